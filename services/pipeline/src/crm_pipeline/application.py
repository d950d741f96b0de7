"""The pipeline application layer, shared by the gRPC and REST adapters.

Writes go through the shared command bus (optimistic concurrency, request-id
replay, audit metadata, group commit); single aggregates are read from the
event store; lists, forecasts, funnels and overdue follow-ups come from
`LocalReadModel`, which follows the event store's notification log, so they
include every write committed before the query, whichever process made it.

Converting a lead needs the contacts service (an existing person and company
are checked, new ones are registered there): the application talks to it
through `ContactsPort`, so the transport (gRPC in production) stays out of
this layer. The contacts calls are made before the conversion command, with
request ids derived from the conversion's own, so a retried conversion
registers nobody twice.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import JSONTranscoder

from crm_common.commands import (
    CommandBus,
    CommandContext,
    CommandReceipt,
    UnitOfWork,
    WriteOutcome,
)
from crm_common.errors import FieldErrors, NotFound, ValidationFailed, VersionConflict
from crm_common.eventstore import application_env, creating_tables
from crm_common.settings import Settings
from crm_pipeline.domain import (
    SUBJECT_KINDS,
    TRANSCODINGS,
    Activity,
    Lead,
    LineItemSpec,
    Opportunity,
    Pipeline,
    StageSpec,
    check_close_date,
)
from crm_pipeline.forecast import (
    ActivityInfo,
    ForecastRow,
    Funnel,
    WinRate,
    overdue_follow_ups,
    win_rate,
)
from crm_pipeline.money import CURRENCIES, parse_amount
from crm_pipeline.read_model import LocalReadModel

SERVICE = "pipeline"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


class PipelineApplication(Application[UUID]):
    """The event store of leads, pipelines, opportunities and activities."""

    name = "pipeline"

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        for transcoding in TRANSCODINGS:
            transcoder.register(transcoding)


def create_application(settings: Settings) -> PipelineApplication:
    """The application on the configured event store (SQLite or PostgreSQL)."""
    with creating_tables(settings):
        return PipelineApplication(env=application_env(settings))


# -- the contacts service, as this service needs it ----------------------------------------


@dataclass(frozen=True)
class PersonToRegister:
    given_name: str
    family_name: str
    email: str
    phone: str
    owner: str


@dataclass(frozen=True)
class CompanyToRegister:
    name: str
    owner: str


class ContactsPort(Protocol):
    """What lead conversion needs from the contacts service."""

    async def ensure_exists(self, kind: str, contact_id: str) -> None:
        """Raises NotFound unless `contact_id` is a contact of `kind` (person or company)."""

    async def register_person(self, person: PersonToRegister, request_id: str | None) -> str:
        """Registers a person as an opportunity-stage contact; returns the new id."""

    async def register_company(self, company: CompanyToRegister, request_id: str | None) -> str:
        """Registers a company; returns the new id."""

    async def link_person_to_company(
        self, person_id: str, company_id: str, request_id: str | None
    ) -> None:
        """Relates the person to the company."""


# -- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewLead:
    family_name: str
    source: str
    owner: str
    given_name: str = ""
    company_name: str = ""
    email: str = ""
    phone: str = ""
    campaign: str = ""


@dataclass(frozen=True)
class NewOpportunity:
    pipeline_id: str
    name: str
    customer_id: str
    owner: str
    amount: str | Decimal | int
    currency: str
    expected_close_date: str | date
    stage_id: str = ""
    person_id: str = ""
    company_id: str = ""
    kind: str = "new_business"
    related_opportunity_ids: Sequence[str] = ()


@dataclass(frozen=True)
class LeadConversion:
    lead_id: str
    pipeline_id: str
    amount: str | Decimal | int
    currency: str
    expected_close_date: str | date
    opportunity_name: str = ""
    # Empty: register a new person from the lead.
    person_id: str = ""
    # Empty and create_company: register the lead's company and link the person.
    company_id: str = ""
    create_company: bool = False
    # Empty: the lead's owner.
    owner: str = ""


@dataclass(frozen=True)
class NewActivity:
    subject_kind: str
    subject_id: str
    kind: str
    title: str
    owner: str
    due_at: datetime


@dataclass(frozen=True)
class OpportunityQuery:
    pipeline_id: str = ""
    owner: str = ""
    customer_id: str = ""
    status: str = ""
    page_size: int = 0
    page_token: str = ""


# -- outputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """The outcome of a write and its subject as it stands after it."""

    outcome: WriteOutcome
    subject: Any


@dataclass(frozen=True)
class OpportunityPage:
    opportunities: list[Opportunity]
    next_page_token: str
    total_size: int


def optional_date(value: str | date | None, field: str) -> date | None:
    """An ISO-8601 calendar date given as text or as a date; None when not given."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        raise ValidationFailed.of(field, f"{value!r} is not an ISO-8601 date") from None


