"""What the pipeline holds about a person, exported over gRPC
(`crm.privacy.v1.PersonalDataService/ExportPersonalData`) on a real in-process
server with real tokens: administrators (and the platform) may ask, sales
users may not. The document lists the person's leads, deals and activities,
each as it stands and with its history, personal values opened, or erased
once the person is.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from pipeline_support import STAGES, Clock, InProcessContacts, WithToken

from crm.privacy.v1 import privacy_pb2 as pp
from crm.privacy.v1 import privacy_pb2_grpc
from crm_common.commands import Caller
from crm_common.contact_events import ContactChange
from crm_common.privacy import REDACTED, new_master_key
from crm_common.privacy.export import personal_data_service
from crm_common.server import AccessInterceptor
from crm_common.settings import Settings
from crm_contacts.application import ContactsService
from crm_contacts.application import create_application as create_contacts
from crm_deploy.identity import Identity
from crm_deploy.testing import gate_for
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.contact_changes import PipelineContactChanges
from crm_pipeline.grpc_api import grpc_service
from crm_pipeline.inputs import LeadConversion, NewActivity, NewLead

CALLER = Caller(actor="ann", client="tests")


@dataclass
class Exporting:
    admin: Any
    sales: Any
    service: PipelineService
    clock: Clock


def settings_of(tmp_path: Path, service: str, master: str = "") -> Settings:
    return Settings(
        service=service,
        data_dir=tmp_path,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
        master_keys=master,
    )


@pytest.fixture
async def exporting(tmp_path: Path, identity: Identity) -> AsyncIterator[Exporting]:
    contacts = ContactsService(create_contacts(settings_of(tmp_path, "contacts")))
    clock = Clock()
    service = PipelineService(
        create_application(settings_of(tmp_path, "pipeline", new_master_key("m-export"))),
        InProcessContacts(contacts),
        clock=clock,
    )
    gate = gate_for("pipeline", identity)
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate)])
    for registered in (
        grpc_service(service),
        personal_data_service("pipeline", service.export_person),
    ):
        registered.add_to_server(registered.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = privacy_pb2_grpc.PersonalDataServiceStub(channel)
            yield Exporting(
                WithToken(stub, identity.mint("admin", subject="root", client="export-tests")),
                WithToken(stub, identity.mint("sales", subject="ann", client="export-tests")),
                service,
                clock,
            )
    finally:
        await server.stop(grace=None)
        service.close()
        contacts.close()


async def history_of_a_person(exporting: Exporting) -> dict[str, str]:
    service, clock = exporting.service, exporting.clock
    pipeline_id = (await service.define_pipeline(CALLER, "Direct", STAGES)).outcome.id
    new = NewLead(
        "Somerville", "web", "bob", "Mary", email="mary@example.org", phone="+44 131 496 0000"
    )
    lead_id = (await service.create_lead(CALLER, new)).outcome.id
    await service.qualify_lead(CALLER, lead_id, 75)
    conversion = LeadConversion(lead_id, pipeline_id, "4800", "EUR", "2026-04-30")
    extra = (await service.convert_lead(CALLER, conversion)).outcome.extra
    due = clock() + timedelta(days=1)
    activity = NewActivity(
        "opportunity", extra["opportunity_id"], "call", "Ask Mary about the atlas", "ann", due
    )
    activity_id = (await service.schedule_activity(CALLER, activity)).outcome.id
    await service.complete_activity(CALLER, activity_id, "Mary wants two copies")
    return {
        "person": extra["person_id"],
        "lead": lead_id,
        "deal": extra["opportunity_id"],
        "activity": activity_id,
    }


async def exported(stub: Any, contact_id: str) -> dict[str, Any]:
    reply = await stub.ExportPersonalData(pp.ExportPersonalDataRequest(contact_id=contact_id))
    assert reply.service == "pipeline"
    document: dict[str, Any] = json.loads(reply.document_json)
    return document


async def test_an_administrator_exports_a_persons_leads_deals_and_activities(
    exporting: Exporting,
) -> None:
    ids = await history_of_a_person(exporting)

    document = await exported(exporting.admin, ids["person"])

    assert sorted(document) == ["activities", "deals", "leads"]
    (lead,) = document["leads"]
    assert lead["id"] == ids["lead"]
    assert (lead["state"]["given_name"], lead["state"]["email"]) == ("Mary", "mary@example.org")
    assert [(h["type"], h["version"], h["actor"]) for h in lead["history"]] == [
        ("Lead.Created", 1, "ann"),
        ("Lead.Qualified", 2, "ann"),
        ("Lead.Converted", 3, "ann"),
    ]
    assert lead["history"][0]["fields"]["phone"] == "+44 131 496 0000"
    assert lead["history"][2]["fields"]["person_id"] == ids["person"]
    (deal,) = document["deals"]
    assert (deal["id"], deal["state"]["name"]) == (ids["deal"], "Mary Somerville")
    assert deal["state"]["amount"] == {"amount": "4800.00", "currency": "EUR"}
    assert deal["history"][0]["fields"]["amount"] == "4800.00"
    (activity,) = document["activities"]
    assert (activity["state"]["title"], activity["state"]["outcome"]) == (
        "Ask Mary about the atlas",
        "Mary wants two copies",
    )
    assert [h["type"] for h in activity["history"]] == ["Activity.Scheduled", "Activity.Completed"]
    assert activity["history"][0]["time"].startswith("20")

    # Someone the pipeline knows nothing about: an empty document.
    assert await exported(exporting.admin, "person-unknown") == {
        "activities": [],
        "deals": [],
        "leads": [],
    }


async def test_an_erased_person_exports_as_erased_with_the_business_facts(
    exporting: Exporting,
) -> None:
    ids = await history_of_a_person(exporting)
    changes = PipelineContactChanges(exporting.service)
    await changes.person_erased(
        ContactChange("person_erased", ids["person"], (), "dsr-2", f"{ids['person']}:4", "root")
    )

    document = await exported(exporting.admin, ids["person"])

    (lead,) = document["leads"]
    assert (lead["state"]["given_name"], lead["state"]["email"], lead["state"]["score"]) == (
        REDACTED,
        REDACTED,
        75,
    )
    assert lead["history"][0]["fields"]["email"] == REDACTED
    (deal,) = document["deals"]
    assert (deal["state"]["name"], deal["state"]["amount"]["amount"]) == (REDACTED, "4800.00")
    (activity,) = document["activities"]
    assert (activity["state"]["title"], activity["state"]["status"]) == (REDACTED, "completed")
    assert [h["type"] for h in activity["history"]][-1] == "Activity.PersonalDataErased"
    assert "Mary" not in json.dumps(document)


async def test_a_sales_user_may_not_export_and_a_bad_id_is_refused(exporting: Exporting) -> None:
    ids = await history_of_a_person(exporting)

    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await exporting.sales.ExportPersonalData(
            pp.ExportPersonalDataRequest(contact_id=ids["person"])
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await exporting.admin.ExportPersonalData(pp.ExportPersonalDataRequest(contact_id="a b"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contact_id" in (bad.value.details() or "")
