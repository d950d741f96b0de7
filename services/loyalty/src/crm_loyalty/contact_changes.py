"""Loyalty honours the contacts topic: erased persons, merges and their undo.

`LoyaltyContactChanges` is the `crm_common.contact_events.ContactChanges` of
the loyalty service; `crm-loyalty ingest` (= `follow`) runs a
`ContactEventsFollower` with it beside the ERP order ingest (`run_together`),
in one process under one stop signal and one health endpoint
(`JointHeartbeat`: alive and ready only while both consumers are).

- **Erased** (`person_erased`): the data keys of the members of the person
  and of every contact merged into them are destroyed: birthday and referrer
  read as not given everywhere, the ledger (points, lots, tier) stays, and
  enrolling any of them again is refused.
- **Merged** (`contacts_merged`): each merged contact's membership moves onto
  the survivor's (`LoyaltyService.merge_members`).
- **Merge undone** (`merge_undone`): what that merge moved goes back
  (`LoyaltyService.unmerge_members`).

Each command's request id derives from the contacts event
(`contacts-merge:<event id>:<merged contact>`), and the members themselves
remember which merges they took over, so a redelivered event writes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from crm_common.commands import Caller
from crm_common.contact_events import ContactChange
from crm_common.health import DEFAULT_STALE_AFTER, Heartbeat
from crm_loyalty.application import LoyaltyService

#: The client the follower's commands are recorded with.
CLIENT = "crm-loyalty-contacts-follower"


class LoyaltyContactChanges:
    """What loyalty does on each change of the contacts topic (all idempotent)."""

    def __init__(self, service: LoyaltyService) -> None:
        self.service = service

    async def person_erased(self, change: ContactChange) -> None:
        await self.service.erase_members((change.contact_id, *change.others))

    async def contacts_merged(self, change: ContactChange) -> None:
        caller = Caller(
            actor=change.actor, client=CLIENT, request_id=f"contacts-merge:{change.event_id}"
        )
        await self.service.merge_members(caller, change.contact_id, change.others, change.reference)

    async def merge_undone(self, change: ContactChange) -> None:
        caller = Caller(
            actor=change.actor, client=CLIENT, request_id=f"contacts-unmerge:{change.event_id}"
        )
        await self.service.unmerge_members(
            caller, change.contact_id, change.others, change.reference
        )


class JointHeartbeat(Heartbeat):
    """The heartbeat of a process running several consumers: alive only while
    every one is, ready only while every one is. Its report has the fields of
    every worker's (errors joined, lags summed, the worst of the times) and each
    member's own report under `members`. The members report their lag and dead
    letters to the metrics themselves; the joint heartbeat adds only whether the
    process is up (`crm_worker_up`)."""

    def __init__(self, worker: str, members: Sequence[Heartbeat]) -> None:
        super().__init__(worker)
        self.members = list(members)

    @property
    def stale_after(self) -> float:
        members = getattr(self, "members", [])
        return max((m.stale_after for m in members), default=DEFAULT_STALE_AFTER)

    @stale_after.setter
    def stale_after(self, value: float) -> None:
        if value <= 0:
            raise ValueError("stale_after must be positive")
        for member in getattr(self, "members", []):
            member.stale_after = value

    @property
    def age(self) -> float:
        return max(m.age for m in self.members)

    @property
    def alive(self) -> bool:
        return all(m.alive for m in self.members)

    @property
    def ready(self) -> bool:
        return all(m.ready for m in self.members)

    def report(self, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        reports = [m.report() for m in self.members]

        def known(name: str) -> list[Any]:
            return [r[name] for r in reports if r[name] is not None]

        errors = [f"{r['worker']}: {r['last_error']}" for r in reports if r["last_error"]]
        lags, behind, since_error = (
            known("lag_events"),
            known("lag_seconds"),
            known("seconds_since_error"),
        )
        body: dict[str, Any] = {
            "worker": self.worker,
            "status": "ok" if self.alive else "stale",
            "ready": self.ready,
            "waiting_for": ", ".join(known("waiting_for")) or None,
            "seconds_since_beat": max(r["seconds_since_beat"] for r in reports),
            "stale_after_seconds": self.stale_after,
            "uptime_seconds": min(r["uptime_seconds"] for r in reports),
            "rounds": min(r["rounds"] for r in reports),
            "last_error": "; ".join(errors) or None,
            "seconds_since_error": max(since_error) if since_error else None,
            "lag_events": sum(lags) if lags else None,
            "lag_seconds": max(behind) if behind else None,
            "dead_letters": sum(r["dead_letters"] for r in reports),
            "not_ready": [m.worker for m in self.members if not m.ready],
            "members": reports,
        }
        if details:
            body.update(details)
        return body


Work = Callable[[asyncio.Event], Coroutine[Any, Any, Any]]


async def run_together(stop: asyncio.Event, *works: Work) -> None:
    """Runs each work until `stop` is set. When one of them ends (it failed, or
    returned on its own), the others are stopped too; the first failure is then
    raised, so the process exits and is restarted rather than half working."""
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(work(stop)) for work in works]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result
