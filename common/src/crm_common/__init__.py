"""Shared plumbing of the CRM services.

Nothing here knows a business rule: event store setup, the command bus,
the relay, projection consumers, gRPC/HTTP bootstrap, errors and telemetry.
"""
