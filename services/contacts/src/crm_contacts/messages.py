"""Views and domain values as protobuf messages (the gRPC API and the Kafka events)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from crm.contacts.v1 import contacts_pb2 as pb
from crm.events.v1 import contacts_pb2 as events_pb
from crm_common.enums import enum_number
from crm_contacts.domain import (
    ChannelIdentity,
    CompanyProfile,
    Consent,
    CustomField,
    Interaction,
    PersonProfile,
)
from crm_contacts.views import ContactView, PossibleDuplicate


def timestamp(when: datetime | None) -> Timestamp:
    stamp = Timestamp()
    if when is not None:
        stamp.FromDatetime(when)
    return stamp


def custom_fields_pb(fields: Mapping[str, CustomField]) -> dict[str, pb.CustomFieldValue]:
    return {
        name: pb.CustomFieldValue(type=str(v.type), value=v.value, currency=v.currency)
        for name, v in fields.items()
    }


def consent_pb(consent: Consent | None) -> pb.Consent:
    if consent is None:
        return pb.Consent()
    return pb.Consent(
        status=enum_number(pb.ConsentStatus, consent.status),
        source=consent.source,
        recorded_at=timestamp(consent.recorded_at),
    )


def channel_pb(identity: ChannelIdentity) -> pb.ChannelIdentity:
    return pb.ChannelIdentity(
        channel=enum_number(pb.Channel, identity.channel),
        address=identity.address,
        preferred=identity.preferred,
        consent=consent_pb(identity.consent),
    )


def interaction_pb(interaction: Interaction) -> pb.Interaction:
    return pb.Interaction(
        interaction_id=interaction.interaction_id,
        kind=enum_number(pb.InteractionKind, interaction.kind),
        direction=enum_number(pb.Direction, interaction.direction),
        channel=enum_number(pb.Channel, interaction.channel),
        summary=interaction.summary,
        occurred_at=timestamp(interaction.occurred_at),
        owner=interaction.owner,
    )


def person_profile_pb(profile: PersonProfile) -> events_pb.PersonProfile:
    return events_pb.PersonProfile(
        given_name=profile.given_name,
        family_name=profile.family_name,
        lifecycle_stage=enum_number(pb.LifecycleStage, profile.lifecycle_stage),
        tags=list(profile.tags),
        custom_fields=custom_fields_pb(profile.custom_fields),
        channels=[channel_pb(c) for c in profile.channels],
        owner=profile.owner,
    )


def company_profile_pb(profile: CompanyProfile) -> events_pb.CompanyProfile:
    return events_pb.CompanyProfile(
        name=profile.name,
        domain=profile.domain,
        industry=profile.industry,
        lifecycle_stage=enum_number(pb.LifecycleStage, profile.lifecycle_stage),
        tags=list(profile.tags),
        custom_fields=custom_fields_pb(profile.custom_fields),
        owner=profile.owner,
    )


def contact_pb(view: ContactView) -> pb.Contact:
    contact = pb.Contact(
        id=view.id,
        kind=enum_number(pb.ContactKind, view.kind),
        version=view.version,
        lifecycle_stage=enum_number(pb.LifecycleStage, view.profile.lifecycle_stage),
        tags=list(view.profile.tags),
        custom_fields=custom_fields_pb(view.profile.custom_fields),
        affiliations=[
            pb.Affiliation(company_id=a.company_id, company_name=a.company_name, role=a.role)
            for a in view.affiliations
        ],
        interactions=[interaction_pb(i) for i in view.interactions],
        owner=view.profile.owner,
        created_at=timestamp(view.created_at),
        updated_at=timestamp(view.updated_at),
        redirected_from=view.redirected_from or "",
        interactions_total=view.interactions_total,
        erased=view.erased,
    )
    if isinstance(view.profile, PersonProfile):
        contact.given_name = view.profile.given_name
        contact.family_name = view.profile.family_name
        contact.name = view.display_name
        contact.channels.extend(channel_pb(c) for c in view.profile.channels)
    else:
        contact.name = view.profile.name
        contact.domain = view.profile.domain
        contact.industry = view.profile.industry
    return contact


def possible_duplicate_pb(found: PossibleDuplicate) -> pb.PossibleDuplicate:
    """A create's look-alike: its id, score and the reasons in words."""
    return pb.PossibleDuplicate(
        contact_id=found.contact_id,
        score=found.score,
        reasons=[r.detail for r in found.reasons],
    )
