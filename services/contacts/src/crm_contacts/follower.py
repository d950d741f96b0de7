"""Contacts follow the pipeline: the lifecycle rules of `domain.lifecycle`.

`OpportunityFollower` consumes `crm.pipeline.events` as a member of a Kafka
consumer group. For each `OpportunityOpened` it runs one
`FollowLifecycleRule` command (rule `deal_opened`: a subscriber, lead, lost
or churned contact becomes an opportunity) per contact of the deal (the
person, the company, and the customer id the deal was opened for, each
once); for each `OpportunityWon` one `BecomeCustomer` command (rule
`deal_won`). Each stage change records its cause: the rule and the deal.

- **Idempotent.** Each command carries a request id derived from the event
  (`opportunity-won:<aggregate id>:<version>:<contact id>`, or
  `opportunity-opened:...`), so a redelivered event is answered from the
  command's receipt and writes nothing new.
- **At least once.** A partition's offset is committed only after every
  command of the records before it succeeded. A crash, a kill or a
  rebalance hands the uncommitted records to the next member, which
  replays them harmlessly.
- **Never stuck on a bad record.** A record that cannot be decoded, or
  names a contact this service does not know, is logged with its
  coordinates and passed over. A failure of the service itself (the event
  store unreachable) is retried from the same record with a growing pause.
- **Purchases.** With a `crm_contacts.churn.PurchaseLedger` (the
  `crm-contacts follow` process), a won deal is also a purchase of each of
  its contacts at the time it was won: the churn sweep counts from it.
- **Never refused by the funnel.** A customer or advocate stays as it is (no
  event); every other stage, churned and lost included, moves to customer.

Partitions are processed concurrently, each in order; the commands of
concurrent partitions share the command bus's group commit.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError
from opentelemetry import trace

from crm.events.v1 import pipeline_pb2 as events_pb
from crm_common.commands import Caller
from crm_common.errors import CrmError, NotFound, RuleViolated, ValidationFailed
from crm_common.following import GroupMember, GroupProgress, RetryLater
from crm_common.health import Heartbeat
from crm_common.records import Record, consuming_span, header, where
from crm_common.settings import topic_of
from crm_contacts.application import ContactsService
from crm_contacts.domain.lifecycle import LifecycleRule

if TYPE_CHECKING:
    from crm_contacts.churn import PurchaseLedger

log = logging.getLogger(__name__)
tracer = trace.get_tracer("crm_contacts.follower")

WON_TYPE = "crm.pipeline.v1.OpportunityWon"
OPENED_TYPE = "crm.pipeline.v1.OpportunityOpened"
CLIENT = "crm-contacts-follower"
# Errors that say the record itself can never succeed: logged and passed over.
PERMANENT: tuple[type[CrmError], ...] = (NotFound, ValidationFailed, RuleViolated)


def default_group_id() -> str:
    """`<prefix>.contacts-follower`, after the topic prefix (`CRM_TOPIC_PREFIX`)."""
    prefix = topic_of("pipeline").removesuffix(".pipeline.events")
    return f"{prefix}.contacts-follower"


@dataclass(frozen=True)
class Promotion:
    """One contact to make a customer, and the request id that makes it idempotent."""

    contact_id: str
    request_id: str
    actor: str
    rule: LifecycleRule = LifecycleRule.DEAL_WON
    #: The deal that fired the rule, recorded as the change's cause.
    cause: str = ""
    #: When the deal was won (a purchase); None for an opened deal or an unknown time.
    won_at: datetime | None = None


def promotions_of(record: Record) -> list[Promotion]:
    """What a pipeline event asks of contacts: nothing, unless a deal was
    opened or won.

    Raises `DecodeError` for a value that is not a `PipelineEvent`.
    """
    ce_type = header(record, "ce_type")
    if ce_type is not None and ce_type not in (WON_TYPE, OPENED_TYPE):
        return []
    message = events_pb.PipelineEvent.FromString(record.value or b"")
    payload = message.WhichOneof("payload")
    if payload == "opportunity_won":
        deal: Any = message.opportunity_won
        rule, prefix = LifecycleRule.DEAL_WON, "opportunity-won"
    elif payload == "opportunity_opened":
        deal = message.opportunity_opened
        rule, prefix = LifecycleRule.DEAL_OPENED, "opportunity-opened"
    else:
        return []
    event_id = f"{message.aggregate_id}:{message.version}"
    contacts = dict.fromkeys(i for i in (deal.person_id, deal.company_id, message.customer_id) if i)
    won_at = (
        message.occurred_at.ToDatetime(tzinfo=UTC)
        if rule is LifecycleRule.DEAL_WON and message.HasField("occurred_at")
        else None
    )
    return [
        Promotion(
            contact_id=contact_id,
            request_id=f"{prefix}:{event_id}:{contact_id}",
            actor=message.actor or "pipeline",
            rule=rule,
            cause=f"deal {message.aggregate_id}",
            won_at=won_at,
        )
        for contact_id in contacts
    ]


@dataclass
class FollowerStats(GroupProgress):
    promoted: int = 0
    unchanged: int = 0
    replayed: int = 0
    skipped: int = 0


class OpportunityFollower(GroupMember):
    """Feeds won deals from the pipeline topic to the contacts command bus."""

    def __init__(
        self,
        service: ContactsService,
        *,
        bootstrap: str,
        topic: str | None = None,
        group_id: str | None = None,
        max_records: int = 200,
        poll_timeout_ms: int = 250,
        retry_backoff: float = 0.5,
        heartbeat: Heartbeat | None = None,
        purchases: PurchaseLedger | None = None,
    ) -> None:
        self.service = service
        #: Where won deals are noted as purchases (None: they are not).
        self.purchases = purchases
        stats = FollowerStats()
        group = group_id or default_group_id()
        super().__init__(
            topic=topic or topic_of("pipeline"),
            bootstrap=bootstrap,
            group_id=group,
            client_id=CLIENT,
            stats=stats,
            max_records=max_records,
            poll_timeout_ms=poll_timeout_ms,
            retry_backoff=retry_backoff,
            heartbeat=heartbeat,
            what="follower",
        )
        self.stats: FollowerStats = stats

    async def run(self, stop: asyncio.Event) -> None:
        """Follows the topic until `stop` is set."""
        await self.consume(stop)

    async def handle(self, record: Record) -> None:
        at = where(record)
        try:
            wanted = promotions_of(record)
        except DecodeError as error:
            log.error("follower: %s is not a PipelineEvent (%s); passed over", at, error)
            self.stats.skipped += 1
            return
        if not wanted:
            return
        what = "OpportunityWon" if wanted[0].rule is LifecycleRule.DEAL_WON else "OpportunityOpened"
        with consuming_span(record, f"follow {what}", tracer):
            for promotion in wanted:
                await self._promote(promotion, at)

    async def _promote(self, promotion: Promotion, at: str) -> None:
        caller = Caller(actor=promotion.actor, client=CLIENT, request_id=promotion.request_id)
        try:
            if promotion.rule is LifecycleRule.DEAL_WON:
                written = await self.service.become_customer(
                    caller, promotion.contact_id, promotion.cause
                )
            else:
                written = await self.service.follow_lifecycle_rule(
                    caller, promotion.contact_id, promotion.rule, promotion.cause
                )
        except PERMANENT as error:
            log.warning(
                "follower: %s: contact %s not moved by %s: %s; passed over",
                at,
                promotion.contact_id,
                promotion.rule,
                error.message,
            )
            self.stats.skipped += 1
            return
        except Exception as error:
            log.error(
                "follower: %s: contact %s failed (%r); retrying in %.1f s",
                at,
                promotion.contact_id,
                error,
                self._backoff,
            )
            self.heartbeat.failed(f"contact {promotion.contact_id} at {at}: {error!r}")
            raise RetryLater from error
        if promotion.won_at is not None and self.purchases is not None:
            await self._purchased(promotion, promotion.won_at, at)
        if self.heartbeat.last_error is not None:
            self.heartbeat.recovered()
        outcome = written.outcome
        if outcome.replayed:
            self.stats.replayed += 1
        elif outcome.extra.get("promoted") == "true":
            self.stats.promoted += 1
            log.info("contact %s moved by %s (%s)", promotion.contact_id, promotion.rule, at)
        else:
            self.stats.unchanged += 1

    async def _purchased(self, promotion: Promotion, won_at: datetime, at: str) -> None:
        """Notes the won deal as a purchase (after its command: a crash between the
        two replays the record, and both steps are idempotent)."""
        ledger = self.purchases
        assert ledger is not None
        try:
            recorded = await asyncio.to_thread(
                ledger.record, promotion.contact_id, won_at, promotion.cause
            )
            if recorded.churned_for:
                # The won deal itself made them a customer again.
                await asyncio.to_thread(
                    ledger.came_back, promotion.contact_id, recorded.churned_for
                )
        except Exception as error:
            log.error(
                "follower: %s: the purchase of contact %s not recorded (%r); retrying in %.1f s",
                at,
                promotion.contact_id,
                error,
                self._backoff,
            )
            self.heartbeat.failed(f"purchase of {promotion.contact_id} at {at}: {error!r}")
            raise RetryLater from error
