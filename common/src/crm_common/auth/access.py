"""Authorization: which roles may run which operation, from one reviewable file.

The rules live in `access.yaml` beside this module (or the file named by
`CRM_ACCESS_POLICY`): per service, per operation (the gRPC method name; each
REST route carries the same name as its `operation_id`), the roles allowed.
Anything not listed is refused to everyone: a new RPC or route is closed
until someone writes down who may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crm_common.auth.principal import ROLES, Principal
from crm_common.errors import PermissionDenied

DEFAULT_POLICY = Path(__file__).with_name("access.yaml")


class PolicyError(ValueError):
    """The access policy file is malformed."""


@dataclass(frozen=True)
class PartnerGrant:
    """What one partner may reach: the customers carrying its tag."""

    client: str
    tag: str


@dataclass(frozen=True)
class AccessPolicy:
    """Operation -> roles, per service; the fields only some roles see; the bulk
    queries whose personal fields some roles get as pseudonyms; partner grants."""

    operations: Mapping[str, Mapping[str, frozenset[str]]]
    fields: Mapping[str, Mapping[str, frozenset[str]]]
    pseudonymised: Mapping[str, Mapping[str, tuple[frozenset[str], tuple[str, ...]]]] = field(
        default_factory=dict
    )
    partners: Mapping[str, PartnerGrant] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | str = DEFAULT_POLICY) -> AccessPolicy:
        document = yaml.safe_load(Path(path).read_text())
        if not isinstance(document, dict):
            raise PolicyError(f"{path}: not a mapping")
        return cls(
            operations=_table(document.get("operations"), "operations"),
            fields=_table(document.get("fields", {}), "fields"),
            pseudonymised=_pseudonymised(document.get("pseudonymised", {})),
            partners=_partners(document.get("partners", {})),
        )

    def roles_for(self, service: str, operation: str) -> frozenset[str]:
        """The roles that may run the operation; empty when it is not listed."""
        return self.operations.get(service, {}).get(operation, frozenset())

    def is_listed(self, service: str, operation: str) -> bool:
        return operation in self.operations.get(service, {})

    def check(self, principal: Principal, service: str, operation: str) -> None:
        """Raises `PermissionDenied` unless the principal may run the operation.

        A platform service acting for a user needs both its own right to call
        and the user's: a service never widens what its user may do.
        """
        allowed = self.roles_for(service, operation)
        if not principal.roles & allowed:
            raise PermissionDenied(
                f"{operation} is not allowed to the roles {_names(principal.roles)}"
            )
        if principal.on_behalf_of is not None and not principal.on_behalf_of.roles & allowed:
            raise PermissionDenied(
                f"{operation} is not allowed to the acting user's roles "
                f"{_names(principal.on_behalf_of.roles)}"
            )

    def may_see(self, principal: Principal, service: str, field: str) -> bool:
        """Whether the principal may see a restricted field (unrestricted fields: yes)."""
        allowed = self.fields.get(service, {}).get(field)
        return allowed is None or principal.has_any(allowed)

    def hidden_fields(self, principal: Principal, service: str) -> frozenset[str]:
        """The dotted paths of the service's replies this principal may not see."""
        return frozenset(
            path
            for path, roles in self.fields.get(service, {}).items()
            if not principal.has_any(roles)
        )

    def pseudonymised_fields(
        self, principal: Principal, service: str, operation: str
    ) -> frozenset[str]:
        """The personal fields this principal gets only as pseudonyms from a bulk query."""
        rule = self.pseudonymised.get(service, {}).get(operation)
        if rule is None:
            return frozenset()
        roles, paths = rule
        # Roles outside the rule see clear data, unless the principal only holds roles in it.
        return frozenset(paths) if principal.acting_roles <= roles else frozenset()

    def grant(self, principal: Principal) -> PartnerGrant | None:
        """The grant a partner works under; None for everyone else.

        A principal whose only role is `partner` and whose client has no grant is
        refused: a partner sees nothing it was not granted.
        """
        roles = principal.acting_roles
        if "partner" not in roles or roles - {"partner"}:
            return None
        client = principal.on_behalf_of.client if principal.on_behalf_of else principal.client
        grant = self.partners.get(client)
        if grant is None:
            raise PermissionDenied(f"partner {client!r} has no grant")
        return grant


def _pseudonymised(raw: Any) -> dict[str, dict[str, tuple[frozenset[str], tuple[str, ...]]]]:
    if not isinstance(raw, dict):
        raise PolicyError("'pseudonymised' must map services to operations")
    table: dict[str, dict[str, tuple[frozenset[str], tuple[str, ...]]]] = {}
    for service, operations in raw.items():
        table[str(service)] = {}
        for operation, rule in (operations or {}).items():
            roles, paths = rule.get("roles"), rule.get("fields")
            if not isinstance(roles, list) or not isinstance(paths, list):
                raise PolicyError(f"pseudonymised.{service}.{operation} needs roles and fields")
            unknown = sorted(set(roles) - set(ROLES))
            if unknown:
                raise PolicyError(f"pseudonymised.{service}.{operation}: unknown roles {unknown}")
            table[str(service)][str(operation)] = (frozenset(roles), tuple(map(str, paths)))
    return table


def _partners(raw: Any) -> dict[str, PartnerGrant]:
    if not isinstance(raw, dict):
        raise PolicyError("'partners' must map partner client ids to their grants")
    grants = {}
    for client, grant in raw.items():
        if not isinstance(grant, dict) or not isinstance(grant.get("tag"), str):
            raise PolicyError(f"partners.{client} needs a 'tag'")
        grants[str(client)] = PartnerGrant(str(client), grant["tag"])
    return grants


def _names(roles: frozenset[str]) -> str:
    return ", ".join(sorted(roles)) or "(none)"


def _table(raw: Any, what: str) -> dict[str, dict[str, frozenset[str]]]:
    if not isinstance(raw, dict):
        raise PolicyError(f"'{what}' must map services to their {what}")
    table: dict[str, dict[str, frozenset[str]]] = {}
    for service, entries in raw.items():
        if not isinstance(entries, dict):
            raise PolicyError(f"{what}.{service} must map names to role lists")
        table[str(service)] = {}
        for name, roles in entries.items():
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise PolicyError(f"{what}.{service}.{name} must be a list of roles")
            unknown = sorted(set(roles) - set(ROLES))
            if unknown:
                raise PolicyError(f"{what}.{service}.{name}: unknown roles {unknown}")
            table[str(service)][str(name)] = frozenset(roles)
    return table
