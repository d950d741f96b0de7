"""The tickets application layer, shared by the gRPC and REST adapters and the
SLA scanner.

Writes go through the shared command bus (optimistic concurrency, request-id
replay, audit metadata, group commit); single aggregates are read from the
event store; the team queue, the due deadlines, each customer's cases and SLA
compliance come from the query tables of `crm_tickets.deadlines`, in the
service's own database, which follow the event store's notification log.

Opening a case checks its contact with the contacts service first, through
`ContactsPort`, so the transport (gRPC in production) stays out of this layer.

The customer tier comes from the loyalty service through `TierPort` (gRPC
`GetTier` with a short deadline in production): when loyalty does not know the
customer as a member, cannot be reached, does not answer in time or refuses,
the case gets `DEFAULT_TIER` and records why (`tier_source` "default: not a
member", "default: loyalty unreachable", ...). The port never raises.

SLA deadlines are raised by `raise_due_deadlines` (the scanner of every API
process, and the `sla` process): each deadline is one `RaiseSlaDeadline`
command whose request id is derived from (case, kind, warning or breach,
deadline version). A second replica or a restarted scanner running the same
command is answered from its receipt; and the case itself refuses to raise a
target's warning or breach twice, so even after receipts expire nothing is
raised again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from crm_common.commands import Caller, CommandBus, UnitOfWork
from crm_common.errors import NotFound, RuleViolated, ValidationFailed
from crm_common.eventstore import SnapshottingApplication, application_env, creating_tables
from crm_common.querystore import QueryDatabase
from crm_common.settings import Settings
from crm_tickets import validation
from crm_tickets.deadlines import (
    DUE_PAGE,
    QueueEntry,
    SurveyRow,
    TicketsQuery,
    micros,
    month_start,
    week_start,
)
from crm_tickets.domain import (
    DEFAULT_TIER,
    PRIORITIES,
    TIERS,
    BusinessCalendar,
    Case,
    Deadline,
    SlaPolicy,
    policy_terms,
)
from crm_tickets.inputs import NewCase, SlaTermsInput, SurveyInput, Triage
from crm_tickets.views import (
    CasePage,
    CaseView,
    ComplianceView,
    PolicyView,
    SatisfactionPeriodView,
    SatisfactionTrendView,
    TargetComplianceView,
    Written,
    case_view,
    view_of,
)

SERVICE = "tickets"
log = logging.getLogger(__name__)

#: How long after solving a case the customer (or an agent) may reopen it.
DEFAULT_REOPEN_WINDOW_SECONDS = 7 * 24 * 3600
HOUR = 3600

#: The terms of a case opened without a policy: Monday to Friday 09:00-17:00 UTC,
#: the same targets for every tier (business hours: first reply, next reply after
#: each customer reply, resolution).
DEFAULT_TERMS = policy_terms(
    targets={
        tier: {
            "urgent": {"first_response": HOUR, "next_reply": HOUR, "resolution": 8 * HOUR},
            "high": {"first_response": 4 * HOUR, "next_reply": 4 * HOUR, "resolution": 16 * HOUR},
            "normal": {"first_response": 8 * HOUR, "next_reply": 8 * HOUR, "resolution": 40 * HOUR},
            "low": {"first_response": 16 * HOUR, "next_reply": 16 * HOUR, "resolution": 80 * HOUR},
        }
        for tier in TIERS
    },
    calendar=BusinessCalendar(),
    warning_seconds=HOUR,
    pause_on_hold=False,
    escalate_priority=True,
    escalate_team="",
)
assert set(DEFAULT_TERMS["targets"][DEFAULT_TIER]) == set(PRIORITIES)

#: Who the SLA scanner's commands are recorded as.
SLA_CALLER = Caller(actor="service:tickets", client="tickets-sla")
#: The client of the commands the contacts follower runs (the actor is whoever
#: merged or undid the merge in contacts).
CONTACTS_FOLLOWER = "tickets-contacts-follower"


class TicketsApplication(SnapshottingApplication):
    """The event store of cases and SLA policies."""

    name = "tickets"
    #: A case's replies, notes and SLA clocks are its events.
    snapshot_kinds = (Case,)
    #: The settings it was made with: the query tables live in the same database.
    settings: Settings


def create_application(settings: Settings) -> TicketsApplication:
    """The application on the configured event store (SQLite or PostgreSQL)."""
    with creating_tables(settings):
        app = TicketsApplication(env=application_env(settings))
    app.settings = settings
    return app


class ContactsPort(Protocol):
    """What opening a case needs from the contacts service."""

    async def ensure_exists(self, contact_id: str) -> None:
        """Raises NotFound unless `contact_id` is a contact (person or company)."""


@dataclass(frozen=True)
class TierAnswer:
    """A customer's tier and where it came from ("loyalty" or "default: <why>")."""

    tier: str
    source: str


