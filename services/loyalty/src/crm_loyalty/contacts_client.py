"""The contacts service as this service sees it: the shared lookup
(`crm_common.clients.ContactsLookup`), which asks with the platform's own
credentials and the acting user's token; an unknown contact is `NotFound`, a
contact outside the caller's reach `PermissionDenied`, and when contacts cannot
answer, `Unavailable`: no member is enrolled."""

from __future__ import annotations

from crm_common.clients import ContactsLookup as GrpcContacts

__all__ = ["GrpcContacts"]
