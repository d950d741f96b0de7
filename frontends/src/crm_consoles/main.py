"""`crm-consoles serve <console>`: one department console as its own process."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from crm_consoles.app import create_app
from crm_consoles.config import CONSOLE_PORTS, ConfigError, ConsoleSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crm-consoles", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve one console until SIGTERM/SIGINT")
    serve.add_argument("console", choices=sorted(CONSOLE_PORTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # One line per forwarded call would name customers' ids in the log; failures still show.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = ConsoleSettings.from_env(args.console)
    except (ConfigError, OSError) as error:
        print(f"crm-consoles: {error}", file=sys.stderr)
        return 2
    app = create_app(settings)
    logging.getLogger("crm_consoles").info(
        "%s console on http://%s:%d (%s sign-in)",
        settings.console,
        settings.bind_host,
        settings.port,
        "development" if settings.dev_identity_dir else "OpenID Connect",
    )
    uvicorn.run(
        app,
        host=settings.bind_host,
        port=settings.port,
        log_level="warning",
        proxy_headers=True,
        server_header=False,
        # Live streams stay open until the browser leaves: do not wait for them on shutdown.
        timeout_graceful_shutdown=3,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
