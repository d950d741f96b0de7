"""`crm-stack`: runs the whole CRM platform locally as processes.

    crm-stack up [--detach] [--only NAME,...] [--postgres]
                                                start everything, print "CRM platform ready";
                                                --postgres: the write services on PostgreSQL
    crm-stack down                              stop a detached stack gracefully
    crm-stack status                            each process: running?, ready?, pid, RSS,
                                                health port, restarts
    crm-stack restart NAME                      stop and start one process of the running stack
    crm-stack wipe                              delete the data directory (not while running)
    crm-stack rebuild-360                       rebuild the 360 view and audit trail from the topics
    crm-stack identity [--rotate] [--rotate-master-key]
                                                signing keys, a token per role, dev certificates,
                                                the master keys that seal personal data
    crm-stack registry [--write]                the service registry as the Helm chart reads it
    crm-stack asyncapi [--write]                the event contract (docs/asyncapi.yaml)

The data directory is CRM_DATA_DIR (default ./var); ports come from
CRM_KAFKA_PORT, CRM_ZOOKEEPER_PORT, CRM_MONGO_PORT and CRM_<SERVICE>_GRPC_PORT /
CRM_<SERVICE>_HTTP_PORT. Commands other than `up` use the configuration the
running stack recorded in <data_dir>/run/stack.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from crm_common.registry import chart_document
from crm_deploy.process import PidRecord, ProcessFailed, read_pid_file, stop_pid, tail
from crm_deploy.stack import INFRA, STACK_PROCESSES, Stack, StackConfig, load_state
from crm_deploy.supervisor import (
    RESTART_PENDING,
    Interrupted,
    Supervisor,
    hold_dir,
    restart_dir,
)

READY_LINE = "CRM platform ready"
DETACH_TIMEOUT = 300.0
DOWN_TIMEOUT = 120.0
PROJECTOR = "analytics-projector"
STACK_DIRS = ("run", "logs", "kafka-logs", "zookeeper", "secantus", "kafka-dist", "postgres")

log = logging.getLogger("crm_deploy")


def _config_for_running(data_dir: Path) -> StackConfig:
    """The configuration the stack in `data_dir` recorded, else the environment's."""
    state = load_state(data_dir)
    if state is not None:
        return StackConfig.from_json(state["config"])
    return StackConfig.from_env()


def _data_dir() -> Path:
    return StackConfig.from_env().data_dir


def _supervisor(run_dir: Path) -> PidRecord | None:
    record = read_pid_file(run_dir / "supervisor.pid")
    return record if record is not None and record.process() is not None else None


def _process_names() -> list[str]:
    return [*INFRA, *(row.name for row in STACK_PROCESSES)]


def _live_children(run_dir: Path) -> dict[str, PidRecord]:
    live = {}
    for name in _process_names():
        record = read_pid_file(run_dir / f"{name}.pid")
        if record is not None and record.process() is not None:
            live[name] = record
    return live


def banner(
    endpoints: dict[str, str], seconds: float | None = None, *, detached: bool = True
) -> str:
    width = max(len(k) for k in endpoints) + 2
    lines = [READY_LINE]
    lines += [f"  {name.ljust(width)}{address}" for name, address in endpoints.items()]
    if seconds is not None:
        how = "deploy/crm down" if detached else "Ctrl-C (or deploy/crm down)"
        lines.append(f"started in {seconds:.1f} s; stop it with {how}")
    return "\n".join(lines)


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    # While Kafka boots, aiokafka logs every refused metadata request at ERROR;
    # the stack retries and reports a real failure itself.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


# -- up ------------------------------------------------------------------------


def _check_not_running(config: StackConfig) -> int | None:
    supervisor = _supervisor(config.run_dir)
    if supervisor is not None:
        return supervisor.pid
    leftovers = _live_children(config.run_dir)
    if leftovers:
        names = ", ".join(f"{n} (pid {r.pid})" for n, r in leftovers.items())
        raise SystemExit(
            f"processes of an earlier stack in {config.data_dir} are still running: {names}; "
            "run `crm-stack down` first"
        )
    return None


