"""Fixtures shared by every test directory of the repository.

`local_stack` starts the real infrastructure (ZooKeeper, Kafka with the
platform's topics, SecantusDB) once per test session, on free ports of
127.0.0.1, with its data in a temporary directory, and stops it at the end.
It is lazy: a session whose tests never ask for it starts nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from crm_deploy.identity import Identity, ensure_certificates, ensure_identity
from crm_deploy.stack import Stack, StackConfig
from crm_deploy.testing import kill_leftovers


@pytest.fixture(scope="session")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """The session's development identity: real keys; `identity.mint("sales")` is a
    sales user's token. The local stack and every in-process API trust it."""
    root = tmp_path_factory.mktemp("identity")
    ensure_identity(root)
    ensure_certificates(root / "tls")
    return Identity(root)


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory, identity: Identity) -> Iterator[Stack]:
    """The session's Stack: `kafka_bootstrap`, `mongo_url`, `config`, `start_services`, ...

    Set CRM_KEEP_TEST_DATA=1 to keep its data directory (logs included) after the run.
    """
    root = tmp_path_factory.mktemp("local-stack")
    stack = Stack(StackConfig.for_tests(root, identity_dir=identity.root))
    stack.start_infra()
    try:
        yield stack
    finally:
        stack.stop()
        if not os.environ.get("CRM_KEEP_TEST_DATA"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The processes a test starts (`crm_deploy.testing.start_process`); what
    still runs when the test ends is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    kill_leftovers(started)


#: Fixtures that start (or need) real servers: a test using any of them, directly or
#: through another fixture, is marked `servers`, and `make unit` leaves it out.
SERVER_FIXTURES = frozenset({"local_stack", "processes"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SERVER_FIXTURES or item.get_closest_marker("postgres"):
            item.add_marker(pytest.mark.servers)
