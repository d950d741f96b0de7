"""`python -m bench.projector`: the 360 projector under load and its rebuild rate.

One run starts the real local stack (Kafka, SecantusDB, the service
processes) on free ports in a scratch directory and measures, each against a
baseline of the same run:

- the document store's raw bulk-write rate: the 360 documents the rebuild
  below produced, written again under new ids with unordered `insert_many`
  calls of `--bulk` documents into an empty collection with the 360's index
  (no transaction, nothing read): the ceiling any projection of these
  documents has on this store;
- a full rebuild of the 360 view (what `crm-analytics rebuild` runs) over a
  history of `--customers` customers with about ten events each on the
  contacts and pipeline topics (registration, consent, profile updates,
  interactions; a deal opened, moved and won or lost), in events/s and
  documents/s, and as a share of the raw bulk-write rate;
- per event store (SQLite, PostgreSQL): the bare `save()` loop
  (bench/baseline.py), then the lag from a `CreatePerson` acknowledgement
  until its 360 document shows the position (bench/load.py's open loop) at
  200 commands/s, and at stepped offered rates until the p99 reaches 500 ms;
  the highest rate under it is given as a multiple of the bare-save rate.

The section between the projector markers of docs/benchmarks.md is
rewritten; numbers are recorded, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaProducer
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from pymongo import MongoClient

from bench import postgres as bench_postgres
from bench.baseline import bare_save_loop
from bench.load import Lag, open_loop_lag
from bench.sections import record_section
from crm.contacts.v1 import contacts_pb2
from crm.events.v1 import contacts_pb2 as contact_events
from crm.events.v1 import pipeline_pb2 as pipeline_events
from crm.pipeline.v1 import pipeline_pb2
from crm_analytics.store import PROJECTION, REBUILD_BATCH, Customer360Store
from crm_common.projection import ProjectionConsumer
from crm_common.relay import audit_headers, cloudevent_headers
from crm_deploy.servers import ensure_topics
from crm_deploy.stack import TOPIC_SERVICES, Stack, StackConfig
from crm_deploy.testing import grpc_auth

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = ["contacts-api", "contacts-relay", "analytics-api", "analytics-projector"]
BEGIN = "<!-- projector benchmark: begin (written by python -m bench.projector) -->"
END = "<!-- projector benchmark: end -->"
#: The lag target at the stepped rates: the highest rate whose p99 stays under it.
P99_LIMIT_MS = 500.0
T0 = datetime(2025, 1, 1, tzinfo=UTC)
PIPELINE = "bench-sales"
STAGES = [
    ("qualify", pipeline_pb2.FORECAST_CATEGORY_PIPELINE),
    ("propose", pipeline_pb2.FORECAST_CATEGORY_BEST_CASE),
    ("negotiate", pipeline_pb2.FORECAST_CATEGORY_COMMIT),
]
CLOSED = [
    ("won", pipeline_pb2.FORECAST_CATEGORY_CLOSED_WON),
    ("lost", pipeline_pb2.FORECAST_CATEGORY_CLOSED_LOST),
]


# -- a realistic history ----------------------------------------------------------------


def _ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


@dataclass
class History:
    """Events of both topics in log order, with what a rebuild must end with."""

    contacts: list[contact_events.ContactEvent] = field(default_factory=list)
    pipeline: list[pipeline_events.PipelineEvent] = field(default_factory=list)
    customers: int = 0

    @property
    def events(self) -> int:
        return len(self.contacts) + len(self.pipeline)


def history(customers: int, seed: int = 15) -> History:
    """About ten events per customer, spread over a year as a service would log them:
    each customer registers at some moment, and its later events (consent,
    profile updates, interactions, one deal opened, moved and won or lost)
    follow at random moments after it, interleaved with everybody else's."""
    rng = random.Random(seed)
    timeline: list[tuple[float, str, str, int]] = []  # (when, topic, customer, step)
    for n in range(customers):
        start = rng.random() * 300
        timeline.append((start, "contacts", f"c{n}", 0))
        for step in range(1, 6):
            timeline.append((start + rng.random() * 65, "contacts", f"c{n}", step))
        for step in range(4):
            timeline.append((start + 1 + rng.random() * 64, "pipeline", f"c{n}", step))
    timeline.sort()
    result = History(customers=customers)
    versions: dict[str, int] = {}
    deal_steps: dict[str, int] = {}
    for when_days, topic, customer, step in timeline:
        when = T0 + timedelta(days=when_days)
        if topic == "contacts":
            version = versions[customer] = versions.get(customer, 0) + 1
            result.contacts.append(
                _contact_event(customer, version, len(result.contacts) + 1, when, step, rng)
            )
        else:
            order = deal_steps[customer] = deal_steps.get(customer, 0) + 1
            if order == 1 and not result.pipeline:
                result.pipeline.append(_pipeline_defined(1, when))
            result.pipeline.append(
                _deal_event(customer, order, len(result.pipeline) + 1, when, rng)
            )
    return result


