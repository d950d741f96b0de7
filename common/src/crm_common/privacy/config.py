"""Building the key client from configuration: for a service's own
application (its environment, see `crm_common.eventstore.application_env`)
or for any process from its `Settings`."""

from __future__ import annotations

from collections.abc import Mapping

from crm_common.privacy.client import DEFAULT_CACHE_SIZE, DEFAULT_CACHE_TTL, KeyClient
from crm_common.privacy.keystore import LOCATION_VAR, KeyStoreLocation
from crm_common.privacy.masterkeys import MASTER_KEYS_FILE_VAR, MASTER_KEYS_VAR, MasterKeyRing
from crm_common.settings import Settings

CACHE_SIZE_VAR = "CRM_KEY_CACHE_SIZE"
CACHE_TTL_VAR = "CRM_KEY_CACHE_TTL_SECONDS"


def privacy_env(settings: Settings) -> dict[str, str]:
    """The entries an application's environment needs for personal data keys
    (every one written, empty when unset, so the settings win over whatever
    the process environment holds)."""
    return {
        MASTER_KEYS_VAR: settings.master_keys,
        MASTER_KEYS_FILE_VAR: settings.master_keys_file,
        LOCATION_VAR: KeyStoreLocation.of(settings).to_env(),
        CACHE_SIZE_VAR: str(settings.key_cache_size),
        CACHE_TTL_VAR: str(settings.key_cache_ttl),
    }


def key_client_from_env(env: Mapping[str, str], accessor: str | None = None) -> KeyClient | None:
    """The owner's key client configured by an application's environment;
    None when no master keys are configured."""
    ring = MasterKeyRing.from_config(env.get(MASTER_KEYS_VAR), env.get(MASTER_KEYS_FILE_VAR))
    if ring is None:
        return None
    location_text = env.get(LOCATION_VAR)
    if not location_text:
        raise RuntimeError(
            "master keys are configured but not where the data keys are: build the "
            "application's environment with crm_common.eventstore.application_env()"
        )
    location = KeyStoreLocation.from_env(location_text)
    return KeyClient(
        location.open(),
        ring,
        accessor or location.owner,
        cache_size=int(env.get(CACHE_SIZE_VAR) or DEFAULT_CACHE_SIZE),
        ttl=float(env.get(CACHE_TTL_VAR) or DEFAULT_CACHE_TTL),
    )


def key_client(settings: Settings, owner: str | None = None) -> KeyClient | None:
    """The key client of this service (`settings.service`) for the keys of
    `owner` (default: its own); None when no master keys are configured.
    Reading another service's keys needs the registry's leave and is audited."""
    ring = MasterKeyRing.from_config(settings.master_keys, settings.master_keys_file)
    if ring is None:
        return None
    location = KeyStoreLocation.of(settings, owner)
    return KeyClient(
        location.open(),
        ring,
        settings.service,
        cache_size=settings.key_cache_size,
        ttl=settings.key_cache_ttl,
    )
