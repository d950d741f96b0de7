"""End to end over the real processes: the audit trail answers "who did what to
this customer, when, through which client" after real commands through contacts
and pipeline (verified token → command → event → relay's audit headers →
projector → `audit`), for admins only, over gRPC and REST."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import grpc
import httpx
import pytest
from test_e2e_pipeline import define_pipeline, in_days

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm.customer360.v1 import customer360_pb2 as v
from crm.pipeline.v1 import pipeline_pb2 as p
from crm.pipeline.v1 import pipeline_pb2_grpc
from crm_deploy.testing import bearer, grpc_auth


async def test_the_audit_trail_names_who_did_what_when_through_which_client(
    platform: Any, pipeline: Any, customer360: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    ada = platform.identity.mint("sales", subject=f"ada-{tag}", client="sales-console")
    bob = platform.identity.mint("service", subject=f"bob-{tag}", client="service-desk")
    pipeline_id = await define_pipeline(pipeline)

    # Ada (sales, through the sales console) registers a person over gRPC...
    async with grpc.aio.insecure_channel(platform.contacts_grpc) as channel:
        created = await contacts_pb2_grpc.ContactsServiceStub(channel).CreatePerson(
            c.CreatePersonRequest(
                request_id=f"create-{tag}",
                given_name="Hedy",
                family_name=f"Lamarr{tag}",
                lifecycle_stage=c.LIFECYCLE_STAGE_LEAD,
            ),
            metadata=grpc_auth(ada),
        )
    person_id = created.result.id
    # ...Bob (service, through the service desk) logs a call over REST...
    async with httpx.AsyncClient(timeout=30) as http:
        call = await http.post(
            f"{platform.contacts_http}/contacts/{person_id}/interactions",
            json={
                "kind": "call",
                "direction": "inbound",
                "channel": "phone",
                "summary": "Asked about frequency hopping",
            },
            headers={**bearer(bob), "Idempotency-Key": f"call-{tag}"},
        )
        assert call.status_code == 201, call.text
    # ...and Ada opens a deal for the person in the pipeline service.
    async with grpc.aio.insecure_channel(platform.pipeline_grpc) as channel:
        opened = await pipeline_pb2_grpc.PipelineServiceStub(channel).OpenOpportunity(
            p.OpenOpportunityRequest(
                request_id=f"open-{tag}",
                pipeline_id=pipeline_id,
                name="Torpedo guidance",
                customer_id=person_id,
                person_id=person_id,
                owner=f"ada-{tag}",
                amount=p.Money(amount="500.00", currency="EUR"),
                expected_close_date=in_days(20),
            ),
            metadata=grpc_auth(ada),
        )

    # The audit entries are written with the 360 change: once the view shows the
    # writes, so does the trail.
    await customer360.GetCustomer360(
        v.GetCustomer360Request(
            customer_id=person_id,
            wait_for={
                "contacts": call.json()["position"],
                "pipeline": opened.result.position,
            },
            wait_timeout_ms=20000,
        )
    )
    admin = platform.identity.mint("admin", subject=f"auditor-{tag}", client="audit-console")
    async with httpx.AsyncClient(base_url=platform.analytics_http, timeout=30) as http:
        reply = await http.get("/audit", params={"customer_id": person_id}, headers=bearer(admin))
        assert reply.status_code == 200, reply.text
        entries = reply.json()["entries"]
        who = [
            (e["source"], e["command"], e["actor"], e["client"], e["request_id"])
            for e in reversed(entries)  # oldest first
        ]
        assert who[:3] == [
            ("contacts", "CreatePerson", f"ada-{tag}", "sales-console", f"create-{tag}"),
            ("contacts", "LogInteraction", f"bob-{tag}", "service-desk", f"call-{tag}"),
            ("pipeline", "OpenOpportunity", f"ada-{tag}", "sales-console", f"open-{tag}"),
        ]
        times = [datetime.fromisoformat(e["occurred_at"]) for e in entries]
        assert times == sorted(times, reverse=True)
        assert {e["customer_id"] for e in entries} == {person_id}

        # Per actor: everything Bob did, whatever the customer.
        bobs = await http.get("/audit", params={"actor": f"bob-{tag}"}, headers=bearer(admin))
        assert [(e["customer_id"], e["command"]) for e in bobs.json()["entries"]] == [
            (person_id, "LogInteraction")
        ]

        # Nobody but an admin reads the trail.
        for token in (ada, bob, platform.identity.mint("analyst")):
            refused = await http.get(
                "/audit", params={"customer_id": person_id}, headers=bearer(token)
            )
            assert refused.status_code == 403, refused.text

    # The same over gRPC.
    trail = await customer360.GetAuditTrail(
        v.GetAuditTrailRequest(customer_id=person_id), metadata=grpc_auth(admin)
    )
    assert [(e.command, e.actor, e.client) for e in reversed(trail.entries)][:3] == [
        (command, actor, client) for _, command, actor, client, _ in who[:3]
    ]
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await customer360.GetAuditTrail(
            v.GetAuditTrailRequest(customer_id=person_id), metadata=grpc_auth(bob)
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
