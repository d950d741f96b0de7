"""What the pipeline does when contacts erases a person or merges contacts.

`PipelineContactChanges` is the `crm_common.contact_events.ContactChanges`
the `crm-pipeline follow` process hands to its `ContactEventsFollower`: each
change becomes commands of `PipelineService` (the rules are there and in
the domain), with request ids derived from the contacts event, so a record
handled twice changes nothing the second time.
"""

from __future__ import annotations

import logging

from crm_common.contact_events import ContactChange
from crm_pipeline.application import PipelineService

log = logging.getLogger(__name__)


class PipelineContactChanges:
    """Erasures and merges of contacts, as the pipeline honours them."""

    def __init__(self, service: PipelineService) -> None:
        self.service = service

    async def person_erased(self, change: ContactChange) -> None:
        erasure = await self.service.erase_person(
            change.contact_id, change.others, change.reference, change.event_id, change.actor
        )
        log.info(
            "person %s erased (%s): %d keys destroyed of %d subjects; %d deals, %d leads,"
            " %d activities held",
            change.contact_id,
            change.reference,
            erasure.destroyed,
            len(erasure.subjects),
            len(erasure.deals),
            len(erasure.leads),
            len(erasure.activities),
        )

    async def contacts_merged(self, change: ContactChange) -> None:
        moved = await self.service.move_customers(
            change.contact_id, change.others, change.reference, change.event_id, change.actor
        )
        log.info(
            "contacts %s merged into %s (merge %s): %d records moved",
            ", ".join(change.others),
            change.contact_id,
            change.reference,
            moved,
        )

    async def merge_undone(self, change: ContactChange) -> None:
        moved = await self.service.undo_customer_moves(
            change.contact_id, change.others, change.reference, change.event_id, change.actor
        )
        log.info(
            "merge %s into %s undone: %d records moved back to %s",
            change.reference,
            change.contact_id,
            moved,
            ", ".join(change.others),
        )
