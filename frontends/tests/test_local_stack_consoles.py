"""The consoles in the local stack: `deploy/crm up` starts one process per
console at its documented address, with the development sign-in, and
`deploy/crm status` lists them (no servers: the stack's own tables)."""

from __future__ import annotations

from pathlib import Path

from crm_consoles.config import CONSOLE_PORTS
from crm_deploy import cli
from crm_deploy.stack import CONSOLE_PROCESSES, STACK_PROCESSES, Stack, StackConfig


def test_each_console_runs_at_its_documented_address(tmp_path: Path) -> None:
    config = StackConfig(data_dir=tmp_path)
    stack = Stack(config)
    assert [row.command for row in CONSOLE_PROCESSES] == [
        ("crm-consoles", "serve", name) for name in CONSOLE_PORTS
    ]
    assert {row.name: config.health_ports[row.name] for row in CONSOLE_PROCESSES} == {
        f"{name}-console": port for name, port in CONSOLE_PORTS.items()
    }
    endpoints = stack.endpoints()
    for name, port in CONSOLE_PORTS.items():
        assert endpoints[f"{name} console"] == f"http://127.0.0.1:{port} (development sign-in)"
    # `up` starts them with everything else; `status` and `restart` know them.
    assert set(CONSOLE_PROCESSES) <= set(STACK_PROCESSES)
    assert {row.name for row in CONSOLE_PROCESSES} <= set(cli._process_names())
