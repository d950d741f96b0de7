"""CSV import of persons and companies: reading a file row by row against a
column mapping into the same inputs the API takes.

Pure and streaming: `read_rows` yields one `ImportRow` per data line (with
its line number in the file, as a spreadsheet shows it) and never holds the
file, so a file of any length costs the memory of one row. A row that cannot
become a contact is a `RowFailure` with every reason at once; it never stops
the rows after it. Rows that repeat a key of an earlier row of the same file
(the same email, or the same match key) fail as duplicates naming that row,
so a file cannot create one person twice. What a row does to the contact base
(create, update, nothing) is decided by the import job against the contacts
that exist (`crm_contacts.application`).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from crm_contacts.domain import ContactKind
from crm_contacts.inputs import ChannelInput, CustomFieldInput, NewCompany, NewPerson

#: Targets a column may map to, per kind of contact; `custom:<key>` adds a custom field.
PERSON_TARGETS = frozenset(
    {"given_name", "family_name", "email", "phone", "mobile", "lifecycle_stage", "tags", "owner"}
)
COMPANY_TARGETS = frozenset({"name", "domain", "industry", "lifecycle_stage", "tags", "owner"})
CUSTOM = "custom:"
MAX_COLUMNS = 200
MAX_CELL = 10_000
#: Separators of several tags in one cell.
TAG_SEPARATORS = (";", "|")


class MappingRefused(ValueError):
    """The mapping (or the file's header) cannot import anything: field, reason."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class ColumnMapping:
    """Which column of the file feeds which field, and what matches an
    existing contact: `email` (persons), `domain` (companies), or a custom
    field defined as unique (`custom:<key>`, e.g. an ERP's customer number)."""

    kind: ContactKind
    columns: Mapping[str, str]
    match_on: str = "email"

    def __post_init__(self) -> None:
        targets = PERSON_TARGETS if self.kind is ContactKind.PERSON else COMPANY_TARGETS
        if not self.columns:
            raise MappingRefused("columns", "map at least one column")
        if len(self.columns) > MAX_COLUMNS:
            raise MappingRefused("columns", f"at most {MAX_COLUMNS} columns")
        seen: dict[str, str] = {}
        for column, target in self.columns.items():
            if target.startswith(CUSTOM):
                key = target[len(CUSTOM) :]
                if not key:
                    raise MappingRefused(f"columns.{column}", "names no custom field")
            elif target not in targets:
                raise MappingRefused(
                    f"columns.{column}",
                    f"{target!r} is not a {self.kind} field; one of "
                    f"{', '.join(sorted(targets))} or custom:<key>",
                )
            if target in seen:
                raise MappingRefused(
                    f"columns.{column}", f"{target!r} is mapped from {seen[target]!r} already"
                )
            seen[target] = column
        default = "email" if self.kind is ContactKind.PERSON else "domain"
        if self.match_on not in (default,) and not self.match_on.startswith(CUSTOM):
            raise MappingRefused("match_on", f"must be {default!r} or custom:<key>")
        if self.match_on not in seen:
            raise MappingRefused("match_on", f"{self.match_on!r} is not mapped from any column")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ColumnMapping:
        try:
            kind = ContactKind(str(data.get("kind", "person")))
        except ValueError:
            raise MappingRefused("kind", "must be 'person' or 'company'") from None
        columns = data.get("columns")
        if not isinstance(columns, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in columns.items()
        ):
            raise MappingRefused("columns", "must map column names to field names")
        default = "email" if kind is ContactKind.PERSON else "domain"
        return cls(kind, dict(columns), str(data.get("match_on", default)))

    def fingerprint(self) -> str:
        """Identifies the mapping (with the file's digest, a re-run of the same import)."""
        text = repr((str(self.kind), sorted(self.columns.items()), self.match_on))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ImportRow:
    line: int
    #: The value the row matches existing contacts on (canonical form is the job's).
    match_value: str
    person: NewPerson | None = None
    company: NewCompany | None = None
    #: The row's cells as read, for the report if the row fails later (the job's checks).
    cells: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RowFailure:
    line: int
    reasons: tuple[str, ...]
    #: The row's cells as read, for the report.
    cells: Mapping[str, str] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _tags(cell: str) -> tuple[str, ...]:
    text = cell
    for sep in TAG_SEPARATORS:
        text = text.replace(sep, ",")
    return tuple(t.strip() for t in text.split(",") if t.strip())


def read_rows(
    lines: Iterable[str],
    mapping: ColumnMapping,
    *,
    custom_types: Mapping[str, str] | None = None,
    normalise_match: Any = None,
) -> Iterator[ImportRow | RowFailure]:
    """The file's rows as inputs, in file order.

    `custom_types` gives each defined custom field's type (a value of a
    column mapped to an undefined field is refused); `normalise_match` turns
    a match value into its canonical form (e.g. an email in lower case) or
    None when it is not valid, so duplicates inside the file are found
    whatever their spelling.
    """
    reader = csv.DictReader(lines, strict=False)
    header = reader.fieldnames
    if header is None:
        raise MappingRefused("file", "is empty: it has no header line")
    missing = [c for c in mapping.columns if c not in header]
    if missing:
        raise MappingRefused(
            "columns", f"not in the file's header: {', '.join(repr(c) for c in missing)}"
        )
    types = dict(custom_types or {})
    undefined = sorted(
        t[len(CUSTOM) :]
        for t in mapping.columns.values()
        if t.startswith(CUSTOM) and t[len(CUSTOM) :] not in types
    )
    if undefined:
        raise MappingRefused("columns", f"no custom field is defined for: {', '.join(undefined)}")
    first_line_of: dict[str, int] = {}
    line = 1  # the header
    for raw in reader:
        line = reader.line_num  # the line this row ended on (a quoted cell may span lines)
        cells = {c: (raw.get(c) or "") for c in mapping.columns}
        reasons: list[str] = []
        if None in raw:  # more cells than the header has columns
            reasons.append(f"has {len(header) + len(raw[None])} cells, the header {len(header)}")
        if any(len(v) > MAX_CELL for v in cells.values()):
            reasons.append(f"a cell is longer than {MAX_CELL} characters")
        values = {mapping.columns[c]: v.strip() for c, v in cells.items()}
        match_value = values.get(mapping.match_on, "")
        if not match_value:
            reasons.append(f"{mapping.match_on} is empty (the import matches on it)")
        else:
            canonical = normalise_match(match_value) if normalise_match else match_value
            if canonical is None:
                reasons.append(f"{mapping.match_on} {match_value[:60]!r} is not valid")
            else:
                match_value = canonical
                earlier = first_line_of.get(match_value)
                if earlier is not None:
                    reasons.append(
                        f"duplicate of line {earlier} ({mapping.match_on} {match_value})"
                    )
                else:
                    first_line_of[match_value] = line
        if reasons:
            yield RowFailure(line, tuple(reasons), cells)
            continue
        custom = {
            t[len(CUSTOM) :]: CustomFieldInput(types[t[len(CUSTOM) :]], v)
            for t, v in values.items()
            if t.startswith(CUSTOM) and v
        }
        if mapping.kind is ContactKind.PERSON:
            channels = []
            if values.get("email"):
                channels.append(ChannelInput("email", values["email"], preferred=True))
            if values.get("phone"):
                channels.append(ChannelInput("phone", values["phone"]))
            if values.get("mobile"):
                channels.append(ChannelInput("sms", values["mobile"]))
            person = NewPerson(
                given_name=values.get("given_name", ""),
                family_name=values.get("family_name", ""),
                channels=tuple(channels),
                lifecycle_stage=values.get("lifecycle_stage") or None,
                tags=_tags(values.get("tags", "")),
                custom_fields=custom,
                owner=values.get("owner", ""),
            )
            yield ImportRow(line, match_value, person=person, cells=cells)
        else:
            company = NewCompany(
                name=values.get("name", ""),
                domain=values.get("domain", ""),
                industry=values.get("industry", ""),
                lifecycle_stage=values.get("lifecycle_stage") or None,
                tags=_tags(values.get("tags", "")),
                custom_fields=custom,
                owner=values.get("owner", ""),
            )
            yield ImportRow(line, match_value, company=company, cells=cells)


def file_digest(chunks: Iterable[bytes]) -> str:
    """SHA-256 of a file read in chunks: with the mapping, what makes a re-run a re-run."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()
