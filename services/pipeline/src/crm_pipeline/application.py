"""The pipeline application layer, shared by the gRPC and REST adapters.

Writes go through the shared command bus (optimistic concurrency, request-id
replay, audit metadata, group commit); single aggregates are read from the
event store; lists, forecasts, funnels and overdue follow-ups come from
the query tables of `ReadModel` (SQL over the service's own database), which
apply the event store's notification log before each query, so they include
every write committed before the query, whichever process made it.

Converting a lead needs the contacts service (an existing person and company
are checked, new ones are registered there): the application talks to it
through `ContactsPort`, so the transport (gRPC in production) stays out of
this layer. The contacts calls are made before the conversion command, with
request ids derived from the conversion's own, so a retried conversion
registers nobody twice; they are made for the converting user (the contacts
service checks that user's roles too and names the user in its audit trail),
and what the user may not have done there is refused before anything is
registered.

Each write names its command and passes its request
(`caller.command("QualifyLead", lead_id, score)`): the request is fingerprinted,
so a request id (Idempotency-Key) used again for a different request is refused
with `IdempotencyKeyReused` instead of being answered with the first outcome.
Request ids belong to the authenticated caller: another caller's equal request
id is another request.

Partners (`AccessPolicy.grant`, docs/security.md) may create leads and read
leads: a lead a partner creates carries the partner's tag, and a partner reads
only the leads carrying its own; any other lead is refused with
`PermissionDenied`. The rule is here, not in the adapters, so both transports
keep it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from datetime import UTC, date, datetime
from functools import partial
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import JSONTranscoder

from crm_common.auth.access import AccessPolicy, PartnerGrant
from crm_common.commands import (
    Caller,
    CommandBus,
    CommandContext,
    CommandReceipt,
    UnitOfWork,
    WriteOutcome,
)
from crm_common.errors import (
    NotFound,
    PermissionDenied,
    RuleViolated,
    ValidationFailed,
    VersionConflict,
)
from crm_common.eventstore import SnapshottingApplication, application_env, creating_tables
from crm_common.querystore import DEFAULT_AGGREGATE_CACHE
from crm_common.settings import Settings
from crm_pipeline import validation
from crm_pipeline.domain import (
    TRANSCODINGS,
    Activity,
    Lead,
    Opportunity,
    Pipeline,
    check_close_date,
)
from crm_pipeline.domain.customers import moves_to_undo
from crm_pipeline.forecast import ActivityInfo, ForecastRow, Funnel, WinRate
from crm_pipeline.inputs import (
    ActivityQuery,
    ForecastQuery,
    LeadConversion,
    LeadQuery,
    LineItemInput,
    NewActivity,
    NewLead,
    NewOpportunity,
    Number,
    OpportunityQuery,
    StageInput,
    WinRateQuery,
)
from crm_pipeline.read_model import ReadModel
from crm_pipeline.views import (
    ActivityPage,
    ActivityView,
    LeadPage,
    LeadView,
    OpportunityPage,
    OpportunityView,
    PipelineView,
    StageView,
    Written,
    activity_view,
    lead_view,
    opportunity_view,
    pipeline_view,
    view_of,
)

SERVICE = "pipeline"
#: The client named in the audit trail of the commands the contacts follower runs.
FOLLOWER_CLIENT = "pipeline-contacts-follower"
#: Commands a follower hands to the bus at once.
COMMAND_GROUP = 100
#: What every stored event has; the export lists the rest as its fields.
EVENT_ENVELOPE = frozenset({"originator_id", "originator_version", "timestamp"})


def _contact_id(field: str, value: str) -> str:
    value = (value or "").strip()
    if not value or len(value) > 200 or any(c.isspace() or c == "\x00" for c in value):
        raise ValidationFailed.of(field, "required: an id without spaces, at most 200 characters")
    return value


def exportable(value: Any) -> Any:
    """`value` with views, line items and money as plain mappings and lists (times,
    dates and decimals are left to `crm_common.privacy.export.export_json`)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: exportable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): exportable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [exportable(v) for v in value]
    return value


def _moved(outcomes: Sequence[WriteOutcome]) -> int:
    """How many of the commands moved their record (a replay moved nothing now)."""
    return sum(1 for o in outcomes if not o.replayed and o.extra.get("moved", "0") != "0")


@dataclass(frozen=True)
class Erasure:
    """What erasing a person did here."""

    #: The subjects whose keys were destroyed (none without master keys).
    subjects: tuple[str, ...]
    #: How many of them still had a key.
    destroyed: int
    deals: tuple[str, ...]
    leads: tuple[str, ...]
    activities: tuple[str, ...]


