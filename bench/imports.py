"""`python -m bench.imports`: the speed of the contacts CSV import.

One bounded run in this process on SQLite stores in a scratch directory: the
import job of `crm_contacts.import_jobs` as the API process runs it (the file
streamed to disk, rows decided in chunks, one command per row through the
command bus with its group commit), with no server or network in between:

- **10,000 rows** of new persons (a few hundred bad rows among them), then the
  same file again (every row answered as imported already, nothing written);
- **100,000 rows** into a fresh store, stopped after `--large-timeout` seconds
  (its rate is then the rows done so far), with the process's RSS sampled
  every 0.2 s: the peak during the import against the RSS before it;
- the bare `Application.save()` loop on the same kind of store (`bench.baseline`),
  before and after, as the reference.

The section between the imports markers of docs/benchmarks.md is rewritten;
numbers are recorded, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

from bench.__main__ import machine
from bench.baseline import bare_save_loop
from bench.sections import record_section
from crm_common.commands import Caller
from crm_common.settings import Settings
from crm_contacts.application import ContactsService, create_application
from crm_contacts.definitions import FieldDefinitionInput
from crm_contacts.import_jobs import ImportJobs, ImportView, Outcome
from crm_contacts.imports import ColumnMapping

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- imports benchmark: begin (written by python -m bench.imports) -->"
END = "<!-- imports benchmark: end -->"
MAPPING = ColumnMapping.from_dict(
    {
        "kind": "person",
        "columns": {
            "First": "given_name",
            "Last": "family_name",
            "Email": "email",
            "Phone": "phone",
            "Tags": "tags",
            "Segment": "custom:segment",
        },
    }
)
CALLER = Caller(actor="bench", client="bench-imports")


@dataclass
class ImportRun:
    rows: int
    seconds: float = 0.0
    done: int = 0
    created: int = 0
    failed: int = 0
    finished: bool = True
    rerun_seconds: float = 0.0
    rss_before: int = 0
    rss_peak: int = 0

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


@dataclass
class Results:
    small: ImportRun
    large: ImportRun | None
    baseline_before: float = 0.0
    baseline_after: float = 0.0
    load: list[float] = field(default_factory=list)

    @property
    def baseline(self) -> float:
        return statistics.fmean([self.baseline_before, self.baseline_after])


def _settings(data_dir: Path) -> Settings:
    return Settings(
        service="contacts",
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


async def csv_file(rows: int, chunk_rows: int = 2000) -> AsyncIterator[bytes]:
    """The file, made as it is read: one bad row in 40 (a bad email, an unknown
    choice, a duplicate of the row before, in turn)."""
    yield b"First,Last,Email,Phone,Tags,Segment\n"
    lines: list[str] = []
    for i in range(rows):
        email, segment = f"import.{i}@example.com", ("smb", "ent")[i % 2]
        if i % 40 == 39:
            kind = (i // 40) % 3
            if kind == 0:
                email = f"broken-{i}"
            elif kind == 1:
                segment = "galaxy"
            else:
                email = f"import.{i - 1}@example.com"
        lines.append(f"Given{i},Family{i},{email},+41 44 668 {i % 10000:04d},bench;csv,{segment}")
        if len(lines) >= chunk_rows:
            yield ("\n".join(lines) + "\n").encode()
            lines = []
    if lines:
        yield ("\n".join(lines) + "\n").encode()


class PeakRss:
    """Samples this process's resident set every 0.2 s in a thread."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _tally(run: ImportRun, view: ImportView) -> None:
    run.done = view.progress.rows
    run.created = view.progress.counts[Outcome.CREATED]
    run.failed = view.progress.counts[Outcome.FAILED]


async def import_once(scratch: Path, rows: int, timeout: float, *, rerun: bool) -> ImportRun:
    run = ImportRun(rows)
    service = ContactsService(create_application(_settings(scratch)))
    jobs = ImportJobs(service)
    try:
        await service.fields.define(
            CALLER,
            "person",
            FieldDefinitionInput("segment", "Segment", "choice", options=("smb", "ent")),
        )
        run.rss_before = psutil.Process().memory_info().rss
        with PeakRss() as rss:
            started = time.perf_counter()
            view = await jobs.submit(CALLER, MAPPING, csv_file(rows))
            task = jobs.task(view.id)
            assert task is not None
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                run.finished = False
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            run.seconds = time.perf_counter() - started
            _tally(run, await jobs.get(view.id))
        run.rss_peak = rss.peak
        if rerun and run.finished:
            started = time.perf_counter()
            again = await jobs.submit(CALLER, MAPPING, csv_file(rows))
            await jobs.wait(again.id)
            run.rerun_seconds = time.perf_counter() - started
    finally:
        await jobs.aclose()
        service.close()
    return run