def _parse_only(only: str | None) -> list[str] | None:
    if only is None:
        return None
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {row.name for row in STACK_PROCESSES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(
            f"unknown service process(es): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return names


def cmd_up(detach: bool, only: str | None, postgres: bool = False) -> int:
    config = StackConfig.from_env(postgres=postgres)
    names = _parse_only(only)
    running = _check_not_running(config)
    if running is not None and names is not None:
        print(
            f"a stack is already running in {config.data_dir} (supervisor pid {running}); "
            "--only chooses the processes of a stack that starts. To restart one process "
            "of this one: crm-stack restart NAME",
            file=sys.stderr,
        )
        return 1
    if running is not None:
        state = load_state(config.data_dir) or {}
        if detach and state.get("status") == "ready":
            print(banner(state["endpoints"]))
            print(f"(already running, supervisor pid {running})")
            return 0
        print(f"a stack is already running in {config.data_dir} (supervisor pid {running})")
        return 1
    if detach:
        return _up_detached(config, names)
    _setup_logging()
    supervisor = Supervisor(Stack(config), names)
    started = time.perf_counter()
    try:
        endpoints = supervisor.start()
    except Interrupted:
        return 130
    except ProcessFailed as exc:
        print(f"startup failed: {exc}", file=sys.stderr)
        return 1
    print(banner(endpoints, time.perf_counter() - started, detached=False), flush=True)
    supervisor.supervise()
    return 0


def _up_detached(config: StackConfig, names: list[str] | None) -> int:
    config.logs_dir.mkdir(parents=True, exist_ok=True)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    state_path = config.run_dir / "stack.json"
    state_path.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "crm_deploy.cli", "supervise"]
    if names is not None:
        argv += ["--only", ",".join(names)]
    if config.postgres:
        argv.append("--postgres")
    supervisor_log = config.logs_dir / "supervisor.log"
    started = time.perf_counter()
    with supervisor_log.open("ab") as out:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + DETACH_TIMEOUT
    while time.monotonic() < deadline:
        state = load_state(config.data_dir) or {}
        status = state.get("status")
        if status == "ready":
            print(banner(state["endpoints"], time.perf_counter() - started))
            print(f"supervisor pid {child.pid}; its log: {supervisor_log}")
            return 0
        if status == "failed":
            child.wait(DOWN_TIMEOUT)
            print(f"startup failed: {state.get('error')}", file=sys.stderr)
            return 1
        if child.poll() is not None:
            print(
                f"the supervisor exited with status {child.returncode}:\n{tail(supervisor_log)}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.2)
    child.terminate()
    print(f"not ready after {DETACH_TIMEOUT:.0f} s:\n{tail(supervisor_log)}", file=sys.stderr)
    return 1


def cmd_supervise(only: str | None, postgres: bool = False) -> int:
    """The detached supervisor (started by `up --detach`)."""
    _setup_logging()
    supervisor = Supervisor(Stack(StackConfig.from_env(postgres=postgres)), _parse_only(only))
    try:
        supervisor.start()
    except Interrupted:
        return 130
    except Exception:
        log.exception("startup failed")
        return 1
    supervisor.supervise()
    return 0


# -- down, status, wipe ----------------------------------------------------------


def _wait_gone(records: dict[str, PidRecord], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [n for n, r in records.items() if r.process() is not None]
        if not alive:
            return []
        time.sleep(0.2)
    return [n for n, r in records.items() if r.process() is not None]


def cmd_down() -> int:
    config = _config_for_running(_data_dir())
    run_dir = config.run_dir
    supervisor = _supervisor(run_dir)
    children = _live_children(run_dir)
    if supervisor is None and not children:
        print(f"no stack running in {config.data_dir}")
        return 0
    if supervisor is not None:
        print(f"stopping the stack (supervisor pid {supervisor.pid}) ...", flush=True)
        stop_pid(supervisor, timeout=DOWN_TIMEOUT)
    # Children left behind by a supervisor that died: stop them in the same order.
    leftovers = _live_children(run_dir)
    order = [*(row.name for row in STACK_PROCESSES), "kafka", "zookeeper", "secantus"]
    for name in order:
        if name in leftovers:
            print(f"stopping leftover {name} (pid {leftovers[name].pid})", flush=True)
            stop_pid(leftovers[name])
    everything = {**children, **({"supervisor": supervisor} if supervisor else {})}
    alive = _wait_gone(everything, DOWN_TIMEOUT)
    if alive:
        print(f"still running: {', '.join(alive)}", file=sys.stderr)
        return 1
    print("stopped")
    return 0


def _health(port: int | None) -> str:
    """`ready`, `not ready` (with what it waits for) or `no answer`, from GET /readyz."""
    if port is None:
        return "-"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as reply:
            return "ready" if reply.status == 200 else "not ready"
    except urllib.error.HTTPError as error:
        try:
            waiting_for = json.loads(error.read() or b"{}").get("waiting_for")
        except ValueError:
            waiting_for = None
        return f"waiting for {waiting_for}" if waiting_for else "not ready"
    except OSError:
        return "no answer"


def cmd_status() -> int:
    config = _config_for_running(_data_dir())
    state = load_state(config.data_dir) or {}
    supervisor = _supervisor(config.run_dir)
    if supervisor is not None:
        print(f"stack: {state.get('status', 'unknown')} (supervisor pid {supervisor.pid})")
    else:
        print(f"stack: not running ({config.data_dir})")
    restarts: dict[str, int] = state.get("restarts") or {}
    print(
        f"{'process':<22}{'state':<10}{'pid':>8}{'RSS MiB':>9}{'restarts':>10}  "
        f"{'health port':<13}health (GET /healthz, /readyz, /metrics)"
    )
    for name in _process_names():
        record = read_pid_file(config.run_dir / f"{name}.pid")
        process = record.process() if record is not None else None
        port = config.health_ports.get(name)
        port_text = str(port) if port is not None else "-"
        count = restarts.get(name, 0)
        if process is None:
            held = " (held)" if (hold_dir(config.run_dir) / name).exists() else ""
            print(f"{name:<22}{'stopped' + held:<10}{'-':>8}{'-':>9}{count:>10}  {port_text:<13}-")
            continue
        try:
            rss = f"{process.memory_info().rss / 2**20:.0f}"
        except Exception:
            rss = "?"
        print(
            f"{name:<22}{'running':<10}{process.pid:>8}{rss:>9}{count:>10}  "
            f"{port_text:<13}{_health(port)}"
        )
    return 0 if supervisor is not None else 3


# -- restart ---------------------------------------------------------------------

RESTART_TIMEOUT = 150.0


def cmd_restart(name: str) -> int:
    """Asks the running supervisor to stop and start one process; waits for the outcome."""
    known = _process_names()
    if name not in known:
        print(f"no process {name!r}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    config = _config_for_running(_data_dir())
    if _supervisor(config.run_dir) is None:
        print(f"no stack running in {config.data_dir}: start it with `crm-stack up --detach`")
        return 1
    state = load_state(config.data_dir) or {}
    if name not in (state.get("processes") or known):
        print(f"{name} is not part of the running stack (it was started with --only)")
        return 1
    if (hold_dir(config.run_dir) / name).exists():
        print(f"{name} is held (rebuild-360 running?): not restarting it", file=sys.stderr)
        return 1
    request = restart_dir(config.run_dir) / name
    request.parent.mkdir(parents=True, exist_ok=True)
    tmp = request.with_suffix(".tmp")
    tmp.write_text(RESTART_PENDING + "\n")
    tmp.replace(request)
    print(f"restarting {name} ...", flush=True)
    deadline = time.monotonic() + RESTART_TIMEOUT
    try:
        while time.monotonic() < deadline:
            answer = request.read_text().strip()
            if answer != RESTART_PENDING:
                if answer.startswith("ok"):
                    print(f"{name} restarted and ready (pid {answer.split()[-1]})")
                    return 0
                print(f"{name}: {answer}", file=sys.stderr)
                return 1
            if _supervisor(config.run_dir) is None:
                print("the supervisor stopped before it answered", file=sys.stderr)
                return 1
            time.sleep(0.2)
    finally:
        request.unlink(missing_ok=True)
    print(f"{name} was not ready again within {RESTART_TIMEOUT:.0f} s", file=sys.stderr)
    return 1


def cmd_wipe() -> int:
    data_dir = _data_dir()
    if not data_dir.exists():
        print(f"nothing to wipe: {data_dir} does not exist")
        return 0
    run_dir = data_dir / "run"
    if _supervisor(run_dir) is not None or _live_children(run_dir):
        print(f"refusing to wipe {data_dir}: the stack is running (crm-stack down first)")
        return 1
    if not any((data_dir / d).exists() for d in STACK_DIRS):
        print(f"refusing to wipe {data_dir}: it does not look like a stack's data directory")
        return 1
    shutil.rmtree(data_dir)
    print(f"wiped {data_dir}")
    return 0


# -- rebuild-360 -----------------------------------------------------------------


def cmd_rebuild_360() -> int:
    """Holds the projector, runs `crm-analytics rebuild`, lets the supervisor restart it."""
    config = _config_for_running(_data_dir())
    run_dir = config.run_dir
    if _supervisor(run_dir) is None:
        print(f"no stack running in {config.data_dir}: start it with `crm-stack up --detach`")
        return 1
    marker = hold_dir(run_dir) / PROJECTOR
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"held by rebuild-360, pid {os.getpid()}\n")
    try:
        record = read_pid_file(run_dir / f"{PROJECTOR}.pid")
        if record is not None and record.process() is not None:
            print(f"stopping {PROJECTOR} (pid {record.pid})", flush=True)
            stop_pid(record)
        env = Stack(config).service_env()
        executable = str(Path(sys.executable).with_name("crm-analytics"))
        result = subprocess.run([executable, "rebuild"], env=env, check=False)
        if result.returncode != 0:
            print(f"rebuild failed with status {result.returncode}", file=sys.stderr)
    finally:
        marker.unlink(missing_ok=True)
    # The supervisor starts the projector again once the hold is gone.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        again = read_pid_file(run_dir / f"{PROJECTOR}.pid")
        if again is not None and again.process() is not None and again != record:
            print(f"{PROJECTOR} running again (pid {again.pid})")
            return result.returncode
        time.sleep(0.2)
    print(f"{PROJECTOR} did not come back within 30 s", file=sys.stderr)
    return 1


# -- registry --------------------------------------------------------------------

CHART_REGISTRY = Path(__file__).resolve().parents[3] / "helm" / "crm-platform" / "services.json"


def registry_json() -> str:
    """The chart's copy of the service registry, exactly as `registry --write` writes it."""
    return json.dumps(chart_document(), indent=2) + "\n"


def cmd_registry(write: bool) -> int:
    """Prints the chart's copy of the registry, or writes it into the chart."""
    text = registry_json()
    if not write:
        print(text, end="")
        return 0
    CHART_REGISTRY.write_text(text)
    print(f"wrote {CHART_REGISTRY.name} ({len(chart_document()['services'])} services)")
    return 0


# -- asyncapi --------------------------------------------------------------------


def cmd_asyncapi(write: bool) -> int:
    """Prints the AsyncAPI document of every topic, or writes docs/asyncapi.yaml."""
    # Imported here: it compiles proto/ and imports every service's events module.
    from crm_deploy import asyncapi

    try:
        text = asyncapi.document_text()
    except asyncapi.ContractError as error:
        print(f"cannot generate the AsyncAPI document: {error}", file=sys.stderr)
        return 1
    if not write:
        print(text, end="")
        return 0
    asyncapi.DOCUMENT.write_text(text)
    print(f"wrote docs/{asyncapi.DOCUMENT.name}")
    return 0


# -- identity --------------------------------------------------------------------


def cmd_identity(rotate: bool, rotate_master_key: bool = False) -> int:
    """Creates (or rotates) the development identity and says how to use it."""
    stack = Stack(StackConfig.from_env())
    identity = stack.ensure_identity(rotate=rotate, rotate_master_key=rotate_master_key)
    print(f"key set (CRM_AUTH_JWKS): {identity.jwks}")
    print(f"a token per role, valid for 12 h: {identity.tokens}/<role>.jwt")
    print(f"  roles: {', '.join(sorted(p.stem for p in identity.tokens.glob('*.jwt')))}")
    print(f"development CA and certificates: {identity.root / 'tls'}")
    print("call an API with one, e.g.:")
    print(f'  curl -H "Authorization: Bearer $(cat {identity.token_path("sales")})" \\')
    print("       localhost:8081/persons")
    ids = identity.master_key_ids()
    print(f"master keys (CRM_MASTER_KEYS_FILE, never overwritten): {identity.master_keys}")
    print(f"  current: {ids[0]}" + (f"; still unwrapping: {', '.join(ids[1:])}" if ids[1:] else ""))
    if rotate:
        print("rotated the users' signing key; tokens signed by the previous key stay valid")
    if rotate_master_key and len(ids) == 1:
        print("there was no master key to rotate: the first one was created")
    elif rotate_master_key:
        print(
            f"new master key {ids[0]} wraps new data keys from now on (the stack's processes "
            "re-read the file within 5 s); the earlier ones stay in the file. Move every "
            "data key to it, for each of contacts, pipeline, tickets and loyalty "
            "(docs/security.md, 'Rotating the master key'):"
        )
        print(
            f"  CRM_DATA_DIR={stack.config.data_dir} CRM_MASTER_KEYS_FILE={identity.master_keys} "
            ".venv/bin/python -m crm_common.privacy <service> rewrap"
        )
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="crm-stack",
        description="Runs the CRM platform locally: Kafka, ZooKeeper, SecantusDB, the services.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start everything; print the endpoints when ready")
    up.add_argument(
        "--detach", action="store_true", help="keep running in the background and return"
    )
    up.add_argument(
        "--only",
        metavar="NAME,...",
        help="start only these service processes (infrastructure always starts)",
    )
    up.add_argument(
        "--postgres",
        action="store_true",
        help="store the write services' events in PostgreSQL (a schema each): the server "
        "CRM_POSTGRES_HOST names, else one the stack starts under <data_dir>/postgres",
    )
    commands.add_parser("down", help="stop the detached stack gracefully")
    commands.add_parser(
        "status", help="each process: running, ready, pid, RSS, restarts, health port"
    )
    restart = commands.add_parser(
        "restart", help="stop and start one process of the running stack, wait until ready"
    )
    restart.add_argument("name", help="a process: " + ", ".join(_process_names()))
    commands.add_parser("wipe", help="delete the data directory (refused while running)")
    commands.add_parser(
        "rebuild-360", help="drop the 360 view and rebuild it from the topics (stack running)"
    )
    identity = commands.add_parser(
        "identity", help="signing keys, a token per role, development certificates"
    )
    identity.add_argument(
        "--rotate", action="store_true", help="replace the users' key (the old one stays valid)"
    )
    identity.add_argument(
        "--rotate-master-key",
        action="store_true",
        help="put a new master key first in the master keys file (the earlier ones stay)",
    )
    registry = commands.add_parser(
        "registry", help="print the service registry as the Helm chart reads it"
    )
    registry.add_argument(
        "--write", action="store_true", help="write it to helm/crm-platform/services.json"
    )
    asyncapi = commands.add_parser(
        "asyncapi", help="print the event contract (AsyncAPI 3.0) generated from the code"
    )
    asyncapi.add_argument("--write", action="store_true", help="write it to docs/asyncapi.yaml")
    supervise = commands.add_parser("supervise", help=argparse.SUPPRESS)
    supervise.add_argument("--only")
    supervise.add_argument("--postgres", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "up":
        code = cmd_up(args.detach, args.only, args.postgres)
    elif args.command == "supervise":
        code = cmd_supervise(args.only, args.postgres)
    elif args.command == "down":
        code = cmd_down()
    elif args.command == "status":
        code = cmd_status()
    elif args.command == "restart":
        code = cmd_restart(args.name)
    elif args.command == "wipe":
        code = cmd_wipe()
    elif args.command == "identity":
        code = cmd_identity(args.rotate, args.rotate_master_key)
    elif args.command == "registry":
        code = cmd_registry(args.write)
    elif args.command == "asyncapi":
        code = cmd_asyncapi(args.write)
    else:
        code = cmd_rebuild_360()
    sys.exit(code)


if __name__ == "__main__":
    main()