class TierPort(Protocol):
    """What opening a case needs from the loyalty service."""

    async def tier_of(self, contact_id: str) -> TierAnswer:
        """The customer's tier; the default tier (with the reason) when there is none.
        Never raises, never waits beyond its own short deadline."""


NO_LOYALTY = TierAnswer(DEFAULT_TIER, "default: loyalty not configured")


class TicketsService:
    """Use cases of the tickets service; both adapters and the scanner call these."""

    def __init__(
        self,
        app: TicketsApplication,
        contacts: ContactsPort | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        reopen_window_seconds: int = DEFAULT_REOPEN_WINDOW_SECONDS,
        tiers: TierPort | None = None,
        query: TicketsQuery | None = None,
    ) -> None:
        self.app = app
        self.contacts = contacts
        self.tiers = tiers
        self.bus = CommandBus(app, SERVICE)
        #: The query tables (opening them reads no log: they are where they were left).
        self.query = query or TicketsQuery(app, QueryDatabase(app.settings))
        self.clock = clock
        self.reopen_window_seconds = reopen_window_seconds

    def close(self) -> None:
        """Stops the command bus (after pending commands), the query tables' follower
        and closes the store."""
        self.bus.close()
        self.query.close()
        self.app.close()

    async def _write(
        self,
        caller: Caller,
        command: str,
        request: tuple[Any, ...],
        decide: Callable[[UnitOfWork], Any],
    ) -> Written:
        outcome = await self.bus.execute_async(caller.command(command, *request), decide)
        subject = outcome.subject
        if subject is None:  # a replay: the subject as it is now
            subject = await asyncio.to_thread(self._load, outcome.id)
        return Written(outcome, view_of(subject, self.clock()))

    def _load(self, ident: str) -> Any:
        try:
            return self.app.repository.get(UUID(ident))
        except (AggregateNotFoundError, ValueError):
            raise NotFound("Case", ident) from None

    # -- cases

    async def open_case(self, caller: Caller, new: NewCase) -> Written:
        case = validation.new_case(new)
        if self.contacts is None:
            raise NotFound("Contact", case.customer_id)
        await self.contacts.ensure_exists(case.customer_id)
        tier = NO_LOYALTY if self.tiers is None else await self.tiers.tier_of(case.customer_id)

        def decide(uow: UnitOfWork) -> Case:
            policy_id, version, terms = "", 0, DEFAULT_TERMS
            if case.policy_id:
                policy = uow.get(case.policy_id, SlaPolicy, subject=False)
                if policy.retired:
                    raise NotFound("SlaPolicy", case.policy_id)
                policy_id, version, terms = str(policy.id), policy.policy_version, policy.terms
            return uow.add(
                Case.open(
                    customer_id=case.customer_id,
                    channel=case.channel or "",
                    subject=case.subject,
                    description=case.description,
                    category=case.category,
                    priority=case.priority or "normal",
                    team=case.team,
                    assignee=case.assignee,
                    tier=tier.tier,
                    tier_source=tier.source,
                    policy_id=policy_id,
                    policy_version=version,
                    terms=terms,
                    reopen_window_seconds=self.reopen_window_seconds,
                    at=self.clock(),
                )
            )

        return await self._write(caller, "OpenCase", (case,), decide)

    async def _case_command(
        self,
        caller: Caller,
        command: str,
        case_id: str,
        request: tuple[Any, ...],
        change: Callable[[Case, datetime], None],
    ) -> Written:
        def decide(uow: UnitOfWork) -> Case:
            case = uow.get(case_id, Case)
            change(case, self.clock())
            return case

        return await self._write(caller, command, (case_id, *request), decide)

    async def triage_case(self, caller: Caller, case_id: str, change: Triage) -> Written:
        checked = validation.triage(change)
        return await self._case_command(
            caller,
            "TriageCase",
            case_id,
            (checked,),
            lambda c, at: c.triage(
                category=checked.category,
                priority=checked.priority or "",
                team=checked.team,
                at=at,
            ),
        )

    async def assign_case(self, caller: Caller, case_id: str, assignee: str) -> Written:
        who = validation.body("assignee", assignee)
        return await self._case_command(
            caller, "AssignCase", case_id, (who,), lambda c, at: c.assign(who, at)
        )

    async def reply_to_case(
        self, caller: Caller, case_id: str, author_kind: str | None, body: str
    ) -> Written:
        kind = author_kind or "agent"
        if kind not in ("agent", "customer"):
            raise ValidationFailed.of("author_kind", "must be agent or customer")
        text = validation.body("body", body)
        return await self._case_command(
            caller,
            "ReplyToCase",
            case_id,
            (kind, text),
            lambda c, at: c.reply(author=caller.actor, author_kind=kind, body=text, at=at),
        )

    async def add_internal_note(self, caller: Caller, case_id: str, body: str) -> Written:
        text = validation.body("body", body)
        return await self._case_command(
            caller,
            "AddInternalNote",
            case_id,
            (text,),
            lambda c, at: c.add_note(author=caller.actor, body=text, at=at),
        )

    async def change_case_status(self, caller: Caller, case_id: str, status: str | None) -> Written:
        checked = validation.status(status)
        return await self._case_command(
            caller,
            "ChangeCaseStatus",
            case_id,
            (checked,),
            lambda c, at: c.change_status(checked, at),
        )

    async def record_satisfaction(
        self, caller: Caller, case_id: str, response: SurveyInput
    ) -> Written:
        checked = validation.survey(response)
        return await self._case_command(
            caller,
            "RecordSatisfaction",
            case_id,
            (checked,),
            lambda c, at: c.record_satisfaction(
                csat=checked.csat, ces=checked.ces, nps=checked.nps, comment=checked.comment, at=at
            ),
        )

    async def get_case(self, case_id: str) -> CaseView:
        case = await asyncio.to_thread(self._load, case_id)
        if not isinstance(case, Case):
            raise NotFound("Case", case_id)
        return case_view(case, self.clock())

    async def _page(
        self, rows: list[Any], page: validation.Page, key: Callable[[Any], Any]
    ) -> CasePage:
        """The page's cases, loaded from the store; `rows` is one more than the page
        when there are more (the token is then the key of the page's last row)."""
        chosen = rows[: page.size]
        cases = [await self.get_case(ident) for ident in (self._case_id(r) for r in chosen)]
        more = len(rows) > page.size
        return CasePage(cases, validation.page_token(key(chosen[-1])) if more else "")

    @staticmethod
    def _case_id(row: Any) -> str:
        return row.case_id if isinstance(row, QueueEntry) else str(row[1])

    async def team_queue(self, team: str, page_size: int = 0, page_token: str = "") -> CasePage:
        """A team's unsolved cases by SLA urgency (`TicketsQuery.queue`)."""
        checked = validation.team("team", team)
        page = validation.page(page_size, page_token)
        after = page.key(int, int, int, str)
        rows = await asyncio.to_thread(self.query.queue, checked, after, page.size + 1)
        return await self._page(rows, page, lambda e: e.key)

    async def cases_at_risk(
        self, within_minutes: int, team: str = "", page_size: int = 0, page_token: str = ""
    ) -> CasePage:
        """Unsolved cases with a breach due within `within_minutes`, the nearest first."""
        minutes = validation.within_minutes(within_minutes)
        checked = validation.team("team", team, required=False)
        page = validation.page(page_size, page_token)
        after = page.key(int, int, int, str)
        until = self.clock() + timedelta(minutes=minutes)
        rows = await asyncio.to_thread(self.query.at_risk, until, checked, after, page.size + 1)
        return await self._page(rows, page, lambda e: e.key)

    async def customer_cases(
        self, customer_id: str, page_size: int = 0, page_token: str = ""
    ) -> CasePage:
        """A customer's cases, the newest first (closed ones too)."""
        customer = validation.required("customer_id", customer_id)
        page = validation.page(page_size, page_token)
        after = page.key(int, str)
        rows = await asyncio.to_thread(self.query.customer_cases, customer, after, page.size + 1)
        return await self._page(rows, page, lambda row: row)

    async def sla_compliance(
        self, team: str, period_start: datetime | None, period_end: datetime | None
    ) -> ComplianceView:
        """Per target kind the share met, and mean and p90 business time to the first
        reply and to resolution, over the team's cases opened in the period."""
        checked = validation.team("team", team)
        start, end = validation.period(period_start, period_end)
        found = await asyncio.to_thread(self.query.compliance, checked, start, end)
        return ComplianceView(
            team=checked,
            period_start=start,
            period_end=end,
            cases=found.cases,
            targets=[
                TargetComplianceView(
                    kind,
                    met,
                    breached,
                    still_open,
                    met / (met + breached) if met + breached else 0.0,
                )
                for kind, (met, breached, still_open) in found.targets.items()
            ],
            first_reply_count=found.first_reply.count,
            first_reply_mean_seconds=round(found.first_reply.mean, 3),
            first_reply_p90_seconds=round(found.first_reply.p90, 3),
            resolution_count=found.resolution.count,
            resolution_mean_seconds=round(found.resolution.mean, 3),
            resolution_p90_seconds=round(found.resolution.p90, 3),
        )

    async def satisfaction_trend(
        self,
        team: str,
        period_start: datetime | None,
        period_end: datetime | None,
        interval: str = "",
    ) -> SatisfactionTrendView:
        """Survey responses recorded in the period (of one team, or every team) per UTC
        month or week: responses, mean CSAT and CES, and NPS, summed in SQL."""
        checked_team = validation.team("team", team, required=False)
        checked_interval = validation.interval(interval)
        start, end = validation.period(period_start, period_end)
        rows = await asyncio.to_thread(
            self.query.satisfaction, checked_team, start, end, checked_interval
        )
        found = {row.start: row for row in rows}
        return SatisfactionTrendView(
            team=checked_team,
            period_start=start,
            period_end=end,
            interval=checked_interval,
            periods=[
                satisfaction_period(bucket, cut_start, cut_end, found.get(bucket))
                for bucket, cut_start, cut_end in buckets(start, end, checked_interval)
            ],
        )

    # -- what the contacts service asks of every holder of a person's data

    def erase_customer(self, contact_ids: Sequence[str]) -> int:
        """Erases every case text of the customers (a person and the contacts merged
        into them) by destroying their keys: each case's subject, description, replies,
        notes and survey comment are sealed under the key of the customer they were
        written for (`customer_id` of each event). Loading then reads "[erased]" in
        those fields; statuses, SLA clocks, scores and every query row stay as they
        were (no query table holds the texts). Idempotent: a key destroyed before
        stays destroyed. The number of keys destroyed by this call."""
        keys = self.app.personal_data_keys
        if keys is None:
            raise RuleViolated(
                "tickets has no master keys: the case texts are stored in clear and"
                " cannot be erased by destroying a key (configure CRM_MASTER_KEYS)"
            )
        destroyed = sum(keys.destroy(subject) for subject in dict.fromkeys(contact_ids) if subject)
        # The query tables keep no text; their cached cases (in memory) go too.
        self.query.tables.reset()
        return destroyed

    async def move_customer_cases(
        self, *, merged: Sequence[str], survivor: str, merge_id: str, event_id: str, actor: str
    ) -> int:
        """A contacts merge: every case of the merged contacts moves to the survivor,
        one `MoveCaseCustomer` command per case whose request id is derived from the
        merge event and the case (a redelivered event writes nothing again). The
        number of cases moved by this call."""
        sources = [m for m in dict.fromkeys(merged) if m and m != survivor]
        ids = await asyncio.to_thread(self.query.case_ids_of, sources)
        moved = 0
        for case_id in ids:
            if await self._hand_over(
                case_id,
                event_id,
                actor,
                (survivor, merge_id),
                lambda case, at: case.move_to_customer(survivor, merge_id, at),
            ):
                moved += 1
        return moved

    async def give_back_customer_cases(
        self, *, survivor: str, restored: Sequence[str], merge_id: str, event_id: str, actor: str
    ) -> int:
        """A merge undone: exactly the survivor's cases that merge `merge_id` moved go
        back to the contact each came from (among `restored`), with their replies,
        notes and status changes since. The number of cases given back by this call."""
        back = tuple(dict.fromkeys(restored))
        ids = await asyncio.to_thread(self.query.case_ids_of, [survivor])
        given = 0
        for case_id in ids:
            case = await asyncio.to_thread(self._load, case_id)
            if not isinstance(case, Case) or not case.moved_by(merge_id):
                continue
            if await self._hand_over(
                case_id,
                event_id,
                actor,
                (back, merge_id),
                lambda case, at: case.give_back(merge_id, back, at),
            ):
                given += 1
        return given

    async def _hand_over(
        self,
        case_id: str,
        event_id: str,
        actor: str,
        request: tuple[Any, ...],
        change: Callable[[Case, datetime], bool],
    ) -> bool:
        changed = False

        def decide(uow: UnitOfWork) -> Case:
            nonlocal changed
            case = uow.get(case_id, Case)
            changed = change(case, self.clock())
            return case

        caller = Caller(actor, CONTACTS_FOLLOWER, request_id=f"{event_id}:{case_id}")
        outcome = await self.bus.execute_async(
            caller.command("MoveCaseCustomer", case_id, *request), decide
        )
        return changed and not outcome.replayed

    def export_personal_data(self, contact_id: str) -> dict[str, Any]:
        """Everything tickets holds about the contact: each of their cases as it stands
        and its whole history (opening, replies, notes, triage, status changes, SLA
        events, the survey with its comment, moves between customers), the personal
        values opened, or "[erased]" once the key is gone. Runs off the event loop."""
        cases = []
        for case_id in self.query.case_ids_of([contact_id]):
            case = self._load(case_id)
            if not isinstance(case, Case):
                continue
            events = self.app.repository.event_store.get(UUID(case_id))
            cases.append(
                {
                    "case": asdict(case_view(case, self.clock())),
                    "history": [exported_event(event) for event in events],
                }
            )
        return {"contact_id": contact_id, "cases": cases}

    # -- SLA policies

    async def define_sla_policy(self, caller: Caller, name: str, terms: SlaTermsInput) -> Written:
        checked_name = validation.body("name", name)
        checked = validation.sla_terms(terms)

        def decide(uow: UnitOfWork) -> SlaPolicy:
            return uow.add(SlaPolicy.define(checked_name, checked, self.clock()))

        return await self._write(caller, "DefineSlaPolicy", (checked_name, checked), decide)

    async def revise_sla_policy(
        self, caller: Caller, policy_id: str, terms: SlaTermsInput
    ) -> Written:
        checked = validation.sla_terms(terms)

        def decide(uow: UnitOfWork) -> SlaPolicy:
            policy = uow.get(policy_id, SlaPolicy)
            policy.revise(checked, self.clock())
            return policy

        return await self._write(caller, "ReviseSlaPolicy", (policy_id, checked), decide)

    async def retire_sla_policy(self, caller: Caller, policy_id: str) -> Written:
        def decide(uow: UnitOfWork) -> SlaPolicy:
            policy = uow.get(policy_id, SlaPolicy)
            policy.retire(self.clock())
            return policy

        return await self._write(caller, "RetireSlaPolicy", (policy_id,), decide)

    async def get_sla_policy(self, policy_id: str) -> PolicyView:
        policy = await asyncio.to_thread(self._load, policy_id)
        if not isinstance(policy, SlaPolicy):
            raise NotFound("SlaPolicy", policy_id)
        view = view_of(policy, self.clock())
        assert isinstance(view, PolicyView)
        return view

    # -- the SLA scanner

    async def raise_deadline(self, deadline: Deadline) -> bool:
        """Raises one due deadline; False when it was raised before (here or elsewhere)."""
        now = self.clock()
        raised = False

        def decide(uow: UnitOfWork) -> Case:
            nonlocal raised
            case = uow.get(deadline.case_id, Case)
            raised = case.raise_deadline(
                deadline.kind, deadline.what, deadline.deadline_version, now
            )
            return case

        caller = Caller(SLA_CALLER.actor, SLA_CALLER.client, request_id=deadline.request_id)
        outcome = await self.bus.execute_async(
            caller.command("RaiseSlaDeadline", deadline.case_id, deadline.kind, deadline.what),
            decide,
        )
        return raised and not outcome.replayed

    async def raise_due_deadlines(self) -> int:
        """Raises every deadline due now, reading them from the query tables a page at a
        time (earliest first); the number raised by this call."""
        now = self.clock()
        count = 0
        after: tuple[int, str, str, str] | None = None
        while True:
            due = await asyncio.to_thread(self.query.due, now, after, DUE_PAGE)
            for deadline in due:
                if await self.raise_deadline(deadline):
                    count += 1
                    log.info(
                        "SLA %s of %s raised for case %s",
                        deadline.what,
                        deadline.kind,
                        deadline.case_id,
                    )
            if len(due) < DUE_PAGE:
                return count
            last = due[-1]
            after = (micros(last.at), last.case_id, last.kind, last.what)