def _profile(customer: str, family: str) -> contact_events.PersonProfile:
    profile = contact_events.PersonProfile(
        given_name=f"Given{customer}",
        family_name=family,
        lifecycle_stage=contacts_pb2.LIFECYCLE_STAGE_LEAD,
        tags=["bench", "newsletter"],
        owner="grace",
        channels=[
            contacts_pb2.ChannelIdentity(
                channel=contacts_pb2.CHANNEL_EMAIL,
                address=f"{customer}@example.com",
                preferred=True,
                consent=contacts_pb2.Consent(
                    status=contacts_pb2.CONSENT_STATUS_GRANTED,
                    source="web-form:newsletter",
                    recorded_at=_ts(T0),
                ),
            )
        ],
    )
    profile.custom_fields["budget"].CopyFrom(
        contacts_pb2.CustomFieldValue(type="money", value="1234.50", currency="EUR")
    )
    return profile


def _contact_event(
    customer: str, version: int, position: int, when: datetime, step: int, rng: random.Random
) -> contact_events.ContactEvent:
    event = contact_events.ContactEvent(
        contact_id=customer,
        version=version,
        position=position,
        occurred_at=_ts(when),
        actor="bench",
        client="bench",
    )
    if version == 1:
        event.person_registered.profile.CopyFrom(_profile(customer, "Family"))
    elif step == 1:
        event.consent_recorded.CopyFrom(
            contact_events.ConsentRecorded(
                channel=contacts_pb2.CHANNEL_EMAIL,
                address=f"{customer}@example.com",
                consent=contacts_pb2.Consent(
                    status=rng.choice(
                        [contacts_pb2.CONSENT_STATUS_GRANTED, contacts_pb2.CONSENT_STATUS_WITHDRAWN]
                    ),
                    source="call:agent-7",
                    recorded_at=_ts(when),
                ),
            )
        )
    elif step == 2:
        event.person_profile_updated.profile.CopyFrom(_profile(customer, f"Family{version}"))
        event.person_profile_updated.changed_fields.append("family_name")
    else:
        event.interaction_logged.interaction.CopyFrom(
            contacts_pb2.Interaction(
                interaction_id=f"{customer}-i{version}",
                kind=contacts_pb2.INTERACTION_KIND_CALL,
                direction=contacts_pb2.DIRECTION_OUTBOUND,
                channel=contacts_pb2.CHANNEL_PHONE,
                summary=f"call {version} about the renewal and the next order",
                occurred_at=_ts(when),
                owner="grace",
            )
        )
    return event


def _pipeline_defined(position: int, when: datetime) -> pipeline_events.PipelineEvent:
    event = pipeline_events.PipelineEvent(
        aggregate_id=PIPELINE, version=1, position=position, occurred_at=_ts(when), actor="bench"
    )
    event.pipeline_defined.CopyFrom(
        pipeline_events.PipelineDefined(
            name="Sales",
            stages=[
                pipeline_pb2.Stage(stage_id=s, name=s.title(), probability="10", category=c)
                for s, c in [*STAGES, *CLOSED]
            ],
        )
    )
    return event


