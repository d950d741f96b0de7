"""Where each benchmark module writes its section of docs/benchmarks.md.

A section lies between its module's begin and end markers (HTML comments);
a run replaces it in place, or adds it when the file has none yet: at the
end, or, for the sections `make bench` writes above the notes it keeps, just
before those notes."""

from __future__ import annotations

from pathlib import Path

#: Everything after this line of the file is written by people (notes on
#: earlier runs, findings) and kept when `make bench` rewrites the file.
NOTES_MARKER = "<!-- Below: notes kept by make bench when it rewrites this file. -->"


def record_section(
    out: Path, text: str, begin: str, end: str, *, before_notes: bool = False
) -> None:
    """Puts `text` (which starts with `begin` and ends with `end`) into `out`."""
    previous = out.read_text() if out.exists() else ""
    head, found, rest = previous.partition(begin)
    if found:
        _, closed, after = rest.partition(end)
        updated = head + text + (after if closed else "")
    elif before_notes and NOTES_MARKER in previous:
        head, marker, notes = previous.partition(NOTES_MARKER)
        updated = head.rstrip("\n") + "\n\n" + text + "\n\n" + marker + notes
    else:
        updated = previous.rstrip("\n") + "\n\n" + text + "\n"
    out.write_text(updated)
