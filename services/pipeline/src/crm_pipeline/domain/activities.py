"""`Activity`: a call, mail, meeting or task with a due date on a lead or an
opportunity.

Activities are their own aggregate: they are many, they keep their own
lifecycle (reschedule, complete, cancel), following up on a won or lost deal
is normal business, and scheduling one must not contend for the deal's
version with the salesperson editing the deal.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate

from crm_common.errors import RuleViolated
from crm_common.privacy.declaration import REDACTED, PersonalData
from crm_pipeline.domain.customers import apply_move, move_customers, undo_customer_moves
from crm_pipeline.domain.leads import Lead
from crm_pipeline.domain.opportunities import Opportunity
from crm_pipeline.domain.values import check_aware


class Activity(Aggregate):
    """A call, mail, meeting or task due on a lead or an opportunity."""

    class Scheduled(Aggregate.Created):
        customer_id: str
        subject_kind: str
        subject_id: str
        kind: str
        title: str
        owner: str
        due_at: datetime
        at: datetime
        # A title is free text ("call Ada about her renewal"). The subject is the activity:
        # the customer is unknown ("") while its lead is not converted.
        personal_data = PersonalData("title")

    class Rescheduled(Aggregate.Event):
        customer_id: str
        due_at: datetime
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.due_at = self.due_at

    class Completed(Aggregate.Event):
        customer_id: str
        outcome: str
        at: datetime
        # What came of it, in free text that may name people.
        personal_data = PersonalData("outcome")

        def apply(self, aggregate: Any) -> None:
            aggregate.status = "completed"
            aggregate.outcome = self.outcome
            aggregate.finished_at = self.at

    class Cancelled(Aggregate.Event):
        customer_id: str
        reason: str
        at: datetime
        # Free text too, kept with the outcome.
        personal_data = PersonalData("reason")

        def apply(self, aggregate: Any) -> None:
            aggregate.status = "cancelled"
            aggregate.outcome = self.reason
            aggregate.finished_at = self.at

    class CustomerMoved(Aggregate.Event):
        # A contacts merge (or its undo) moved the activity's customer.
        customer_id: str
        from_customer_id: str
        to_customer_id: str
        merge_id: str
        undone: bool
        fields: list[str]
        at: datetime

        def apply(self, aggregate: Any) -> None:
            apply_move(aggregate, self)

    class PersonalDataErased(Aggregate.Event):
        # The person the activity is about was erased (`reference`: the erasure's);
        # its keys are destroyed, so its texts read as erased from now on. It carries
        # nothing personal: the query tables apply it to drop their copy of the title.
        customer_id: str
        reference: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.title = REDACTED
            aggregate.outcome = REDACTED if aggregate.outcome else ""
            aggregate.personal_data_erased = True

    def __init__(
        self,
        customer_id: str,
        subject_kind: str,
        subject_id: str,
        kind: str,
        title: str,
        owner: str,
        due_at: datetime,
        at: datetime,
    ) -> None:
        self.customer_id = customer_id
        self.subject_kind = subject_kind
        self.subject_id = subject_id
        self.kind = kind
        self.title = title
        self.owner = owner
        self.due_at = due_at
        self.scheduled_at = at
        self.status = "open"
        self.outcome = ""
        self.finished_at: datetime | None = None
        self.customer_moves: list[dict[str, Any]] = []
        self.personal_data_erased = False

    @classmethod
    def schedule(
        cls,
        *,
        subject: Lead | Opportunity,
        kind: str,
        title: str,
        owner: str,
        due_at: datetime,
        at: datetime,
    ) -> Activity:
        check_aware("due_at", due_at)
        check_aware("at", at)
        return cls._create(
            cls.Scheduled,
            customer_id=subject.customer_id,
            subject_kind="lead" if isinstance(subject, Lead) else "opportunity",
            subject_id=str(subject.id),
            kind=kind,
            title=title,
            owner=owner,
            due_at=due_at,
            at=at,
        )

    def _ensure_open(self) -> None:
        if self.status != "open":
            raise RuleViolated(f"activity {self.id} is already {self.status}")

    def reschedule(self, due_at: datetime, at: datetime) -> None:
        check_aware("due_at", due_at)
        check_aware("at", at)
        self._ensure_open()
        if due_at != self.due_at:
            self.trigger_event(self.Rescheduled, customer_id=self.customer_id, due_at=due_at, at=at)

    def complete(self, outcome: str, at: datetime) -> None:
        check_aware("at", at)
        self._ensure_open()
        self.trigger_event(self.Completed, customer_id=self.customer_id, outcome=outcome, at=at)

    def cancel(self, reason: str, at: datetime) -> None:
        check_aware("at", at)
        self._ensure_open()
        self.trigger_event(self.Cancelled, customer_id=self.customer_id, reason=reason, at=at)

    def move_customer(self, merged: list[str], to_id: str, merge_id: str, at: datetime) -> int:
        """The activity's customer, if one of `merged`, becomes `to_id`."""
        return move_customers(self, ("customer_id",), merged, to_id, merge_id, at)

    def undo_customer_move(
        self, merge_id: str, at: datetime, restored: list[str] | None = None
    ) -> int:
        """Gives back what merge `merge_id` moved."""
        return undo_customer_moves(self, merge_id, at, restored)

    def erase_personal_data(self, reference: str, at: datetime) -> bool:
        """Records that the activity's person was erased (once); True when recorded."""
        check_aware("at", at)
        if getattr(self, "personal_data_erased", False):
            return False
        self.trigger_event(
            self.PersonalDataErased, customer_id=self.customer_id, reference=reference, at=at
        )
        return True
