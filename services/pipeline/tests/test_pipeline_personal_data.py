"""A person's personal data at rest in the pipeline store, on SQLite and PostgreSQL.

With master keys configured, the service's own commands (a lead with its
activity, qualified and converted into a deal named after the person,
activities on the deal completed and cancelled, the deal won) leave none of
the person's name, email, phone or the activities' texts in clear in any row
of the event, snapshot or key tables, while the service still shows them.

The pipeline holds a person's data under several subjects: the lead's own
id (a prospect has no contact id until converted), the customer's contact
id (the deal's copy of their name), and each activity's id (an activity of
a lead not yet converted has no customer). Once those keys are destroyed,
loading shows the redaction marker where the data was, and the business
facts (amounts, stages, statuses, scores, the win rate) are unchanged; a
write carrying personal data for an erased subject is refused with
`SubjectErased`.

The query tables are left out of this scan: they hold activity titles in
clear until the person is erased through the contacts follower
(`test_pipeline_contact_changes.py` scans every table after that).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from pipeline_support import STAGES, Clock, InProcessContacts

from crm_common.commands import Caller
from crm_common.privacy import REDACTED, SubjectErased, new_master_key
from crm_common.settings import Settings
from crm_contacts.application import ContactsService
from crm_contacts.application import create_application as create_contacts
from crm_deploy.testing import drop_schema, found_in_clear, postgres_settings
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.inputs import (
    LeadConversion,
    LeadQuery,
    NewActivity,
    NewLead,
    NewOpportunity,
    OpportunityQuery,
    WinRateQuery,
)

CALLER = Caller(actor="ann", client="tests")
GIVEN, FAMILY = "Augusta", "Lovelace-Byron"
EMAIL, PHONE = "augusta.ada@example.org", "+44 20 7946 0018"
LEAD_TITLE = "Call Augusta about the difference engine"
DEAL_TITLE = "Demo at Lovelace-Byron's home in Ockham"
OUTCOME = "She wants the brochure sent to her private address"
REASON = "Augusta is travelling until March"
#: What no stored row may hold in clear.
PERSONAL = (
    *(GIVEN, FAMILY, EMAIL, "augusta.ada", PHONE, "7946 0018"),
    *(LEAD_TITLE, DEAL_TITLE, OUTCOME, REASON),
)
STORED_TABLES = {
    "sqlite": ("stored_events", "stored_snapshots"),
    "postgres": ("pipeline_events", "pipeline_snapshots"),
}
KEY_TABLES = ("privacy_data_keys", "privacy_key_access")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def keyed(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """An empty store with master keys, snapshots every 3 events: SQLite, then PostgreSQL."""
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "3")
    master = new_master_key("m-pipeline")
    if request.param == "sqlite":
        yield Settings(
            service="pipeline",
            data_dir=tmp_path,
            bind_host="127.0.0.1",
            grpc_port=0,
            http_port=0,
            event_store="sqlite",
            master_keys=master,
        )
        return
    schema = f"pipeline_pd_{uuid.uuid4().hex[:10]}"
    yield dataclasses.replace(postgres_settings("pipeline", schema, tmp_path), master_keys=master)
    drop_schema(schema)


@pytest.fixture
def contacts(tmp_path: Path) -> Iterator[ContactsService]:
    service = ContactsService(
        create_contacts(
            Settings(
                service="contacts",
                data_dir=tmp_path,
                bind_host="127.0.0.1",
                grpc_port=0,
                http_port=0,
                event_store="sqlite",
            )
        )
    )
    yield service
    service.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pipeline(keyed: Settings, contacts: ContactsService, clock: Clock) -> Iterator[PipelineService]:
    service = PipelineService(create_application(keyed), InProcessContacts(contacts), clock=clock)
    yield service
    service.close()


def scanned(settings: Settings) -> tuple[str, ...]:
    """The event, snapshot and key tables of the store of `settings`."""
    return (*STORED_TABLES[settings.event_store], *KEY_TABLES)


def in_clear(settings: Settings, values: tuple[str, ...] = PERSONAL) -> list[str]:
    """The `values` a raw scan of the stored rows finds."""
    return found_in_clear(settings, scanned(settings), values)


@dataclasses.dataclass
class History:
    pipeline_id: str
    lead_id: str
    person_id: str
    deal_id: str
    #: Activities: on the lead, completed on the deal, cancelled, still open.
    activities: list[str]

    @property
    def subjects(self) -> list[str]:
        """Every subject the pipeline keeps this person's data under."""
        return [self.person_id, self.lead_id, *self.activities]


async def activity(pipeline: PipelineService, kind: str, subject_id: str, title: str) -> str:
    new = NewActivity(kind, subject_id, "call", title, "ann", pipeline.clock() + timedelta(days=2))
    written = await pipeline.schedule_activity(CALLER, new)
    return str(written.outcome.id)


