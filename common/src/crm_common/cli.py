"""The command line of every service: `crm-<service> <process>`.

Each service names its processes (serve, relay, project, ...) and the
coroutine that runs each; `run_cli` parses the command line, sets up logging
and telemetry once, reads the settings from the environment, runs the chosen
process and flushes the traces when it ends, whatever the way it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crm_common.logs import setup_logging
from crm_common.settings import Settings
from crm_common.telemetry import setup_telemetry, shutdown_telemetry


@dataclass(frozen=True)
class Process:
    """One of a service's processes: its one-line help and what runs it.

    `run` returns the exit status (None: 0).
    """

    help: str
    run: Callable[[Settings], Coroutine[Any, Any, int | None]]


def run_cli(
    service: str,
    processes: Mapping[str, Process],
    *,
    description: str | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    parser = argparse.ArgumentParser(prog=f"crm-{service}", description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, process in processes.items():
        commands.add_parser(name, help=process.help)
    args = parser.parse_args(argv)

    setup_logging(service)
    setup_telemetry(service)
    settings = Settings.from_env(service)
    try:
        code: int | None = asyncio.run(processes[args.command].run(settings))
    finally:
        shutdown_telemetry()
    if code:
        sys.exit(code)
