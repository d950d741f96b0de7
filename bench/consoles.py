"""`python -m bench.consoles`: the 360 page in a browser, as a person opens it.

One run starts the real local stack on free ports in a scratch directory (Kafka,
SecantusDB, the contacts, pipeline, tickets, loyalty and analytics processes and
the sales console), registers a customer with deals, cases, a loyalty membership
and interactions, waits until the 360 view shows them, and then measures, in the
same run:

- the baseline: `GET /customers/{id}/360` of the analytics REST API, straight from
  this machine with a sales user's token (what any client pays for the data);
- the same read through the console's backend-for-frontend (`/api/analytics/...`
  with the session cookie: the console's own hop);
- the 360 page in headless Chromium (the distribution's, through Playwright), a
  fresh document every time (the page's address opened from `about:blank`), with
  the browser's own timings: the shell's first byte (navigation timing), the
  first contentful paint (paint timing: the first thing a person sees), and the
  page's `crm:interactive` mark (the console's router sets it once the 360 page
  is drawn with its data and takes input).

`measure_360_page(scratch)` is what the main benchmark calls; the section between
the consoles markers of docs/benchmarks.md is rewritten. Numbers are recorded,
never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.sections import record_section
from crm_deploy.identity import Identity, ensure_identity
from crm_deploy.stack import Stack, StackConfig
from crm_deploy.testing import bearer

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- consoles benchmark: begin (written by python -m bench.consoles) -->"
END = "<!-- consoles benchmark: end -->"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
PROCESSES = [
    "contacts-api",
    "contacts-relay",
    "pipeline-api",
    "pipeline-relay",
    "tickets-api",
    "tickets-relay",
    "loyalty-api",
    "loyalty-relay",
    "analytics-api",
    "analytics-projector",
    "sales-console",
]
INTERACTIVE_JS = "() => performance.getEntriesByName('crm:interactive').length > 0"
#: What the page's browser timings are read from once it is drawn.
TIMINGS_JS = """() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const paints = performance.getEntriesByType("paint");
  const fcp = paints.find((p) => p.name === "first-contentful-paint");
  const ready = performance.getEntriesByName("crm:interactive")[0];
  const api = performance.getEntriesByType("resource").find((r) => r.name.includes("/360"));
  return {
    first_byte: nav.responseStart, content_loaded: nav.domContentLoadedEventEnd,
    first_paint: fcp ? fcp.startTime : null, interactive: ready ? ready.startTime : null,
    api: api ? api.duration : null,
  };
}"""


@dataclass
class ConsolesRun:
    loads: int
    deals: int = 0
    cases: int = 0
    timeline: int = 0
    raw_api: list[float] = field(default_factory=list)
    through_bff: list[float] = field(default_factory=list)
    browser: list[dict[str, float]] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)

    def series(self, key: str) -> list[float]:
        return [b[key] for b in self.browser if b.get(key) is not None]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _call(
    client: httpx.Client, identity: Identity, method: str, url: str, role: str = "admin", **kw: Any
) -> Any:
    reply = client.request(
        method, url, headers={**bearer(identity.mint(role)), **kw.pop("headers", {})}, **kw
    )
    reply.raise_for_status()
    return reply.json()


def seed_customer(stack: Stack, identity: Identity) -> tuple[str, dict[str, str]]:
    """A customer with what a 360 page usually shows; returns its id and the API urls."""
    ports = stack.config.service_ports
    urls = {
        s: f"http://127.0.0.1:{ports[s][1]}"
        for s in ("contacts", "pipeline", "tickets", "loyalty", "analytics")
    }
    tag = uuid.uuid4().hex[:6]
    with httpx.Client(timeout=30) as c:
        person = _call(
            c,
            identity,
            "POST",
            f"{urls['contacts']}/persons",
            "sales",
            json={
                "given_name": "Emmy",
                "family_name": f"Noether{tag}",
                "tags": ["bench", "key-account"],
                "channels": [
                    {
                        "channel": "email",
                        "address": f"emmy.{tag}@example.com",
                        "consent_status": "granted",
                        "consent_source": "web-form",
                    }
                ],
            },
        )["id"]
        stages = [("qualify", "pipeline", "10"), ("propose", "best_case", "40"),
                  ("won", "closed_won", "100"), ("lost", "closed_lost", "0")]  # fmt: skip
        pipeline = _call(
            c,
            identity,
            "POST",
            f"{urls['pipeline']}/pipelines",
            json={
                "name": f"Bench {tag}",
                "stages": [
                    {"stage_id": s, "name": s.title(), "probability": p, "category": k}
                    for s, k, p in stages
                ],
            },
        )["id"]
        close = (datetime.now(UTC).date() + timedelta(days=30)).isoformat()
        for n in range(6):
            deal = _call(
                c,
                identity,
                "POST",
                f"{urls['pipeline']}/opportunities",
                "sales",
                json={
                    "pipeline_id": pipeline,
                    "name": f"Deal {n} {tag}",
                    "customer_id": person,
                    "owner": "bench-seller",
                    "amount": {"amount": f"{1000 * (n + 1)}.00", "currency": "EUR"},
                    "expected_close_date": close,
                },
            )["opportunity"]
            if n < 2:
                won = f"{urls['pipeline']}/opportunities/{deal['id']}/win"
                headers = {"if-match": str(deal["version"])}
                _call(c, identity, "POST", won, "sales", json={}, headers=headers)
        for n in range(3):
            _call(
                c,
                identity,
                "POST",
                f"{urls['tickets']}/cases",
                "service",
                json={
                    "customer_id": person,
                    "channel": "email",
                    "subject": f"Question {n} {tag}",
                    "team": "support",
                    "priority": "normal",
                },
            )
        member = {"contact_id": person, "channel": "web"}
        _call(c, identity, "POST", f"{urls['loyalty']}/members", "marketing", json=member)
        log = f"{urls['contacts']}/contacts/{person}/interactions"
        for n in range(10):
            call = {"kind": "call", "summary": f"Call {n} {tag}", "owner": "bench-seller"}
            _call(c, identity, "POST", log, "sales", json=call)
    return person, urls


def wait_for_360(url: str, identity: Identity, deals: int, timeout: float = 120) -> dict[str, Any]:
    """Waits until the 360 view shows every seeded deal, case and the membership."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=30) as c:
        while True:
            reply = c.get(url, headers=bearer(identity.mint("sales")))
            doc: dict[str, Any] = reply.json() if reply.status_code == 200 else {}
            if (
                len(doc.get("deals") or []) >= deals
                and doc.get("loyalty")
                and len((doc.get("tickets") or {}).get("open_cases") or []) >= 3
            ):
                return doc
            if time.monotonic() > deadline:
                raise TimeoutError(f"the 360 view did not catch up: {reply.status_code}")
            time.sleep(0.5)


