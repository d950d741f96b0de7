"""Privacy: personal data encrypted at rest under a key per person.

- `masterkeys`: the master keys from configuration that wrap the data keys;
- `keystore`: the data keys (one per subject) and the audit of their reads,
  apart from the events;
- `client`: the one way to obtain a key (bounded cache, owner rules, audit);
- `tokens`: single personal values as AES-GCM tokens;
- `declaration`: how an event class declares its personal fields;
- `mapper`: the event store's mapper that seals them;
- `cipher`: optional whole-event encryption.

The design is in docs/security.md ("Privacy").
"""

from crm_common.privacy.client import (
    ERASED,
    DataKey,
    KeyCache,
    KeyClient,
    MissingDataKey,
    SubjectErased,
    may_read_keys_of,
)
from crm_common.privacy.config import key_client, key_client_from_env, privacy_env
from crm_common.privacy.declaration import REDACTED, PersonalData
from crm_common.privacy.keystore import KeyAccess, KeyRow, KeyStore, KeyStoreLocation
from crm_common.privacy.masterkeys import MasterKey, MasterKeyError, MasterKeyRing, new_master_key
from crm_common.privacy.tokens import InvalidToken, PersonalDataCipher

__all__ = [
    "ERASED",
    "REDACTED",
    "DataKey",
    "InvalidToken",
    "KeyAccess",
    "KeyCache",
    "KeyClient",
    "KeyRow",
    "KeyStore",
    "KeyStoreLocation",
    "MasterKey",
    "MasterKeyError",
    "MasterKeyRing",
    "MissingDataKey",
    "PersonalData",
    "PersonalDataCipher",
    "SubjectErased",
    "key_client",
    "key_client_from_env",
    "may_read_keys_of",
    "new_master_key",
    "privacy_env",
]
