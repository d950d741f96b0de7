from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from loyalty_support import Clock, KnownContacts, sqlite_settings

from crm_loyalty.application import LoyaltyService, create_application


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def contacts() -> KnownContacts:
    return KnownContacts("c-1", "c-2")


@pytest.fixture
async def service(
    tmp_path: Path, clock: Clock, contacts: KnownContacts
) -> AsyncIterator[LoyaltyService]:
    loyalty = LoyaltyService(create_application(sqlite_settings(tmp_path)), contacts, clock=clock)
    yield loyalty
    loyalty.close()
