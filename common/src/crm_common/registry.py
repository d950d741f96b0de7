"""The services of the platform: one entry each, read by everything that needs
the list (settings and default ports, the local stack's processes and topics,
the 360 projector's sources, the Helm chart's `services.json`).

Adding a service is one `Service(...)` here (see docs/adding-a-service.md);
`crm-stack registry --write` then regenerates the chart's copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["api", "relay", "follower", "projector"]

#: The console-script subcommand of each role (`crm-<service> <command>`).
COMMANDS: dict[Role, str] = {
    "api": "serve",
    "relay": "relay",
    "follower": "follow",
    "projector": "project",
}
#: Roles of which at most one replica may run (they are the single writer of
#: their tracking position or read model).
SINGLE_WRITERS: frozenset[Role] = frozenset({"relay", "projector"})


@dataclass(frozen=True)
class Service:
    """One deployable service."""

    name: str
    grpc_port: int
    http_port: int
    #: Owns an event store and publishes `<prefix>.<name>.events`.
    writes_events: bool
    #: The processes it runs, by role; empty while the service is planned.
    roles: tuple[Role, ...] = ()
    #: The services whose topics it consumes (projector or follower).
    consumes: tuple[str, ...] = ()
    #: Topics other systems publish for it (`<prefix>.<name>`, e.g. `erp.orders`).
    inbound_topics: tuple[str, ...] = ()
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def planned(self) -> bool:
        return not self.roles

    @property
    def distribution(self) -> str:
        """The Python distribution and console script: `crm-contacts`."""
        return f"crm-{self.name}"

    def process_name(self, role: Role) -> str:
        return f"{self.name}-{role}"


SERVICES: tuple[Service, ...] = (
    Service(
        "contacts",
        50051,
        8081,
        writes_events=True,
        # The follower turns deals (pipeline) and orders (loyalty) into lifecycle moves.
        roles=("api", "relay", "follower"),
        consumes=("pipeline", "loyalty"),
        summary="people, companies, relations, consent, interactions",
    ),
    Service(
        "pipeline",
        50052,
        8082,
        writes_events=True,
        # The follower honours erasures and merges from the contacts topic.
        roles=("api", "relay", "follower"),
        consumes=("contacts",),
        summary="leads, pipelines, opportunities, activities, forecast",
    ),
    Service(
        "tickets",
        50053,
        8083,
        writes_events=True,
        roles=("api", "relay", "follower"),
        consumes=("contacts",),
        summary="service cases, SLA policies on business hours, satisfaction",
    ),
    Service(
        "loyalty",
        50054,
        8084,
        writes_events=True,
        # The follower role is `crm-loyalty ingest` (ERP orders, expiry schedule,
        # and the erasures and merges of the contacts topic).
        roles=("api", "relay", "follower"),
        consumes=("contacts",),
        inbound_topics=("erp.orders", "erp.orders.dead-letter"),
        summary="members, points on a ledger by lot, earning rules, tiers, ERP orders",
    ),
    Service(
        "analytics",
        50055,
        8085,
        writes_events=False,
        roles=("api", "projector"),
        consumes=("contacts", "pipeline", "tickets", "loyalty"),
        summary="read models: the 360-degree customer view",
    ),
)


def service(name: str) -> Service:
    """The registry entry of a service; KeyError naming the known ones otherwise."""
    for entry in SERVICES:
        if entry.name == name:
            return entry
    raise KeyError(f"no service {name!r} (known: {', '.join(s.name for s in SERVICES)})")


def event_sources() -> tuple[str, ...]:
    """Services that publish domain events (each has a topic, planned or not)."""
    return tuple(s.name for s in SERVICES if s.writes_events)


def inbound_topics() -> tuple[str, ...]:
    """Topics other systems publish to (ERP orders), without the topic prefix."""
    return tuple(t for s in SERVICES for t in s.inbound_topics)


def chart_document() -> dict[str, Any]:
    """The registry as the Helm chart reads it (`helm/crm-platform/services.json`)."""
    return {
        "_generated": "by `crm-stack registry --write` from crm_common.registry; do not edit",
        "services": [
            {
                "name": s.name,
                "grpcPort": s.grpc_port,
                "httpPort": s.http_port,
                "writeService": s.writes_events,
                "processes": [
                    {
                        "role": role,
                        "name": s.process_name(role),
                        "command": COMMANDS[role],
                        "api": role == "api",
                        "singleWriter": role in SINGLE_WRITERS,
                    }
                    # A planned write service gets the standard pair once it is enabled.
                    for role in (s.roles or (("api", "relay") if s.writes_events else ()))
                ],
            }
            for s in SERVICES
        ],
    }