def _deal_event(
    customer: str, order: int, position: int, when: datetime, rng: random.Random
) -> pipeline_events.PipelineEvent:
    deal = f"{customer}-d1"
    event = pipeline_events.PipelineEvent(
        customer_id=customer,
        aggregate_id=deal,
        version=order,
        position=position,
        occurred_at=_ts(when),
        actor="bench",
        client="bench",
    )
    amount = pipeline_pb2.Money(amount=f"{rng.randint(5, 500) * 100}.00", currency="EUR")
    if order == 1:
        event.opportunity_opened.CopyFrom(
            pipeline_events.OpportunityOpened(
                pipeline_id=PIPELINE,
                stage_id="qualify",
                name=f"Deal of {customer}",
                person_id=customer,
                owner="grace",
                amount=amount,
                expected_close_date="2025-12-31",
                kind=pipeline_pb2.OPPORTUNITY_KIND_NEW_BUSINESS,
            )
        )
    elif order < 4:
        event.opportunity_stage_changed.CopyFrom(
            pipeline_events.OpportunityStageChanged(
                from_stage_id=STAGES[order - 2][0], stage_id=STAGES[order - 1][0]
            )
        )
    elif rng.random() < 0.6:
        event.opportunity_won.CopyFrom(
            pipeline_events.OpportunityWon(
                stage_id="won", person_id=customer, amount=amount, closed_on="2025-11-20"
            )
        )
    else:
        event.opportunity_lost.CopyFrom(
            pipeline_events.OpportunityLost(stage_id="lost", reason="price")
        )
    return event


async def publish(bootstrap: str, topic: str, source: str, events: Sequence[Message]) -> None:
    """Publishes like the services' relays: keyed by customer, CloudEvents and audit headers."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=20,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    try:
        acks = []
        for event in events:
            payload = event.WhichOneof("payload") or "unknown"
            subject = getattr(event, "contact_id", "") or getattr(event, "customer_id", "")
            key = subject or getattr(event, "aggregate_id", "")
            aggregate = getattr(event, "contact_id", "") or getattr(event, "aggregate_id", "")
            headers = cloudevent_headers(
                ce_id=f"{aggregate}:{getattr(event, 'version')}",  # noqa: B009
                ce_type=f"crm.{source}.v1." + "".join(p.title() for p in payload.split("_")),
                source=f"/crm/{source}",
                subject=key,
                time_=getattr(event, "occurred_at").ToDatetime(tzinfo=UTC),  # noqa: B009
                proto_message=event.DESCRIPTOR.full_name,
                position=getattr(event, "position"),  # noqa: B009
            )
            headers += audit_headers({"actor": "bench", "client": "bench", "command": payload})
            acks.append(
                await producer.send(
                    topic, event.SerializeToString(), key=key.encode(), headers=headers
                )
            )
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


# -- rebuild and raw writes --------------------------------------------------------------


@dataclass
class RebuildRun:
    customers: int
    events: int = 0
    documents: int = 0
    seconds: float = 0.0
    batches: int = 0
    document_kib: float = 0.0
    raw_documents: int = 0
    raw_seconds: float = 0.0
    raw_batch: int = 0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def documents_per_second(self) -> float:
        return self.documents / self.seconds if self.seconds else 0.0

    @property
    def raw_per_second(self) -> float:
        return self.raw_documents / self.raw_seconds if self.raw_seconds else 0.0


async def measure_rebuild(
    stack: Stack, customers: int, bulk: int, *, prefix: str = "bench-rebuild.crm"
) -> RebuildRun:
    """Publishes the history, rebuilds the 360 view from it as `crm-analytics rebuild`
    does, then writes its documents again raw; both on the stack's document store."""
    run = RebuildRun(customers)
    topics = {"contacts": f"{prefix}.contacts.events", "pipeline": f"{prefix}.pipeline.events"}
    ensure_topics(stack.kafka_bootstrap, dict.fromkeys(topics.values(), 6))
    story = await asyncio.to_thread(history, customers)
    print(f"[rebuild] publishing {story.events:,} events of {customers:,} customers", flush=True)
    await publish(stack.kafka_bootstrap, topics["contacts"], "contacts", story.contacts)
    await publish(stack.kafka_bootstrap, topics["pipeline"], "pipeline", story.pipeline)
    client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_url, tz_aware=True)
    database = client[f"bench_rebuild_{secrets.token_hex(3)}"]
    try:
        store = Customer360Store(database, topics=topics)
        started = time.perf_counter()
        await asyncio.to_thread(store.drop)
        await asyncio.to_thread(store.ensure_indexes)
        consumer = ProjectionConsumer(
            projection=PROJECTION,
            topics=list(topics.values()),
            read_model=store,
            mongo=client,
            database=database.name,
            bootstrap=stack.kafka_bootstrap,
            max_records=REBUILD_BATCH,
        )
        result = await consumer.run_until_caught_up(by_partition=True)
        run.seconds = time.perf_counter() - started
        run.events, run.batches = result.records, result.batches
        run.documents = await asyncio.to_thread(store.count)
        print(
            f"[rebuild]   {run.events:,} events, {run.documents:,} documents in "
            f"{run.seconds:.1f} s: {run.events_per_second:,.0f} events/s",
            flush=True,
        )
        docs = await asyncio.to_thread(lambda: list(store.collection.find()))
        run.document_kib = statistics.fmean(len(repr(d)) for d in docs) / 1024 if docs else 0.0
        run.raw_documents, run.raw_batch = len(docs), bulk
        run.raw_seconds = await asyncio.to_thread(raw_bulk_write, database, docs, bulk)
        print(f"[rebuild]   raw bulk writes: {run.raw_per_second:,.0f} documents/s", flush=True)
    finally:
        client.drop_database(database.name)
        client.close()
    return run