async def busy_person(pipeline: PipelineService, clock: Clock) -> History:
    """A person's history through the service's commands, from lead to won deal."""
    pipeline_id = (await pipeline.define_pipeline(CALLER, "Direct", STAGES)).outcome.id
    new = NewLead(FAMILY, "event", "bob", GIVEN, email=EMAIL, phone=PHONE, campaign="expo-2026")
    lead_id = (await pipeline.create_lead(CALLER, new)).outcome.id
    on_lead = await activity(pipeline, "lead", lead_id, LEAD_TITLE)
    await pipeline.qualify_lead(CALLER, lead_id, 80)
    conversion = LeadConversion(lead_id, pipeline_id, "25000", "EUR", "2026-04-30")
    extra = (await pipeline.convert_lead(CALLER, conversion)).outcome.extra
    deal_id = extra["opportunity_id"]
    done = await activity(pipeline, "opportunity", deal_id, DEAL_TITLE)
    cancelled = await activity(pipeline, "opportunity", deal_id, DEAL_TITLE)
    still_open = await activity(pipeline, "opportunity", deal_id, DEAL_TITLE)
    clock.advance(days=1)
    await pipeline.complete_activity(CALLER, done, OUTCOME)
    await pipeline.cancel_activity(CALLER, cancelled, REASON)
    await pipeline.change_amount(CALLER, deal_id, "27500.50", "EUR")
    await pipeline.move_opportunity(CALLER, deal_id, "propose")
    clock.advance(days=1)
    await pipeline.win_opportunity(CALLER, deal_id)
    return History(
        pipeline_id,
        lead_id,
        extra["person_id"],
        deal_id,
        [on_lead, done, cancelled, still_open],
    )


async def test_a_persons_data_is_sealed_at_rest_and_shown_by_the_service(
    pipeline: PipelineService, keyed: Settings, clock: Clock
) -> None:
    h = await busy_person(pipeline, clock)

    assert in_clear(keyed) == []
    # What is not personal stays readable: campaign, amount, stage.
    assert in_clear(keyed, ("expo-2026", "27500.50", "propose")) == [
        "expo-2026",
        "27500.50",
        "propose",
    ]
    # The deal holds its customer's data: it is replayed, never snapshotted.
    assert pipeline.app.snapshots is not None
    assert list(pipeline.app.snapshots.get(uuid.UUID(h.deal_id))) == []

    lead = await pipeline.get_lead(h.lead_id)
    assert (lead.given_name, lead.family_name, lead.email, lead.phone) == (
        GIVEN,
        FAMILY,
        EMAIL,
        PHONE,
    )
    deal = await pipeline.get_opportunity(h.deal_id)
    assert (deal.name, deal.customer_id) == (f"{GIVEN} {FAMILY}", h.person_id)
    titles = [(await pipeline.get_activity(a)).title for a in h.activities]
    assert titles == [LEAD_TITLE, DEAL_TITLE, DEAL_TITLE, DEAL_TITLE]
    listed = await pipeline.list_leads(LeadQuery())
    assert [(v.id, v.email) for v in listed.leads] == [(h.lead_id, EMAIL)]
    deals = await pipeline.list_opportunities(OpportunityQuery(customer_id=h.person_id))
    assert [d.name for d in deals.opportunities] == [f"{GIVEN} {FAMILY}"]


async def test_an_erased_person_reads_redacted_with_the_business_facts_kept(
    pipeline: PipelineService, keyed: Settings, clock: Clock
) -> None:
    h = await busy_person(pipeline, clock)
    deal_before = await pipeline.get_opportunity(h.deal_id)
    rate_before = await pipeline.get_win_rate(WinRateQuery(pipeline_id=h.pipeline_id))
    keys = pipeline.app.personal_data_keys
    assert keys is not None

    assert [keys.destroy(s) for s in h.subjects] == [True] * len(h.subjects)

    lead = await pipeline.get_lead(h.lead_id)
    assert (lead.given_name, lead.family_name, lead.email, lead.phone) == (REDACTED,) * 4
    assert (lead.status, lead.score, lead.campaign) == ("converted", 80, "expo-2026")
    assert (lead.person_id, lead.opportunity_id) == (h.person_id, h.deal_id)
    deal = await pipeline.get_opportunity(h.deal_id)
    assert deal.name == REDACTED
    assert deal == dataclasses.replace(deal_before, name=REDACTED)
    assert deal.amount.amount == Decimal("27500.50")
    assert (deal.status, deal.stage_id) == ("won", "won")
    seen = [await pipeline.get_activity(a) for a in h.activities]
    assert [(a.title, a.status, a.outcome) for a in seen] == [
        (REDACTED, "open", ""),
        (REDACTED, "completed", REDACTED),
        (REDACTED, "cancelled", REDACTED),
        (REDACTED, "open", ""),
    ]
    listed = await pipeline.list_opportunities(OpportunityQuery(customer_id=h.person_id))
    assert [(d.name, d.amount.amount) for d in listed.opportunities] == [
        (REDACTED, Decimal("27500.50"))
    ]
    assert await pipeline.get_win_rate(WinRateQuery(pipeline_id=h.pipeline_id)) == rate_before
    assert in_clear(keyed) == []


async def test_a_write_of_personal_data_for_an_erased_person_is_refused(
    pipeline: PipelineService, keyed: Settings, clock: Clock
) -> None:
    h = await busy_person(pipeline, clock)
    keys = pipeline.app.personal_data_keys
    assert keys is not None
    for subject in h.subjects:
        keys.destroy(subject)
    stored = pipeline.app.recorder.max_notification_id()

    new_deal = NewOpportunity(
        h.pipeline_id, "Second engine", h.person_id, "ann", "900", "EUR", "2026-04-30"
    )
    with pytest.raises(SubjectErased):
        await pipeline.open_opportunity(CALLER, new_deal)
    with pytest.raises(SubjectErased):
        await pipeline.complete_activity(CALLER, h.activities[-1], "called her back")
    assert pipeline.app.recorder.max_notification_id() == stored

    # Business without personal data goes on: the deal reopens, the activity is rescheduled.
    reopened = await pipeline.reopen_opportunity(CALLER, h.deal_id)
    assert reopened.subject.status == "open"
    await pipeline.reschedule_activity(CALLER, h.activities[-1], clock() + timedelta(days=9))
    assert pipeline.app.recorder.max_notification_id() == stored + 2
    assert in_clear(keyed) == []
