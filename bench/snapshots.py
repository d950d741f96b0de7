"""`python -m bench.snapshots`: what snapshots of long-lived aggregates buy.

One bounded run, in process, on the real loyalty application and command bus
(group commit) over a real store (SQLite; PostgreSQL with `--store postgres`,
on the tests' PostgreSQL server), twice: without snapshots
(`CRM_SNAPSHOT_INTERVAL=0`, the store as it was before snapshots) and with the
default interval. Each time, 16 concurrent redeemers (closed loop) take one
popular reward `--events` times, spread over 200 members, so that reward's
history grows to that many events:

- redemption throughput over the first and the last 10% of the run (a store
  without snapshots replays the whole reward on every batch, so its rate
  falls as the reward is used);
- then the time to load that reward (the median of repeated loads of its
  5,000-event history, say) with and without its snapshot.

The section between the snapshot markers of docs/benchmarks.md is rewritten
with `--record`; numbers are recorded, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.__main__ import machine
from bench.sections import record_section
from crm_common.commands import Caller
from crm_common.errors import NotFound
from crm_common.eventstore import DEFAULT_SNAPSHOT_INTERVAL, SNAPSHOT_INTERVAL_VAR
from crm_common.settings import Settings
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.domain.rewards import reward_id
from crm_loyalty.inputs import RewardInput

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- snapshots benchmark: begin (written by python -m bench.snapshots) -->"
END = "<!-- snapshots benchmark: end -->"
ADMIN = Caller(actor="bench", client="bench-snapshots")
MEMBERS = 200
CLIENTS = 16
CODE = "popular-mug"


class BenchContacts:
    """The contacts port: the bench's own contact ids (the contacts service is
    not what is measured here)."""

    def __init__(self, known: set[str]) -> None:
        self.known = known

    async def ensure_exists(self, contact_id: str) -> None:
        if contact_id not in self.known:
            raise NotFound("Contact", contact_id)


@dataclass
class Phase:
    interval: int
    #: Redemptions per second over the first and the last tenth of the run.
    first: float = 0.0
    last: float = 0.0
    overall: float = 0.0
    load_ms: list[float] = field(default_factory=list)
    reward_version: int = 0
    snapshot_version: int = 0

    @property
    def load_median(self) -> float:
        return statistics.median(self.load_ms)


def settings_for(store: str, scratch: Path, name: str) -> Settings:
    if store == "postgres":
        from crm_deploy.testing import postgres_settings

        settings: Settings = postgres_settings(
            "loyalty", f"bench_snapshots_{name}_{uuid.uuid4().hex[:8]}"
        )
        return settings
    return Settings(
        service="loyalty",
        data_dir=scratch / name,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


async def run_phase(
    settings: Settings, interval: int, events: int, loads: int, *, snapshots: bool
) -> Phase:
    os.environ[SNAPSHOT_INTERVAL_VAR] = str(interval if snapshots else 0)
    contacts = [f"bench-{i}" for i in range(MEMBERS)]
    service = LoyaltyService(create_application(settings), BenchContacts(set(contacts)))
    phase = Phase(interval if snapshots else 0)
    try:
        for contact in contacts:
            await service.enrol(ADMIN, contact, "web")
            await service.adjust(ADMIN, contact, 1_000_000, "bench")
        await service.define_reward(ADMIN, RewardInput(CODE, "Mug", 1, events + interval))
        done: list[float] = []
        # The definition is the reward's first event; half an interval more than
        # `events` leaves the average number of events after the latest snapshot.
        todo = iter(range(events - 1 + interval // 2))

        async def redeemer() -> None:
            for n in todo:
                await service.redeem_reward(ADMIN, contacts[n % MEMBERS], CODE)
                done.append(time.perf_counter())

        start = time.perf_counter()
        await asyncio.gather(*(redeemer() for _ in range(CLIENTS)))
        tenth = max(len(done) // 10, 1)
        phase.first = tenth / (done[tenth - 1] - start)
        phase.last = tenth / (done[-1] - done[-tenth - 1])
        phase.overall = len(done) / (done[-1] - start)
        app = service.app
        rid = reward_id(CODE)
        for _ in range(loads):
            t0 = time.perf_counter()
            reward = app.repository.get(rid)
            phase.load_ms.append((time.perf_counter() - t0) * 1000)
        phase.reward_version = reward.version
        if app.snapshots is not None:
            latest = list(app.snapshots.get(rid, desc=True, limit=1))
            phase.snapshot_version = latest[0].originator_version if latest else 0
    finally:
        service.close()
    return phase


def render(store: str, events: int, plain: Phase, snapped: Phase) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load1, load5, load15 = os.getloadavg()
    return "\n".join(
        [
            BEGIN,
            "## Snapshots",
            "",
            f"- **Machine:** {machine()}",
            f"- **Run:** {when}; {store} store; `python -m bench.snapshots --events {events}`; "
            f"in process, the loyalty application and its command bus; {CLIENTS} concurrent "
            f"redeemers of one reward spread over {MEMBERS} members, until that reward has "
            f"{plain.reward_version:,} events; load average {load1:.1f} / {load5:.1f} / "
            f"{load15:.1f} at the end, on {os.cpu_count()} cores: read the ratios.",
            "",
            "| measure | without snapshots | with snapshots "
            f"(every {snapped.interval} events) | ratio |",
            "|---|---|---|---|",
            f"| load the reward ({plain.reward_version:,} events, "
            f"{snapped.reward_version - snapped.snapshot_version} after the snapshot; median of "
            f"{len(plain.load_ms)} loads) | {plain.load_median:.1f} ms | "
            f"{snapped.load_median:.2f} ms (snapshot at {snapped.snapshot_version:,}) | "
            f"{plain.load_median / snapped.load_median:.0f}x faster |",
            f"| `RedeemReward` on that reward, first 10% of the run | {plain.first:.0f}/s | "
            f"{snapped.first:.0f}/s | {snapped.first / plain.first:.2f}x |",
            f"| `RedeemReward` on that reward, last 10% of the run | {plain.last:.0f}/s | "
            f"{snapped.last:.0f}/s | {snapped.last / plain.last:.2f}x |",
            f"| `RedeemReward`, whole run | {plain.overall:.0f}/s | {snapped.overall:.0f}/s | "
            f"{snapped.overall / plain.overall:.2f}x |",
            "",
            "Without snapshots every batch of the command bus replays the reward's whole",
            f"history: by the last tenth of the run the rate is {plain.last / plain.first:.2f}x "
            "the first tenth's.",
            "With them a load reads the latest snapshot and at most "
            f"{snapped.interval - 1} events, so the rate no longer",
            f"depends on the history's length (last tenth {snapped.last / snapped.first:.2f}x "
            "the first; the two phases",
            "run one after the other on a shared machine, so the first-tenth figures, a",
            "few seconds each, are the noisiest). A snapshot is taken after the save",
            "that takes an aggregate to a multiple of the interval",
            f"(`CRM_SNAPSHOT_INTERVAL`, default {DEFAULT_SNAPSHOT_INTERVAL}): one load and one "
            "insert per interval events.",
            END,
        ]
    )


def record(text: str, out: Path) -> None:
    """Replaces this benchmark's section of `out` (or adds it)."""
    record_section(out, text, BEGIN, END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.snapshots", description=__doc__)
    parser.add_argument("--events", type=int, default=5000, help="events of the popular reward")
    parser.add_argument("--loads", type=int, default=21, help="timed loads of the reward")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--interval", type=int, default=DEFAULT_SNAPSHOT_INTERVAL, help="snapshot interval"
    )
    parser.add_argument("--record", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crm-bench-snapshots-") as scratch:
        base = Path(scratch)
        plain, snapped = (
            asyncio.run(
                run_phase(
                    settings_for(args.store, base, name),
                    args.interval,
                    args.events,
                    args.loads,
                    snapshots=name == "snapped",
                )
            )
            for name in ("plain", "snapped")
        )
    text = render(args.store, args.events, plain, snapped)
    print(text)
    if args.record:
        record(text, ROOT / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()
