"""Fixtures of the consoles' browser tests: the platform's real API processes
(on the session's `local_stack`), console processes as `crm-consoles serve`
runs them, and headless Chromium from the distribution driven by Playwright.

Every run keeps one screenshot per console in docs/screens/ (the README shows
them; 1280x800, the visible part of the page). Set CRM_CONSOLE_SCREENSHOTS to a
directory to also keep a full-page screenshot of every page the tests visit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from console_support import Apis

from crm_deploy.identity import Identity

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The API processes the consoles use in these tests, with what feeds the 360 view.
API_PROCESSES = [
    "contacts-api",
    "contacts-relay",
    "pipeline-api",
    "pipeline-relay",
    "tickets-api",
    "tickets-relay",
    "loyalty-api",
    "loyalty-relay",
    "loyalty-follower",
    "analytics-api",
    "analytics-projector",
]


@pytest.fixture(scope="session")
def apis(local_stack: Any, identity: Identity) -> Iterator[Apis]:
    """The APIs running as real processes; those already started by other tests are reused."""
    running = []
    for name in API_PROCESSES:
        try:
            if local_stack.process(name).is_running():
                running.append(name)
        except KeyError:
            pass
    mine = [n for n in API_PROCESSES if n not in running]
    local_stack.start_services(mine)
    ports = local_stack.config.service_ports
    urls = {
        s: f"http://127.0.0.1:{ports[s][1]}"
        for s in ("contacts", "pipeline", "tickets", "loyalty", "analytics")
    }
    try:
        yield Apis(urls, identity)
    finally:
        local_stack.stop_services(mine)


@pytest.fixture(scope="session")
def consoles(local_stack: Any, apis: Apis) -> Iterator[Callable[[str], str]]:
    """`consoles("sales")` starts (once) that console the way `deploy/crm up` does (its
    own process, development sign-in, the stack's APIs) and gives its address."""
    started: list[str] = []

    def start(name: str) -> str:
        process = f"{name}-console"
        if process not in started:
            local_stack.start_services([process])
            started.append(process)
        return f"http://127.0.0.1:{local_stack.config.health_ports[process]}"

    yield start
    local_stack.stop_services(started)


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium (the distribution's, never a downloaded build) in a fresh profile."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: deploy/install.sh installs it"
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 800},
            # Charts drawn at once (no animation), so screenshots show them whole.
            reduced_motion="reduce",
        )
        context.set_default_timeout(15_000)
        yield context
        context.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab with no session cookies."""
    browser.clear_cookies()
    tab = browser.new_page()
    yield tab
    tab.close()


#: The screenshots the README shows, rewritten by every run under docs/screens/.
README_SCREENS = frozenset(
    {
        "sales-board",
        "sales-customer-360",
        "service-queue",
        "marketing-member",
        "management-dashboard",
    }
)
SCREENS = Path(__file__).resolve().parents[2] / "docs" / "screens"


@pytest.fixture(scope="session")
def screenshot() -> Callable[[Any, str], None]:
    """`screenshot(page, name)`: the README's screens go to docs/screens/<name>.png (the
    viewport, to keep them small); every page also to CRM_CONSOLE_SCREENSHOTS when set."""
    folder = os.environ.get("CRM_CONSOLE_SCREENSHOTS")

    def take(page: Any, name: str) -> None:
        if name in README_SCREENS:
            SCREENS.mkdir(parents=True, exist_ok=True)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(SCREENS / f"{name}.png"), animations="disabled")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)

    return take
