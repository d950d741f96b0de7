"""What tickets does when the contacts topic says a person was erased, or
contacts were merged or a merge undone (`crm-tickets follow`, through
`crm_common.contact_events.ContactEventsFollower`).

- **Erased:** the keys of the person and of every contact merged into them
  earlier are destroyed. Every case text is sealed under the key of the
  customer it was written for, so this erases the subjects, descriptions,
  replies, notes and survey comments of all their cases at once, including
  the texts of cases that came to the person through a merge (sealed under
  the merged contact's key). Statuses, SLA clocks and scores stay.
- **Merged:** every case of the merged contacts moves to the survivor (a
  `Case.CustomerMoved` per case); the customer's case list follows.
- **Undone:** the cases that merge moved go back to the restored contacts,
  with what happened to them since.

Every handler is idempotent: destroying a key twice is harmless, and each
move is a command whose request id is derived from the contacts event and
the case, which the case itself would refuse to repeat anyway.
"""

from __future__ import annotations

import asyncio
import logging

from crm_common.contact_events import ContactChange
from crm_common.errors import RuleViolated
from crm_tickets.application import TicketsService

log = logging.getLogger(__name__)


class TicketsContactChanges:
    """`ContactChanges` of the tickets service."""

    def __init__(self, service: TicketsService) -> None:
        self.service = service

    async def person_erased(self, change: ContactChange) -> None:
        subjects = (change.contact_id, *change.others)
        try:
            destroyed = await asyncio.to_thread(self.service.erase_customer, subjects)
        except RuleViolated:
            log.error(
                "erase of %s (%s) cannot be honoured: no master keys configured",
                change.contact_id,
                change.reference,
            )
            raise
        log.info(
            "customer erased: %s (%s), %d keys destroyed of %d contacts",
            change.contact_id,
            change.reference,
            destroyed,
            len(subjects),
        )

    async def contacts_merged(self, change: ContactChange) -> None:
        moved = await self.service.move_customer_cases(
            merged=change.others,
            survivor=change.contact_id,
            merge_id=change.reference,
            event_id=change.event_id,
            actor=change.actor,
        )
        log.info("merge %s: %d cases moved to %s", change.reference, moved, change.contact_id)

    async def merge_undone(self, change: ContactChange) -> None:
        given = await self.service.give_back_customer_cases(
            survivor=change.contact_id,
            restored=change.others,
            merge_id=change.reference,
            event_id=change.event_id,
            actor=change.actor,
        )
        log.info(
            "merge %s undone: %d cases given back by %s", change.reference, given, change.contact_id
        )
