"""What every contact shares, person or company: its kind, its lifecycle stage
and its interaction log."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from eventsourcing.domain import Aggregate, event

from crm_common.errors import ValidationFailed
from crm_contacts.domain.channels import Channel, ConsentStatus
from crm_contacts.domain.interactions import Interaction, most_recent
from crm_contacts.domain.lifecycle import CUSTOMER_ALREADY, LifecycleStage


class ContactKind(StrEnum):
    PERSON = "person"
    COMPANY = "company"


class Contact(Aggregate):
    """What persons and companies share: an interaction log and a lifecycle stage."""

    KIND: ClassVar[ContactKind]

    class InteractionLogged(Aggregate.Event):
        interaction: dict[str, Any]

    if TYPE_CHECKING:  # set by each kind's registration (not an event field)
        interactions: list[Interaction]

    @property
    def display_name(self) -> str:
        raise NotImplementedError

    @property
    def lifecycle_stage(self) -> LifecycleStage:
        raise NotImplementedError

    def change_stage(self, stage: LifecycleStage) -> list[str]:
        """Moves the contact to `stage` (funnel rules apply); returns what changed."""
        raise NotImplementedError

    def log_interaction(self, interaction: Interaction) -> None:
        self._interaction_logged(interaction=interaction.to_dict())

    @event(InteractionLogged)
    def _interaction_logged(self, interaction: dict[str, Any]) -> None:
        self.interactions.append(Interaction.from_dict(interaction))

    def record_consent(
        self, channel: Channel, address: str, status: ConsentStatus, source: str, at: datetime
    ) -> None:
        raise ValidationFailed.of("address", f"a {self.KIND} has no {channel} identities")

    def become_customer(self) -> bool:
        """A deal of this contact was won: it is a customer from now on.

        A customer or advocate stays as it is (nothing is recorded), so a won
        deal never moves a contact back in the funnel; any other stage,
        churned and lost included, moves forward to customer. Returns whether
        the stage changed.
        """
        if self.lifecycle_stage in CUSTOMER_ALREADY:
            return False
        return bool(self.change_stage(LifecycleStage.CUSTOMER))

    def recent_interactions(self, limit: int) -> list[Interaction]:
        """Newest first by occurrence; equal times in the order they were logged."""
        return most_recent(self.interactions, limit)
