"""What a caller may see of the 360 view, for both adapters.

The rules are the platform's access policy (`crm_common/auth/access.yaml`),
applied through the API process's `AccessGate`:

- fields (`fields.analytics`): dotted paths of the reply only some roles see;
  everyone else gets them left out (REST) or cleared (gRPC). A timeline
  summary that names a deal's amount (`Deal Gears opened (1200.00 EUR)`) is
  shown without it to whoever may not see `deals.amount`.
- pseudonyms (`pseudonymised.analytics.GetCustomer360`): personal text only
  some roles may read in clear (the subjects of the customer's cases) is
  replaced by a stable pseudonym for the roles the policy names (analysts).
- partners (`partners`): a partner reads only the customers whose document
  carries its tag; any other customer, known or not, is refused with
  PERMISSION_DENIED / 403 (the same answer either way, so a partner cannot
  probe which customers exist).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from crm_analytics.document import Customer360
from crm_analytics.query import Customer360Queries
from crm_common.auth.gate import AccessGate
from crm_common.auth.principal import Principal, current_principal
from crm_common.errors import NotFound, PermissionDenied, Unauthenticated

OPERATION = "GetCustomer360"
#: The restricted path whose value the deals' timeline summaries repeat.
AMOUNT_PATH = "deals.amount"
# " (1200.00 EUR)" at the end of a summary: what from_pipeline appends to name the amount.
_AMOUNT_IN_SUMMARY = re.compile(r" \(-?\d+(?:\.\d+)? [A-Z]{3}\)$")


def principal() -> Principal:
    """The caller the gate admitted for this request."""
    admitted = current_principal.get()
    if admitted is None:
        # Only reachable if a route or method escaped the gate: refuse, never guess.
        raise Unauthenticated("the request was not authenticated")
    return admitted


def without_amounts(doc: Customer360) -> Customer360:
    """The document with the amounts taken out of its timeline's summaries."""
    timeline = [
        {**e, "summary": _AMOUNT_IN_SUMMARY.sub("", e.get("summary", ""))}
        if e.get("source") == "pipeline"
        else e
        for e in doc.get("timeline", [])
    ]
    return {**doc, "timeline": timeline}  # type: ignore[typeddict-item]


@dataclass(frozen=True)
class Visible:
    """The customer's document for one caller, and how its reply is to be shaped."""

    doc: Customer360
    #: Reply paths to leave out (REST) or clear (gRPC).
    hidden: frozenset[str]
    #: Reply paths whose text the caller gets as a pseudonym.
    pseudonymised: frozenset[str]


async def customer360_for(
    queries: Customer360Queries,
    gate: AccessGate,
    caller: Principal,
    customer_id: str,
    wait_for: Mapping[str, int] | None = None,
    timeout_ms: int | None = None,
) -> Visible:
    """The customer's document as `caller` may see it, and what its reply hides."""
    grant = gate.policy.grant(caller)  # PermissionDenied for a partner without a grant
    try:
        doc = await queries.get_customer360(customer_id, wait_for, timeout_ms)
    except NotFound:
        if grant is None:
            raise
        doc = None
    if grant is not None and (doc is None or grant.tag not in doc.get("tags", [])):
        raise PermissionDenied(
            f"partner {grant.client!r} may read only customers tagged {grant.tag!r}; "
            f"customer {customer_id[:200]!r} is not one of them"
        )
    assert doc is not None
    hidden = gate.hidden_fields(caller)
    if AMOUNT_PATH in hidden:
        doc = without_amounts(doc)
    return Visible(doc, hidden, gate.pseudonymised_fields(caller, OPERATION))
