"""The contacts application layer, shared by the gRPC and REST adapters and
the follower.

Each command is a method of `ContactsService` that names itself and passes
its request (`caller.command("CreatePerson", new)`, the fingerprint a reused
request id is checked against) and goes through the shared command bus
(optimistic concurrency, request-id replay, audit metadata, group commit);
reads load aggregates from the event store.

Partners work under their grant (`AccessPolicy.grant`, docs/security.md): what
a partner creates gets its tag, and it reads or changes only contacts that
carry that tag; any other contact is refused with `PermissionDenied`, and its
searches see only its tagged contacts. The rule is here, not in the adapters,
so both transports (and anything else that runs commands) keep it. Searching uses
`crm_contacts.directory.ContactDirectory`: query tables in the service's own
database that follow the event store's notification log, so a search sees the
writes of every replica of the service, and a restarted process answers from
the tables as they are instead of reading the log again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from crm_common.auth.access import AccessPolicy, PartnerGrant
from crm_common.commands import Caller, CommandBus, CommandContext, CommandReceipt, UnitOfWork
from crm_common.errors import (
    FieldErrors,
    NotFound,
    PermissionDenied,
    RuleViolated,
    Unavailable,
    ValidationFailed,
)
from crm_common.eventstore import SnapshottingApplication, application_env, creating_tables
from crm_common.querystore import QueryDatabase
from crm_common.settings import Settings
from crm_contacts import export, interaction_token, validation
from crm_contacts.already_exists import LikelyDuplicate
from crm_contacts.definitions import FieldDefinitions
from crm_contacts.directory import ContactDirectory
from crm_contacts.domain import (
    PHONE_CHANNELS,
    Channel,
    Company,
    Contact,
    ContactKind,
    Person,
    PersonProfile,
    merging,
)
from crm_contacts.domain.contacts import MergeRecord
from crm_contacts.domain.interactions import InteractionKey, newest_after
from crm_contacts.domain.lifecycle import LifecycleRule
from crm_contacts.duplicate_index import DuplicateIndex, rules_from_environment
from crm_contacts.duplicates import DuplicateRules, facts_for_person
from crm_contacts.inputs import (
    CompanyChanges,
    CompanyLink,
    CompanyUnlink,
    ConsentInput,
    ContactQuery,
    InteractionInput,
    InteractionQuery,
    NewCompany,
    NewPerson,
    PersonChanges,
)
from crm_contacts.unique_values import claim_values, existing_holders, unique_values
from crm_contacts.views import (
    ContactPage,
    ContactView,
    ContactWrite,
    DuplicateReason,
    InteractionPage,
    PersonExport,
    PossibleDuplicate,
    view_of,
)

SERVICE = "contacts"
#: The role of the platform's own services calling for a user.
PLATFORM_ROLE = "platform"

C = TypeVar("C", bound=Contact)
#: Tags that give partners access; only their own may a partner set (docs/security.md).
PARTNER_TAG_PREFIX = "partner:"
#: How long a merge can be undone, unless `CRM_CONTACTS_MERGE_UNDO_DAYS` says otherwise.
DEFAULT_MERGE_UNDO_DAYS = 30
#: Merge ids derived from request ids: a retried merge names the merge it made.
MERGE_NAMESPACE = uuid.UUID("6f1d7f0e-3c2a-5b8e-9d41-2a7c0e5b9f13")
#: A page of ListInteractions: the size unless asked otherwise, and the largest.
DEFAULT_INTERACTION_PAGE = 50
MAX_INTERACTION_PAGE = 200
#: Why an erase is refused without master keys: it could not shred anything.
ENCRYPTION_NOT_CONFIGURED = "personal data encryption is not configured (CRM_MASTER_KEYS)"
#: What a create does about look-alikes: `off`, `warn` (answers with them) or
#: `refuse` (ALREADY_EXISTS unless the request allows a duplicate).
DUPLICATES_ON_CREATE_VARIABLE = "CRM_CONTACTS_DUPLICATES_ON_CREATE"
DUPLICATES_ON_CREATE_MODES = ("off", "warn", "refuse")


class RemoteExports(Protocol):
    """The other services' parts of a person's export, by service
    (`crm_contacts.personal_data_client.PersonalDataClients`)."""

    async def export(self, contact_id: str) -> dict[str, dict[str, Any]]: ...


def merge_undo_window_from_env() -> timedelta:
    """The undo window `CRM_CONTACTS_MERGE_UNDO_DAYS` sets (whole days, at least 1)."""
    raw = os.environ.get("CRM_CONTACTS_MERGE_UNDO_DAYS", "").strip()
    if not raw:
        return timedelta(days=DEFAULT_MERGE_UNDO_DAYS)
    try:
        days = int(raw)
    except ValueError:
        raise ValueError(
            f"CRM_CONTACTS_MERGE_UNDO_DAYS must be a whole number, not {raw!r}"
        ) from None
    if days < 1:
        raise ValueError(f"CRM_CONTACTS_MERGE_UNDO_DAYS must be at least 1, not {days}")
    return timedelta(days=days)


def duplicates_on_create_from_env(rules: DuplicateRules) -> str:
    """`CRM_CONTACTS_DUPLICATES_ON_CREATE` (off, warn, refuse); unset, the rules'
    own `on_create` (warn unless the rules say otherwise)."""
    raw = os.environ.get(DUPLICATES_ON_CREATE_VARIABLE, "").strip().lower()
    if not raw:
        return rules.on_create
    if raw not in DUPLICATES_ON_CREATE_MODES:
        raise ValueError(
            f"{DUPLICATES_ON_CREATE_VARIABLE} must be one of "
            f"{', '.join(DUPLICATES_ON_CREATE_MODES)}, not {raw!r}"
        )
    return raw


class ContactsApplication(SnapshottingApplication):
    """The event store of persons and companies."""

    name = "contacts"
    #: A person's or company's every interaction is one of its events.
    snapshot_kinds = (Person, Company)
    #: Where the store is: the directory's query tables live in the same database.
    settings: Settings | None = None


def create_application(settings: Settings) -> ContactsApplication:
    """The application on the configured event store (SQLite or PostgreSQL)."""
    with creating_tables(settings):
        app = ContactsApplication(env=application_env(settings))
    app.settings = settings
    return app


def open_directory(app: ContactsApplication) -> ContactDirectory:
    """The directory's query tables in the application's own database, created
    if missing (the query side serialises that among replicas starting together)."""
    if app.settings is None:
        raise ValueError("the application was not made by create_application: no settings")
    database = QueryDatabase(app.settings)
    try:
        return ContactDirectory(app, database)
    except BaseException:
        database.close()
        raise


# -- the service ---------------------------------------------------------------------------


class ContactsService:
    """Use cases of the contacts service; both adapters call these."""

    def __init__(
        self,
        app: ContactsApplication,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        policy: AccessPolicy | None = None,
        directory: ContactDirectory | None = None,
        merge_undo_window: timedelta = timedelta(days=DEFAULT_MERGE_UNDO_DAYS),
        remote_exports: RemoteExports | None = None,
        duplicate_rules: DuplicateRules | None = None,
        duplicates_on_create: str | None = None,
    ) -> None:
        self.app = app
        #: The duplicate rules (`CRM_CONTACTS_DUPLICATE_RULES`), read once: malformed
        #: rules stop the process at start rather than a request.
        self.duplicate_rules = duplicate_rules or rules_from_environment()
        #: What a create of a person does about look-alikes (off, warn, refuse).
        self.duplicates_on_create = duplicates_on_create or duplicates_on_create_from_env(
            self.duplicate_rules
        )
        if self.duplicates_on_create not in DUPLICATES_ON_CREATE_MODES:
            raise ValueError(f"duplicates on create: not one of {DUPLICATES_ON_CREATE_MODES}")
        self._duplicate_index: DuplicateIndex | None = None
        #: Checks on create under way (in worker threads): `close` waits for them
        #: before it closes the index under their feet.
        self._checks = 0
        self._checks_done = threading.Condition()
        self._closing = False
        #: The other services' parts of an export (None: an export is refused).
        self.remote_exports = remote_exports
        #: How long after a merge `undo_merge` may reverse it.
        self.merge_undo_window = merge_undo_window
        self.bus = CommandBus(app, SERVICE)
        self._directory = directory
        self._directory_lock = threading.Lock()
        self.clock = clock
        #: The custom-field definitions values are checked against.
        self.fields = FieldDefinitions(app, self.bus, clock)
        self.fields.holders = lambda kind, key: existing_holders(self.directory, kind, key)
        #: Whose grants partners work under (the API's gate's policy; by default
        #: the policy shipped with crm_common).
        self.policy = policy or AccessPolicy.load()

    @property
    def directory(self) -> ContactDirectory:
        """The search's query tables, opened on first use: a process that never
        searches (the follower) never touches them."""
        with self._directory_lock:
            if self._directory is None:
                self._directory = open_directory(self.app)
            return self._directory

    @property
    def duplicate_index(self) -> DuplicateIndex:
        """The duplicate index's query tables, opened on first use (the check on
        create, the duplicate routes)."""
        with self._directory_lock:
            if self._duplicate_index is None:
                self._duplicate_index = DuplicateIndex.open(self.app, rules=self.duplicate_rules)
            return self._duplicate_index

    def close(self) -> None:
        """Stops the command bus (after pending commands), the directory and the store."""
        with self._checks_done:
            self._closing = True
            self._checks_done.wait_for(lambda: self._checks == 0, timeout=30)
        self.bus.close()
        with self._directory_lock:
            if self._directory is not None:
                self._directory.close()
            if self._duplicate_index is not None:
                self._duplicate_index.close()
                self._duplicate_index = None
        self.app.close()

    # -- partners ------------------------------------------------------------------------

    def grant_of(self, caller: Caller | None) -> PartnerGrant | None:
        """The grant the caller works under: None for everyone but a partner (and for
        the platform's own commands); `PermissionDenied` for a partner without one."""
        if caller is None or caller.principal is None:
            return None
        return self.policy.grant(caller.principal)

    def _is_partner_tag(self, tag: str) -> bool:
        """Whether a (canonical) tag grants partners access: a grant's tag, or any tag
        in the `partner:` namespace (a grant added later must not find contacts a
        partner tagged for it in advance)."""
        grants = {_canonical_tag(g.tag) for g in self.policy.partners.values()}
        return tag in grants or tag.startswith(PARTNER_TAG_PREFIX)

    def _tags_for(
        self, grant: PartnerGrant | None, requested: Sequence[str], kept: Sequence[str] = ()
    ) -> list[str]:
        """The tags a partner's create or tag change stores: what it asked for, its own
        tag, and the other partners' tags the contact has (it may not remove them, nor
        tag a contact for another partner)."""
        if grant is None:
            return list(requested)
        own = _canonical_tag(grant.tag)
        foreign = [
            t for t in map(_canonical_tag, requested) if t != own and self._is_partner_tag(t)
        ]
        if foreign:
            raise PermissionDenied(
                f"partner {grant.client!r} may not tag contacts for other partners"
            )
        others = [t for t in kept if _canonical_tag(t) != own and self._is_partner_tag(t)]
        return [*requested, own, *others]

    @staticmethod
    def _check_grant(grant: PartnerGrant | None, contact: Contact) -> None:
        if grant is not None and _canonical_tag(grant.tag) not in _tags_of(contact):
            raise PermissionDenied(
                f"contact {contact.id} is not within the grant of partner {grant.client!r}"
            )

    def _subject(self, uow: UnitOfWork, grant: PartnerGrant | None, ident: str, kind: type[C]) -> C:
        """The command's subject, refused to a partner outside its grant before anything
        else about it (its version included) is said."""
        if grant is not None:
            self._check_grant(grant, uow.get(ident, kind, subject=False))
        subject = uow.get(ident, kind)
        _refuse_tombstone(subject)
        return subject

    async def _write(
        self, caller: Caller, ctx: CommandContext, decide: Callable[[UnitOfWork], Any]
    ) -> ContactWrite:
        outcome = await self.bus.execute_async(ctx, decide)
        if isinstance(outcome.subject, Contact):
            view = self.fields.hide_retired(view_of(outcome.subject))
        else:  # a replay: show the contact as it is now (if the caller still may)
            view = await self.get_contact(outcome.id, caller)
        return ContactWrite(outcome, view)

    async def create_person(
        self,
        caller: Caller,
        new: NewPerson,
        *,
        allow_duplicate: bool = False,
        check_duplicates: bool = True,
    ) -> ContactWrite:
        """Registers a person. Unless `duplicates_on_create` is off, the existing
        persons that look like the new one (the duplicate rules, over the duplicate
        index; a partner's only among its own) come back in `possible_duplicates`;
        with `refuse`, a look-alike scoring the rules' `refuse_threshold` or more
        refuses the create (`LikelyDuplicate`, nothing written) unless
        `allow_duplicate`. The check reads the index before the command: it is a
        warning to people, not a guarantee against two creates racing (a unique
        custom field is that). `check_duplicates=False` skips it (a caller that
        matched the person against existing contacts itself, and shows no one
        the warning)."""
        grant = self.grant_of(caller)
        tagged = dataclasses.replace(new, tags=self._tags_for(grant, new.tags))
        definitions = self.fields.current(ContactKind.PERSON)
        profile = validation.new_person_profile(tagged, self.clock(), definitions)
        found: list[PossibleDuplicate] = []
        if check_duplicates and self.duplicates_on_create != "off":
            found = await asyncio.to_thread(self._look_alikes, profile, grant)
            refusing = [c for c in found if c.score >= self.duplicate_rules.refuse_threshold]
            if (
                self.duplicates_on_create == "refuse"
                and refusing
                and not allow_duplicate
                and not await asyncio.to_thread(self._answered_before, caller)
            ):
                raise LikelyDuplicate(refusing)

        def decide(uow: UnitOfWork) -> Person:
            person = uow.add(Person.register(profile))
            claim_values(uow, person, {}, definitions)
            return person

        written = await self._write(caller, caller.command("CreatePerson", new), decide)
        shown = tuple(c for c in found if c.contact_id != written.outcome.id)
        return dataclasses.replace(written, possible_duplicates=shown)

    def _look_alikes(
        self, profile: PersonProfile, grant: PartnerGrant | None
    ) -> list[PossibleDuplicate]:
        """The live persons that look like a new person with `profile`, best first;
        for a partner, only those within its grant (the others are not named)."""
        emails = sorted({c.address for c in profile.channels if c.channel is Channel.EMAIL})
        phones = sorted({c.address for c in profile.channels if c.channel in PHONE_CHANNELS})
        name = " ".join(f"{profile.given_name} {profile.family_name}".split())
        facts = facts_for_person("", name, emails, phones)
        with self._checks_done:
            if self._closing:
                raise Unavailable("the contacts service is stopping")
            self._checks += 1
        try:
            candidates = self.duplicate_index.check(facts)
        finally:
            with self._checks_done:
                self._checks -= 1
                self._checks_done.notify_all()
        found: list[PossibleDuplicate] = []
        for candidate in candidates:
            if grant is not None and not self._within_grant(grant, candidate.match.other):
                continue
            found.append(
                PossibleDuplicate(
                    candidate.match.other,
                    candidate.match.score,
                    tuple(
                        DuplicateReason(r.rule, r.score, r.detail) for r in candidate.match.reasons
                    ),
                )
            )
        return found

    def _within_grant(self, grant: PartnerGrant, contact_id: str) -> bool:
        try:
            contact: Any = self.app.repository.get(UUID(contact_id))
        except (ValueError, AggregateNotFoundError):
            return False
        return isinstance(contact, Contact) and _canonical_tag(grant.tag) in _tags_of(contact)

    def _answered_before(self, caller: Caller) -> bool:
        """Whether the caller's request id has an answer already (a retry of a create
        that went through is replayed, not refused as a duplicate of itself)."""
        if not caller.request_id:
            return False
        ident = CommandReceipt.create_id(SERVICE, caller.request_id, caller.scope)
        try:
            self.app.repository.get(ident)
        except AggregateNotFoundError:
            return False
        return True

    async def update_person(self, caller: Caller, changes: PersonChanges) -> ContactWrite:
        grant = self.grant_of(caller)
        now = self.clock()

        def decide(uow: UnitOfWork) -> Person:
            person = self._subject(uow, grant, changes.id, Person)
            wanted = changes
            if grant is not None and "tags" in changes.fields:
                tags = self._tags_for(grant, changes.tags, person.profile.tags)
                wanted = dataclasses.replace(changes, tags=tags)
            definitions = self.fields.current(ContactKind.PERSON)
            before = unique_values(person, definitions)
            person.change_profile(
                validation.changed_person_profile(person.profile, wanted, now, definitions)
            )
            claim_values(uow, person, before, definitions)
            return person

        return await self._write(
            caller, caller.command("UpdatePerson", changes.id, changes), decide
        )

    async def create_company(self, caller: Caller, new: NewCompany) -> ContactWrite:
        grant = self.grant_of(caller)
        tagged = dataclasses.replace(new, tags=self._tags_for(grant, new.tags))
        definitions = self.fields.current(ContactKind.COMPANY)
        profile = validation.new_company_profile(tagged, definitions)

        def decide(uow: UnitOfWork) -> Company:
            company = uow.add(Company.register(profile))
            claim_values(uow, company, {}, definitions)
            return company

        return await self._write(caller, caller.command("CreateCompany", new), decide)

    async def update_company(self, caller: Caller, changes: CompanyChanges) -> ContactWrite:
        grant = self.grant_of(caller)

        def decide(uow: UnitOfWork) -> Company:
            company = self._subject(uow, grant, changes.id, Company)
            wanted = changes
            if grant is not None and "tags" in changes.fields:
                tags = self._tags_for(grant, changes.tags, company.profile.tags)
                wanted = dataclasses.replace(changes, tags=tags)
            definitions = self.fields.current(ContactKind.COMPANY)
            before = unique_values(company, definitions)
            company.change_profile(
                validation.changed_company_profile(company.profile, wanted, definitions)
            )
            claim_values(uow, company, before, definitions)
            return company

        return await self._write(
            caller, caller.command("UpdateCompany", changes.id, changes), decide
        )

    async def link_person_to_company(self, caller: Caller, link: CompanyLink) -> ContactWrite:
        grant = self.grant_of(caller)
        role = validation.link_role(link.role)

        def decide(uow: UnitOfWork) -> Person:
            person = self._subject(uow, grant, link.person_id, Person)
            company: Company = uow.get(link.company_id, Company, subject=False)
            # The person would show the company's name: a partner links only its own.
            self._check_grant(grant, company)
            _refuse_tombstone(company)
            person.link_to_company(company, role)
            return person

        return await self._write(
            caller, caller.command("LinkPersonToCompany", link.person_id, link), decide
        )

    async def unlink_person_from_company(
        self, caller: Caller, unlink: CompanyUnlink
    ) -> ContactWrite:
        grant = self.grant_of(caller)

        def decide(uow: UnitOfWork) -> Person:
            person = self._subject(uow, grant, unlink.person_id, Person)
            person.unlink_from_company(unlink.company_id)
            return person

        return await self._write(
            caller, caller.command("UnlinkPersonFromCompany", unlink.person_id, unlink), decide
        )

    async def record_consent(self, caller: Caller, consent: ConsentInput) -> ContactWrite:
        grant = self.grant_of(caller)
        channel, address, status, source = validation.consent_of(consent)
        now = self.clock()

        def decide(uow: UnitOfWork) -> Contact:
            contact = self._subject(uow, grant, consent.contact_id, Contact)
            contact.record_consent(channel, address, status, source, now)
            return contact

        return await self._write(
            caller, caller.command("RecordConsent", consent.contact_id, consent), decide
        )

    async def log_interaction(self, caller: Caller, interaction: InteractionInput) -> ContactWrite:
        """Logs an interaction; its id is in `outcome.extra["interaction_id"]`."""
        grant = self.grant_of(caller)
        logged = validation.interaction_of(interaction, str(uuid.uuid4()), self.clock())

        def decide(uow: UnitOfWork) -> tuple[Contact, dict[str, str]]:
            contact = self._subject(uow, grant, interaction.contact_id, Contact)
            contact.log_interaction(logged)
            return contact, {"interaction_id": logged.interaction_id}

        return await self._write(
            caller, caller.command("LogInteraction", interaction.contact_id, interaction), decide
        )

    async def become_customer(
        self, caller: Caller, contact_id: str, cause: str = ""
    ) -> ContactWrite:
        """A deal of the contact was won: makes it a customer unless it is one already.

        Never refused by the lifecycle rule: a customer or advocate is left as
        it is (no event). `outcome.extra["promoted"]` says whether the stage
        changed ("true") or not ("false"), for replays too.
        """
        return await self.follow_lifecycle_rule(
            caller, contact_id, LifecycleRule.DEAL_WON, cause, command="BecomeCustomer"
        )

    async def follow_lifecycle_rule(
        self,
        caller: Caller,
        contact_id: str,
        rule: LifecycleRule,
        cause: str = "",
        *,
        command: str = "FollowLifecycleRule",
    ) -> ContactWrite:
        """Moves the contact's stage as `rule` says (`domain.lifecycle`), recording
        `cause` on the change; a contact the rule does not apply to is left as
        it is. `outcome.extra["promoted"]` says whether the stage changed."""
        grant = self.grant_of(caller)

        def decide(uow: UnitOfWork) -> tuple[Contact, dict[str, str]]:
            contact = self._subject(uow, grant, contact_id, Contact)
            promoted = contact.follow_rule(rule, cause)
            return contact, {"promoted": "true" if promoted else "false"}

        # BecomeCustomer keeps the fingerprint it always had (receipts stored
        # before lifecycle rules existed still answer their replays).
        args = (contact_id,) if rule is LifecycleRule.DEAL_WON else (contact_id, str(rule))
        return await self._write(caller, caller.command(command, *args), decide)

    # -- merging (the rules are in `domain.merging`) ---------------------------------------

    async def merge_contacts(
        self,
        caller: Caller,
        survivor_id: str,
        merged_ids: Sequence[str],
        choices: Mapping[str, str],
    ) -> ContactWrite:
        """Folds `merged_ids` into `survivor_id`: one command over all of them (saved
        together, the survivor version-checked). The merge id is in
        `outcome.extra["merge_id"]`; derived from the request id when there is one,
        so a retried request names the merge the first one made."""
        grant = self.grant_of(caller)
        wanted = _merge_input(survivor_id, merged_ids, choices)
        merge_id = (
            str(uuid.uuid5(MERGE_NAMESPACE, f"{caller.scope}:{caller.request_id}"))
            if caller.request_id
            else str(uuid.uuid4())
        )
        now = self.clock()

        def decide(uow: UnitOfWork) -> tuple[Contact, dict[str, str]]:
            # The others first: the survivor's events come last, so the outcome's
            # position (the survivor's) is the merge's last event.
            others = [self._merged_contact(uow, grant, ident, i) for i, ident in enumerate(wanted)]
            survivor = self._subject(uow, grant, survivor_id, Contact)
            errors = FieldErrors()
            for i, other in enumerate(others):
                if other.KIND is not survivor.KIND:
                    errors.add(
                        f"merged_ids[{i}]",
                        f"is a {other.KIND}, the survivor a {survivor.KIND}: "
                        "only contacts of one kind merge",
                    )
            errors.raise_if_any()
            definitions = self.fields.current(survivor.KIND)
            before = unique_values(survivor, definitions)
            merging.merge(merge_id, survivor, others, choices, now, actor=caller.actor)
            # The tombstones hold nothing now; what the survivor took over is its own.
            claim_values(uow, survivor, before, definitions)
            return survivor, {"merge_id": merge_id}

        return await self._write(
            caller,
            caller.command(
                "MergeContacts", survivor_id, list(wanted), dict(sorted(choices.items()))
            ),
            decide,
        )

    def _merged_contact(
        self, uow: UnitOfWork, grant: PartnerGrant | None, ident: str, index: int
    ) -> Contact:
        """One of the contacts a merge absorbs: an unknown id is bad input (the field
        names it), a tombstone is refused naming its survivor."""
        try:
            contact = uow.get(ident, Contact, subject=False)
        except NotFound:
            errors = FieldErrors()
            errors.add(f"merged_ids[{index}]", f"no contact has the id {ident!r}")
            errors.raise_if_any()
            raise
        self._check_grant(grant, contact)
        _refuse_tombstone(contact)
        return contact

    async def undo_merge(self, caller: Caller, survivor_id: str, merge_id: str) -> ContactWrite:
        """Reverses the survivor's merge `merge_id` within the undo window: the
        absorbed contacts come back as they were, the survivor keeps what happened
        to it since (one command over all of them)."""
        grant = self.grant_of(caller)
        errors = FieldErrors()
        if not merge_id.strip():
            errors.add("merge_id", "is required")
        errors.raise_if_any()
        now = self.clock()

        def decide(uow: UnitOfWork) -> tuple[Contact, dict[str, str]]:
            record = self._merge_record(grant, survivor_id, merge_id)
            # The others first: the survivor's events come last (see merge_contacts).
            others = [uow.get(i, Contact, subject=False) for i in record.merged_ids]
            for other in others:
                self._check_grant(grant, other)
            survivor = self._subject(uow, grant, survivor_id, Contact)
            definitions = self.fields.current(survivor.KIND)
            before = unique_values(survivor, definitions)
            merging.undo_merge(
                merge_id, survivor, others, now, self.merge_undo_window, actor=caller.actor
            )
            # The contacts given back claim their values again (refused when
            # another contact took one meanwhile); the survivor what it keeps.
            claim_values(uow, survivor, before, definitions)
            for other in others:
                claim_values(uow, other, {}, definitions)
            return survivor, {"merge_id": merge_id}

        return await self._write(caller, caller.command("UndoMerge", survivor_id, merge_id), decide)

    def _merge_record(
        self, grant: PartnerGrant | None, survivor_id: str, merge_id: str
    ) -> MergeRecord:
        """The survivor's record of `merge_id` as stored (what a merge took never
        changes afterwards), read before the command touches any contact."""
        try:
            survivor: Any = self.app.repository.get(UUID(survivor_id))
        except (ValueError, AggregateNotFoundError):
            raise NotFound("Contact", survivor_id) from None
        if not isinstance(survivor, Contact):
            raise NotFound("Contact", survivor_id)
        self._check_grant(grant, survivor)
        record = survivor.merges.get(merge_id)
        if record is None:
            raise NotFound("Merge", merge_id)
        return record

    # -- privacy: erase and export (docs/security.md, docs/privacy-export.md) -------------

    async def erase_person(self, caller: Caller, person_id: str, reference: str) -> ContactWrite:
        """Erases a person: records `PersonErased` (with the contacts merged into
        them), then destroys the data keys of the person and of those contacts, so
        every personal value of theirs, wherever it was sealed, reads "[erased]".

        Refused, with nothing written: bad `reference`, no master keys (nothing
        could be shredded), an unknown id, a company, a contact merged into
        another (its survivor is the one to erase). An erased person is answered
        again without a new event (`outcome.extra["already_erased"] == "true"`),
        its keys destroyed again (a no-op, or the end of an erase that stopped
        between its event and the destroy).
        """
        wanted = validation.erase_reference(reference)
        keys = self.app.personal_data_keys
        if keys is None:
            raise RuleViolated(ENCRYPTION_NOT_CONFIGURED)

        def decide(uow: UnitOfWork) -> tuple[Contact, dict[str, str]]:
            contact = uow.get(person_id, Contact)
            if not isinstance(contact, Person):
                raise ValidationFailed.of(
                    "id", f"contact {contact.id} is a {contact.KIND}: only a person can be erased"
                )
            if contact.merged_into is not None:
                raise RuleViolated(
                    f"contact {contact.id} was merged into {contact.merged_into}; erase "
                    f"{contact.merged_into} instead (that erases the contacts merged into it)"
                )
            if contact.erased:
                return contact, {"already_erased": "true"}
            contact.erase(wanted, self._absorbed_ids(contact))
            return contact, {"already_erased": "false"}

        written = await self._write(
            caller, caller.command("ErasePerson", person_id, wanted), decide
        )
        await asyncio.to_thread(self._shred, written.outcome.id)
        return written

    def _absorbed_ids(self, contact: Contact) -> list[str]:
        """The contacts merged into `contact` and not given back, and those merged
        into them in turn (a survivor merged later), oldest merge first."""
        found: list[str] = []
        pending = [contact]
        while pending:
            current = pending.pop(0)
            for record in current.merges.values():
                if record.undone:
                    continue
                for ident in record.merged_ids:
                    if ident in found or ident == str(contact.id):
                        continue
                    found.append(ident)
                    try:
                        pending.append(self.app.repository.get(UUID(ident)))
                    except (ValueError, AggregateNotFoundError):  # pragma: no cover
                        continue
        return found

    def _shred(self, person_id: str) -> list[str]:
        """Destroys the data keys of an erased person and of the contacts erased
        with them; returns the subjects."""
        keys = self.app.personal_data_keys
        if keys is None:  # pragma: no cover - refused before the event
            raise RuleViolated(ENCRYPTION_NOT_CONFIGURED)
        person: Any = self.app.repository.get(UUID(person_id))
        subjects = [str(person.id), *getattr(person, "erased_merged_ids", ())]
        for subject in subjects:
            keys.destroy(subject)
        return subjects

    async def export_person(self, caller: Caller, contact_id: str) -> PersonExport:
        """Everything the platform holds about a person as one document: contacts'
        own part and every other service's (`remote_exports`); a service that does
        not answer fails the export (`Unavailable` naming it). A merged id exports
        its survivor and says so (`redirected_from`). Recorded on the person as
        `PersonalDataExported` (audited like every command)."""
        person, redirected_from = await asyncio.to_thread(self._person_to_export, contact_id)
        own = await asyncio.to_thread(self._contacts_part, person, redirected_from)
        if self.remote_exports is None:
            raise Unavailable("the export cannot reach the other services: none is configured")
        others = await self.remote_exports.export(str(person.id))
        services = ["contacts", *others]

        def decide(uow: UnitOfWork) -> Person:
            subject = uow.get(person.id, Person)
            subject.record_export(services)
            return subject

        await self.bus.execute_async(caller.command("ExportPerson", str(person.id)), decide)
        document = {
            "person": str(person.id),
            "redirected_from": redirected_from,
            "exported_at": self.clock().isoformat(),
            "services": {"contacts": own, **others},
        }
        return PersonExport(str(person.id), document, services, redirected_from)

    def personal_data(self, contact_id: str) -> dict[str, Any]:
        """Contacts' own part of an export (`ExportPersonalData`, in a worker thread):
        a merged id answers for its survivor."""
        person, redirected_from = self._person_to_export(contact_id)
        return self._contacts_part(person, redirected_from)

    def _person_to_export(self, contact_id: str) -> tuple[Person, str | None]:
        contact, redirected_from = self._readable(contact_id, None)
        if not isinstance(contact, Person):
            raise ValidationFailed.of(
                "id", f"contact {contact.id} is a {contact.KIND}: only a person is exported"
            )
        return contact, redirected_from

    def _contacts_part(self, person: Person, redirected_from: str | None) -> dict[str, Any]:
        view = self.fields.hide_retired(view_of(person, interactions=len(person.interactions)))
        view = dataclasses.replace(view, redirected_from=redirected_from)
        merged: list[Contact] = []
        for ident in self._absorbed_ids(person):
            try:
                merged.append(self.app.repository.get(UUID(ident)))
            except (ValueError, AggregateNotFoundError):  # pragma: no cover
                continue
        part = export.contacts_part(
            self.app, person, view, self.fields.current(ContactKind.PERSON), merged
        )
        part["contact"]["redirected_from"] = redirected_from
        return part

    async def get_contact(self, contact_id: str, caller: Caller | None = None) -> ContactView:
        """One contact as `caller` may see it (None: the platform itself, in process)."""
        grant = self.grant_of(caller)
        return await asyncio.to_thread(self.load, contact_id, grant)

    def load(self, contact_id: str, grant: PartnerGrant | None = None) -> ContactView:
        contact, redirected_from = self._readable(contact_id, grant)
        view = view_of(contact)
        if redirected_from is not None:
            view = dataclasses.replace(view, redirected_from=redirected_from)
        return self.fields.hide_retired(view)

    def _readable(self, contact_id: str, grant: PartnerGrant | None) -> tuple[Contact, str | None]:
        """The contact a read of `contact_id` answers with, and the id asked for when
        that was merged into it (None otherwise); a partner only within its grant."""
        try:
            ident = UUID(contact_id)
        except (ValueError, AttributeError, TypeError):
            raise NotFound("Contact", contact_id) from None
        try:
            contact: Any = self.app.repository.get(ident)
        except AggregateNotFoundError:
            raise NotFound("Contact", contact_id) from None
        if not isinstance(contact, Contact):
            raise NotFound("Contact", contact_id)
        self._check_grant(grant, contact)
        if contact.merged_into is None:
            return contact, None
        # A tombstone answers with its survivor, and says so.
        survivor = self._survivor_of(contact)
        self._check_grant(grant, survivor)
        return survivor, str(contact.id)

    async def list_interactions(
        self, query: InteractionQuery, caller: Caller | None = None
    ) -> InteractionPage:
        """A page of all of a contact's interactions, newest first, as `caller` may
        see it (a partner: within its grant, as `get_contact`). Bad input is refused
        before the contact is read.

        Roles that may not see a contact's `interactions` (the policy's fields) are
        refused: an empty page would say the contact has none.
        """
        principal = caller.principal if caller is not None else None
        if principal is not None and "interactions" in self.policy.hidden_fields(
            principal, SERVICE
        ):
            raise PermissionDenied("the caller's roles may not see a contact's interactions")
        size = query.page_size or DEFAULT_INTERACTION_PAGE
        errors = FieldErrors()
        if not 1 <= size <= MAX_INTERACTION_PAGE:
            errors.add("page_size", f"must be between 1 and {MAX_INTERACTION_PAGE}")
        after = interaction_token.decode(query.page_token, errors) if query.page_token else None
        errors.raise_if_any()
        grant = self.grant_of(caller)
        return await asyncio.to_thread(self._interactions, query.contact_id, grant, after, size)

    def _interactions(
        self,
        contact_id: str,
        grant: PartnerGrant | None,
        after: InteractionKey | None,
        size: int,
    ) -> InteractionPage:
        contact, redirected_from = self._readable(contact_id, grant)
        # One more than the page: whether another page follows.
        keyed = newest_after(contact.interactions, after, size + 1)
        shown = keyed[:size]
        more = len(keyed) > size
        return InteractionPage(
            contact_id=str(contact.id),
            interactions=[i for _, i in shown],
            next_page_token=interaction_token.encode(shown[-1][0]) if more else "",
            total_size=len(contact.interactions),
            redirected_from=redirected_from,
        )

    def _survivor_of(self, tombstone: Contact) -> Contact:
        """The contact a tombstone's merges lead to (a survivor merged later leads on)."""
        contact = tombstone
        seen = {contact.id}
        while contact.merged_into is not None:
            contact = self.app.repository.get(UUID(contact.merged_into))
            if contact.id in seen:  # pragma: no cover - merges never make a cycle
                break
            seen.add(contact.id)
        return contact

    async def list_contacts(self, query: ContactQuery, caller: Caller | None = None) -> ContactPage:
        """A page of the search as `caller` may see it: a partner, its tagged contacts only.

        A caller who sees names and addresses only as pseudonyms may not search by
        them either: a search by email would confirm who is behind a pseudonym.
        The platform's own services look a contact up by its exact email or phone
        (a lead converting into a contact that exists); they do not browse.
        """
        if (
            caller is not None
            and caller.principal is not None
            and PLATFORM_ROLE in caller.principal.roles
            and not (query.email or query.phone)
        ):
            raise PermissionDenied(
                "the platform's services look contacts up by email or phone; they do not browse"
            )
        if (
            caller is not None
            and caller.principal is not None
            and (query.query or query.email or query.phone)
        ):
            masked = self.policy.pseudonymised_fields(caller.principal, "contacts", "ListContacts")
            if masked:
                raise PermissionDenied(
                    "searching by name, email or phone is not open to roles that see "
                    "personal data only as pseudonyms; filter by tag or kind"
                )
        grant = self.grant_of(caller)
        within = _canonical_tag(grant.tag) if grant is not None else None
        return await asyncio.to_thread(self._search, query, within)

    def _search(self, query: ContactQuery, within_tag: str | None) -> ContactPage:
        # In the worker thread: the first search opens the directory's tables.
        page = self.directory.search(query, within_tag=within_tag)
        shown = [self.fields.hide_retired(v) for v in page.contacts]
        return dataclasses.replace(page, contacts=shown)


def _refuse_tombstone(contact: Contact) -> None:
    """A merged contact takes no commands: they belong to its survivor."""
    if contact.merged_into is not None:
        raise RuleViolated(
            f"contact {contact.id} was merged into {contact.merged_into}; "
            f"send the command to {contact.merged_into}"
        )


def _merge_input(
    survivor_id: str, merged_ids: Sequence[str], choices: Mapping[str, str]
) -> list[str]:
    """The merged ids, checked before anything is loaded: named, distinct, not the
    survivor, at most `merging.MAX_MERGED` contacts in all."""
    errors = FieldErrors()
    ids = [i.strip() for i in merged_ids]
    if not ids:
        errors.add("merged_ids", "name at least one contact to merge into the survivor")
    if len(ids) + 1 > merging.MAX_MERGED:
        errors.add("merged_ids", f"at most {merging.MAX_MERGED} contacts merge at once")
    for i, ident in enumerate(ids):
        if not ident:
            errors.add(f"merged_ids[{i}]", "is empty")
        elif ident == survivor_id:
            errors.add(f"merged_ids[{i}]", "is the survivor: a contact does not merge into itself")
        elif ident in ids[:i]:
            errors.add(f"merged_ids[{i}]", "names a contact twice")
    for field, source in choices.items():
        if source != survivor_id and source not in ids:
            errors.add(f"choices.{field}", f"{source} is not one of the merged contacts")
    errors.raise_if_any()
    return ids


def _canonical_tag(tag: str) -> str:
    """A tag as contacts store it (validation.tags_of): lower case, single spaces."""
    return " ".join(tag.split()).lower()


def _tags_of(contact: Contact) -> tuple[str, ...]:
    profile = getattr(contact, "profile", None)
    return tuple(getattr(profile, "tags", ()))