def parse_date(value: str | date | None, field: str) -> date:
    """A required ISO-8601 calendar date."""
    day = optional_date(value, field)
    if day is None:
        raise ValidationFailed.of(field, "is required")
    return day


def _page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode().rstrip("=")


def _offset_of(token: str) -> int:
    try:
        padded = token + "=" * (-len(token) % 4)
        offset = json.loads(base64.urlsafe_b64decode(padded.encode()))["offset"]
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(token)
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise ValidationFailed.of("page_token", "is not a page token of this listing") from None
    return offset


# -- the service ---------------------------------------------------------------------------------


class PipelineService:
    """Use cases of the pipeline service; both adapters call these."""

    def __init__(
        self,
        app: PipelineApplication,
        contacts: ContactsPort | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.app = app
        self.contacts = contacts
        self.bus = CommandBus(app, SERVICE)
        self.read_model = LocalReadModel(app)
        self.clock = clock

    def close(self) -> None:
        """Stops the command bus (after pending commands) and closes the store."""
        self.bus.close()
        self.app.close()

    async def _write(self, ctx: CommandContext, decide: Callable[[UnitOfWork], Any]) -> Written:
        outcome = await self.bus.execute_async(ctx, decide)
        subject = outcome.subject
        if subject is None:  # a replay: the subject as it is now
            subject = await asyncio.to_thread(self.load, outcome.id, Aggregate)
        return Written(outcome, subject)

    # -- leads

    async def create_lead(self, ctx: CommandContext, new: NewLead) -> Written:
        def decide(uow: UnitOfWork) -> Lead:
            return uow.add(
                Lead.create(
                    given_name=new.given_name,
                    family_name=new.family_name,
                    company_name=new.company_name,
                    email=new.email,
                    phone=new.phone,
                    source=new.source,
                    campaign=new.campaign,
                    owner=new.owner,
                    at=self.clock(),
                )
            )

        return await self._write(ctx, decide)

    async def qualify_lead(self, ctx: CommandContext, lead_id: str, score: int) -> Written:
        def decide(uow: UnitOfWork) -> Lead:
            lead = uow.get(lead_id, Lead)
            lead.qualify(score, self.clock())
            return lead

        return await self._write(ctx, decide)

    async def disqualify_lead(self, ctx: CommandContext, lead_id: str, reason: str) -> Written:
        def decide(uow: UnitOfWork) -> Lead:
            lead = uow.get(lead_id, Lead)
            lead.disqualify(reason, self.clock())
            return lead

        return await self._write(ctx, decide)

    async def convert_lead(self, ctx: CommandContext, conversion: LeadConversion) -> Written:
        """Converts a qualified lead; the new deal's id is in `outcome.extra`."""
        if await asyncio.to_thread(self._seen, ctx):
            # A retry of a conversion that happened: the bus replays its outcome.
            return await self._write(ctx, lambda uow: uow.get(conversion.lead_id, Lead))
        # Refuse what can be refused before anything is registered in contacts.
        expected = parse_date(conversion.expected_close_date, "expected_close_date")
        errors = FieldErrors()
        if conversion.currency not in CURRENCIES:
            errors.add("currency", f"{conversion.currency!r} is not an ISO 4217 currency code")
        else:
            try:
                parse_amount(conversion.amount, conversion.currency)
            except ValidationFailed as refused:
                errors.errors.extend(refused.errors)
        errors.raise_if_any()
        check_close_date(expected, self.clock(), "expected_close_date")
        lead = await asyncio.to_thread(self.load, conversion.lead_id, Lead)
        if ctx.expected_version is not None and ctx.expected_version != lead.version:
            raise VersionConflict(conversion.lead_id, ctx.expected_version, lead.version)
        lead.ensure_convertible()
        await asyncio.to_thread(self.load, conversion.pipeline_id, Pipeline)
        person_id, company_id = await self._contacts_of(ctx, lead, conversion)

        def decide(uow: UnitOfWork) -> tuple[Lead, dict[str, str]]:
            now = self.clock()
            lead = uow.get(conversion.lead_id, Lead)
            lead.ensure_convertible()
            pipeline = uow.get(conversion.pipeline_id, Pipeline, subject=False)
            name = (
                conversion.opportunity_name
                or lead.company_name
                or (f"{lead.given_name} {lead.family_name}".strip())
            )
            deal = uow.add(
                Opportunity.open(
                    pipeline=pipeline,
                    name=name,
                    customer_id=company_id or person_id,
                    owner=conversion.owner or lead.owner,
                    amount=conversion.amount,
                    currency=conversion.currency,
                    expected_close_date=expected,
                    at=now,
                    person_id=person_id,
                    company_id=company_id,
                    lead_id=str(lead.id),
                )
            )
            lead.convert(
                person_id=person_id,
                company_id=company_id,
                opportunity_id=str(deal.id),
                at=now,
            )
            return lead, {
                "opportunity_id": str(deal.id),
                "person_id": person_id,
                "company_id": company_id,
            }

        return await self._write(ctx, decide)

    def _seen(self, ctx: CommandContext) -> bool:
        """Whether a command with this request id was already carried out."""
        if not ctx.request_id:
            return False
        try:
            self.app.repository.get(CommandReceipt.create_id(SERVICE, ctx.request_id))
        except AggregateNotFoundError:
            return False
        return True

    async def _contacts_of(
        self, ctx: CommandContext, lead: Lead, conversion: LeadConversion
    ) -> tuple[str, str]:
        if self.contacts is None:
            raise RuntimeError("lead conversion needs the contacts service; none is configured")
        if conversion.company_id and conversion.create_company:
            raise ValidationFailed.of("create_company", "name a company or create one, not both")
        if conversion.create_company and not lead.company_name:
            raise ValidationFailed.of("create_company", "the lead has no company name")

        def derived(part: str) -> str | None:
            return f"{ctx.request_id}:{part}" if ctx.request_id else None

        person_id = conversion.person_id
        if person_id:
            await self.contacts.ensure_exists("person", person_id)
        else:
            person_id = await self.contacts.register_person(
                PersonToRegister(
                    lead.given_name, lead.family_name, lead.email, lead.phone, lead.owner
                ),
                derived("person"),
            )
        company_id = conversion.company_id
        if company_id:
            await self.contacts.ensure_exists("company", company_id)
        elif conversion.create_company:
            company_id = await self.contacts.register_company(
                CompanyToRegister(lead.company_name, lead.owner), derived("company")
            )
        if company_id and (conversion.create_company or not conversion.person_id):
            # A new person joins the company, or the new company gets its person.
            await self.contacts.link_person_to_company(person_id, company_id, derived("link"))
        return person_id, company_id

    # -- pipelines

    async def define_pipeline(
        self, ctx: CommandContext, name: str, stages: Sequence[StageSpec]
    ) -> Written:
        return await self._write(ctx, lambda uow: uow.add(Pipeline.define(name, list(stages))))

    async def _pipeline_command(
        self, ctx: CommandContext, pipeline_id: str, change: Callable[[Pipeline], None]
    ) -> Written:
        def decide(uow: UnitOfWork) -> Pipeline:
            pipeline = uow.get(pipeline_id, Pipeline)
            change(pipeline)
            return pipeline

        return await self._write(ctx, decide)

    async def add_stage(
        self, ctx: CommandContext, pipeline_id: str, stage: StageSpec, position: int | None = None
    ) -> Written:
        return await self._pipeline_command(
            ctx, pipeline_id, lambda p: p.add_stage(stage, position)
        )

    async def rename_stage(
        self, ctx: CommandContext, pipeline_id: str, stage_id: str, name: str
    ) -> Written:
        return await self._pipeline_command(
            ctx, pipeline_id, lambda p: p.rename_stage(stage_id, name)
        )

    async def change_stage_settings(
        self,
        ctx: CommandContext,
        pipeline_id: str,
        stage_id: str,
        probability: str | Decimal | int,
        category: str,
    ) -> Written:
        return await self._pipeline_command(
            ctx, pipeline_id, lambda p: p.change_stage_settings(stage_id, probability, category)
        )

    async def reorder_stages(
        self, ctx: CommandContext, pipeline_id: str, stage_ids: Sequence[str]
    ) -> Written:
        return await self._pipeline_command(
            ctx, pipeline_id, lambda p: p.reorder_stages(list(stage_ids))
        )

    async def retire_stage(self, ctx: CommandContext, pipeline_id: str, stage_id: str) -> Written:
        return await self._pipeline_command(ctx, pipeline_id, lambda p: p.retire_stage(stage_id))

    # -- opportunities

    async def open_opportunity(self, ctx: CommandContext, new: NewOpportunity) -> Written:
        expected = parse_date(new.expected_close_date, "expected_close_date")

        def decide(uow: UnitOfWork) -> Opportunity:
            pipeline = uow.get(new.pipeline_id, Pipeline, subject=False)
            related = [uow.get(i, Opportunity, subject=False) for i in new.related_opportunity_ids]
            return uow.add(
                Opportunity.open(
                    pipeline=pipeline,
                    name=new.name,
                    customer_id=new.customer_id,
                    owner=new.owner,
                    amount=new.amount,
                    currency=new.currency,
                    expected_close_date=expected,
                    at=self.clock(),
                    stage_id=new.stage_id,
                    person_id=new.person_id,
                    company_id=new.company_id,
                    kind=new.kind,
                    related_deals=related,
                )
            )

        return await self._write(ctx, decide)

    async def _deal_command(
        self,
        ctx: CommandContext,
        opportunity_id: str,
        change: Callable[[Opportunity, Pipeline, datetime], None],
    ) -> Written:
        def decide(uow: UnitOfWork) -> Opportunity:
            deal = uow.get(opportunity_id, Opportunity)
            pipeline = uow.get(deal.pipeline_id, Pipeline, subject=False)
            change(deal, pipeline, self.clock())
            return deal

        return await self._write(ctx, decide)

    async def change_amount(
        self, ctx: CommandContext, opportunity_id: str, amount: str | Decimal | int, currency: str
    ) -> Written:
        return await self._deal_command(
            ctx, opportunity_id, lambda d, _, now: d.change_amount(amount, currency, now)
        )

    async def set_line_items(
        self, ctx: CommandContext, opportunity_id: str, items: Sequence[LineItemSpec]
    ) -> Written:
        return await self._deal_command(
            ctx, opportunity_id, lambda d, _, now: d.set_line_items(list(items), now)
        )

    async def change_expected_close_date(
        self, ctx: CommandContext, opportunity_id: str, expected: str | date
    ) -> Written:
        day = parse_date(expected, "expected_close_date")
        return await self._deal_command(
            ctx, opportunity_id, lambda d, _, now: d.change_expected_close_date(day, now)
        )

    async def reassign_opportunity(
        self, ctx: CommandContext, opportunity_id: str, owner: str
    ) -> Written:
        return await self._deal_command(
            ctx, opportunity_id, lambda d, _, now: d.reassign(owner, now)
        )

    async def move_opportunity(
        self, ctx: CommandContext, opportunity_id: str, stage_id: str
    ) -> Written:
        return await self._deal_command(
            ctx, opportunity_id, lambda d, p, now: d.change_stage(p, stage_id, now)
        )

    async def win_opportunity(
        self, ctx: CommandContext, opportunity_id: str, closed_on: str | date | None = None
    ) -> Written:
        day = optional_date(closed_on, "closed_on")
        return await self._deal_command(ctx, opportunity_id, lambda d, p, now: d.win(p, now, day))

    async def lose_opportunity(
        self,
        ctx: CommandContext,
        opportunity_id: str,
        reason: str,
        closed_on: str | date | None = None,
    ) -> Written:
        day = optional_date(closed_on, "closed_on")
        return await self._deal_command(
            ctx, opportunity_id, lambda d, p, now: d.lose(p, reason, now, day)
        )

    async def reopen_opportunity(
        self, ctx: CommandContext, opportunity_id: str, stage_id: str = ""
    ) -> Written:
        return await self._deal_command(
            ctx, opportunity_id, lambda d, p, now: d.reopen(p, now, stage_id)
        )

    # -- activities

    async def schedule_activity(self, ctx: CommandContext, new: NewActivity) -> Written:
        if new.subject_kind not in SUBJECT_KINDS:
            raise ValidationFailed.of("subject_kind", f"must be one of {', '.join(SUBJECT_KINDS)}")
        kind: type[Lead | Opportunity] = Lead if new.subject_kind == "lead" else Opportunity

        def decide(uow: UnitOfWork) -> Activity:
            subject = uow.get(new.subject_id, kind, subject=False)
            return uow.add(
                Activity.schedule(
                    subject=subject,
                    kind=new.kind,
                    title=new.title,
                    owner=new.owner,
                    due_at=new.due_at,
                    at=self.clock(),
                )
            )

        return await self._write(ctx, decide)

    async def _activity_command(
        self, ctx: CommandContext, activity_id: str, change: Callable[[Activity, datetime], None]
    ) -> Written:
        def decide(uow: UnitOfWork) -> Activity:
            activity = uow.get(activity_id, Activity)
            change(activity, self.clock())
            return activity

        return await self._write(ctx, decide)

    async def reschedule_activity(
        self, ctx: CommandContext, activity_id: str, due_at: datetime
    ) -> Written:
        return await self._activity_command(
            ctx, activity_id, lambda a, now: a.reschedule(due_at, now)
        )

    async def complete_activity(
        self, ctx: CommandContext, activity_id: str, outcome: str = ""
    ) -> Written:
        return await self._activity_command(
            ctx, activity_id, lambda a, now: a.complete(outcome, now)
        )

    async def cancel_activity(
        self, ctx: CommandContext, activity_id: str, reason: str = ""
    ) -> Written:
        return await self._activity_command(ctx, activity_id, lambda a, now: a.cancel(reason, now))

    # -- reading one aggregate

    def load(self, ident: str, kind: type[Any]) -> Any:
        try:
            key = UUID(ident)
        except (ValueError, AttributeError, TypeError):
            raise NotFound(kind.__name__, ident) from None
        try:
            aggregate: Any = self.app.repository.get(key)
        except AggregateNotFoundError:
            raise NotFound(kind.__name__, ident) from None
        if not isinstance(aggregate, kind) or not isinstance(
            aggregate, Lead | Pipeline | Opportunity | Activity
        ):
            raise NotFound(kind.__name__, ident)
        return aggregate

    async def get_lead(self, lead_id: str) -> Lead:
        lead: Lead = await asyncio.to_thread(self.load, lead_id, Lead)
        return lead

    async def get_pipeline(self, pipeline_id: str) -> Pipeline:
        pipeline: Pipeline = await asyncio.to_thread(self.load, pipeline_id, Pipeline)
        return pipeline

    async def get_opportunity(self, opportunity_id: str) -> Opportunity:
        deal: Opportunity = await asyncio.to_thread(self.load, opportunity_id, Opportunity)
        return deal

    async def get_activity(self, activity_id: str) -> Activity:
        activity: Activity = await asyncio.to_thread(self.load, activity_id, Activity)
        return activity

    # -- queries over every deal

    async def list_pipelines(self) -> list[Pipeline]:
        pipelines = await asyncio.to_thread(self.read_model.pipelines)
        return sorted(pipelines, key=lambda p: (p.name.casefold(), str(p.id)))

    def _list_opportunities(self, query: OpportunityQuery) -> OpportunityPage:
        errors = FieldErrors()
        size = query.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            errors.add("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
        if query.status and query.status not in ("open", "won", "lost"):
            errors.add("status", "must be one of open, won, lost")
        errors.raise_if_any()
        offset = _offset_of(query.page_token) if query.page_token else 0

        def wanted(deal: Opportunity) -> bool:
            return (
                (not query.pipeline_id or deal.pipeline_id == query.pipeline_id)
                and (not query.owner or deal.owner == query.owner)
                and (not query.customer_id or deal.customer_id == query.customer_id)
                and (not query.status or deal.status == query.status)
            )

        with self.read_model.locked() as aggregates:
            deals = sorted(
                (a for a in aggregates if isinstance(a, Opportunity) and wanted(a)),
                key=lambda d: (d.opened_at, str(d.id)),
            )
            page = [copy.deepcopy(d) for d in deals[offset : offset + size]]
        more = offset + size < len(deals)
        return OpportunityPage(page, _page_token(offset + size) if more else "", len(deals))

    async def list_opportunities(self, query: OpportunityQuery) -> OpportunityPage:
        return await asyncio.to_thread(self._list_opportunities, query)

    def _forecast(self, **filters: Any) -> list[ForecastRow]:
        return self.read_model.forecast(**filters)

    async def get_forecast(
        self,
        *,
        period: str = "month",
        start: str | date | None = None,
        end: str | date | None = None,
        owner: str = "",
        pipeline_id: str = "",
    ) -> list[ForecastRow]:
        return await asyncio.to_thread(
            self._forecast,
            period=period or "month",
            start=optional_date(start, "start"),
            end=optional_date(end, "end"),
            owner=owner or None,
            pipeline_id=pipeline_id or None,
        )

    def _funnel(self, pipeline_id: str) -> Funnel:
        result = self.read_model.funnel(pipeline_id)
        if result is None:
            raise NotFound("Pipeline", pipeline_id)
        return result

    async def get_funnel(self, pipeline_id: str) -> Funnel:
        return await asyncio.to_thread(self._funnel, pipeline_id)

    def _win_rate(self, **filters: Any) -> WinRate:
        deals, _, _ = self.read_model.snapshot()
        return win_rate(deals, **filters)

    async def get_win_rate(
        self,
        *,
        pipeline_id: str = "",
        owner: str = "",
        start: str | date | None = None,
        end: str | date | None = None,
    ) -> WinRate:
        return await asyncio.to_thread(
            self._win_rate,
            pipeline_id=pipeline_id or None,
            owner=owner or None,
            start=optional_date(start, "start"),
            end=optional_date(end, "end"),
        )

    def _overdue(self, owner: str) -> dict[str, list[ActivityInfo]]:
        _, _, activities = self.read_model.snapshot()
        return overdue_follow_ups(activities, self.clock(), owner or None)

    async def overdue_follow_ups(self, owner: str = "") -> dict[str, list[ActivityInfo]]:
        return await asyncio.to_thread(self._overdue, owner)
