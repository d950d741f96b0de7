"""`Lead`: a prospect with source and campaign; qualified with a score,
disqualified with a reason, or converted into an opportunity linked to a
person and (optionally) a company of the contacts service.

Methods take values `crm_pipeline.validation` has already checked; they
refuse with `RuleViolated` what the lead's state does not allow, before any
event is triggered, so a refused command changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate

from crm_common.errors import RuleViolated, ValidationFailed
from crm_common.privacy.declaration import PersonalData
from crm_pipeline.domain.customers import (
    CUSTOMER_FIELDS,
    apply_move,
    move_customers,
    undo_customer_moves,
)
from crm_pipeline.domain.values import check_aware


class Lead(Aggregate):
    """A prospect not yet known to be a customer."""

    class Created(Aggregate.Created):
        customer_id: str
        given_name: str
        family_name: str
        company_name: str
        email: str
        phone: str
        source: str
        campaign: str
        owner: str
        at: datetime
        #: The tag of the partner that brought the lead ("" for everyone else; absent
        #: from leads stored before partners could create them).
        partner_tag: str
        # The prospect's name and addresses; the company name, source and campaign are not theirs.
        personal_data = PersonalData("given_name", "family_name", "email", "phone")

    class Qualified(Aggregate.Event):
        customer_id: str
        score: int
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.status = "qualified"
            aggregate.score = self.score

    class Disqualified(Aggregate.Event):
        customer_id: str
        reason: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.status = "disqualified"
            aggregate.disqualify_reason = self.reason

    class Converted(Aggregate.Event):
        customer_id: str
        person_id: str
        company_id: str
        opportunity_id: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.status = "converted"
            aggregate.customer_id = self.customer_id
            aggregate.person_id = self.person_id
            aggregate.company_id = self.company_id
            aggregate.opportunity_id = self.opportunity_id
            aggregate.converted_at = self.at

    class CustomerMoved(Aggregate.Event):
        # A contacts merge (or its undo) moved the person or company the lead was
        # converted into (`fields`); `customer_id` is the lead's customer after the move.
        customer_id: str
        from_customer_id: str
        to_customer_id: str
        merge_id: str
        undone: bool
        fields: list[str]
        at: datetime

        def apply(self, aggregate: Any) -> None:
            apply_move(aggregate, self)

    def __init__(
        self,
        customer_id: str,
        given_name: str,
        family_name: str,
        company_name: str,
        email: str,
        phone: str,
        source: str,
        campaign: str,
        owner: str,
        at: datetime,
        partner_tag: str = "",
    ) -> None:
        self.customer_id = customer_id
        self.given_name = given_name
        self.family_name = family_name
        self.company_name = company_name
        self.email = email
        self.phone = phone
        self.source = source
        self.campaign = campaign
        self.owner = owner
        self.created_at = at
        self.partner_tag = partner_tag
        self.status = "new"
        self.score: int | None = None
        self.disqualify_reason = ""
        self.person_id = ""
        self.company_id = ""
        self.opportunity_id = ""
        self.converted_at: datetime | None = None
        self.customer_moves: list[dict[str, Any]] = []

    @classmethod
    def create(
        cls,
        *,
        given_name: str = "",
        family_name: str,
        company_name: str = "",
        email: str = "",
        phone: str = "",
        source: str,
        campaign: str = "",
        owner: str,
        at: datetime,
        partner_tag: str = "",
    ) -> Lead:
        check_aware("at", at)
        return cls._create(
            cls.Created,
            customer_id="",
            given_name=given_name,
            family_name=family_name,
            company_name=company_name,
            email=email,
            phone=phone,
            source=source,
            campaign=campaign,
            owner=owner,
            at=at,
            partner_tag=partner_tag,
        )

    @property
    def display_name(self) -> str:
        """What a deal made from this lead is called unless it is named."""
        return self.company_name or f"{self.given_name} {self.family_name}".strip()

    def _ensure_open(self, action: str) -> None:
        if self.status == "converted":
            raise RuleViolated(f"lead {self.id} was converted; it cannot be {action}")
        if self.status == "disqualified":
            raise RuleViolated(f"lead {self.id} is disqualified; it cannot be {action}")

    def qualify(self, score: int, at: datetime) -> None:
        check_aware("at", at)
        self._ensure_open("qualified")
        self.trigger_event(self.Qualified, customer_id=self.customer_id, score=score, at=at)

    def disqualify(self, reason: str, at: datetime) -> None:
        check_aware("at", at)
        self._ensure_open("disqualified")
        self.trigger_event(self.Disqualified, customer_id=self.customer_id, reason=reason, at=at)

    def ensure_convertible(self) -> None:
        self._ensure_open("converted")
        if self.status != "qualified":
            raise RuleViolated(f"lead {self.id} must be qualified before it is converted")

    def convert(
        self, *, person_id: str, company_id: str, opportunity_id: str, at: datetime
    ) -> None:
        if not person_id:
            raise ValidationFailed.of("person_id", "is required")
        check_aware("at", at)
        self.ensure_convertible()
        self.trigger_event(
            self.Converted,
            customer_id=company_id or person_id,
            person_id=person_id,
            company_id=company_id,
            opportunity_id=opportunity_id,
            at=at,
        )

    def move_customer(self, merged: list[str], to_id: str, merge_id: str, at: datetime) -> int:
        """The person or company the lead was converted into that is one of `merged`
        becomes `to_id`; returns how many moves were recorded."""
        return move_customers(self, CUSTOMER_FIELDS, merged, to_id, merge_id, at)

    def undo_customer_move(
        self, merge_id: str, at: datetime, restored: list[str] | None = None
    ) -> int:
        """Gives back what merge `merge_id` moved; returns how many moves were recorded."""
        return undo_customer_moves(self, merge_id, at, restored)
