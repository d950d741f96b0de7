"""Channels from one service to another's gRPC API.

A gRPC channel keeps its HTTP/2 connections open, so a Kubernetes Service
(one virtual address, balanced per connection) would pin a caller to one
replica of the callee. The Helm chart therefore gives each API a headless
Service and its callers a `dns:///` target: the channel resolves every
ready replica and spreads calls over them (`round_robin`). The servers close
connections after a while (`crm_common.server`), so callers resolve again
and find replicas that were added since. A plain `host:port` or a list
`ipv4:a:p,b:p` works the same way.

After the callee was unreachable, the channel tries again within a second
or so: a call retried once it is back should not meet a backoff left over
from its outage (gRPC's defaults start at 1 s and grow to two minutes). The
minimum is also the timeout of each connection attempt, so it stays well
above a connect within a cluster.
"""

from __future__ import annotations

import grpc

CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def service_channel(target: str) -> grpc.aio.Channel:
    """An insecure channel to another service of the platform (the cluster's
    network, or a mesh, provides transport security)."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
