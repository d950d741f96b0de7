"""Duplicate detection: which contacts look like the same person or company,
and why.

The rules are data (`DuplicateRules`, loaded from configuration), each one a
kind of evidence with a score:

- `email`: an email address in common (addresses are compared as stored:
  trimmed and in lower case);
- `phone`: a phone number in common (compared in E.164);
- `name_domain`: names alike (a Jaro-Winkler similarity of the normalised
  names at or above the rule's threshold) and a domain in common (a
  company's web domain, a person's email domain other than a free mail
  provider's, or the domain of a company the person works at).

A pair's score is the highest score of the rules it meets; a pair below the
rules' `report_threshold` is not reported. Pure functions over `Facts`, the
few things a rule compares: no storage, no transport. The caller finds the
candidates (the contacts sharing a key, `blocking_keys`), so a check reads a
handful of contacts and a scan over the whole base compares only contacts
that share a key, never every pair.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Mail providers whose domain says nothing about where a person works.
FREE_MAIL_DOMAINS = frozenset(
    {
        "gmail.com",
        "googlemail.com",
        "outlook.com",
        "hotmail.com",
        "live.com",
        "msn.com",
        "yahoo.com",
        "ymail.com",
        "icloud.com",
        "me.com",
        "aol.com",
        "proton.me",
        "protonmail.com",
        "gmx.de",
        "gmx.net",
        "web.de",
        "mail.ru",
        "yandex.ru",
        "qq.com",
        "163.com",
    }
)

RULE_KINDS = ("email", "phone", "name_domain")


@dataclass(frozen=True)
class Rule:
    """One kind of evidence and what it scores (0 < score <= 1)."""

    kind: str
    score: float
    #: `name_domain` only: the least name similarity (0..1) that counts.
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(f"rule kind must be one of {', '.join(RULE_KINDS)}, not {self.kind!r}")
        if not 0.0 < self.score <= 1.0:
            raise ValueError(f"a {self.kind} rule's score must be in (0, 1], not {self.score}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"a {self.kind} rule's threshold must be in [0, 1]")


@dataclass(frozen=True)
class DuplicateRules:
    rules: tuple[Rule, ...]
    #: Pairs scoring below this are not reported at all.
    report_threshold: float = 0.5
    #: On create: "warn" answers with the look-alikes and creates anyway;
    #: "refuse" refuses a create whose best look-alike scores `refuse_threshold` or more.
    on_create: str = "warn"
    refuse_threshold: float = 0.9

    def __post_init__(self) -> None:
        if self.on_create not in ("warn", "refuse"):
            raise ValueError(f"on_create must be 'warn' or 'refuse', not {self.on_create!r}")
        if not self.rules:
            raise ValueError("at least one duplicate rule is needed")

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> DuplicateRules:
        """From a mapping as configuration gives it (YAML or JSON)."""
        try:
            rules = tuple(
                Rule(str(r["kind"]), float(r["score"]), float(r.get("threshold", 0.0)))
                for r in data["rules"]
            )
            return cls(
                rules,
                report_threshold=float(data.get("report_threshold", 0.5)),
                on_create=str(data.get("on_create", "warn")),
                refuse_threshold=float(data.get("refuse_threshold", 0.9)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"duplicate rules are malformed: {exc}") from exc


DEFAULT_RULES = DuplicateRules(
    (
        Rule("email", 1.0),
        Rule("phone", 0.9),
        Rule("name_domain", 0.8, threshold=0.88),
    )
)


@dataclass(frozen=True)
class Facts:
    """What the rules compare of one contact."""

    id: str
    kind: str  # "person" | "company"
    name: str
    emails: frozenset[str] = frozenset()
    phones: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Reason:
    rule: str
    score: float
    detail: str


@dataclass(frozen=True)
class Match:
    """`other` looks like the contact checked, with `score` for `reasons`."""

    other: str
    score: float
    reasons: tuple[Reason, ...]


@dataclass(frozen=True)
class Pair:
    first: str
    second: str
    score: float
    reasons: tuple[Reason, ...]


# -- normalising ----------------------------------------------------------------------------


def normalised_name(name: str) -> str:
    """Lower case, accents and punctuation dropped, words in order:
    "  Zoë  O'Brien-Smith " -> "zoe o brien smith"."""
    decomposed = unicodedata.normalize("NFKD", name.casefold())
    letters = [ch if ch.isalnum() else " " for ch in decomposed if not unicodedata.combining(ch)]
    return " ".join("".join(letters).split())


def _sorted_words(name: str) -> str:
    return " ".join(sorted(name.split()))


def domain_of_email(address: str) -> str | None:
    """The email's domain when it can say where a person works."""
    domain = address.rpartition("@")[2].strip().lower()
    if not domain or domain in FREE_MAIL_DOMAINS:
        return None
    return domain