def raw_bulk_write(database: Any, docs: Sequence[Mapping[str, Any]], bulk: int) -> float:
    """Seconds to insert `docs` again under new ids, `bulk` per unordered `insert_many`,
    into an empty collection with the 360's index."""
    collection = database["raw_bulk_write"]
    collection.drop()
    collection.create_index("companies.company_id")
    copies = [{**d, "_id": f"raw-{d['_id']}"} for d in docs]
    started = time.perf_counter()
    for start in range(0, len(copies), bulk):
        collection.insert_many(copies[start : start + bulk], ordered=False)
    seconds = time.perf_counter() - started
    collection.drop()
    return seconds


# -- lag under load ----------------------------------------------------------------------


@dataclass
class LagRun:
    store: str
    baseline: float = 0.0
    at_200: Lag | None = None
    steps: list[Lag] = field(default_factory=list)

    @property
    def highest_under_limit(self) -> float:
        ok = [s.offered_per_second for s in self.steps if _p99(s) < P99_LIMIT_MS and not s.unseen]
        return max(ok, default=0.0)


def _p99(lag: Lag) -> float:
    return lag.summary()["p99"]


async def measure_lag(
    stack: Stack, store: str, scratch: Path, rates: Sequence[float], seconds: float
) -> LagRun:
    run = LagRun(store)
    schema = f"bench_{secrets.token_hex(4)}"
    prefix = f"bench-lag-{store}.crm"
    mongo_db = f"crm_bench_lag_{store}"
    ensure_topics(stack.kafka_bootstrap, {f"{prefix}.{name}.events": 6 for name in TOPIC_SERVICES})
    env = {
        "CRM_EVENT_STORE": store,
        "CRM_TOPIC_PREFIX": prefix,
        "CRM_MONGO_DB": mongo_db,
        **(bench_postgres.env(schema) if store == "postgres" else {}),
    }
    print(f"[lag/{store}] baseline (bare save loop)", flush=True)
    run.baseline = bare_save_loop(
        scratch / f"projector-baseline-{store}", store, 2000, f"{schema}_baseline"
    )
    print(f"[lag/{store}]   {run.baseline:,.0f} saves/s", flush=True)
    stack.start_services(PROCESSES, extra_env=env)
    target = f"127.0.0.1:{stack.config.service_ports['contacts'][0]}"
    try:
        await asyncio.sleep(3)

        async def at(rate: float, duration: float) -> Lag:
            lag = await open_loop_lag(
                target,
                stack.mongo_url,
                mongo_db,
                rate,
                duration,
                bootstrap=stack.kafka_bootstrap,
                topic=f"{prefix}.contacts.events",
                metadata=grpc_auth(stack.identity.mint("sales", client="bench")),
            )
            s = lag.summary()
            print(
                f"[lag/{store}]   {rate:.0f}/s offered, {lag.commands / lag.seconds:.0f}/s "
                f"achieved: p50 {s['p50']:.0f} ms, p99 {s['p99']:.0f} ms, unseen {lag.unseen}",
                flush=True,
            )
            await asyncio.sleep(2)  # the projector drains before the next step
            return lag

        run.at_200 = await at(200.0, seconds)
        for rate in rates:
            lag = await at(rate, seconds / 2)
            run.steps.append(lag)
            achieved = lag.commands / lag.seconds
            if _p99(lag) >= P99_LIMIT_MS or lag.unseen or achieved < 0.9 * rate:
                break
    finally:
        stack.stop_services(PROCESSES)
        if store == "postgres":
            for name in (schema, f"{schema}_baseline"):
                bench_postgres.drop_schema(name)
    return run


# -- report ------------------------------------------------------------------------------


