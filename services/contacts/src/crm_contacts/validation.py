"""Input checks and normalisation: pure functions from inputs to domain values.

Each function collects every problem of a request in a `FieldErrors` and
raises one `ValidationFailed` naming all offending field paths
(`channels[0].address`, `custom_fields.budget.currency`), so a client can fix
a form in one round trip.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import TypeVar

from crm_common.errors import FieldErrors, ValidationFailed
from crm_common.money import parse_amount, parse_decimal
from crm_contacts.domain import (
    PHONE_CHANNELS,
    Channel,
    ChannelIdentity,
    CompanyProfile,
    Consent,
    ConsentStatus,
    CustomField,
    Direction,
    FieldType,
    Interaction,
    InteractionKind,
    LifecycleStage,
    PersonProfile,
    merge_channels,
)
from crm_contacts.domain.field_definitions import FieldDefinition
from crm_contacts.inputs import (
    ChannelInput,
    CompanyChanges,
    ConsentInput,
    CustomFieldInput,
    InteractionInput,
    NewCompany,
    NewPerson,
    PersonChanges,
)

E = TypeVar("E", bound=StrEnum)

MAX_NAME = 200
MAX_TAG = 64
MAX_TAGS = 50
MAX_CUSTOM_FIELDS = 100
MAX_FIELD_VALUE = 1000
MAX_SUMMARY = 4000
MAX_ROLE = 100
MAX_SOURCE = 200
MAX_HANDLE = 200
MAX_EMAIL = 254
MAX_CHANNELS = 20

PERSON_MASK = frozenset(PersonProfile.FIELDS)
COMPANY_MASK = frozenset(CompanyProfile.FIELDS)

FIELD_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_EMAIL = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_PHONE_PUNCTUATION = re.compile(r"[\s\-.()/]")
_DOMAIN = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_ISO_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


# -- small pieces -------------------------------------------------------------------------


def enum_of(
    errors: FieldErrors, path: str, kind: type[E], word: str | None, *, required: bool
) -> E | None:
    """An enum from its lower-case word; None (or "unspecified") when not given."""
    if word is None or word == "" or word == "unspecified":
        if required:
            errors.add(path, "must be specified")
        return None
    try:
        return kind(word.lower())
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        errors.add(path, f"{word!r} is not one of: {choices}")
        return None


def text(errors: FieldErrors, path: str, value: str, limit: int, *, required: bool = False) -> str:
    cleaned = value.strip()
    if required and not cleaned:
        errors.add(path, "must not be empty")
    elif len(cleaned) > limit:
        errors.add(path, f"must be at most {limit} characters")
    return cleaned


def email_address(value: str) -> str | None:
    """The address in lower case, or None when it is not an email address."""
    cleaned = value.strip().lower()
    if len(cleaned) > MAX_EMAIL or not _EMAIL.match(cleaned):
        return None
    if len(cleaned.split("@", 1)[0]) > 64:
        return None
    return cleaned


def phone_number(value: str) -> str | None:
    """The number in E.164 (`+41446681800`), or None when it is not one.

    Spaces, dashes, dots, slashes and parentheses are dropped, and a leading
    international call prefix `00` becomes `+`.
    """
    cleaned = _PHONE_PUNCTUATION.sub("", value.strip())
    if cleaned.startswith("00"):
        cleaned = "+" + cleaned[2:]
    return cleaned if _E164.match(cleaned) else None


def address_of(errors: FieldErrors, path: str, channel: Channel | None, value: str) -> str:
    """A channel address in its canonical form (errors recorded under `path`)."""
    if not value.strip():
        errors.add(path, "must not be empty")
        return ""
    if channel is Channel.EMAIL:
        email = email_address(value)
        if email is None:
            errors.add(path, f"{value.strip()[:100]!r} is not an email address")
            return value.strip()
        return email
    if channel in PHONE_CHANNELS:
        number = phone_number(value)
        if number is None:
            errors.add(
                path, "must be a phone number in international format, e.g. +41 44 668 18 00"
            )
            return value.strip()
        return number
    return text(errors, path, value, MAX_HANDLE)


def tags_of(errors: FieldErrors, path: str, tags: Sequence[str]) -> tuple[str, ...]:
    """Tags in lower case with single spaces, without duplicates, sorted."""
    seen: set[str] = set()
    for i, tag in enumerate(tags):
        cleaned = " ".join(tag.split()).lower()
        if not cleaned:
            errors.add(f"{path}[{i}]", "must not be empty")
        elif len(cleaned) > MAX_TAG:
            errors.add(f"{path}[{i}]", f"must be at most {MAX_TAG} characters")
        else:
            seen.add(cleaned)
    if len(seen) > MAX_TAGS:
        errors.add(path, f"at most {MAX_TAGS} tags")
    return tuple(sorted(seen))


#: The largest decimal exponent a number custom field may have, either way.
MAX_EXPONENT = 30


def custom_field_of(errors: FieldErrors, path: str, given: CustomFieldInput) -> CustomField | None:
    """A custom field value with no definition, in canonical text; None when invalid."""
    before = len(errors.errors)
    kind = enum_of(errors, f"{path}.type", FieldType, given.type, required=True)
    if kind is FieldType.MULTI_CHOICE:
        errors.add(f"{path}.type", "a multi_choice value needs a field definition with its options")
        return None
    if kind is None:
        return None
    value, currency = _canonical(errors, path, kind, given.value.strip(), given.currency.strip())
    if len(errors.errors) > before:
        return None
    return CustomField(kind, value, currency)


def defined_field_of(
    errors: FieldErrors, path: str, definition: FieldDefinition, given: CustomFieldInput
) -> CustomField | None:
    """A value of a defined custom field, checked against its definition (its
    type, options and currency) and in canonical text; None when invalid.
    The value's `type` may be left empty; given, it must be the field's."""
    before = len(errors.errors)
    if definition.retired:
        errors.add(path, f"custom field {definition.key!r} is retired")
        return None
    if given.type.strip() and given.type.strip().lower() != str(definition.type):
        errors.add(f"{path}.type", f"{definition.key!r} is a {definition.type} field")
        return None
    raw = given.value.strip()
    if definition.type is FieldType.CHOICE:
        if raw not in definition.options:
            errors.add(f"{path}.value", f"{raw[:50]!r} is not one of {_options(definition)}")
        value, currency = raw, ""
    elif definition.type is FieldType.MULTI_CHOICE:
        chosen = {p.strip() for p in re.split(r"[;,\n]", raw) if p.strip()}
        unknown = sorted(chosen - set(definition.options))
        if unknown:
            errors.add(f"{path}.value", f"{unknown[0][:50]!r} is not one of {_options(definition)}")
        value = ";".join(o for o in definition.options if o in chosen)
        currency = ""
    elif definition.type is FieldType.NUMBER:
        value, currency = _canonical(errors, path, FieldType.NUMBER, raw, given.currency.strip())
        if len(errors.errors) == before and "." in value:
            errors.add(f"{path}.value", "must be a whole number")
    else:
        currency_given = given.currency.strip()
        if definition.currency and not currency_given:
            currency_given = definition.currency
        value, currency = _canonical(errors, path, definition.type, raw, currency_given)
        if len(errors.errors) == before and definition.currency and currency != definition.currency:
            errors.add(f"{path}.currency", f"must be {definition.currency}")
    if len(errors.errors) > before:
        return None
    return CustomField(definition.type, value, currency)


def _options(definition: FieldDefinition) -> str:
    shown = ", ".join(repr(o) for o in definition.options[:10])
    more = len(definition.options) - 10
    return shown + (f" (and {more} more)" if more > 0 else "")


_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})
_URL = re.compile(r"^https?://[^\s/?#]+\.[^\s/?#]+(?:[/?#]\S*)?$", re.IGNORECASE)


def _canonical(
    errors: FieldErrors, path: str, kind: FieldType, raw: str, currency: str
) -> tuple[str, str]:
    """(value, currency) of a value of type `kind` in canonical text; errors under `path`."""
    value = raw
    if len(raw) > MAX_FIELD_VALUE:
        errors.add(f"{path}.value", f"must be at most {MAX_FIELD_VALUE} characters")
        return raw, currency
    if kind in (FieldType.NUMBER, FieldType.DECIMAL):
        number = _collected(errors, lambda: parse_decimal(raw, f"{path}.value"))
        # Bounded as a number, before it is written out: `1e999999` is nine
        # characters in and a million digits out.
        if number is not None and number and not -MAX_EXPONENT <= number.adjusted() < MAX_EXPONENT:
            errors.add(f"{path}.value", f"must be between 1e-{MAX_EXPONENT} and 1e{MAX_EXPONENT}")
        elif number is not None:
            value = _plain(number)
            if len(value) > MAX_FIELD_VALUE:
                errors.add(f"{path}.value", f"has more than {MAX_FIELD_VALUE} digits")
    elif kind is FieldType.MONEY:
        return _money(errors, path, raw, currency)
    elif kind is FieldType.DATE:
        day = _iso_date(raw)
        if day is None:
            errors.add(f"{path}.value", f"{raw[:50]!r} is not a date (YYYY-MM-DD)")
        else:
            value = day.isoformat()
    elif kind is FieldType.BOOLEAN:
        word = raw.lower()
        if word in _TRUE:
            value = "true"
        elif word in _FALSE:
            value = "false"
        else:
            errors.add(f"{path}.value", f"{raw[:50]!r} is not true or false")
    elif kind is FieldType.URL:
        if not _URL.match(raw):
            errors.add(f"{path}.value", f"{raw[:50]!r} is not an http(s) URL")
    elif kind is FieldType.EMAIL:
        address = email_address(raw)
        if address is None:
            errors.add(f"{path}.value", f"{raw[:50]!r} is not an email address")
        else:
            value = address
    elif kind is FieldType.PHONE:
        number_ = phone_number(raw)
        if number_ is None:
            errors.add(
                f"{path}.value", f"{raw[:50]!r} is not a phone number in international format"
            )
        else:
            value = number_
    elif kind is FieldType.CHOICE and not raw:
        errors.add(f"{path}.value", "a choice must not be empty")
    if currency:  # money returned above
        errors.add(f"{path}.currency", "only money fields have a currency")
    return value, ""


T = TypeVar("T")


def _collected(errors: FieldErrors, check: Callable[[], T]) -> T | None:
    """Runs a shared check that raises; its field errors join the others."""
    try:
        return check()
    except ValidationFailed as refused:
        errors.errors.extend(refused.errors)
        return None


def _plain(number: Decimal) -> str:
    """Canonical decimal text: no exponent, no trailing zeros, no negative zero."""
    text_ = format(number.normalize(), "f")
    if "." in text_:
        text_ = text_.rstrip("0").rstrip(".")
    return "0" if text_ in ("-0", "") else text_


def _money(errors: FieldErrors, path: str, raw: str, currency: str) -> tuple[str, str]:
    """(amount, currency) in canonical text: exactly the currency's minor units.

    A custom field may hold a negative amount (a credit, a refund).
    """
    number = _collected(errors, lambda: parse_decimal(raw, f"{path}.value"))
    if number is None:
        return raw, currency
    amount = _collected(
        errors,
        lambda: parse_amount(
            number,
            currency,
            f"{path}.value",
            currency_field=f"{path}.currency",
            allow_negative=True,
        ),
    )
    if amount is None:
        return raw, currency
    return format(amount, "f"), currency.upper()


def _iso_date(raw: str) -> date | None:
    if not _ISO_DATE.match(raw):
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        return None


#: The custom-field definitions of a kind of contact, by key (all of them,
#: retired ones included: a value for a retired field is refused).
Definitions = Mapping[str, FieldDefinition]
NO_DEFINITIONS: Definitions = {}


def custom_fields_of(
    errors: FieldErrors,
    path: str,
    given: Mapping[str, CustomFieldInput],
    definitions: Definitions = NO_DEFINITIONS,
) -> dict[str, CustomField]:
    """Values checked against their definition where the key has one, by
    their own type otherwise."""
    fields: dict[str, CustomField] = {}
    for key, value in given.items():
        if not FIELD_KEY.match(key):
            errors.add(f"{path}.{key[:70]}", "key must match ^[a-z][a-z0-9_]{0,63}$")
            continue
        definition = definitions.get(key)
        if definition is not None:
            checked = defined_field_of(errors, f"{path}.{key}", definition, value)
        else:
            checked = custom_field_of(errors, f"{path}.{key}", value)
        if checked is not None:
            fields[key] = checked
    return fields


def _required_fields(
    errors: FieldErrors, path: str, given: Mapping[str, object], definitions: Definitions
) -> None:
    """Every required field in force must be given a value (a value given but
    invalid has its own error)."""
    for key, definition in sorted(definitions.items()):
        if definition.required and not definition.retired and key not in given:
            errors.add(f"{path}.{key}", f"is required ({definition.label})")


def _limit_fields(errors: FieldErrors, path: str, fields: Mapping[str, CustomField]) -> None:
    if len(fields) > MAX_CUSTOM_FIELDS:
        errors.add(path, f"at most {MAX_CUSTOM_FIELDS} custom fields")


def channels_of(
    errors: FieldErrors, path: str, given: Sequence[ChannelInput], now: datetime
) -> tuple[ChannelIdentity, ...]:
    if len(given) > MAX_CHANNELS:
        errors.add(path, f"at most {MAX_CHANNELS} channel identities")
    identities: list[ChannelIdentity] = []
    seen: set[tuple[Channel, str]] = set()
    preferred: set[Channel] = set()
    for i, item in enumerate(given):
        at = f"{path}[{i}]"
        channel = enum_of(errors, f"{at}.channel", Channel, item.channel, required=True)
        address = address_of(errors, f"{at}.address", channel, item.address)
        status = enum_of(
            errors, f"{at}.consent_status", ConsentStatus, item.consent_status, required=False
        )
        source = text(errors, f"{at}.consent_source", item.consent_source, MAX_SOURCE)
        if channel is None:
            continue
        if (channel, address) in seen:
            errors.add(f"{at}.address", f"{channel} {address} is listed twice")
        seen.add((channel, address))
        if item.preferred:
            if channel in preferred:
                errors.add(f"{at}.preferred", f"only one preferred {channel} identity")
            preferred.add(channel)
        consent = None if status is None else Consent(status, source, now)
        identities.append(ChannelIdentity(channel, address, item.preferred, consent))
    return tuple(identities)


# -- whole commands -------------------------------------------------------------------------


def _person_names(errors: FieldErrors, given_name: str, family_name: str) -> tuple[str, str]:
    given = text(errors, "given_name", given_name, MAX_NAME)
    family = text(errors, "family_name", family_name, MAX_NAME)
    if not given and not family:
        errors.add("given_name", "a person needs a given or a family name")
    return given, family


def new_person_profile(
    new: NewPerson, now: datetime, definitions: Definitions = NO_DEFINITIONS
) -> PersonProfile:
    errors = FieldErrors()
    given, family = _person_names(errors, new.given_name, new.family_name)
    stage = enum_of(errors, "lifecycle_stage", LifecycleStage, new.lifecycle_stage, required=False)
    tags = tags_of(errors, "tags", new.tags)
    fields = custom_fields_of(errors, "custom_fields", new.custom_fields, definitions)
    _required_fields(errors, "custom_fields", new.custom_fields, definitions)
    _limit_fields(errors, "custom_fields", fields)
    channels = channels_of(errors, "channels", new.channels, now)
    owner = text(errors, "owner", new.owner, MAX_NAME)
    errors.raise_if_any()
    return PersonProfile(
        given_name=given,
        family_name=family,
        lifecycle_stage=stage or LifecycleStage.LEAD,
        tags=tags,
        custom_fields=fields,
        channels=channels,
        owner=owner,
    )


def _check_mask(
    errors: FieldErrors,
    fields: frozenset[str],
    allowed: frozenset[str],
    remove_custom_fields: Sequence[str],
) -> None:
    choices = ", ".join(sorted(allowed))
    if not fields:
        errors.add("update_mask", f"must name at least one field: {choices}")
    for name in sorted(fields - allowed):
        errors.add("update_mask", f"unknown field {name[:50]!r}; one of: {choices}")
    if remove_custom_fields and "custom_fields" not in fields:
        errors.add("remove_custom_fields", "needs custom_fields in the update_mask")


def _changed_custom_fields(
    errors: FieldErrors,
    current: Mapping[str, CustomField],
    given: Mapping[str, CustomFieldInput],
    removed: Sequence[str],
    definitions: Definitions = NO_DEFINITIONS,
) -> dict[str, CustomField]:
    fields = dict(current)
    for key in removed:
        if key in given:
            errors.add(f"custom_fields.{key[:70]}", "is both set and removed")
        definition = definitions.get(key)
        if definition is not None and definition.required and not definition.retired:
            errors.add(f"custom_fields.{key[:70]}", f"is required ({definition.label})")
        fields.pop(key, None)
    fields.update(custom_fields_of(errors, "custom_fields", given, definitions))
    _limit_fields(errors, "custom_fields", fields)
    return fields


def changed_person_profile(
    current: PersonProfile,
    changes: PersonChanges,
    now: datetime,
    definitions: Definitions = NO_DEFINITIONS,
) -> PersonProfile:
    """The profile after a field-mask update (equal to `current` if nothing changes)."""
    errors = FieldErrors()
    mask = changes.fields
    _check_mask(errors, mask, PERSON_MASK, changes.remove_custom_fields)
    profile = current
    given, family = current.given_name, current.family_name
    if "given_name" in mask:
        given = text(errors, "given_name", changes.given_name, MAX_NAME)
    if "family_name" in mask:
        family = text(errors, "family_name", changes.family_name, MAX_NAME)
    if {"given_name", "family_name"} & mask and not given and not family:
        errors.add("given_name", "a person needs a given or a family name")
    profile = replace(profile, given_name=given, family_name=family)
    if "lifecycle_stage" in mask:
        stage = enum_of(
            errors, "lifecycle_stage", LifecycleStage, changes.lifecycle_stage, required=True
        )
        profile = replace(profile, lifecycle_stage=stage or current.lifecycle_stage)
    if "tags" in mask:
        profile = replace(profile, tags=tags_of(errors, "tags", changes.tags))
    if "custom_fields" in mask:
        fields = _changed_custom_fields(
            errors,
            current.custom_fields,
            changes.custom_fields,
            changes.remove_custom_fields,
            definitions,
        )
        profile = replace(profile, custom_fields=fields)
    if "owner" in mask:
        profile = replace(profile, owner=text(errors, "owner", changes.owner, MAX_NAME))
    if "channels" in mask:
        wanted = channels_of(errors, "channels", changes.channels, now)
        profile = replace(profile, channels=merge_channels(current.channels, wanted))
    errors.raise_if_any()
    return profile


def _company_domain(errors: FieldErrors, value: str) -> str:
    cleaned = value.strip().lower().rstrip(".")
    if cleaned and (len(cleaned) > 253 or not _DOMAIN.match(cleaned)):
        errors.add("domain", f"{value.strip()[:100]!r} is not a domain name (e.g. example.com)")
    return cleaned


def new_company_profile(
    new: NewCompany, definitions: Definitions = NO_DEFINITIONS
) -> CompanyProfile:
    errors = FieldErrors()
    name = text(errors, "name", new.name, MAX_NAME, required=True)
    domain = _company_domain(errors, new.domain)
    industry = text(errors, "industry", new.industry, MAX_NAME)
    stage = enum_of(errors, "lifecycle_stage", LifecycleStage, new.lifecycle_stage, required=False)
    tags = tags_of(errors, "tags", new.tags)
    fields = custom_fields_of(errors, "custom_fields", new.custom_fields, definitions)
    _required_fields(errors, "custom_fields", new.custom_fields, definitions)
    _limit_fields(errors, "custom_fields", fields)
    owner = text(errors, "owner", new.owner, MAX_NAME)
    errors.raise_if_any()
    return CompanyProfile(
        name=name,
        domain=domain,
        industry=industry,
        lifecycle_stage=stage or LifecycleStage.LEAD,
        tags=tags,
        custom_fields=fields,
        owner=owner,
    )


def changed_company_profile(
    current: CompanyProfile, changes: CompanyChanges, definitions: Definitions = NO_DEFINITIONS
) -> CompanyProfile:
    errors = FieldErrors()
    mask = changes.fields
    _check_mask(errors, mask, COMPANY_MASK, changes.remove_custom_fields)
    profile = current
    if "name" in mask:
        profile = replace(profile, name=text(errors, "name", changes.name, MAX_NAME, required=True))
    if "domain" in mask:
        profile = replace(profile, domain=_company_domain(errors, changes.domain))
    if "industry" in mask:
        profile = replace(profile, industry=text(errors, "industry", changes.industry, MAX_NAME))
    if "lifecycle_stage" in mask:
        stage = enum_of(
            errors, "lifecycle_stage", LifecycleStage, changes.lifecycle_stage, required=True
        )
        profile = replace(profile, lifecycle_stage=stage or current.lifecycle_stage)
    if "tags" in mask:
        profile = replace(profile, tags=tags_of(errors, "tags", changes.tags))
    if "custom_fields" in mask:
        fields = _changed_custom_fields(
            errors,
            current.custom_fields,
            changes.custom_fields,
            changes.remove_custom_fields,
            definitions,
        )
        profile = replace(profile, custom_fields=fields)
    if "owner" in mask:
        profile = replace(profile, owner=text(errors, "owner", changes.owner, MAX_NAME))
    errors.raise_if_any()
    return profile


def link_role(role: str) -> str:
    errors = FieldErrors()
    cleaned = text(errors, "role", role, MAX_ROLE)
    errors.raise_if_any()
    return cleaned


def consent_of(given: ConsentInput) -> tuple[Channel, str, ConsentStatus, str]:
    errors = FieldErrors()
    channel = enum_of(errors, "channel", Channel, given.channel, required=True)
    address = address_of(errors, "address", channel, given.address)
    status = enum_of(errors, "status", ConsentStatus, given.status, required=True)
    source = text(errors, "source", given.source, MAX_SOURCE)
    errors.raise_if_any()
    assert channel is not None and status is not None
    return channel, address, status, source


def interaction_of(given: InteractionInput, interaction_id: str, now: datetime) -> Interaction:
    errors = FieldErrors()
    kind = enum_of(errors, "kind", InteractionKind, given.kind, required=True)
    direction = enum_of(errors, "direction", Direction, given.direction, required=False)
    channel = enum_of(errors, "channel", Channel, given.channel, required=False)
    summary = text(errors, "summary", given.summary, MAX_SUMMARY, required=True)
    owner = text(errors, "owner", given.owner, MAX_NAME)
    occurred_at = given.occurred_at or now
    if occurred_at.tzinfo is None:
        errors.add("occurred_at", "must carry a time zone")
    errors.raise_if_any()
    assert kind is not None
    return Interaction(
        interaction_id=interaction_id,
        kind=kind,
        direction=direction,
        channel=channel,
        summary=summary,
        occurred_at=occurred_at.astimezone(UTC),
        owner=owner,
    )


#: The longest reference of a data subject request an erase accepts.
MAX_ERASE_REFERENCE = 200


def erase_reference(reference: str) -> str:
    """The reference of the data subject request an erase fulfils, trimmed: at
    most 200 characters, no control characters (it is stored in clear)."""
    text = reference.strip()
    if len(text) > MAX_ERASE_REFERENCE:
        raise ValidationFailed.of("reference", f"is longer than {MAX_ERASE_REFERENCE} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text):
        raise ValidationFailed.of("reference", "must not contain control characters")
    return text
