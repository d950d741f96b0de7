"""Merging duplicate contacts into a survivor, and undoing a merge.

A merge folds two or three contacts of one kind into the one chosen to
survive. The survivor records `ContactsMerged`: its profile before and after, and
what it took over (interactions, company links), so that the merge can be
undone; each of the others records `ContactMergedInto` and becomes a tombstone that
names the survivor (reads of its id answer with the survivor; it takes no
commands). Nothing is dropped: every channel identity with its consent (the
most recent consent of an identity held by several), every company link, tag,
custom field and interaction ends up on the survivor; for a field held by
several with different values, the caller's choice decides (default: the
survivor's value, or the first one given when the survivor has none; the
lifecycle stage furthest along the funnel).

`undo_merge` reverses one: each absorbed contact comes back as it was (it
changed nothing while a tombstone), and the survivor gives back what it took
over, keeping what happened to it since the merge: a field changed after the
merge keeps its newer value, an interaction logged since stays. Only a
survivor's latest merge can be undone, within the window the service sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from crm_common.errors import RuleViolated, ValidationFailed
from crm_contacts.domain.channels import ChannelIdentity
from crm_contacts.domain.companies import Company, CompanyProfile
from crm_contacts.domain.contacts import Contact
from crm_contacts.domain.lifecycle import FUNNEL, LifecycleStage
from crm_contacts.domain.persons import Person, PersonProfile

MAX_MERGED = 3
#: Profile fields taken whole from one contact (chosen per field).
PERSON_SCALARS = ("given_name", "family_name", "owner")
COMPANY_SCALARS = ("name", "domain", "industry", "owner")


def _stage_rank(stage: LifecycleStage) -> int:
    # Churned and lost come after the funnel's stages only when nothing else is there.
    return FUNNEL.index(stage) if stage in FUNNEL else -1


def _pick(
    field: str,
    survivor: Any,
    others: Sequence[tuple[str, Any]],
    choices: Mapping[str, str],
    survivor_id: str,
) -> Any:
    chosen = choices.get(field)
    if chosen is not None and chosen != survivor_id:
        for ident, profile in others:
            if ident == chosen:
                return getattr(profile, field)
        raise ValidationFailed.of(f"choices.{field}", f"{chosen} is not one of the merged contacts")
    value = getattr(survivor, field)
    if value or chosen == survivor_id:
        return value
    return next((getattr(p, field) for _, p in others if getattr(p, field)), value)


def _merged_channels(
    survivor: tuple[ChannelIdentity, ...], others: Sequence[tuple[ChannelIdentity, ...]]
) -> tuple[ChannelIdentity, ...]:
    merged: dict[Any, ChannelIdentity] = {c.key: c for c in survivor}
    preferred = {c.channel for c in survivor if c.preferred}
    for channels in others:
        for identity in channels:
            held = merged.get(identity.key)
            if held is None:
                keep = replace(
                    identity, preferred=identity.preferred and identity.channel not in preferred
                )
                if keep.preferred:
                    preferred.add(keep.channel)
                merged[identity.key] = keep
            elif identity.consent is not None and (
                held.consent is None or identity.consent.recorded_at > held.consent.recorded_at
            ):
                merged[identity.key] = replace(held, consent=identity.consent)
    return tuple(merged.values())


def _merged_common(
    survivor: Any, others: Sequence[tuple[str, Any]], choices: Mapping[str, str], survivor_id: str
) -> dict[str, Any]:
    stage_choice = choices.get("lifecycle_stage")
    if stage_choice is not None:
        stage = _pick("lifecycle_stage", survivor, others, choices, survivor_id)
    else:
        stages = [survivor.lifecycle_stage] + [p.lifecycle_stage for _, p in others]
        stage = max(stages, key=_stage_rank)
    tags = sorted(set(survivor.tags).union(*(p.tags for _, p in others)))
    fields = dict(survivor.custom_fields)
    for _, profile in others:
        for key, value in profile.custom_fields.items():
            fields.setdefault(key, value)
    for key in {k for _, p in others for k in p.custom_fields}:
        chosen = choices.get(f"custom_fields.{key}")
        if chosen is None or chosen == survivor_id:
            continue
        source = next((p for i, p in others if i == chosen), None)
        if source is None:
            raise ValidationFailed.of(
                f"choices.custom_fields.{key}", f"{chosen} is not one of the merged contacts"
            )
        if key in source.custom_fields:
            fields[key] = source.custom_fields[key]
        else:
            fields.pop(key, None)
    return {"lifecycle_stage": stage, "tags": tuple(tags), "custom_fields": fields}


def merged_person_profile(
    survivor_id: str,
    survivor: PersonProfile,
    others: Sequence[tuple[str, PersonProfile]],
    choices: Mapping[str, str],
) -> PersonProfile:
    common = _merged_common(survivor, others, choices, survivor_id)
    scalars = {f: _pick(f, survivor, others, choices, survivor_id) for f in PERSON_SCALARS}
    channels = _merged_channels(survivor.channels, [p.channels for _, p in others])
    return replace(survivor, **scalars, **common, channels=channels)


def merged_company_profile(
    survivor_id: str,
    survivor: CompanyProfile,
    others: Sequence[tuple[str, CompanyProfile]],
    choices: Mapping[str, str],
) -> CompanyProfile:
    common = _merged_common(survivor, others, choices, survivor_id)
    scalars = {f: _pick(f, survivor, others, choices, survivor_id) for f in COMPANY_SCALARS}
    return replace(survivor, **scalars, **common)


def merge(
    merge_id: str,
    survivor: Contact,
    others: Sequence[Contact],
    choices: Mapping[str, str],
    at: datetime,
    actor: str = "",
) -> None:
    """Folds `others` into `survivor` (records the events on all of them)."""
    ids = [str(survivor.id)] + [str(o.id) for o in others]
    if not others:
        raise ValidationFailed.of("merged_ids", "name at least one contact to merge")
    if len(ids) > MAX_MERGED:
        raise ValidationFailed.of("merged_ids", f"at most {MAX_MERGED} contacts merge at once")
    if len(set(ids)) != len(ids):
        raise ValidationFailed.of("merged_ids", "a contact is named twice")
    allowed = {"lifecycle_stage", "tags", "custom_fields"}
    allowed |= set(PERSON_SCALARS if isinstance(survivor, Person) else COMPANY_SCALARS)
    for field, source in choices.items():
        if field.split(".", 1)[0] not in allowed:
            raise ValidationFailed.of(f"choices.{field}", "is not a field a merge chooses")
        if source not in ids:
            raise ValidationFailed.of(
                f"choices.{field}", f"{source} is not one of the merged contacts"
            )
    for contact in [survivor, *others]:
        if contact.merged_into is not None:
            raise RuleViolated(f"contact {contact.id} was merged into {contact.merged_into}")
        if type(contact) is not type(survivor):
            raise RuleViolated("only contacts of one kind merge: persons or companies")
    pairs = [(str(o.id), o.profile) for o in others]  # type: ignore[attr-defined]
    if isinstance(survivor, Person):
        after: Any = merged_person_profile(str(survivor.id), survivor.profile, pairs, choices)
        taken_links = [
            {"company_id": a.company_id, "company_name": a.company_name, "role": a.role}
            for o in others
            for a in o.affiliations.values()  # type: ignore[attr-defined]
            if a.company_id not in survivor.affiliations
        ]
    elif isinstance(survivor, Company):
        after = merged_company_profile(str(survivor.id), survivor.profile, pairs, choices)
        taken_links = []
    else:  # pragma: no cover - only persons and companies exist
        raise TypeError(type(survivor))
    known = {i.interaction_id for i in survivor.interactions}
    taken_interactions = [
        i.to_dict() for o in others for i in o.interactions if i.interaction_id not in known
    ]
    survivor.absorb(
        merge_id=merge_id,
        merged_ids=ids[1:],
        before=survivor.profile.to_dict(),
        after=after.to_dict(),
        interactions=taken_interactions,
        affiliations=_unique_links(taken_links),
        at=at,
        actor=actor,
    )
    for other in others:
        other.merge_into(merge_id=merge_id, survivor_id=str(survivor.id), at=at, actor=actor)


def _unique_links(links: list[dict[str, str]]) -> list[dict[str, str]]:
    seen: dict[str, dict[str, str]] = {}
    for link in links:
        seen.setdefault(link["company_id"], link)
    return list(seen.values())


def undo_merge(
    merge_id: str,
    survivor: Contact,
    others: Sequence[Contact],
    at: datetime,
    window: timedelta,
    actor: str = "",
) -> None:
    """Reverses `merge_id`: the others come back, the survivor gives back what it took."""
    record = survivor.merges.get(merge_id)
    if record is None:
        raise RuleViolated(f"contact {survivor.id} has no merge {merge_id}")
    if record.undone:
        raise RuleViolated(f"merge {merge_id} was undone already")
    latest = max(
        (r for r in survivor.merges.values() if not r.undone), key=lambda r: r.at, default=None
    )
    if latest is not None and latest.merge_id != merge_id:
        raise RuleViolated(
            f"only the latest merge of {survivor.id} can be undone ({latest.merge_id})"
        )
    if at - record.at > window:
        raise RuleViolated(f"merge {merge_id} is older than the undo window ({window})")
    if sorted(str(o.id) for o in others) != sorted(record.merged_ids):
        raise RuleViolated(f"merge {merge_id} merged {', '.join(record.merged_ids)}")
    current: dict[str, Any] = survivor.profile.to_dict()  # type: ignore[attr-defined]
    restored = _restored_profile(record.before, record.after, current)
    survivor.give_back(
        merge_id=merge_id,
        restored_ids=list(record.merged_ids),
        profile=restored,
        interactions=list(record.interactions_added),
        affiliations=list(record.affiliations_added),
        at=at,
        actor=actor,
    )
    for other in others:
        other.unmerge(merge_id=merge_id, at=at, actor=actor)


def _restored_profile(
    before: Mapping[str, Any], after: Mapping[str, Any], current: Mapping[str, Any]
) -> dict[str, Any]:
    """The survivor's profile after an undo: each field the merge set and that
    has not changed since goes back to its value before the merge; collections
    lose the items the merge added that are still there, keeping items added
    since."""
    restored = dict(current)
    for field, merged in after.items():
        if field not in before:
            continue
        now: Any = current.get(field, before[field])
        was = before[field]
        if isinstance(merged, list) and field == "channels":
            had = {(c["channel"], c["address"]) for c in was}
            added = {(c["channel"], c["address"]) for c in merged} - had
            restored[field] = [c for c in now if (c["channel"], c["address"]) not in added]
        elif isinstance(merged, list):
            added_items = set(merged) - set(was)
            restored[field] = [v for v in now if v not in added_items]
        elif isinstance(merged, dict):  # custom fields
            kept = dict(now)
            for key, value in merged.items():
                if key not in was and kept.get(key) == value:
                    kept.pop(key)
                elif key in was and kept.get(key) == value and was[key] != value:
                    kept[key] = was[key]
            restored[field] = kept
        elif now == merged:
            restored[field] = was
    return restored
