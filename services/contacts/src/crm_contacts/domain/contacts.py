"""What every contact shares, person or company: its kind, its lifecycle stage
and its interaction log."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

from eventsourcing.domain import Aggregate, event

from crm_common.errors import ValidationFailed
from crm_common.privacy.declaration import PersonalData
from crm_contacts.domain.channels import Channel, ConsentStatus
from crm_contacts.domain.interactions import Interaction, most_recent
from crm_contacts.domain.lifecycle import (
    LifecycleRule,
    LifecycleStage,
    stage_after_rule,
)


class ContactKind(StrEnum):
    PERSON = "person"
    COMPANY = "company"


@dataclass(frozen=True)
class MergeRecord:
    """What a survivor's merge changed, kept for an undo (`domain.merging`)."""

    merge_id: str
    merged_ids: tuple[str, ...]
    before: Mapping[str, Any]
    after: Mapping[str, Any]
    interactions_added: tuple[str, ...]
    affiliations_added: tuple[str, ...]
    at: datetime
    undone: bool = False


class Contact(Aggregate):
    """What persons and companies share: an interaction log and a lifecycle stage."""

    KIND: ClassVar[ContactKind]

    if TYPE_CHECKING:  # set by the merge events only (contacts older than merging lack them)
        _survivor_id: str | None
        _merge_records: dict[str, MergeRecord]
        _erased: bool  # set by `Person.PersonErased` only

    @property
    def merged_into(self) -> str | None:
        """The survivor's id when this contact was merged into it (a tombstone)."""
        return getattr(self, "_survivor_id", None)

    @property
    def erased(self) -> bool:
        """Whether the person was erased (`Person.PersonErased`); a company never is."""
        return bool(getattr(self, "_erased", False))

    @property
    def merges(self) -> Mapping[str, MergeRecord]:
        """The merges this contact survived, by merge id (see `domain.merging`)."""
        return MappingProxyType(getattr(self, "_merge_records", {}))

    class InteractionLogged(Aggregate.Event):
        interaction: dict[str, Any]
        # A summary is free text about what was said (to a company too, naming people).
        personal_data = PersonalData("interaction.summary")

    class ContactsMerged(Aggregate.Event):
        """This contact survived a merge: its profile before and after, and
        what it took over from the others."""

        merge_id: str
        merged_ids: list[str]
        before: dict[str, Any]
        after: dict[str, Any]
        interactions: list[dict[str, Any]]
        affiliations: list[dict[str, str]]
        at: datetime
        actor: str
        # A person's profile fields (see `Person`; for companies it seals their custom
        # field values too), and the interaction summaries and roles taken over.
        personal_data = PersonalData(
            "before.given_name",
            "before.family_name",
            "before.channels.*.address",
            "before.custom_fields.*.value",
            "after.given_name",
            "after.family_name",
            "after.channels.*.address",
            "after.custom_fields.*.value",
            "interactions.*.summary",
            "affiliations.*.role",
        )

    class ContactMergedInto(Aggregate.Event):
        merge_id: str
        survivor_id: str
        at: datetime
        actor: str

    class ContactMergeUndone(Aggregate.Event):
        """A merge this contact survived was undone: what it gave back."""

        merge_id: str
        restored_ids: list[str]
        profile: dict[str, Any]
        interactions: list[str]
        affiliations: list[str]
        at: datetime
        actor: str
        # The profile as it is after the undo: the same fields as `ContactsMerged`'s.
        personal_data = PersonalData(
            "profile.given_name",
            "profile.family_name",
            "profile.channels.*.address",
            "profile.custom_fields.*.value",
        )

    class ContactUnmerged(Aggregate.Event):
        merge_id: str
        at: datetime
        actor: str

    if TYPE_CHECKING:  # set by each kind's registration (not an event field)
        interactions: list[Interaction]

    @property
    def display_name(self) -> str:
        raise NotImplementedError

    @property
    def lifecycle_stage(self) -> LifecycleStage:
        raise NotImplementedError

    def change_stage(self, stage: LifecycleStage, cause: str = "") -> list[str]:
        """Moves the contact to `stage` (funnel rules apply); returns what changed.
        `cause` is recorded with the change (a lifecycle rule and what fired it)."""
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

    # -- merging (the rules are in `domain.merging`) --

    def _set_profile(self, profile: dict[str, Any]) -> None:
        raise NotImplementedError

    def _add_affiliations(self, links: list[dict[str, str]]) -> None:
        """Persons keep company links; companies have none."""

    def _remove_affiliations(self, company_ids: list[str]) -> None:
        """Persons keep company links; companies have none."""

    def absorb(self, **fields: Any) -> None:
        self._absorbed(**fields)

    @event(ContactsMerged)
    def _absorbed(
        self,
        merge_id: str,
        merged_ids: list[str],
        before: dict[str, Any],
        after: dict[str, Any],
        interactions: list[dict[str, Any]],
        affiliations: list[dict[str, str]],
        at: datetime,
        actor: str,
    ) -> None:
        self._set_profile(after)
        self.interactions.extend(Interaction.from_dict(i) for i in interactions)
        self._add_affiliations(affiliations)
        record = MergeRecord(
            merge_id,
            tuple(merged_ids),
            before,
            after,
            tuple(i["interaction_id"] for i in interactions),
            tuple(a["company_id"] for a in affiliations),
            at,
        )
        self._merge_records = {**self.merges, merge_id: record}

    def merge_into(self, **fields: Any) -> None:
        self._merged_into(**fields)

    @event(ContactMergedInto)
    def _merged_into(self, merge_id: str, survivor_id: str, at: datetime, actor: str) -> None:
        self._survivor_id = survivor_id

    def give_back(self, **fields: Any) -> None:
        self._merge_undone(**fields)

    @event(ContactMergeUndone)
    def _merge_undone(
        self,
        merge_id: str,
        restored_ids: list[str],
        profile: dict[str, Any],
        interactions: list[str],
        affiliations: list[str],
        at: datetime,
        actor: str,
    ) -> None:
        self._set_profile(profile)
        gone = set(interactions)
        self.interactions = [i for i in self.interactions if i.interaction_id not in gone]
        self._remove_affiliations(affiliations)
        self._merge_records = {**self.merges, merge_id: replace(self.merges[merge_id], undone=True)}

    def unmerge(self, **fields: Any) -> None:
        self._unmerged(**fields)

    @event(ContactUnmerged)
    def _unmerged(self, merge_id: str, at: datetime, actor: str) -> None:
        self._survivor_id = None

    def follow_rule(self, rule: LifecycleRule, cause: str) -> bool:
        """Moves the stage as the lifecycle `rule` says, recording `cause`;
        False (and no event) when the rule leaves this contact where it is."""
        target = stage_after_rule(rule, self.lifecycle_stage)
        if target is None:
            return False
        return bool(self.change_stage(target, cause=f"{rule}: {cause}" if cause else str(rule)))

    def become_customer(self, cause: str = "") -> bool:
        """A deal of this contact was won: it is a customer from now on.

        A customer or advocate stays as it is (nothing is recorded), so a won
        deal never moves a contact back in the funnel; any other stage,
        churned and lost included, moves forward to customer. Returns whether
        the stage changed.
        """
        return self.follow_rule(LifecycleRule.DEAL_WON, cause)

    def recent_interactions(self, limit: int) -> list[Interaction]:
        """Newest first by occurrence; equal times in the order they were logged."""
        return most_recent(self.interactions, limit)