def timed_gets(client: httpx.Client, url: str, count: int, **kw: Any) -> list[float]:
    """`count` sequential GETs (after three unrecorded ones); milliseconds each."""
    for _ in range(3):
        client.get(url, **kw).raise_for_status()
    out = []
    for _ in range(count):
        began = time.perf_counter()
        client.get(url, **kw).raise_for_status()
        out.append((time.perf_counter() - began) * 1000)
    return out


def measure_360_page(scratch: Path, loads: int = 30) -> ConsolesRun:
    """Starts what it needs under `scratch`, measures, stops everything."""
    from playwright.sync_api import sync_playwright

    result = ConsolesRun(loads)
    identity = ensure_identity(scratch / "identity")
    stack = Stack(StackConfig.for_tests(scratch / "stack", identity_dir=identity.root))
    result.load = (os.getloadavg()[0], 0.0)
    stack.start_infra()
    try:
        stack.start_services(PROCESSES)
        person, urls = seed_customer(stack, identity)
        api_url = f"{urls['analytics']}/customers/{person}/360"
        doc = wait_for_360(api_url, identity, deals=6)
        result.deals, result.cases = len(doc["deals"]), len(doc["tickets"]["open_cases"])
        result.timeline = len(doc.get("timeline") or [])
        console = f"http://127.0.0.1:{stack.config.health_ports['sales-console']}"
        with httpx.Client(timeout=30) as client:
            result.raw_api = timed_gets(
                client,
                api_url,
                loads,
                headers=bearer(identity.mint("sales", subject="bench-seller")),
            )
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page = context.new_page()
            page.goto(f"{console}/signin")
            page.get_by_label("Role").select_option("sales")
            page.get_by_label("User name").fill("bench-seller")
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_selector(".sidenav")
            cookies = {c["name"]: c["value"] for c in context.cookies()}
            with httpx.Client(timeout=30, cookies=cookies) as client:
                result.through_bff = timed_gets(
                    client, f"{console}/api/analytics/customers/{person}/360", loads
                )
            for n in range(loads + 3):
                page.goto("about:blank")
                page.goto(f"{console}/#/customer/{person}")
                page.get_by_role("heading", level=1, name=re.compile("Emmy Noether")).wait_for()
                # (page.evaluate, not wait_for_function: the console's CSP forbids eval.)
                while not page.evaluate(INTERACTIVE_JS):
                    time.sleep(0.01)
                if n >= 3:
                    result.browser.append(page.evaluate(TIMINGS_JS))
            context.close()
            browser.close()
    finally:
        stack.stop()
    result.load = (result.load[0], os.getloadavg()[0])
    return result


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 1024**3:.0f} GiB "
        f"RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def render(r: ConsolesRun) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    base = statistics.median(r.raw_api)
    verdict = "within" if statistics.median(r.series("interactive")) < 300 else "over"

    def row(what: str, values: list[float], note: str = "") -> str:
        med = statistics.median(values)
        ratio = note or f"{med / base:.1f}x"
        return f"| {what} | **{med:.0f} ms** | {percentile(values, 95):.0f} ms | {ratio} |"

    return "\n".join(
        [
            BEGIN,
            "## Consoles: the 360 page in a browser",
            "",
            f"- **Machine:** {machine()}",
            f"- **Run:** {when}; SQLite stores; a customer with {r.deals} deals, {r.cases} open "
            f"cases, a loyalty membership and {r.timeline} timeline entries; {r.loads} loads "
            "each, after three unrecorded ones. The machine is shared: its load average was "
            f"{r.load[0]:.1f} and {r.load[1]:.1f} at the start and the end of the run, on "
            f"{os.cpu_count()} cores; read the ratios, not the absolute figures.",
            "",
            "| measure | median | p95 | against the raw API read |",
            "|---|---|---|---|",
            row(
                "`GET /customers/{id}/360`, analytics REST API, from this machine",
                r.raw_api,
                "the reference",
            ),
            row("the same through the console's backend-for-frontend", r.through_bff),
            row("the page in Chromium: the shell's first byte", r.series("first_byte")),
            row(
                "the page in Chromium: **first contentful paint** (first render)",
                r.series("first_paint"),
            ),
            row("the 360 read as the page's own fetch (resource timing)", r.series("api")),
            row(
                "the page in Chromium: **interactive** (`crm:interactive`: drawn with its data)",
                r.series("interactive"),
            ),
            "",
            "Every load is a new document (opened from `about:blank`), so the shell, the",
            "scripts (revalidated: `no-cache`, answered 304) and the 360 read all count;",
            "the times run from the navigation's start. The first paint is the shell",
            "(header, navigation, the loading indicator); the page is interactive when",
            "the router has drawn the 360 page with its data, which waits for the",
            "scripts, the session's read through the console and the analytics API.",
            "The issue asks for the 360 page in under 300 ms on the local stack: the",
            f"interactive median above is {verdict} that.",
            "`python -m bench.consoles` rewrites this section.",
            END,
        ]
    )


def record(text: str, out: Path) -> None:
    """Replaces this benchmark's section of `out` (or adds it)."""
    record_section(out, text, BEGIN, END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.consoles", description=__doc__)
    parser.add_argument("--loads", type=int, default=30, help="page loads (and API reads) measured")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crm-bench-consoles-") as tmp:
        result = measure_360_page(Path(tmp), args.loads)
    text = render(result)
    print(text)
    record(text, Path(args.out))


if __name__ == "__main__":
    main()