class PipelineApplication(SnapshottingApplication):
    """The event store of leads, pipelines, opportunities and activities."""

    name = "pipeline"
    #: A deal's stage moves, amounts and line items; a pipeline's stage edits.
    snapshot_kinds = (Opportunity, Pipeline)
    #: Where the store is, for the query tables kept beside it (`create_application`).
    settings: Settings | None = None

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        for transcoding in TRANSCODINGS:
            transcoder.register(transcoding)


def create_application(settings: Settings) -> PipelineApplication:
    """The application on the configured event store (SQLite or PostgreSQL)."""
    with creating_tables(settings):
        app = PipelineApplication(env=application_env(settings))
    app.settings = settings
    return app


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

    async def authorize(self, operations: Iterable[str]) -> None:
        """Raises PermissionDenied when the current request's user may not have the
        contacts service run these operations (`GetContact`, `CreatePerson`, ...)."""

    async def ensure_exists(self, kind: str, contact_id: str) -> None:
        """Raises NotFound unless `contact_id` is a contact of `kind` (person or company)."""

    async def find_persons(self, email: str, phone: str) -> list[str]:
        """The ids of the persons that have exactly this email (or, with no email given,
        this phone), oldest first; empty when nobody has it."""

    async def register_person(self, person: PersonToRegister, request_id: str | None) -> str:
        """Registers a person as an opportunity-stage contact; returns the new id."""

    async def register_company(self, company: CompanyToRegister, request_id: str | None) -> str:
        """Registers a company; returns the new id."""

    async def link_person_to_company(
        self, person_id: str, company_id: str, request_id: str | None
    ) -> None:
        """Relates the person to the company."""


# -- the service ---------------------------------------------------------------------------------


