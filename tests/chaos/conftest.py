"""The chaos suite's own stack and its long form.

The chaos tests kill Kafka, ZooKeeper and the document store: they run on a
stack of their own (free ports, a data directory of their own), never on the
session's shared `local_stack`, and stop it at the end.

The short form runs in the normal suite. The long form (more faults, a longer
load) runs with `pytest tests/chaos --chaos-long`, or with `CRM_CHAOS_LONG=1`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from crm_deploy.identity import Identity
from crm_deploy.stack import Stack, StackConfig


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-long",
        action="store_true",
        default=False,
        help="run the long form of the chaos suite (more faults, a longer load)",
    )


@pytest.fixture(scope="session")
def chaos_long(request: pytest.FixtureRequest) -> bool:
    """True for the long form: `--chaos-long` or `CRM_CHAOS_LONG=1`."""
    flag = bool(request.config.getoption("--chaos-long", default=False))
    return flag or os.environ.get("CRM_CHAOS_LONG", "") not in ("", "0")


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory: pytest.TempPathFactory, identity: Identity) -> Iterator[Stack]:
    """A whole platform of its own: infrastructure and every service process."""
    root: Path = tmp_path_factory.mktemp("chaos-stack")
    stack = Stack(StackConfig.for_tests(root, identity_dir=identity.root))
    stack.start_infra()
    try:
        # SQLite event stores: the verification reads them with SQL.
        stack.start_services(extra_env={"CRM_EVENT_STORE": "sqlite"})
        yield stack
    finally:
        stack.stop()
        if not os.environ.get("CRM_KEEP_TEST_DATA"):
            shutil.rmtree(root, ignore_errors=True)