def render(rebuild: RebuildRun | None, lags: list[LagRun], when: str) -> str:
    lines = [
        BEGIN,
        "## 360 view: lag under load and rebuild rate",
        "",
        f"Written by `python -m bench.projector` ({when}; {psutil.cpu_count()} cores, "
        "the whole stack and the load generator on them). See the module's docstring "
        "for what each figure is.",
        "",
    ]
    if lags:
        lines += [
            "Command → 360 lag (acknowledgement of `CreatePerson` until the change stream "
            "shows the document at its position), per event store, against the bare "
            "`save()` loop of the same run:",
            "",
            "| store | bare saves/s | 200 commands/s: p50 / p99 | highest rate with p99 < "
            "500 ms | as a multiple of the bare-save rate | steps (offered: p99) |",
            "|---|---|---|---|---|---|",
        ]
        for r in lags:
            assert r.at_200 is not None
            s = r.at_200.summary()
            top = r.highest_under_limit
            steps = ", ".join(f"{x.offered_per_second:.0f}: {_p99(x):.0f} ms" for x in r.steps)
            if _p99(r.at_200) >= P99_LIMIT_MS:
                highest = "none: over 500 ms from 200/s on | -"
            elif not top:
                highest = f"200/s | **{200 / r.baseline:.2f}x**"
            else:
                highest = f"{top:,.0f}/s | **{top / r.baseline:.2f}x**"
            lines.append(
                f"| {r.store} | {r.baseline:,.0f} | {s['p50']:.0f} / **{s['p99']:.0f} ms** | "
                f"{highest} | {steps} |"
            )
        lines += ["", "Target: p99 under 100 ms at 200 commands/s on both stores.", ""]
    if rebuild is not None:
        share = rebuild.events_per_second / rebuild.raw_per_second if rebuild.raw_per_second else 0
        lines += [
            f"Full rebuild (`crm-analytics rebuild`'s path, chunks of {REBUILD_BATCH:,} "
            f"records) of {rebuild.customers:,} customers, {rebuild.events:,} events on the "
            "contacts and pipeline topics, against the raw bulk-write rate of the same "
            f"documents (about {rebuild.document_kib:.1f} KiB each, {rebuild.raw_batch:,} per "
            "`insert_many`):",
            "",
            "| rebuild events/s | rebuild documents/s | raw bulk writes, documents/s | "
            "rebuild events/s as a share of it |",
            "|---|---|---|---|",
            f"| {rebuild.events_per_second:,.0f} ({rebuild.seconds:.1f} s, "
            f"{rebuild.batches} batches) | {rebuild.documents_per_second:,.0f} | "
            f"{rebuild.raw_per_second:,.0f} | **{share:.0%}** |",
            "",
            "Target: at least 70%.",
            "",
        ]
    lines.append(END)
    return "\n".join(lines)


def record(text: str, out: Path) -> None:
    """Replaces this benchmark's section of `out` (or adds it)."""
    record_section(out, text, BEGIN, END)


async def run(args: argparse.Namespace) -> str:
    stores = [s for s in args.stores.split(",") if s]
    rates = [float(r) for r in args.rates.split(",") if r]
    with tempfile.TemporaryDirectory(prefix="crm-bench-projector-") as tmp:
        scratch = Path(tmp)
        stack = Stack(StackConfig.for_tests(scratch / "stack"))
        stack.start_infra()
        try:
            rebuild = (
                await measure_rebuild(stack, args.customers, args.bulk)
                if args.customers > 0
                else None
            )
            lags = [
                await measure_lag(stack, store, scratch, rates, args.seconds) for store in stores
            ]
        finally:
            stack.stop()
    return render(rebuild, lags, datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.projector", description=__doc__)
    parser.add_argument("--stores", default="sqlite,postgres", help="'' skips the lag runs")
    parser.add_argument("--customers", type=int, default=20_000, help="0 skips the rebuild")
    parser.add_argument("--bulk", type=int, default=1000, help="documents per raw insert_many")
    parser.add_argument("--seconds", type=float, default=20.0, help="the 200/s run's length")
    parser.add_argument("--rates", default="200,300,400,600,800,1000,1200,1600")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    text = asyncio.run(run(args))
    print(text)
    if args.out:
        record(text, Path(args.out))


if __name__ == "__main__":
    os.environ.setdefault("CRM_LOG_LEVEL", "WARNING")
    main()
