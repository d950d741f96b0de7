"""The tier configuration file: YAML into a checked `TierPolicy`.

Deployed with the image (the packaged `tiers.yaml`, the default), as a file
named by `CRM_LOYALTY_TIERS_FILE`, or as the YAML text itself in
`CRM_LOYALTY_TIERS_YAML` (what the Helm chart's ConfigMap carries, rendered from
its values `loyalty.tiers`); read once at start. Every mistake is reported at
once, each naming the source and the field (`tiers[2].threshold: must rise
above silver's 1000`), and the process does not start with a configuration it
would have to guess about.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from crm_common.errors import ValidationFailed
from crm_common.money import canonical_currency
from crm_loyalty.domain.tiers import BASES, SPEND, Tier, TierPolicy

ENV = "CRM_LOYALTY_TIERS_FILE"
ENV_TEXT = "CRM_LOYALTY_TIERS_YAML"
KEYS = {"basis", "window_days", "grace_days", "currency", "tiers"}
NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
MAX_THRESHOLD = 10**12


class TierConfigError(ValueError):
    """The tier configuration cannot be used; the message lists every mistake."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"tier configuration {source} is not valid:\n" + "\n".join(f"  {p}" for p in problems)
        )


def _days(data: dict[str, Any], key: str, default: int, low: int, problems: list[str]) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 3650:
        problems.append(f"{key}: must be a whole number of days from {low} to 3650, not {value!r}")
        return default
    return value


def parse(data: Any, source: str = "<text>") -> TierPolicy:
    """A checked policy from the file's parsed YAML; TierConfigError otherwise."""
    if not isinstance(data, dict):
        raise TierConfigError(source, ["the file must hold a mapping (basis, tiers, ...)"])
    problems: list[str] = [f"{key}: is not a setting" for key in sorted(set(data) - KEYS)]
    basis = data.get("basis", "points")
    if basis not in BASES:
        problems.append(f"basis: must be one of {', '.join(BASES)}, not {basis!r}")
    window = _days(data, "window_days", 365, 1, problems)
    grace = _days(data, "grace_days", 30, 0, problems)
    currency = ""
    if basis == SPEND:
        try:
            currency = canonical_currency(str(data.get("currency") or ""), "currency")
        except ValidationFailed as error:
            problems += [
                f"{e.field}: {e.message} (a policy by spend needs one)" for e in error.errors
            ]
    elif "currency" in data:
        problems.append("currency: only a policy by spend has one")
    tiers: list[Tier] = []
    raw = data.get("tiers")
    if not isinstance(raw, list) or not raw:
        problems.append("tiers: must list at least one tier")
        raw = []
    for index, entry in enumerate(raw):
        where = f"tiers[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "threshold"}:
            problems.append(f"{where}: must have exactly a name and a threshold")
            continue
        name, threshold = entry["name"], entry["threshold"]
        if not isinstance(name, str) or not NAME.match(name):
            problems.append(
                f"{where}.name: lower-case letters, digits, '-' or '_', at most 40, not {name!r}"
            )
            continue
        if name in {t.name for t in tiers}:
            problems.append(f"{where}.name: {name!r} appears twice")
            continue
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int)
            or not 0 <= threshold <= MAX_THRESHOLD
        ):
            problems.append(f"{where}.threshold: must be a whole number from 0, not {threshold!r}")
            continue
        if not tiers and threshold != 0:
            problems.append(f"{where}.threshold: the first tier starts at 0, not {threshold}")
        elif tiers and threshold <= tiers[-1].threshold:
            previous = tiers[-1]
            problems.append(
                f"{where}.threshold: must rise above {previous.name}'s {previous.threshold}"
            )
        tiers.append(Tier(name, threshold))
    if problems:
        raise TierConfigError(source, problems)
    return TierPolicy(
        tiers=tuple(tiers),
        window=timedelta(days=window),
        grace=timedelta(days=grace),
        basis=basis,
        currency=currency,
    )


def load(path: Path | None = None) -> TierPolicy:
    """The policy of `path`, else of `CRM_LOYALTY_TIERS_YAML` (the text), else of
    the file `CRM_LOYALTY_TIERS_FILE` names, else of the packaged file."""
    inline = os.environ.get(ENV_TEXT, "")
    if path is None and inline.strip():
        text, source = inline, ENV_TEXT
    elif path is None and not os.environ.get(ENV):
        text = resources.files("crm_loyalty").joinpath("tiers.yaml").read_text("utf-8")
        source = "crm_loyalty/tiers.yaml"
    else:
        path = path or Path(os.environ[ENV])
        source = str(path)
        try:
            text = path.read_text("utf-8")
        except OSError as error:
            raise TierConfigError(source, [f"cannot be read: {error.strerror or error}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise TierConfigError(source, [f"is not YAML: {error}"]) from None
    return parse(data, source)
