"""The department consoles of the CRM platform: one process per console (sales,
service, marketing, management), each serving its pages and a thin
backend-for-frontend that forwards `/api/<service>/...` to the platform's
public REST APIs with the signed-in user's token."""
