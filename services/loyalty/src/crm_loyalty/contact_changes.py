"""Loyalty honours the contacts topic: erased persons, merges and their undo.

`LoyaltyContactChanges` is the `crm_common.contact_events.ContactChanges` of
the loyalty service; `crm-loyalty ingest` (= `follow`) runs a
`ContactEventsFollower` with it beside the ERP order ingest
(`crm_common.lifecycle.run_together`),
in one process under one stop signal and one health endpoint
(`crm_common.health.JointHeartbeat`: alive and ready only while both
consumers are).

- **Erased** (`person_erased`): the data keys of the members of the person
  and of every contact merged into them are destroyed: birthday and referrer
  read as not given everywhere, the ledger (points, lots, tier) stays, and
  enrolling any of them again is refused.
- **Merged** (`contacts_merged`): each merged contact's membership moves onto
  the survivor's (`LoyaltyService.merge_members`).
- **Merge undone** (`merge_undone`): what that merge moved goes back
  (`LoyaltyService.unmerge_members`).

Each command's request id derives from the contacts event
(`contacts-merge:<event id>:<merged contact>`), and the members themselves
remember which merges they took over, so a redelivered event writes nothing.
"""

from __future__ import annotations

from crm_common.commands import Caller
from crm_common.contact_events import ContactChange
from crm_loyalty.application import LoyaltyService

#: The client the follower's commands are recorded with.
CLIENT = "crm-loyalty-contacts-follower"


class LoyaltyContactChanges:
    """What loyalty does on each change of the contacts topic (all idempotent)."""

    def __init__(self, service: LoyaltyService) -> None:
        self.service = service

    async def person_erased(self, change: ContactChange) -> None:
        await self.service.erase_members((change.contact_id, *change.others))

    async def contacts_merged(self, change: ContactChange) -> None:
        caller = Caller(
            actor=change.actor, client=CLIENT, request_id=f"contacts-merge:{change.event_id}"
        )
        await self.service.merge_members(caller, change.contact_id, change.others, change.reference)

    async def merge_undone(self, change: ContactChange) -> None:
        caller = Caller(
            actor=change.actor, client=CLIENT, request_id=f"contacts-unmerge:{change.event_id}"
        )
        await self.service.unmerge_members(
            caller, change.contact_id, change.others, change.reference
        )