#: The event fields that are the store's, not the case's.
STORE_FIELDS = ("originator_id", "originator_version", "timestamp", "_meta", "_personal")


def exported_event(event: Any) -> dict[str, Any]:
    """One stored event of a case, for the export: its kind, version and fields."""
    fields = {k: v for k, v in event.__dict__.items() if k not in STORE_FIELDS}
    return {"event": type(event).__name__, "version": event.originator_version, **fields}


def buckets(
    start: datetime, end: datetime, interval: str
) -> list[tuple[datetime, datetime, datetime]]:
    """The UTC months or weeks [start, end) touches: (the bucket's own start, and the
    bucket cut to the period), in order."""
    first = month_start if interval == "month" else week_start
    found = []
    bucket = first(start)
    while bucket < end:
        following = (
            first(bucket + timedelta(days=32)) if interval == "month" else bucket + timedelta(7)
        )
        found.append((bucket, max(bucket, start), min(following, end)))
        bucket = following
    return found


def satisfaction_period(
    bucket: datetime, start: datetime, end: datetime, row: SurveyRow | None
) -> SatisfactionPeriodView:
    """A bucket's figures; NPS is promoters% - detractors% of the NPS answers."""
    if row is None:
        return SatisfactionPeriodView(start, end, 0, 0.0, 0, 0.0, 0, 0, 0, 0, 0.0)
    nps = 100.0 * (row.promoters - row.detractors) / row.nps_responses if row.nps_responses else 0.0
    return SatisfactionPeriodView(
        start=start,
        end=end,
        responses=row.responses,
        csat_mean=round(row.csat_mean, 3),
        ces_responses=row.ces_responses,
        ces_mean=round(row.ces_mean, 3),
        nps_responses=row.nps_responses,
        promoters=row.promoters,
        passives=row.nps_responses - row.promoters - row.detractors,
        detractors=row.detractors,
        nps=round(nps, 1),
    )
