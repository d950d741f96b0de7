"""The 360 projector's coalescing and pipelining over real topics and a real store.

A batch folds all events of one customer into one document write; the next
batch is read and decoded while the previous one commits. Whatever happens
between two such batches (the commit fails, the projector stops), the view
ends as the events say, with every event applied once and one audit entry
per event.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from contact_events import comparable, expected_documents, publish, story
from pipeline_events import deal_story
from pipeline_events import expected_documents as expected_with_deals
from pipeline_events import publish as publish_deals
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import AutoReconnect

from crm_analytics.store import Customer360Store, PreparedBatch
from crm_common.projection import ProjectionConsumer, stored_offsets


def consumer_for(
    servers: Any, database: Database[Any], store: Customer360Store, **kw: Any
) -> ProjectionConsumer:
    store.ensure_indexes()
    return ProjectionConsumer(
        projection="customer360",
        topics=list(store.topics.values()),
        read_model=store,
        mongo=database.client,
        database=database.name,
        bootstrap=servers.kafka_bootstrap,
        poll_timeout_ms=50,
        retry_backoff=0.05,
        **kw,
    )


def documents(database: Database[Any]) -> dict[str, Any]:
    return {d["_id"]: comparable(d) for d in database.customer360.find()}


def distinct_events(contact_events: Sequence[Any], deal_events: Sequence[Any] = ()) -> int:
    """Events as the audit trail counts them: one per id, a redelivery is the same."""
    return len({(e.contact_id, e.position) for e in contact_events}) + len(
        {(e.aggregate_id, e.version) for e in deal_events}
    )


async def test_a_batch_of_many_events_per_customer_gives_the_documents_of_one_by_one(
    analytics_servers, mongo, database, topic, pipeline_topic
):
    persons = [f"s21-p{n}" for n in range(6)]
    contact_events = story(seed=21, persons=6, companies=2, steps=240)
    deal_events = deal_story(seed=21, customers=persons, steps=160)
    await publish(analytics_servers.kafka_bootstrap, topic, contact_events)
    await publish_deals(analytics_servers.kafka_bootstrap, pipeline_topic, deal_events)
    topics = {"contacts": topic, "pipeline": pipeline_topic}

    # Every batch one record: each event read, applied and written on its own.
    single = mongo[f"{database.name}_one"]
    try:
        one_by_one = consumer_for(
            analytics_servers, single, Customer360Store(single, topics), max_records=1
        )
        singles = await one_by_one.run_until_caught_up()
        # Large batches: tens of events of each customer folded into one write.
        batched = consumer_for(
            analytics_servers, database, Customer360Store(database, topics), max_records=1000
        )
        result = await batched.run_until_caught_up()

        assert singles.batches == len(contact_events) + len(deal_events)
        assert documents(database) == documents(single)
        assert documents(database) == expected_with_deals(contact_events, deal_events)
        assert result.counters["applied"] == singles.counters["applied"]
        # One write per customer per batch, not one per event.
        customers = database.customer360.count_documents({})
        assert result.counters["documents_written"] <= result.batches * customers
        assert result.counters["documents_written"] < result.counters["applied"] / 5
        assert database.audit.count_documents({}) == single.audit.count_documents({})
        assert database.audit.count_documents({}) == distinct_events(contact_events, deal_events)
    finally:
        mongo.drop_database(single.name)


class FailingOnce(Customer360Store):
    """Fails the transaction of one batch after writing its documents (as a store
    that goes away mid-commit would), once the next batch has been prepared."""

    def __init__(self, *args: Any, fail_batch: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.fail_batch = fail_batch
        self.prepared = 0
        self.applied = 0
        self.prepared_ahead_at_failure: int | None = None

    def prepare_batch(self, records: Sequence[Any]) -> PreparedBatch:
        self.prepared += 1
        return super().prepare_batch(records)

    def apply_prepared(
        self, session: ClientSession, prepared: Sequence[PreparedBatch]
    ) -> Mapping[str, int]:
        counters = super().apply_prepared(session, prepared)
        self.applied += 1
        if self.applied == self.fail_batch:
            # Let the loop read and prepare the next batch meanwhile.
            for _ in range(100):
                if self.prepared > self.applied:
                    break
                threading.Event().wait(0.02)
            self.prepared_ahead_at_failure = self.prepared - self.applied
            raise AutoReconnect("the document store went away during the commit")
        return counters


async def test_a_commit_failing_while_the_next_batch_is_prepared_loses_and_repeats_nothing(
    analytics_servers, database, topic
):
    events = story(seed=22, steps=400)
    await publish(analytics_servers.kafka_bootstrap, topic, events)
    store = FailingOnce(database, {"contacts": topic}, fail_batch=3)
    consumer = consumer_for(analytics_servers, database, store, max_records=25)
    result = await consumer.run_until_caught_up()

    assert store.prepared_ahead_at_failure is not None and store.prepared_ahead_at_failure > 0
    assert documents(database) == expected_documents(events)
    # The failed batch and the one read ahead were both read and applied again.
    assert result.records == len(events)
    assert database.audit.count_documents({}) == distinct_events(events)
    assert consumer.stored_offsets() == result.end_offsets


class Held(Customer360Store):
    """Holds one batch's transaction open until released, to stop the projector
    while that batch commits and the next one is already prepared."""

    def __init__(self, *args: Any, hold_batch: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.hold_batch = hold_batch
        self.prepared = 0
        self.applied = 0
        self.holding = threading.Event()
        self.release = threading.Event()

    def prepare_batch(self, records: Sequence[Any]) -> PreparedBatch:
        self.prepared += 1
        return super().prepare_batch(records)

    def apply_prepared(
        self, session: ClientSession, prepared: Sequence[PreparedBatch]
    ) -> Mapping[str, int]:
        counters = super().apply_prepared(session, prepared)
        self.applied += 1
        if self.applied == self.hold_batch:
            self.holding.set()
            self.release.wait(30)
        return counters


async def test_a_projector_stopped_between_pipelined_batches_resumes_exactly(
    analytics_servers, database, topic
):
    events = story(seed=23, steps=400)
    await publish(analytics_servers.kafka_bootstrap, topic, events)
    store = Held(database, {"contacts": topic}, hold_batch=4)
    consumer = consumer_for(analytics_servers, database, store, max_records=20)
    task = asyncio.create_task(consumer.run(asyncio.Event()))
    assert await asyncio.to_thread(store.holding.wait, 30)
    for _ in range(200):  # the next batch is read and prepared meanwhile
        if store.prepared > store.applied:
            break
        await asyncio.sleep(0.02)
    assert store.prepared > store.applied
    task.cancel()
    await asyncio.sleep(0.1)
    store.release.set()  # the held transaction commits: a stop cannot undo it
    await asyncio.gather(task, return_exceptions=True)
    stopped_at = sum(stored_offsets(database, "customer360").values())
    assert 0 < stopped_at < len(events)

    successor = consumer_for(analytics_servers, database, Customer360Store(database, store.topics))
    result = await successor.run_until_caught_up()
    assert result.records == len(events) - stopped_at
    assert documents(database) == expected_documents(events)
    assert database.audit.count_documents({}) == distinct_events(events)
    assert successor.stored_offsets() == result.end_offsets