class PipelineService:
    """Use cases of the pipeline service; both adapters call these.

    Each write names its command and passes its request
    (`caller.command("CreateLead", new)`): the name is recorded with the events
    and in the receipt of an idempotent command, so it never changes; the
    request goes into the fingerprint a reused request id is checked against.
    """

    def __init__(
        self,
        app: PipelineApplication,
        contacts: ContactsPort | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        policy: AccessPolicy | None = None,
        query_cache: int = DEFAULT_AGGREGATE_CACHE,
    ) -> None:
        if app.settings is None:
            raise ValueError("the application names no settings: make it with create_application")
        self.app = app
        self.contacts = contacts
        self.bus = CommandBus(app, SERVICE)
        #: The query tables, in the application's own database; `query_cache`
        #: bounds the aggregates they keep between batches of events.
        self.read_model = ReadModel(app, app.settings, cache_size=query_cache)
        self.clock = clock
        #: Whose grants partners work under (the API's gate's policy; by default the
        #: policy shipped with crm_common).
        self.policy = policy or AccessPolicy.load()

    def grant_of(self, caller: Caller | None) -> PartnerGrant | None:
        """The grant the caller works under: None for everyone but a partner (and for
        commands without an authenticated caller); `PermissionDenied` for a partner
        without one."""
        if caller is None or caller.principal is None:
            return None
        return self.policy.grant(caller.principal)

    def close(self) -> None:
        """Stops the command bus (after pending commands), the query tables and the store."""
        self.bus.close()
        self.read_model.close()
        self.app.close()

    async def _write(self, ctx: CommandContext, decide: Callable[[UnitOfWork], Any]) -> Written:
        outcome = await self.bus.execute_async(ctx, decide)
        subject = outcome.subject
        if subject is None:  # a replay: the subject as it is now
            subject = await asyncio.to_thread(self.load, outcome.id, Aggregate)
        return Written(outcome, view_of(subject))

    # -- leads

    async def create_lead(self, caller: Caller, new: NewLead) -> Written:
        grant = self.grant_of(caller)
        lead = validation.new_lead(new)

        def decide(uow: UnitOfWork) -> Lead:
            return uow.add(
                Lead.create(
                    given_name=lead.given_name,
                    family_name=lead.family_name,
                    company_name=lead.company_name,
                    email=lead.email,
                    phone=lead.phone,
                    source=lead.source or "",
                    campaign=lead.campaign,
                    owner=lead.owner,
                    at=self.clock(),
                    partner_tag=grant.tag if grant else "",
                )
            )

        return await self._write(caller.command("CreateLead", new), decide)

    async def _lead_command(
        self, ctx: CommandContext, lead_id: str, change: Callable[[Lead, datetime], None]
    ) -> Written:
        def decide(uow: UnitOfWork) -> Lead:
            lead = uow.get(lead_id, Lead)
            change(lead, self.clock())
            return lead

        return await self._write(ctx, decide)

    async def qualify_lead(self, caller: Caller, lead_id: str, score: int) -> Written:
        checked = validation.score(score)
        return await self._lead_command(
            caller.command("QualifyLead", lead_id, score),
            lead_id,
            lambda lead, now: lead.qualify(checked, now),
        )

    async def disqualify_lead(self, caller: Caller, lead_id: str, reason: str) -> Written:
        checked = validation.one_text("reason", reason)
        return await self._lead_command(
            caller.command("DisqualifyLead", lead_id, reason),
            lead_id,
            lambda lead, now: lead.disqualify(checked, now),
        )

    async def convert_lead(self, caller: Caller, conversion: LeadConversion) -> Written:
        """Converts a qualified lead; the new deal's id is in `outcome.extra`."""
        ctx = caller.command("ConvertLead", conversion)
        if await asyncio.to_thread(self._seen, ctx):
            # A retry of a conversion that happened: the bus replays its outcome (or
            # refuses a request id used before for another request).
            return await self._write(ctx, lambda uow: uow.get(conversion.lead_id, Lead))
        # Refuse what can be refused before anything is registered in contacts.
        terms = validation.conversion_terms(conversion)
        check_close_date(terms.expected_close_date, self.clock(), "expected_close_date")
        lead = await asyncio.to_thread(self.load, conversion.lead_id, Lead)
        if caller.expected_version and caller.expected_version != lead.version:
            raise VersionConflict(conversion.lead_id, caller.expected_version, lead.version)
        lead.ensure_convertible()
        await asyncio.to_thread(self.load, conversion.pipeline_id, Pipeline)
        person_id, company_id, matched = await self._contacts_of(caller, lead, conversion)

        def decide(uow: UnitOfWork) -> tuple[Lead, dict[str, str]]:
            now = self.clock()
            lead = uow.get(conversion.lead_id, Lead)
            lead.ensure_convertible()
            pipeline = uow.get(conversion.pipeline_id, Pipeline, subject=False)
            deal = uow.add(
                Opportunity.open(
                    pipeline=pipeline,
                    name=conversion.opportunity_name or lead.display_name,
                    customer_id=company_id or person_id,
                    owner=conversion.owner or lead.owner,
                    amount=terms.amount,
                    expected_close_date=terms.expected_close_date,
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
                "person_matched": "true" if matched else "false",
            }

        return await self._write(ctx, decide)

    def _seen(self, ctx: CommandContext) -> bool:
        """Whether this caller's request id answers with an earlier command's outcome
        (a receipt that has not expired)."""
        if not ctx.request_id:
            return False
        try:
            receipt: Aggregate = self.app.repository.get(
                CommandReceipt.create_id(SERVICE, ctx.request_id, ctx.scope)
            )
        except AggregateNotFoundError:
            return False
        return bool(receipt.modified_on >= datetime.now(UTC) - self.bus.receipt_retention)

    async def _contacts_of(
        self, caller: Caller, lead: Lead, conversion: LeadConversion
    ) -> tuple[str, str, bool]:
        """The person and company the deal belongs to, and whether the person was an
        existing contact (named, or found by the lead's email or phone)."""
        if self.contacts is None:
            raise RuntimeError("lead conversion needs the contacts service; none is configured")
        if conversion.company_id and conversion.create_company:
            raise ValidationFailed.of("create_company", "name a company or create one, not both")
        if conversion.create_company and not lead.company_name:
            raise ValidationFailed.of("create_company", "the lead has no company name")
        searches = not conversion.person_id and bool(lead.email or lead.phone)
        links = bool(
            (conversion.company_id or conversion.create_company)
            and (conversion.create_company or not conversion.person_id)
        )
        await self.contacts.authorize(
            [
                *(["GetContact"] if conversion.person_id or conversion.company_id else []),
                *(["ListContacts"] if searches else []),
                *([] if conversion.person_id else ["CreatePerson"]),
                *(["CreateCompany"] if conversion.create_company else []),
                *(["LinkPersonToCompany"] if links else []),
            ]
        )

        def derived(part: str) -> str | None:
            return f"{caller.request_id}:{part}" if caller.request_id else None

        person_id = conversion.person_id
        matched = bool(person_id)
        if person_id:
            try:
                await self.contacts.ensure_exists("person", person_id)
            except NotFound:
                raise NotFound("Person (person_id)", person_id) from None
        elif searches:
            person_id = await self._existing_person(lead)
            matched = bool(person_id)
        if not person_id:
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
        if links:
            # A new or found person joins the company, or the new company gets its
            # person; a person the user named keeps the companies it has.
            await self.contacts.link_person_to_company(person_id, company_id, derived("link"))
        return person_id, company_id, matched

    async def _existing_person(self, lead: Lead) -> str:
        """The one person of the contacts service who has the lead's email (by its phone
        when the lead has no email), or "" when nobody has it.

        Several such persons are refused rather than guessed between: the user names
        the right one as `person_id` (the message lists them), so a deal never lands
        silently on the wrong one of two duplicates.
        """
        assert self.contacts is not None
        found = await self.contacts.find_persons(lead.email, "" if lead.email else lead.phone)
        if len(found) > 1:
            by = f"the email {lead.email}" if lead.email else f"the phone {lead.phone}"
            raise RuleViolated(
                f"{len(found)} contacts have {by}: {', '.join(found)}; "
                "name the one to convert into as person_id"
            )
        return found[0] if found else ""

    # -- pipelines

    async def define_pipeline(
        self, caller: Caller, name: str, stages: Sequence[StageInput]
    ) -> Written:
        checked_name, checked_stages = validation.new_pipeline(name, stages)
        return await self._write(
            caller.command("DefinePipeline", name, list(stages)),
            lambda uow: uow.add(Pipeline.define(checked_name, checked_stages)),
        )

    async def _pipeline_command(
        self, ctx: CommandContext, pipeline_id: str, change: Callable[[Pipeline], None]
    ) -> Written:
        def decide(uow: UnitOfWork) -> Pipeline:
            pipeline = uow.get(pipeline_id, Pipeline)
            change(pipeline)
            return pipeline

        return await self._write(ctx, decide)

    async def add_stage(
        self, caller: Caller, pipeline_id: str, stage: StageInput, position: int | None = None
    ) -> Written:
        checked = validation.stage(stage, "stage")
        return await self._pipeline_command(
            caller.command("AddStage", pipeline_id, stage, position),
            pipeline_id,
            lambda p: p.add_stage(checked, position),
        )

    async def rename_stage(
        self, caller: Caller, pipeline_id: str, stage_id: str, name: str
    ) -> Written:
        checked = validation.one_text("name", name)
        return await self._pipeline_command(
            caller.command("RenameStage", pipeline_id, stage_id, name),
            pipeline_id,
            lambda p: p.rename_stage(stage_id, checked),
        )

    async def change_stage_settings(
        self,
        caller: Caller,
        pipeline_id: str,
        stage_id: str,
        probability: Number,
        category: str | None,
    ) -> Written:
        def change(pipeline: Pipeline) -> None:
            # The stage is named before its settings are looked at.
            pipeline.active_stage(stage_id)
            checked, word = validation.stage_settings(probability, category)
            pipeline.change_stage_settings(stage_id, checked, word)

        ctx = caller.command("ChangeStageSettings", pipeline_id, stage_id, probability, category)
        return await self._pipeline_command(ctx, pipeline_id, change)

    async def reorder_stages(
        self, caller: Caller, pipeline_id: str, stage_ids: Sequence[str]
    ) -> Written:
        return await self._pipeline_command(
            caller.command("ReorderStages", pipeline_id, list(stage_ids)),
            pipeline_id,
            lambda p: p.reorder_stages(list(stage_ids)),
        )

    async def retire_stage(self, caller: Caller, pipeline_id: str, stage_id: str) -> Written:
        return await self._pipeline_command(
            caller.command("RetireStage", pipeline_id, stage_id),
            pipeline_id,
            lambda p: p.retire_stage(stage_id),
        )

    # -- opportunities

    async def open_opportunity(self, caller: Caller, new: NewOpportunity) -> Written:
        terms = validation.new_opportunity(new)

        def decide(uow: UnitOfWork) -> Opportunity:
            pipeline = uow.get(new.pipeline_id, Pipeline, subject=False)
            related = [uow.get(i, Opportunity, subject=False) for i in new.related_opportunity_ids]
            return uow.add(
                Opportunity.open(
                    pipeline=pipeline,
                    name=terms.name,
                    customer_id=terms.customer_id,
                    owner=terms.owner,
                    amount=terms.amount,
                    expected_close_date=terms.expected_close_date,
                    at=self.clock(),
                    stage_id=new.stage_id,
                    person_id=new.person_id,
                    company_id=new.company_id,
                    kind=terms.kind,
                    related_deals=related,
                )
            )

        return await self._write(caller.command("OpenOpportunity", new), decide)

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
        self, caller: Caller, opportunity_id: str, amount: Number, currency: str
    ) -> Written:
        money = validation.one_money(amount, currency)
        return await self._deal_command(
            caller.command("ChangeAmount", opportunity_id, amount, currency),
            opportunity_id,
            lambda d, _, now: d.change_amount(money, now),
        )

    async def set_line_items(
        self, caller: Caller, opportunity_id: str, items: Sequence[LineItemInput]
    ) -> Written:
        def change(deal: Opportunity, _: Pipeline, now: datetime) -> None:
            # Lines are priced in the deal's own currency.
            deal.set_line_items(validation.line_items(items, deal.amount.currency), now)

        ctx = caller.command("SetLineItems", opportunity_id, list(items))
        return await self._deal_command(ctx, opportunity_id, change)

    async def change_expected_close_date(
        self, caller: Caller, opportunity_id: str, expected: str | date
    ) -> Written:
        day = validation.required_date(expected, "expected_close_date")
        return await self._deal_command(
            caller.command("ChangeExpectedCloseDate", opportunity_id, expected),
            opportunity_id,
            lambda d, _, now: d.change_expected_close_date(day, now),
        )

    async def reassign_opportunity(
        self, caller: Caller, opportunity_id: str, owner: str
    ) -> Written:
        checked = validation.one_text("owner", owner)
        return await self._deal_command(
            caller.command("ReassignOpportunity", opportunity_id, owner),
            opportunity_id,
            lambda d, _, now: d.reassign(checked, now),
        )

    async def move_opportunity(self, caller: Caller, opportunity_id: str, stage_id: str) -> Written:
        return await self._deal_command(
            caller.command("MoveOpportunity", opportunity_id, stage_id),
            opportunity_id,
            lambda d, p, now: d.change_stage(p, stage_id, now),
        )

    async def win_opportunity(
        self, caller: Caller, opportunity_id: str, closed_on: str | date | None = None
    ) -> Written:
        day = validation.optional_date(closed_on, "closed_on")
        return await self._deal_command(
            caller.command("WinOpportunity", opportunity_id, closed_on),
            opportunity_id,
            lambda d, p, now: d.win(p, now, day),
        )

    async def lose_opportunity(
        self,
        caller: Caller,
        opportunity_id: str,
        reason: str,
        closed_on: str | date | None = None,
    ) -> Written:
        checked = validation.one_text("reason", reason)
        day = validation.optional_date(closed_on, "closed_on")
        return await self._deal_command(
            caller.command("LoseOpportunity", opportunity_id, reason, closed_on),
            opportunity_id,
            lambda d, p, now: d.lose(p, checked, now, day),
        )

    async def reopen_opportunity(
        self, caller: Caller, opportunity_id: str, stage_id: str = ""
    ) -> Written:
        return await self._deal_command(
            caller.command("ReopenOpportunity", opportunity_id, stage_id),
            opportunity_id,
            lambda d, p, now: d.reopen(p, now, stage_id),
        )

    # -- activities

    async def schedule_activity(self, caller: Caller, new: NewActivity) -> Written:
        checked = validation.new_activity(new)
        kind: type[Lead | Opportunity] = Lead if checked.subject_kind == "lead" else Opportunity
        assert checked.due_at is not None

        def decide(uow: UnitOfWork) -> Activity:
            subject = uow.get(checked.subject_id, kind, subject=False)
            assert checked.due_at is not None
            return uow.add(
                Activity.schedule(
                    subject=subject,
                    kind=checked.kind or "",
                    title=checked.title,
                    owner=checked.owner,
                    due_at=checked.due_at,
                    at=self.clock(),
                )
            )

        return await self._write(caller.command("ScheduleActivity", new), decide)

    async def _activity_command(
        self,
        ctx: CommandContext,
        activity_id: str,
        change: Callable[[Activity, datetime], None],
    ) -> Written:
        def decide(uow: UnitOfWork) -> Activity:
            activity = uow.get(activity_id, Activity)
            change(activity, self.clock())
            return activity

        return await self._write(ctx, decide)

    async def reschedule_activity(
        self, caller: Caller, activity_id: str, due_at: datetime | None
    ) -> Written:
        due = validation.due_at(due_at)
        return await self._activity_command(
            caller.command("RescheduleActivity", activity_id, due_at),
            activity_id,
            lambda a, now: a.reschedule(due, now),
        )

    async def complete_activity(
        self, caller: Caller, activity_id: str, outcome: str = ""
    ) -> Written:
        checked = validation.one_text("outcome", outcome, required=False)
        return await self._activity_command(
            caller.command("CompleteActivity", activity_id, outcome),
            activity_id,
            lambda a, now: a.complete(checked, now),
        )

    async def cancel_activity(self, caller: Caller, activity_id: str, reason: str = "") -> Written:
        checked = validation.one_text("reason", reason, required=False)
        return await self._activity_command(
            caller.command("CancelActivity", activity_id, reason),
            activity_id,
            lambda a, now: a.cancel(checked, now),
        )

    # -- what contacts asks of the pipeline: erased persons, merged contacts

    def _system_caller(self, actor: str, request_id: str) -> Caller:
        """The platform's own command, on behalf of whoever acted in contacts."""
        return Caller(actor=actor, client=FOLLOWER_CLIENT, request_id=request_id)

    async def _each(self, commands: Sequence[Callable[[], Awaitable[WriteOutcome]]]) -> list[Any]:
        """Runs the commands in groups (the bus commits each group together); a
        group that fails stops the rest (the caller retries the whole change)."""
        done: list[Any] = []
        for start in range(0, len(commands), COMMAND_GROUP):
            group = commands[start : start + COMMAND_GROUP]
            done += await asyncio.gather(*(command() for command in group))
        return done

    async def erase_person(
        self, contact_id: str, merged: Sequence[str], reference: str, event_id: str, actor: str
    ) -> Erasure:
        """Erases a person's personal data (idempotent): destroys the keys of every
        subject holding it here (the contact and the contacts merged into it: their
        deals' names; the leads converted into them; the activities of those leads
        and deals and of the person), then records on each of those activities that
        its texts are erased, so that the query tables drop their copy of the title
        (exactly once, and a rebuild gives the same). Amounts, stages and every other
        business fact stay as they are."""
        contact_id = _contact_id("contact_id", contact_id)
        ids = [contact_id, *(i for i in merged if i and i != contact_id)]
        held = await asyncio.to_thread(self.read_model.held, ids)
        subjects = list(dict.fromkeys([*ids, *held.leads, *held.activities]))
        keys = self.app.personal_data_keys
        destroyed = 0
        if keys is not None:
            for subject in subjects:
                destroyed += bool(await asyncio.to_thread(keys.destroy, subject))

        def erase(activity_id: str) -> Awaitable[WriteOutcome]:
            def decide(uow: UnitOfWork) -> Activity:
                activity = uow.get(activity_id, Activity)
                activity.erase_personal_data(reference, self.clock())
                return activity

            caller = self._system_caller(actor, f"erase:{event_id}:{activity_id}")
            ctx = caller.command("ErasePersonalData", activity_id, reference)
            return self.bus.execute_async(ctx, decide)

        await self._each([partial(erase, a) for a in held.activities])
        # The query tables drop the titles now, not at their next query.
        await asyncio.to_thread(self.read_model.catch_up)
        return Erasure(
            subjects=tuple(subjects) if keys is not None else (),
            destroyed=destroyed,
            deals=tuple(held.deals),
            leads=tuple(held.leads),
            activities=tuple(held.activities),
        )

    async def move_customers(
        self, survivor: str, merged: Sequence[str], merge_id: str, event_id: str, actor: str
    ) -> int:
        """Contacts `merged` were merged into `survivor`: every deal, lead and activity
        naming one of them (customer, person or company) is moved to the survivor by
        a `CustomerMoved` event of its own. Request ids come from the merge event and
        the record, and a record already moved is left alone, so a redelivery writes
        nothing. Returns the number of records moved."""
        survivor = _contact_id("contact_id", survivor)
        merge_id = _contact_id("merge_id", merge_id)
        others = [i for i in dict.fromkeys(merged) if i and i != survivor]
        if not others:
            return 0
        held = await asyncio.to_thread(self.read_model.held, others, subjects=False)

        def move(ident: str, kind: type[Lead | Opportunity | Activity]) -> Awaitable[WriteOutcome]:
            def decide(uow: UnitOfWork) -> tuple[Any, dict[str, str]]:
                record = uow.get(ident, kind)
                moved = record.move_customer(others, survivor, merge_id, self.clock())
                return record, {"moved": str(moved)}

            caller = self._system_caller(actor, f"merge:{event_id}:{ident}")
            ctx = caller.command("MoveCustomer", ident, survivor, others, merge_id)
            return self.bus.execute_async(ctx, decide)

        outcomes = await self._each(
            [
                *(partial(move, i, Opportunity) for i in held.deals),
                *(partial(move, i, Lead) for i in held.leads),
                *(partial(move, i, Activity) for i in held.activities),
            ]
        )
        return _moved(outcomes)

    async def undo_customer_moves(
        self, survivor: str, restored: Sequence[str], merge_id: str, event_id: str, actor: str
    ) -> int:
        """Merge `merge_id` into `survivor` was undone: every record it moved gets
        back exactly the fields it moved (of the contacts `restored`), whatever
        happened to it since. Returns the number of records moved back."""
        survivor = _contact_id("contact_id", survivor)
        merge_id = _contact_id("merge_id", merge_id)
        given_back = [i for i in dict.fromkeys(restored) if i]
        held = await asyncio.to_thread(self.read_model.held, [survivor], subjects=False)

        def moved(ident: str) -> bool:
            record: Any = self.app.repository.get(UUID(ident))
            return any(m.fields for m in moves_to_undo(record, merge_id, given_back or None))

        candidates = [*held.deals, *held.leads, *held.activities]
        kinds: dict[str, type[Lead | Opportunity | Activity]] = {
            **dict.fromkeys(held.deals, Opportunity),
            **dict.fromkeys(held.leads, Lead),
            **dict.fromkeys(held.activities, Activity),
        }
        due = [i for i in candidates if await asyncio.to_thread(moved, i)]

        def undo(ident: str) -> Awaitable[WriteOutcome]:
            def decide(uow: UnitOfWork) -> tuple[Any, dict[str, str]]:
                record = uow.get(ident, kinds[ident])
                moved = record.undo_customer_move(merge_id, self.clock(), given_back or None)
                return record, {"moved": str(moved)}

            caller = self._system_caller(actor, f"unmerge:{event_id}:{ident}")
            ctx = caller.command("UndoCustomerMove", ident, merge_id, given_back)
            return self.bus.execute_async(ctx, decide)

        outcomes = await self._each([partial(undo, i) for i in due])
        return _moved(outcomes)

    def export_person(self, contact_id: str) -> dict[str, Any]:
        """Everything the pipeline holds about a contact: its leads, deals and
        activities, each as it stands and with its history (type, version, time,
        actor, fields), personal values opened (or erased)."""
        held = self.read_model.held([contact_id])
        return {
            "leads": [self._exported(i) for i in held.leads],
            "deals": [self._exported(i) for i in held.deals],
            "activities": [self._exported(i) for i in held.activities],
        }

    def _exported(self, ident: str) -> dict[str, Any]:
        key = UUID(ident)
        events: list[Any] = list(self.app.events.get(key))
        history = [
            {
                "type": type(event).__qualname__,
                "version": event.originator_version,
                "time": event.timestamp,
                "actor": str((getattr(event, "_meta", None) or {}).get("actor") or ""),
                "fields": exportable(
                    {
                        k: v
                        for k, v in vars(event).items()
                        if not k.startswith("_") and k not in EVENT_ENVELOPE
                    }
                ),
            }
            for event in events
        ]
        record: Any = self.app.repository.get(key)
        return {"id": ident, "state": exportable(view_of(record)), "history": history}

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

    async def get_lead(self, lead_id: str, caller: Caller | None = None) -> LeadView:
        """The lead; a partner (`caller`) gets only a lead it brought."""
        grant = self.grant_of(caller)
        lead: Lead = await asyncio.to_thread(self.load, lead_id, Lead)
        if grant is not None and lead.partner_tag != grant.tag:
            raise PermissionDenied(
                f"lead {lead_id} is not within the grant of partner {grant.client!r}"
            )
        return lead_view(lead)

    async def get_pipeline(self, pipeline_id: str) -> PipelineView:
        return pipeline_view(await asyncio.to_thread(self.load, pipeline_id, Pipeline))

    async def get_opportunity(self, opportunity_id: str) -> OpportunityView:
        return opportunity_view(await asyncio.to_thread(self.load, opportunity_id, Opportunity))

    async def get_activity(self, activity_id: str) -> ActivityView:
        return activity_view(await asyncio.to_thread(self.load, activity_id, Activity))

    # -- queries over every deal

    def _list_pipelines(self) -> list[PipelineView]:
        pipelines = [
            PipelineView(
                id=info.pipeline_id,
                version=version,
                name=info.name,
                stages=tuple(
                    StageView(s.stage_id, s.name, s.probability, s.category, s.retired)
                    for s in info.stages
                ),
            )
            for info, version in self.read_model.pipelines()
        ]
        return sorted(pipelines, key=lambda p: (p.name.casefold(), p.id))

    async def list_pipelines(self) -> list[PipelineView]:
        return await asyncio.to_thread(self._list_pipelines)

    def _list_opportunities(self, query: OpportunityQuery) -> OpportunityPage:
        page = validation.opportunity_page(query)
        listed = self.read_model.deals(
            pipeline_id=query.pipeline_id,
            owner=query.owner,
            customer_id=query.customer_id,
            status=page.status,
            size=page.size,
            offset=page.offset,
            after=page.after,
        )
        # Each deal as its row was when listed: a page shows one moment.
        views = [
            opportunity_view(self.app.repository.get(UUID(i), version=v)) for i, v in listed.items
        ]
        end = page.offset + len(views)
        token = validation.page_token(end, listed.after) if listed.after else ""
        return OpportunityPage(views, token, listed.total)

    async def list_opportunities(self, query: OpportunityQuery) -> OpportunityPage:
        return await asyncio.to_thread(self._list_opportunities, query)

    def _list_leads(self, query: LeadQuery, tag: str) -> LeadPage:
        page = validation.lead_page(query)
        listed = self.read_model.leads(
            status=page.status,
            owner=query.owner,
            partner_tag=tag,
            size=page.size,
            offset=page.offset,
            after=page.after,
        )
        views = [lead_view(self.app.repository.get(UUID(i), version=v)) for i, v in listed.items]
        end = page.offset + len(views)
        token = validation.page_token(end, listed.after) if listed.after else ""
        return LeadPage(views, token, listed.total)

    async def list_leads(self, query: LeadQuery, caller: Caller | None = None) -> LeadPage:
        """Leads by creation time; a partner (`caller`) lists only the leads it brought."""
        grant = self.grant_of(caller)
        return await asyncio.to_thread(self._list_leads, query, grant.tag if grant else "")

    def _list_activities(self, query: ActivityQuery) -> ActivityPage:
        page = validation.activity_page(query)
        listed = self.read_model.activities(
            due_from=query.due_from,
            due_before=query.due_before,
            owner=query.owner,
            status=page.status,
            size=page.size,
            offset=page.offset,
            after=page.after,
        )
        views = [
            activity_view(self.app.repository.get(UUID(i), version=v)) for i, v in listed.items
        ]
        end = page.offset + len(views)
        token = validation.page_token(end, listed.after) if listed.after else ""
        return ActivityPage(views, token, listed.total)

    async def list_activities(self, query: ActivityQuery) -> ActivityPage:
        """Activities due in a time range (of any status, or one), by due time."""
        return await asyncio.to_thread(self._list_activities, query)

    def _forecast(self, query: ForecastQuery) -> list[ForecastRow]:
        return self.read_model.forecast(
            period=query.period or "month",
            start=validation.optional_date(query.start, "start"),
            end=validation.optional_date(query.end, "end"),
            owner=query.owner or None,
            pipeline_id=query.pipeline_id or None,
        )

    async def get_forecast(self, query: ForecastQuery) -> list[ForecastRow]:
        return await asyncio.to_thread(self._forecast, query)

    def _funnel(self, pipeline_id: str) -> Funnel:
        result = self.read_model.funnel(pipeline_id)
        if result is None:
            raise NotFound("Pipeline", pipeline_id)
        return result

    async def get_funnel(self, pipeline_id: str) -> Funnel:
        return await asyncio.to_thread(self._funnel, pipeline_id)

    def _win_rate(self, query: WinRateQuery) -> WinRate:
        return self.read_model.win_rate(
            pipeline_id=query.pipeline_id or None,
            owner=query.owner or None,
            start=validation.optional_date(query.start, "start"),
            end=validation.optional_date(query.end, "end"),
        )

    async def get_win_rate(self, query: WinRateQuery) -> WinRate:
        return await asyncio.to_thread(self._win_rate, query)

    def _overdue(self, owner: str) -> dict[str, list[ActivityInfo]]:
        return self.read_model.overdue(self.clock(), owner or None)

    async def overdue_follow_ups(self, owner: str = "") -> dict[str, list[ActivityInfo]]:
        return await asyncio.to_thread(self._overdue, owner)
