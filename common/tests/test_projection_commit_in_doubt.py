"""A commit whose answer is lost (the document store crashed or the connection
broke right after it committed) is recognised as this projector's own: the
projector goes on after it instead of stopping with `ProjectionFenced`, and
applies nothing twice.

Over the same real Kafka broker and document store as test_projection.py; the
lost answer is forced by letting the real commit happen and then raising the
error the driver raises when the answer does not arrive.
"""

from __future__ import annotations

from typing import Any

import pytest
import test_projection as base
from pymongo.client_session import ClientSession
from pymongo.errors import AutoReconnect, OperationFailure, PyMongoError

from crm_common.projection import OFFSETS_COLLECTION

# The servers, database, topic and read model of test_projection.py.
servers, mongo, database_name, topic = base.servers, base.mongo, base.database_name, base.topic
Totals, consumer_for, expected_totals, produce = (
    base.Totals,
    base.consumer_for,
    base.expected_totals,
    base.produce,
)


def lose_the_answer_of_commit(
    monkeypatch: pytest.MonkeyPatch, number: int, error: PyMongoError
) -> list[int]:
    """Commit number `number` (1-based) commits, then answers `error`."""
    real = ClientSession.commit_transaction
    calls: list[int] = []

    def commit(self: ClientSession) -> None:
        calls.append(1)
        real(self)
        if len(calls) == number:
            raise error

    monkeypatch.setattr(ClientSession, "commit_transaction", commit)
    return calls


async def test_a_retried_transaction_that_finds_its_own_commit_goes_on(
    servers: Any, mongo: Any, database_name: str, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a retried commit answers once the store restarted after committing:
    # the driver then runs the whole transaction again.
    no_such_transaction = OperationFailure(
        "Transaction with { txnNumber: 3 } has been committed.",
        code=251,
        details={"errorLabels": ["TransientTransactionError"]},
    )
    calls = lose_the_answer_of_commit(monkeypatch, 2, no_such_transaction)
    await produce(servers.kafka_bootstrap, topic, 0, 40)
    model = Totals(mongo, database_name)
    projection = consumer_for(servers, mongo, database_name, topic, model, max_records=8)
    result = await projection.run_until_caught_up()
    assert len(calls) > 2  # the lost answer did happen, and later batches followed
    assert model.totals() == expected_totals(40)
    assert result.counters["applied"] == 40
    assert sum(projection.stored_offsets().values()) == 40


async def test_a_batch_whose_commit_answered_an_error_is_not_applied_again(
    servers: Any, mongo: Any, database_name: str, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The error reaches the projector (no label the driver retries on): it reads
    # the batch again, finds the offsets stored with that batch's token, and
    # reads on after it.
    calls = lose_the_answer_of_commit(monkeypatch, 2, AutoReconnect("connection closed"))
    await produce(servers.kafka_bootstrap, topic, 0, 40)
    model = Totals(mongo, database_name)
    projection = consumer_for(
        servers, mongo, database_name, topic, model, max_records=8, retry_backoff=0.05
    )
    await projection.run_until_caught_up()
    assert len(calls) > 2
    assert model.totals() == expected_totals(40)
    stored = list(mongo[database_name][OFFSETS_COLLECTION].find())
    assert sum(d["next_offset"] for d in stored) == 40
    assert all(d["commit_token"] for d in stored)
