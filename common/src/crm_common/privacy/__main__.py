"""`python -m crm_common.privacy <service> <command>`: operator commands on a
service's personal data keys, with the service's own configuration (the
environment its processes get).

- `rewrap`: wraps every data key under the current master key (the first
  of `CRM_MASTER_KEYS`); no event is touched. Afterwards `status` shows no
  key under the old master key, which can then be removed.
- `status`: live data keys per master key id, and destroyed ones.
- `new-key ID`: prints a fresh `ID:base64key` entry to put in the list.
"""

from __future__ import annotations

import argparse
import sys

from crm_common.eventstore import creating_tables
from crm_common.privacy.config import key_client
from crm_common.privacy.masterkeys import MasterKeyError, new_master_key
from crm_common.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crm_common.privacy")
    parser.add_argument("service", help="the service whose keys to work on (contacts, ...)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("rewrap", help="wrap every data key under the current master key")
    commands.add_parser("status", help="data keys per master key")
    new = commands.add_parser("new-key", help="print a fresh master key entry")
    new.add_argument("id", help="the new key's id, e.g. master-2027-01")
    args = parser.parse_args(argv)

    if args.command == "new-key":
        print(new_master_key(args.id))
        return 0
    settings = Settings.from_env(args.service)
    try:
        with creating_tables(settings):
            client = key_client(settings)
    except MasterKeyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if client is None:
        print(
            "error: no master keys configured (CRM_MASTER_KEYS or CRM_MASTER_KEYS_FILE)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.command == "rewrap":
            moved = client.rewrap()
            print(f"{moved} data keys re-wrapped under master key {client.ring.current.id!r}")
        counts = client.store.count_by_master_key()
        for key_id, count in sorted(counts.items()):
            print(f"{key_id}: {count}")
    except MasterKeyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