def web_domain(value: str) -> str | None:
    """`https://www.Example.com/about` -> `example.com`."""
    text = value.strip().lower()
    for prefix in ("https://", "http://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    text = text.split("/", 1)[0].split(":", 1)[0]
    if text.startswith("www."):
        text = text[4:]
    return text if "." in text else None


# -- similarity -----------------------------------------------------------------------------


def jaro_winkler(a: str, b: str) -> float:
    """The Jaro-Winkler similarity of two strings, 0 (nothing alike) to 1 (equal)."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    reach = max(len(a), len(b)) // 2 - 1
    a_hits = [False] * len(a)
    b_hits = [False] * len(b)
    matches = 0
    for i, ch in enumerate(a):
        for j in range(max(0, i - reach), min(i + reach + 1, len(b))):
            if not b_hits[j] and b[j] == ch:
                a_hits[i] = b_hits[j] = True
                matches += 1
                break
    if matches == 0:
        return 0.0
    transpositions = 0
    j = 0
    for i, hit in enumerate(a_hits):
        if hit:
            while not b_hits[j]:
                j += 1
            if a[i] != b[j]:
                transpositions += 1
            j += 1
    m = float(matches)
    jaro = (m / len(a) + m / len(b) + (m - transpositions / 2) / m) / 3
    prefix = 0
    for x, y in zip(a[:4], b[:4], strict=False):
        if x != y:
            break
        prefix += 1
    return jaro + prefix * 0.1 * (1 - jaro)


def name_similarity(a: str, b: str) -> float:
    """Similarity of two names, whatever the order of their words
    ("Ada Lovelace" and "Lovelace, Ada" are alike)."""
    na, nb = normalised_name(a), normalised_name(b)
    return max(jaro_winkler(na, nb), jaro_winkler(_sorted_words(na), _sorted_words(nb)))


# -- matching -------------------------------------------------------------------------------


def compare(a: Facts, b: Facts, rules: DuplicateRules = DEFAULT_RULES) -> Match | None:
    """How much `b` looks like `a`, and why; None when below the report threshold."""
    if a.id == b.id or a.kind != b.kind:
        return None
    reasons: list[Reason] = []
    for rule in rules.rules:
        if rule.kind == "email":
            shared = sorted(a.emails & b.emails)
            if shared:
                reasons.append(Reason("email", rule.score, f"same email {shared[0]}"))
        elif rule.kind == "phone":
            shared = sorted(a.phones & b.phones)
            if shared:
                reasons.append(Reason("phone", rule.score, f"same phone {shared[0]}"))
        else:
            shared = sorted(a.domains & b.domains)
            if shared:
                similarity = name_similarity(a.name, b.name)
                if similarity >= rule.threshold:
                    reasons.append(
                        Reason(
                            "name_domain",
                            round(rule.score * similarity, 4),
                            f"names {similarity:.0%} alike, same domain {shared[0]}",
                        )
                    )
    if not reasons:
        return None
    score = max(r.score for r in reasons)
    if score < rules.report_threshold:
        return None
    reasons.sort(key=lambda r: -r.score)
    return Match(b.id, score, tuple(reasons))


def blocking_keys(facts: Facts, rules: DuplicateRules = DEFAULT_RULES) -> set[str]:
    """The keys under which a look-alike of `facts` must share at least one:
    a candidate search reads the contacts with any of these keys."""
    kinds = {r.kind for r in rules.rules}
    keys: set[str] = set()
    if "email" in kinds:
        keys |= {f"email:{e}" for e in facts.emails}
    if "phone" in kinds:
        keys |= {f"phone:{p}" for p in facts.phones}
    if "name_domain" in kinds:
        keys |= {f"domain:{facts.kind}:{d}" for d in facts.domains}
    return keys


def best_matches(
    facts: Facts, candidates: Iterable[Facts], rules: DuplicateRules = DEFAULT_RULES
) -> list[Match]:
    """The candidates that look like `facts`, best first."""
    found = [m for c in candidates if (m := compare(facts, c, rules)) is not None]
    found.sort(key=lambda m: (-m.score, m.other))
    return found


@dataclass
class Scan:
    """Candidate pairs over a whole base, fed contact by contact: each new
    contact is compared with the contacts already fed that share one of its
    keys (a block), so the work grows with the blocks' sizes, not with the
    square of the base."""

    rules: DuplicateRules = DEFAULT_RULES
    #: A key shared by more contacts than this (a shared switchboard number, a
    #: huge company's domain) is too common to pair on; it is counted, not compared.
    max_block: int = 200
    _blocks: dict[str, list[Facts]] = field(default_factory=lambda: defaultdict(list))
    _pairs: dict[tuple[str, str], Pair] = field(default_factory=dict)
    oversized: set[str] = field(default_factory=set)

    def add(self, facts: Facts) -> None:
        for key in blocking_keys(facts, self.rules):
            block = self._blocks[key]
            if len(block) >= self.max_block:
                self.oversized.add(key)
                continue
            for other in block:
                first, second = sorted((facts.id, other.id))
                if (first, second) in self._pairs:
                    continue
                match = compare(facts, other, self.rules)
                if match is not None:
                    self._pairs[(first, second)] = Pair(first, second, match.score, match.reasons)
            block.append(facts)

    def pairs(self) -> list[Pair]:
        """Every pair found, best first."""
        return sorted(self._pairs.values(), key=lambda p: (-p.score, p.first, p.second))


def scan(facts: Iterable[Facts], rules: DuplicateRules = DEFAULT_RULES) -> list[Pair]:
    scanner = Scan(rules)
    for f in facts:
        scanner.add(f)
    return scanner.pairs()


def facts_for_person(
    ident: str,
    name: str,
    emails: Sequence[str],
    phones: Sequence[str],
    company_domains: Sequence[str] = (),
) -> Facts:
    domains = {d for e in emails if (d := domain_of_email(e))}
    domains |= {d for w in company_domains if (d := web_domain(w))}
    return Facts(ident, "person", name, frozenset(emails), frozenset(phones), frozenset(domains))


def facts_for_company(ident: str, name: str, domain: str) -> Facts:
    web = web_domain(domain) if domain else None
    return Facts(ident, "company", name, domains=frozenset({web} if web else ()))