def _mib(value: int) -> str:
    return f"{value / 1024**2:,.0f} MiB"


def render(r: Results) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    b = r.baseline
    small = r.small
    rows = [
        f"| bare `save()` loop (SQLite) | {b:,.0f} saves/s ({r.baseline_before:,.0f} before, "
        f"{r.baseline_after:,.0f} after) | the reference |",
        f"| import of {small.rows:,} rows ({small.created:,} created, {small.failed:,} failed) "
        f"| **{small.per_second:,.0f} rows/s** ({small.seconds:.1f} s) "
        f"| {small.per_second / b:.2f}x the bare save loop |",
    ]
    if small.rerun_seconds:
        rate = small.rows / small.rerun_seconds
        rows.append(
            f"| the same file again (nothing written) | {rate:,.0f} rows/s "
            f"({small.rerun_seconds:.1f} s) | {rate / b:.2f}x the bare save loop |"
        )
    large = r.large
    if large is not None:
        stopped = "" if large.finished else f", stopped after {large.seconds:.0f} s"
        rows.append(
            f"| import of {large.rows:,} rows ({large.done:,} done{stopped}) "
            f"| **{large.per_second:,.0f} rows/s** ({large.seconds:.1f} s) "
            f"| {large.per_second / b:.2f}x the bare save loop |"
        )
    memory = []
    if large is not None:
        memory = [
            "",
            f"Memory during the {large.rows:,}-row import: the process's RSS was "
            f"{_mib(large.rss_before)} before it and at most **{_mib(large.rss_peak)}** "
            f"while it ran ({_mib(small.rss_peak)} at most during the {small.rows:,}-row "
            "one): the file is streamed to disk and read a row at a time, failed rows go "
            "to the job's tables as they happen; what grows with the file is the set of "
            "its match values (the duplicate check inside the file).",
        ]
    return "\n".join(
        [
            BEGIN,
            "## Contacts: CSV import",
            "",
            f"- **Machine:** {machine()}",
            f"- **Run:** {when}; SQLite stores; new persons with an email, a phone, tags "
            "and a defined choice field; one bad row in 40. The import job runs in this "
            "process as `crm-contacts serve` runs it (no HTTP in between: the upload is "
            "streamed from a generator to the job's file). The machine is shared: its load",
            "average was " + " and ".join(f"{x:.1f}" for x in r.load) + " at the start and",
            f"the end of the run, on {os.cpu_count()} cores; read the ratios, not the "
            "absolute figures.",
            "",
            "| measure | rate | against the same run's reference |",
            "|---|---|---|",
            *rows,
            *memory,
            "",
            "Reading the figures: each row is a `CreatePerson` command with its receipt",
            "(request id `import:<digest>:<line>`), decided against the definitions in",
            "force and stored with the rows around it in one save (up to 32 in flight);",
            "the rows' match values are looked up in the directory's tables a chunk at",
            "a time. A second run of the same file finds every row in the job tables and",
            "writes nothing.",
            END,
        ]
    )


def record(text: str, out: Path) -> None:
    """Replaces this benchmark's section of `out` (or adds it)."""
    record_section(out, text, BEGIN, END)


async def measure(args: argparse.Namespace, scratch: Path) -> Results:
    load = [os.getloadavg()[0]]
    print(f"[imports] baseline (bare save loop, {args.baseline} saves)", flush=True)
    before = bare_save_loop(scratch / "baseline-1", "sqlite", args.baseline)
    print(f"[imports] {args.rows:,} rows", flush=True)
    small = await import_once(scratch / "small", args.rows, args.large_timeout, rerun=True)
    large = None
    if args.large_rows:
        print(
            f"[imports] {args.large_rows:,} rows (at most {args.large_timeout:.0f} s)", flush=True
        )
        large = await import_once(
            scratch / "large", args.large_rows, args.large_timeout, rerun=False
        )
    after = bare_save_loop(scratch / "baseline-2", "sqlite", args.baseline)
    load.append(os.getloadavg()[0])
    return Results(small, large, before, after, load)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.imports", description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--large-rows", type=int, default=100_000, help="0: skip")
    parser.add_argument("--large-timeout", type=float, default=180.0)
    parser.add_argument("--baseline", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crm-bench-imports-") as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    text = render(result)
    print(text)
    record(text, Path(args.out))


if __name__ == "__main__":
    main()
