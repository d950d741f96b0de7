"""Errors every service raises, and how they look on the wire.

The mapping to gRPC status codes and HTTP statuses lives here once, so a
client sees the same error the same way on every service and protocol.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class CrmError(Exception):
    """Base of the errors a caller is meant to see."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationFailed(CrmError):
    """The input is malformed; nothing was written."""

    def __init__(self, errors: list[FieldError] | FieldError) -> None:
        self.errors = [errors] if isinstance(errors, FieldError) else list(errors)
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in self.errors))

    @classmethod
    def of(cls, field: str, message: str) -> ValidationFailed:
        return cls(FieldError(field, message))


class NotFound(CrmError):
    """The addressed entity does not exist."""

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"{kind} {ident!r} not found")
        self.kind = kind
        self.ident = ident


class VersionConflict(CrmError):
    """The client's expected version is stale; nothing was written."""

    def __init__(self, ident: str, expected: int, actual: int) -> None:
        super().__init__(f"{ident} is at version {actual}, the command expected version {expected}")
        self.ident = ident
        self.expected = expected
        self.actual = actual


class RuleViolated(CrmError):
    """A business rule refuses the command in the entity's current state."""


@dataclass(frozen=True)
class InTheWay:
    """What an `AlreadyExists` refusal names: a record of `kind` with id `ident`."""

    kind: str
    ident: str
    description: str = ""


class AlreadyExists(RuleViolated):
    """Nothing was written: what the command would create, or a value it would
    take, exists already (gRPC ALREADY_EXISTS with an ErrorInfo `reason` and a
    ResourceInfo per record in the way; HTTP 409 naming them). To code that
    handles refusals in general it is a `RuleViolated`."""

    reason = "ALREADY_EXISTS"

    def metadata(self) -> dict[str, str]:
        """The ErrorInfo's metadata."""
        return {}

    def in_the_way(self) -> list[InTheWay]:
        return []

    def body(self) -> dict[str, object]:
        """What the REST body adds to `error` and `message`."""
        return {"reason": self.reason}


class WaitTimedOut(CrmError):
    """A read-your-writes wait did not see the write in time."""


class Unavailable(CrmError):
    """A service this one depends on (another service's API) could not be reached.

    Not a refusal of the caller's input: nothing was written, and the same
    request may succeed when retried later.
    """


class Unauthenticated(CrmError):
    """The request carries no valid credentials; nothing was read or written."""


class PermissionDenied(CrmError):
    """The authenticated caller may not do this; nothing was read or written."""


class RateLimited(CrmError):
    """The client sent more requests than it may; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IdempotencyKeyReused(CrmError):
    """A request id was used before for a different request; nothing was written."""


class FieldErrors:
    """Collects field errors while validating a whole request."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def add(self, field: str, message: str) -> None:
        self.errors.append(FieldError(field, message))

    def raise_if_any(self) -> None:
        if self.errors:
            raise ValidationFailed(self.errors)


class RequestTooLarge(CrmError):
    """The request is larger than the service accepts; it was not read whole, nothing
    was written (HTTP 413, gRPC RESOURCE_EXHAUSTED)."""


class MalformedRequest(CrmError):
    """The request cannot be parsed at all (not JSON, not UTF-8, not a protobuf
    message of the method's type); nothing was written (HTTP 400, gRPC INVALID_ARGUMENT)."""
