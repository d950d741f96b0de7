"""The Helm chart in helm/crm-platform: lints, renders, and deploys what it should.

Helm itself comes from deploy/tools/helm.sh (a pinned binary, fetched once
into .tools/). Every rendered manifest is validated against the Kubernetes
API schemas of the oldest cluster version the chart supports, and the tests
check what a platform team relies on: one Deployment per service process
with its command, configuration that the processes really read, probes,
single-writer processes that stay single, a values schema that refuses
mistakes, and locked-down pods.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from crm_common.privacy.keystore import KeyStoreLocation
from crm_common.registry import SERVICES
from crm_common.settings import Settings
from crm_deploy.cli import registry_json
from crm_deploy.stack import SERVICE_PROCESSES

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "crm-platform"
PROD_VALUES = CHART / "ci" / "values-prod.yaml"
HELM_SH = ROOT / "deploy" / "tools" / "helm.sh"
RELEASE = "crm"
NAMESPACE = "crm-test"
FULLNAME = "crm-crm-platform"


# -- helm -------------------------------------------------------------------------


@cache
def _helm_problem() -> str | None:
    """Why helm cannot run here, or None when it can (fetches it on first use)."""
    try:
        result = subprocess.run(
            ["bash", str(HELM_SH), "version", "--short"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"deploy/tools/helm.sh did not run: {error!r}"
    if result.returncode != 0 or not result.stdout.startswith("v3."):
        return "deploy/tools/helm.sh could not provide helm: " + result.stderr.strip()[-500:]
    return None


@pytest.fixture(scope="module", autouse=True)
def _helm_available() -> None:
    problem = _helm_problem()
    if problem is not None:
        pytest.skip(problem)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(HELM_SH), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def _declared_kube_version() -> tuple[int, int]:
    """The oldest Kubernetes version the chart supports (Chart.yaml kubeVersion)."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    match = re.match(r"^\s*>=?\s*v?(\d+)\.(\d+)", chart["kubeVersion"])
    assert match, f"kubeVersion {chart['kubeVersion']!r} has no lower bound"
    return int(match[1]), int(match[2])


def _schema_version() -> str:
    """The kubernetes_validate schema version closest to the declared cluster version."""
    major, minor = _declared_kube_version()
    shipped = sorted({tuple(int(p) for p in v.split(".")[:2]) for v in kv_utils.all_versions()})
    best = min(shipped, key=lambda v: (abs((v[0] - major) * 1000 + v[1] - minor), v))
    return f"{best[0]}.{best[1]}.0"


KUBE_VERSION = _schema_version()


def template_args(
    values: Sequence[Path] = (), sets: Sequence[str] = (), *extra: str, kube: str = KUBE_VERSION
) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube]
    for path in values:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    return [*args, *extra]


def render(
    values: Sequence[Path] = (), sets: Sequence[str] = (), *extra: str
) -> list[dict[str, Any]]:
    result = helm(*template_args(values, sets, *extra))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_fails(sets: Sequence[str]) -> str:
    """helm template's error output for values that must be refused."""
    result = helm(*template_args((), sets))
    assert result.returncode != 0, f"helm template accepted {list(sets)}"
    return result.stderr


# -- reading the rendered manifests ------------------------------------------------


class Manifests:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for doc in self.of_kind(kind):
            if doc["metadata"]["name"] == name:
                return doc
        names = [d["metadata"]["name"] for d in self.of_kind(kind)]
        raise AssertionError(f"no {kind} {name!r}; rendered: {names}")

    def has(self, kind: str, name: str) -> bool:
        return any(d["metadata"]["name"] == name for d in self.of_kind(kind))

    def deployment(self, process: str) -> dict[str, Any]:
        return self.get("Deployment", f"{FULLNAME}-{process}")

    def container(self, process: str) -> dict[str, Any]:
        """The one container of a process's pods."""
        return only_container(self.deployment(process)["spec"]["template"]["spec"])

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for doc in self.docs:
            if doc["kind"] in ("Deployment", "Job"):
                yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]

    def container_env(self, container: Mapping[str, Any]) -> dict[str, str]:
        """The environment the container starts with, as Kubernetes would build it.

        A key of a Secret the chart does not render (an existing Secret) reads
        as "<secret NAME/KEY>".
        """
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            config_map = self.get("ConfigMap", source["configMapRef"]["name"])
            env.update({k: str(v) for k, v in config_map["data"].items()})
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif "secretKeyRef" in item["valueFrom"]:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secret_value(ref["name"], ref["key"])
            elif "fieldRef" in item["valueFrom"]:
                env[item["name"]] = "<" + item["valueFrom"]["fieldRef"]["fieldPath"] + ">"
        return env

    def secret_value(self, name: str, key: str) -> str:
        if not self.has("Secret", name):
            return f"<secret {name}/{key}>"
        data = self.get("Secret", name)["data"]
        assert key in data, f"Secret {name} has no key {key}"
        return base64.b64decode(data[key]).decode()


@pytest.fixture(scope="module")
def default() -> Manifests:
    return Manifests(render())


@pytest.fixture(scope="module")
def prod() -> Manifests:
    return Manifests(render([PROD_VALUES]))


def only_container(pod: Mapping[str, Any]) -> dict[str, Any]:
    containers = pod["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def settings_seen_by(
    env: Mapping[str, str], service: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """What crm_common.settings makes of a container's environment."""
    for name in list(os.environ):
        if name.startswith(("CRM_", "OTEL_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings.from_env(service)


# -- lint and Kubernetes schemas ---------------------------------------------------


@pytest.mark.parametrize("values", [[], [PROD_VALUES]], ids=["default", "prod"])
def test_chart_lints_clean(values: list[Path]) -> None:
    args = ["lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION]
    for path in values:
        args += ["-f", str(path)]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


EVERYTHING_ON = [
    "tickets.enabled=true",
    "loyalty.enabled=true",
    "analytics.rebuild.enabled=true",
    "contacts.api.autoscaling.enabled=true",
    "global.otlpEndpoint=http://collector:4317",
]


@pytest.mark.parametrize(
    ("values", "sets"),
    [([], []), ([PROD_VALUES], []), ([PROD_VALUES], EVERYTHING_ON)],
    ids=["default", "prod", "prod-everything-enabled"],
)
def test_every_manifest_is_valid_for_the_supported_kubernetes(
    values: list[Path], sets: list[str]
) -> None:
    docs = render(values, sets)
    assert len(docs) > 10
    for doc in docs:
        where = f"{doc['kind']} {doc['metadata']['name']}"
        try:
            # strict: a field Kubernetes does not know is an error too.
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{where} is not valid for Kubernetes {KUBE_VERSION}: {error}")


def test_the_chart_refuses_a_cluster_older_than_it_supports() -> None:
    major, minor = _declared_kube_version()
    result = helm(*template_args(kube=f"{major}.{minor - 1}.0"))
    assert result.returncode != 0
    assert "kubeVersion" in result.stderr


# -- processes and their configuration ------------------------------------------------


def test_every_service_process_runs_its_command(default: Manifests) -> None:
    rendered = {d["metadata"]["name"] for d in default.of_kind("Deployment")}
    assert rendered == {f"{FULLNAME}-{p.name}" for p in SERVICE_PROCESSES}
    for process in SERVICE_PROCESSES:
        pod = default.deployment(process.name)["spec"]["template"]["spec"]
        container = only_container(pod)
        assert [*container["command"], *container["args"]] == list(process.command)
        assert container["image"] == f"crm-{process.service}:0.1.0"


def test_images_come_from_the_registry_by_tag_or_digest(prod: Manifests) -> None:
    for process in SERVICE_PROCESSES:
        container = prod.container(process.name)
        assert container["image"] == f"registry.example.com/crm/crm-{process.service}:0.1.0"
    digest = "sha256:" + "ab" * 32
    pinned = Manifests(render([PROD_VALUES], [f"analytics.image.digest={digest}"]))
    for process in ("analytics-api", "analytics-projector"):
        container = pinned.container(process)
        assert container["image"] == f"registry.example.com/crm/crm-analytics@{digest}"
    pull_secrets = pinned.deployment("contacts-api")["spec"]["template"]["spec"]["imagePullSecrets"]
    assert pull_secrets == [{"name": "crm-registry"}]


def test_processes_read_kafka_mongodb_and_postgresql_from_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifests = Manifests(
        render(
            sets=[
                "kafka.bootstrap=broker-a:9092\\,broker-b:9092",
                "mongodb.url=mongodb://reader:s3cret@docs-0:27017/?replicaSet=docs",
                "mongodb.database=crm_views",
                "postgresql.host=pg.databases.svc",
                "postgresql.port=6432",
                "postgresql.database=crm_events",
                "postgresql.user=crm_writer",
                "postgresql.password=pg-s3cret",
                "global.otlpEndpoint=http://otel-collector:4317",
            ]
        )
    )
    for process in SERVICE_PROCESSES:
        deployment = manifests.deployment(process.name)
        container = only_container(deployment["spec"]["template"]["spec"])
        env = manifests.container_env(container)
        settings = settings_seen_by(env, process.service, monkeypatch)
        assert settings.kafka_bootstrap == "broker-a:9092,broker-b:9092", process.name
        assert settings.bind_host == "0.0.0.0"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        if process.service == "analytics":
            assert settings.mongo_url == "mongodb://reader:s3cret@docs-0:27017/?replicaSet=docs"
            assert settings.mongo_db == "crm_views"
        else:
            assert settings.event_store == "postgres"
            assert settings.postgres == {
                "host": "pg.databases.svc",
                "port": "6432",
                "dbname": "crm_events",
                "user": "crm_writer",
                "password": "pg-s3cret",
                "schema": process.service,
            }
        if process.api:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports == {
                "grpc": settings.grpc_port,
                "http": settings.http_port,
                "health": settings.health_port,
            }


def test_credentials_travel_in_secrets_never_in_the_config_map(
    default: Manifests, prod: Manifests
) -> None:
    for manifests in (default, prod):
        (config_map,) = manifests.of_kind("ConfigMap")
        assert not {"CRM_MONGO_URL", "CRM_POSTGRES_PASSWORD"} & set(config_map["data"])
    # Default values: the chart's own Secret, made from the values.
    own = f"{FULLNAME}-credentials"
    env = default.container_env(default.container("analytics-api"))
    assert env["CRM_MONGO_URL"] == "mongodb://mongodb:27017/?replicaSet=rs0"
    assert default.has("Secret", own)
    # values-prod.yaml: existing Secrets by name and key; the chart makes none.
    assert prod.of_kind("Secret") == []
    analytics = prod.container_env(prod.container("analytics-projector"))
    contacts = prod.container_env(prod.container("contacts-relay"))
    assert analytics["CRM_MONGO_URL"] == "<secret crm-mongodb/url>"
    assert contacts["CRM_POSTGRES_PASSWORD"] == "<secret crm-postgresql/password>"


def test_tracing_is_configured_only_when_an_endpoint_is_given(
    default: Manifests, prod: Manifests
) -> None:
    (config_map,) = default.of_kind("ConfigMap")
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in config_map["data"]
    (config_map,) = prod.of_kind("ConfigMap")
    assert config_map["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4317")


# -- probes and scaling -----------------------------------------------------------------


def test_api_pods_are_probed_over_grpc_health_and_workers_over_their_heartbeat(
    default: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    for process in SERVICE_PROCESSES:
        container = default.container(process.name)
        if process.api:
            grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
            for probe in ("startupProbe", "readinessProbe"):
                assert container[probe]["grpc"]["port"] == grpc_port, (process.name, probe)
            # Not restarted while a dependency is down: liveness is the process's own.
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
            assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "/bin/sleep"
            # Its health port serves /readyz and /metrics; the probes stay on gRPC.
            settings = settings_seen_by(
                default.container_env(container), process.service, monkeypatch
            )
            assert {"name": "health", "containerPort": settings.health_port, "protocol": "TCP"} in (
                container["ports"]
            )
        else:
            # The worker serves GET /healthz where the probes look for it.
            settings = settings_seen_by(
                default.container_env(container), process.service, monkeypatch
            )
            assert container["ports"] == [
                {"name": "health", "containerPort": settings.health_port, "protocol": "TCP"}
            ], process.name
            assert settings.health_stale_after == 120
            for probe in ("startupProbe", "livenessProbe"):
                assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
            # A worker takes no traffic: nothing to be ready for.
            assert "readinessProbe" not in container
            assert "lifecycle" not in container


def test_the_worker_health_port_and_stale_limit_are_values() -> None:
    manifests = Manifests(
        render(sets=["global.workerHealth.port=9100", "global.workerHealth.staleAfterSeconds=300"])
    )
    container = manifests.container("contacts-relay")
    env = manifests.container_env(container)
    assert (env["CRM_HEALTH_PORT"], env["CRM_HEALTH_STALE_SECONDS"]) == ("9100", "300")
    assert container["ports"][0]["containerPort"] == 9100
    assert "global.workerHealth.staleAfterSeconds" in render_fails(
        ["global.workerHealth.staleAfterSeconds=0"]
    )


def test_metrics_are_not_scraped_unless_asked(default: Manifests) -> None:
    """Every process serves /metrics on its health port; the chart adds no scrape
    annotations, no PodMonitor and no extra ingress by default."""
    for process in SERVICE_PROCESSES:
        deployment = default.get("Deployment", f"{FULLNAME}-{process.name}")
        annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
        assert not any(k.startswith("prometheus.io/") for k in annotations), process.name
        container = default.container(process.name)
        assert "health" in [p["name"] for p in container["ports"]], process.name
    assert default.of_kind("PodMonitor") == []
    assert not default.has("NetworkPolicy", f"{FULLNAME}-metrics-ingress")


def test_scraping_by_annotations_or_a_pod_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = Manifests(
        render(
            sets=[
                "metrics.podAnnotations=true",
                "metrics.podMonitor.enabled=true",
                "metrics.podMonitor.interval=15s",
                "metrics.podMonitor.labels.release=prometheus",
                "metrics.scrapeFrom[0].namespaceSelector.matchLabels.team=observability",
                "global.workerHealth.port=9200",
            ]
        )
    )
    for process in SERVICE_PROCESSES:
        deployment = manifests.get("Deployment", f"{FULLNAME}-{process.name}")
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        # The port the process really serves /metrics on (CRM_HEALTH_PORT).
        container = manifests.container(process.name)
        settings = settings_seen_by(
            manifests.container_env(container), process.service, monkeypatch
        )
        assert annotations["prometheus.io/port"] == str(settings.health_port) == "9200"
    (monitor,) = manifests.of_kind("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "health", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    selected = monitor["spec"]["selector"]["matchLabels"]
    for process in SERVICE_PROCESSES:
        labels = manifests.get("Deployment", f"{FULLNAME}-{process.name}")["spec"]["template"][
            "metadata"
        ]["labels"]
        assert selected.items() <= labels.items(), process.name
    # The default-deny policy would drop the scrapes: one policy lets them in.
    policy = manifests.get("NetworkPolicy", f"{FULLNAME}-metrics-ingress")["spec"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 9200, "protocol": "TCP"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"team": "observability"}}}]
    kubernetes_validate.validate(
        manifests.get("NetworkPolicy", f"{FULLNAME}-metrics-ingress"), KUBE_VERSION, strict=True
    )
    assert "metrics.podMonitor.interval" in render_fails(["metrics.podMonitor.interval=soon"])
    assert "metrics" in render_fails(["metrics.scrape=true"])


def test_relay_and_projector_stay_single_replica_even_when_asked_for_more() -> None:
    assert "contacts.relay.replicas" in render_fails(["contacts.relay.replicas=3"])
    assert "analytics.projector.replicas" in render_fails(["analytics.projector.replicas=2"])
    # Even with the schema switched off, the template never runs two of them.
    manifests = Manifests(
        render(
            [PROD_VALUES],
            ["contacts.relay.replicas=3", "analytics.projector.replicas=2"],
            "--skip-schema-validation",
        )
    )
    for process in ("contacts-relay", "analytics-projector"):
        spec = manifests.deployment(process)["spec"]
        assert spec["replicas"] == 1, process
        assert spec["strategy"] == {"type": "Recreate"}, process
    # Autoscaling and disruption budgets are for the APIs only.
    hpa_targets = {
        h["spec"]["scaleTargetRef"]["name"] for h in manifests.of_kind("HorizontalPodAutoscaler")
    }
    pdb_names = {p["metadata"]["name"] for p in manifests.of_kind("PodDisruptionBudget")}
    apis = {f"{FULLNAME}-{p.name}" for p in SERVICE_PROCESSES if p.api}
    assert hpa_targets == apis
    assert pdb_names == apis


def test_the_contacts_follower_is_a_consumer_group_of_any_size() -> None:
    for replicas in (0, 1, 3):
        manifests = Manifests(render(sets=[f"contacts.follower.replicas={replicas}"]))
        spec = manifests.deployment("contacts-follower")["spec"]
        # Not a single writer: as many members as asked, replaced one by one.
        assert spec["replicas"] == replicas
        assert spec["strategy"]["type"] == "RollingUpdate"
    assert "contacts.follower.replicas" in render_fails(["contacts.follower.replicas=-1"])
    manifests = Manifests(render([PROD_VALUES]))
    assert manifests.deployment("contacts-follower")["spec"]["replicas"] == 2
    # It writes to the contacts event store and reads Kafka, like the contacts API.
    egress = manifests.get("NetworkPolicy", f"{FULLNAME}-contacts-egress")["spec"]
    (selector,) = egress["podSelector"]["matchExpressions"]
    assert "contacts-follower" in selector["values"]


def test_the_pipeline_api_reaches_the_contacts_service_and_scales(
    default: Manifests, prod: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = default.container_env(default.container("pipeline-api"))
    settings = settings_seen_by(env, "pipeline", monkeypatch)
    # Through the headless Service: the channel resolves every ready contacts
    # API pod and balances over them (crm_common.clients), rather than pin
    # its one connection to one pod behind a virtual address.
    scheme, _, address = settings.grpc_target("contacts").partition(":///")
    host, port = address.rsplit(":", 1)
    service = default.get("Service", f"{FULLNAME}-contacts-headless")
    assert scheme == "dns"
    assert host == f"{service['metadata']['name']}.{NAMESPACE}.svc"
    assert service["spec"]["clusterIP"] == "None"
    assert int(port) in {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"}
    # Both Services select the contacts API pods.
    labels = default.deployment("contacts-api")["spec"]["template"]["metadata"]["labels"]
    for name in (f"{FULLNAME}-contacts", f"{FULLNAME}-contacts-headless"):
        assert default.get("Service", name)["spec"]["selector"].items() <= labels.items()
    # The pipeline API is an API like the others: autoscaled in values-prod.yaml.
    hpa = prod.get("HorizontalPodAutoscaler", f"{FULLNAME}-pipeline-api")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert "replicas" not in prod.deployment("pipeline-api")["spec"]
    assert prod.deployment("pipeline-relay")["spec"]["replicas"] == 1


def test_the_projector_can_be_paused() -> None:
    manifests = Manifests(render(sets=["analytics.projector.replicas=0"]))
    assert manifests.deployment("analytics-projector")["spec"]["replicas"] == 0


def test_autoscaled_apis_leave_the_replica_count_to_the_hpa(prod: Manifests) -> None:
    hpa = prod.get("HorizontalPodAutoscaler", f"{FULLNAME}-contacts-api")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 10)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 65
    assert "replicas" not in prod.deployment("contacts-api")["spec"]
    pdb = prod.get("PodDisruptionBudget", f"{FULLNAME}-contacts-api")["spec"]
    assert pdb["minAvailable"] == 2 and "maxUnavailable" not in pdb


def test_an_hpa_whose_minimum_exceeds_its_maximum_is_refused() -> None:
    error = render_fails(
        [
            "contacts.api.autoscaling.enabled=true",
            "contacts.api.autoscaling.minReplicas=5",
            "contacts.api.autoscaling.maxReplicas=3",
        ]
    )
    assert "contacts.api.autoscaling: minReplicas (5) is greater than maxReplicas (3)" in error


# -- the values schema ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("kafka.bootstrapServers=kafka:9092", "bootstrapServers"),
        ("kafka.bootstrap=", "kafka.bootstrap"),
        ("contacts.grpcPort=70000", "contacts.grpcPort"),
        ("global.logLevel=LOUD", "global.logLevel"),
        ("analytics.api.replicas=0", "analytics.api.replicas"),
        ("contacts.postgresSchema=Contacts-Events", "contacts.postgresSchema"),
        ("mongodb.url=postgres://wrong", "mongodb.url"),
        ("contacts.image.digest=latest", "contacts.image.digest"),
    ],
)
def test_the_values_schema_refuses_a_bad_value_and_names_it(bad: str, message: str) -> None:
    error = render_fails([bad])
    assert "don't meet the specifications of the schema" in error
    assert message in error


def test_lint_reports_a_bad_value_too() -> None:
    result = helm("lint", str(CHART), "--set", "contacts.api.resources.limits=null")
    assert result.returncode != 0
    assert "contacts.api.resources" in result.stdout + result.stderr


# -- pods are locked down ---------------------------------------------------------------


@pytest.mark.parametrize("which", ["default", "prod-everything-enabled"])
def test_every_pod_runs_as_non_root_read_only_with_resources(which: str) -> None:
    docs = render() if which == "default" else render([PROD_VALUES], EVERYTHING_ON)
    manifests = Manifests(docs)
    pods = list(manifests.pod_specs())
    assert len(pods) >= len(SERVICE_PROCESSES)
    for name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
            # The writable places of a read-only root file system.
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", "/var/lib/crm"} <= mounts, name


# -- network policies ---------------------------------------------------------------


def test_network_policies_deny_by_default_and_open_only_the_api_ports(
    default: Manifests,
) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in default.of_kind("NetworkPolicy")}
    deny = policies[f"{FULLNAME}-default-deny"]
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in deny
    opened: dict[str, set[int]] = {}
    for spec in policies.values():
        component = spec["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
        for rule in spec.get("ingress", []):
            opened.setdefault(component, set()).update(p["port"] for p in rule["ports"])
    # Exactly the API ports of every service the registry runs (crm_common.registry).
    assert opened == {
        entry.process_name("api"): {entry.grpc_port, entry.http_port}
        for entry in SERVICES
        if "api" in entry.roles
    }
    # Egress: the contacts processes reach PostgreSQL, analytics reaches MongoDB, and
    # PostgreSQL too: its projector reads the write services' personal data keys.
    contacts_ports = {
        p["port"] for r in policies[f"{FULLNAME}-contacts-egress"]["egress"] for p in r["ports"]
    }
    analytics_ports = {
        p["port"] for r in policies[f"{FULLNAME}-analytics-egress"]["egress"] for p in r["ports"]
    }
    assert {53, 9092, 5432} <= contacts_ports and 27017 not in contacts_ports
    assert {53, 9092, 27017, 5432} <= analytics_ports


# -- master keys: personal data sealed at rest ------------------------------------------

MASTER_KEYS_DIR = "/etc/crm/master-keys"


def _holds_master_keys(process: str, service: str) -> bool:
    """Every process of a write service and the 360 projector (the consumer)."""
    return service != "analytics" or process in ("analytics-projector", "analytics-rebuild")


def _master_keys_of(
    manifests: Manifests, pod: Mapping[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Settings, dict[str, Any] | None, dict[str, Any] | None]:
    """The settings of a pod's container, its master keys mount and volume (None: none)."""
    container = only_container(pod)
    settings = settings_seen_by(manifests.container_env(container), service, monkeypatch)
    mounts = [m for m in container["volumeMounts"] if m["name"] == "master-keys"]
    volumes = [v for v in pod["volumes"] if v["name"] == "master-keys"]
    assert len(mounts) <= 1 and len(volumes) <= 1
    return settings, (mounts or [None])[0], (volumes or [None])[0]


@pytest.mark.parametrize("which", ["default", "prod"])
def test_the_write_services_and_the_projector_read_the_master_keys_from_a_secret_file(
    which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = [] if which == "default" else [PROD_VALUES]
    manifests = Manifests(
        render(values, ["analytics.rebuild.enabled=true", "postgresql.password=pg-s3cret"])
    )
    pods = {
        **{
            p.name: (p.service, manifests.deployment(p.name)["spec"]["template"]["spec"])
            for p in SERVICE_PROCESSES
        },
        "analytics-rebuild": (
            "analytics",
            manifests.get("Job", f"{FULLNAME}-analytics-rebuild")["spec"]["template"]["spec"],
        ),
    }
    holders = []
    for name, (service, pod) in pods.items():
        settings, mount, volume = _master_keys_of(manifests, pod, service, monkeypatch)
        if not _holds_master_keys(name, service):
            # The 360 API reads the view, never a key.
            assert (settings.master_keys_file, mount, volume) == ("", None, None), name
            continue
        holders.append(name)
        assert settings.master_keys_file == f"{MASTER_KEYS_DIR}/master-keys", name
        assert settings.master_keys == ""  # never the keys themselves in a variable
        # Read-only, the whole directory (no subPath: a changed Secret reaches the
        # running process, which follows the file), from the operator's Secret.
        assert mount == {"name": "master-keys", "mountPath": MASTER_KEYS_DIR, "readOnly": True}
        assert volume is not None
        assert volume["secret"] == {
            "secretName": "crm-master-keys",
            "defaultMode": 0o440,
            "items": [{"key": "master-keys", "path": "master-keys"}],
        }
        if service == "analytics":
            # The consumer finds every owner's key store in the owner's schema.
            for owner in ("contacts", "pipeline", "tickets", "loyalty"):
                location = KeyStoreLocation.of(settings, owner)
                assert (location.kind, location.schema) == ("postgres", owner)
                password = "pg-s3cret" if which == "default" else "<secret crm-postgresql/password>"
                assert f"password={password}" in location.conninfo.replace("'", "")
    assert {"contacts-api", "contacts-relay", "pipeline-follower", "loyalty-api"} <= set(holders)
    assert {"analytics-projector", "analytics-rebuild"} <= set(holders)


def test_the_master_keys_are_never_in_a_config_map_or_a_secret_the_chart_makes(
    default: Manifests, prod: Manifests
) -> None:
    for manifests in (default, prod):
        for config_map in manifests.of_kind("ConfigMap"):
            assert not {"CRM_MASTER_KEYS", "CRM_MASTER_KEYS_FILE"} & set(config_map["data"])
        for secret in manifests.of_kind("Secret"):
            assert "master-keys" not in secret.get("data", {})
        for _, pod in manifests.pod_specs():
            for container in pod["containers"]:
                assert "CRM_MASTER_KEYS" not in {e["name"] for e in container.get("env", [])}


def test_the_master_keys_secret_and_its_key_are_values(monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = Manifests(
        render(
            sets=["privacy.masterKeys.existingSecret=vault-crm-keys", "privacy.masterKeys.key=ring"]
        )
    )
    pod = manifests.deployment("tickets-api")["spec"]["template"]["spec"]
    _, mount, volume = _master_keys_of(manifests, pod, "tickets", monkeypatch)
    assert volume is not None and mount is not None
    assert volume["secret"]["secretName"] == "vault-crm-keys"
    assert volume["secret"]["items"] == [{"key": "ring", "path": "master-keys"}]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("privacy.masterKeys.existingSecret=", "privacy.masterKeys.existingSecret"),
        ("privacy.masterKeys.existingSecret=Not_A_Name", "privacy.masterKeys.existingSecret"),
        ("privacy.masterKeys.key=a/b", "privacy.masterKeys.key"),
        ("privacy.masterKeys.inline=id:abc", "inline"),
    ],
)
def test_the_values_schema_refuses_master_keys_without_a_secret(bad: str, message: str) -> None:
    error = render_fails([bad])
    assert "don't meet the specifications of the schema" in error
    assert message in error


def test_a_write_service_schema_the_projector_could_not_find_is_refused() -> None:
    error = render_fails(["pipeline.postgresSchema=crm_pipeline"])
    assert 'pipeline.postgresSchema must be "pipeline" while analytics is enabled' in error
    # Without the 360 projector nobody but the owner reads the keys.
    render(sets=["pipeline.postgresSchema=crm_pipeline", "analytics.enabled=false"])


# -- rebuilding the 360 view --------------------------------------------------------


def test_the_rebuild_job_runs_alone() -> None:
    manifests = Manifests(render(sets=["analytics.rebuild.enabled=true"]))
    job = manifests.get("Job", f"{FULLNAME}-analytics-rebuild")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    container = only_container(job["spec"]["template"]["spec"])
    assert [*container["command"], *container["args"]] == ["crm-analytics", "rebuild"]
    env = manifests.container_env(container)
    assert env["CRM_MONGO_URL"] == "mongodb://mongodb:27017/?replicaSet=rs0"
    assert manifests.deployment("analytics-projector")["spec"]["replicas"] == 0
    # Its pods may reach Kafka and MongoDB like the projector's.
    egress = manifests.get("NetworkPolicy", f"{FULLNAME}-analytics-egress")["spec"]
    (selector,) = egress["podSelector"]["matchExpressions"]
    assert "analytics-rebuild" in selector["values"]


def test_no_rebuild_job_unless_asked(default: Manifests) -> None:
    assert default.of_kind("Job") == []
    assert default.deployment("analytics-projector")["spec"]["replicas"] == 1


# -- the service registry -----------------------------------------------------------


def test_the_charts_service_registry_is_the_generated_one() -> None:
    """services.json is generated from crm_common.registry; a new registry entry
    without `crm-stack registry --write` fails here, not in a cluster."""
    assert (CHART / "services.json").read_text() == registry_json()


def test_every_registered_service_has_its_values_with_the_registry_ports() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    for entry in SERVICES:
        block = values[entry.name]
        assert (block["grpcPort"], block["httpPort"]) == (entry.grpc_port, entry.http_port)
        assert entry.name in schema["required"]
        assert entry.name in schema["properties"]
        # Planned services ship disabled; the others are on by default.
        assert block["enabled"] is (not entry.planned)


# -- identity and access ---------------------------------------------------------------


def _mounts(pod: Mapping[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in only_container(pod)["volumeMounts"]}


def test_every_process_verifies_tokens_with_the_key_set_and_holds_its_own_key(
    default: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    for process in SERVICE_PROCESSES:
        pod = default.deployment(process.name)["spec"]["template"]["spec"]
        env = default.container_env(only_container(pod))
        settings = settings_seen_by(env, process.service, monkeypatch)
        assert settings.auth_jwks == "/etc/crm/jwks/jwks.json"
        assert (settings.auth_issuer, settings.auth_audience) == (
            "https://id.example.com/realms/crm",
            "crm-platform",
        )
        assert settings.service_key_file == "/etc/crm/service-key/key.pem"
        assert settings.service_key_id == f"service-{process.service}"
        mounts = _mounts(pod)
        assert mounts["/etc/crm/jwks"] == "jwks" and mounts["/etc/crm/service-key"] == "service-key"
        volumes = {v["name"]: v for v in pod["volumes"]}
        # Each process mounts its own service's key, not every service's.
        assert volumes["service-key"]["secret"]["items"] == [
            {"key": f"{process.service}.key.pem", "path": "key.pem"}
        ]
        assert settings.grpc_tls_cert == "" and settings.grpc_client_auth == "none"


def test_a_key_set_url_replaces_the_config_map(monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = Manifests(render(sets=["auth.jwksUrl=https://id.example.com/jwks"]))
    pod = manifests.deployment("contacts-api")["spec"]["template"]["spec"]
    env = manifests.container_env(only_container(pod))
    assert settings_seen_by(env, "contacts", monkeypatch).auth_jwks == (
        "https://id.example.com/jwks"
    )
    assert "/etc/crm/jwks" not in _mounts(pod)


def test_partners_on_mutual_tls_and_probes_that_still_reach_the_apis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifests = Manifests(render(sets=["grpcTls.enabled=true", "grpcTls.clientAuth=require"]))
    for process in SERVICE_PROCESSES:
        pod = manifests.deployment(process.name)["spec"]["template"]["spec"]
        container = only_container(pod)
        settings = settings_seen_by(
            manifests.container_env(container), process.service, monkeypatch
        )
        assert settings.grpc_client_auth == "require"
        assert settings.grpc_client_ca == "/etc/crm/grpc-client-ca/ca.crt"
        assert settings.grpc_client_cert == "/etc/crm/grpc-client/tls.crt"
        assert _mounts(pod)["/etc/crm/grpc-tls"] == "grpc-tls"
        if process.api:
            assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
            assert "grpc" not in container["livenessProbe"]


def test_client_certificates_without_tls_are_refused() -> None:
    assert "enabled" in render_fails(["grpcTls.clientAuth=require"])


def test_no_key_set_at_all_is_refused() -> None:
    assert render_fails(["auth.jwksConfigMap=", "auth.jwksUrl="])


def test_the_identity_providers_key_set_is_reachable_through_the_egress_policy() -> None:
    url = "auth.jwksUrl=https://login.example.com/jwks"
    manifests = Manifests(render(sets=[url]))
    egress = manifests.get("NetworkPolicy", f"{FULLNAME}-contacts-egress")["spec"]["egress"]
    assert any(p["port"] == 443 for rule in egress for p in rule["ports"])
    without = Manifests(render()).get("NetworkPolicy", f"{FULLNAME}-contacts-egress")
    assert not any(p["port"] == 443 for rule in without["spec"]["egress"] for p in rule["ports"])


# -- the department consoles --------------------------------------------------------------

CONSOLES = ("sales", "service", "marketing", "management")
CONSOLES_ON = [
    "consoles.enabled=true",
    "consoles.oidc.issuer=https://login.example.com/realms/crm",
    "consoles.oidc.clientSecret=s3cret",
    *(f"consoles.{c}.publicUrl=https://{c}.crm.example.com" for c in CONSOLES),
    *(f"consoles.{c}.host={c}.crm.example.com" for c in CONSOLES),
]


def test_the_consoles_are_off_until_an_identity_provider_is_named(default: Manifests) -> None:
    assert not [d for d in default.docs if "console" in d["metadata"]["name"]]
    refused = render_fails(["consoles.enabled=true", "consoles.sales.publicUrl=https://s.example"])
    assert "consoles.oidc.issuer" in refused


def test_each_console_is_a_deployment_and_a_service_over_the_rest_apis() -> None:
    docs = render([PROD_VALUES], CONSOLES_ON)
    manifests = Manifests(docs)
    for name in CONSOLES:
        component = f"{name}-console"
        deployment = manifests.deployment(component)
        pod = deployment["spec"]["template"]["spec"]
        container = only_container(pod)
        assert (container["command"], container["args"]) == (["crm-consoles"], ["serve", name])
        env = manifests.container_env(container)
        assert env["CRM_CONSOLE_PUBLIC_URL"] == f"https://{name}.crm.example.com"
        assert env["CRM_OIDC_ISSUER"] == "https://login.example.com/realms/crm"
        assert env["CRM_OIDC_CLIENT_ID"] == f"crm-{name}-console"
        assert env["CRM_OIDC_CLIENT_SECRET"] == "s3cret"
        # Production never signs in with the development identity, and holds no key.
        assert "CRM_CONSOLE_DEV_IDENTITY_DIR" not in env and "CRM_SERVICE_KEY_FILE" not in env
        for service in ("contacts", "pipeline", "analytics"):
            port = next(s.http_port for s in SERVICES if s.name == service)
            assert env[f"CRM_{service.upper()}_URL"] == f"http://{FULLNAME}-{service}:{port}"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert env["CRM_CONSOLE_SESSION_KEY_FILE"].startswith(tuple(mounts))
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["automountServiceAccountToken"] is False
        service = manifests.get("Service", f"{FULLNAME}-{component}")
        assert service["spec"]["ports"][0]["targetPort"] == "http"
        policy = manifests.get("NetworkPolicy", f"{FULLNAME}-{component}")["spec"]
        assert [p["port"] for p in policy["ingress"][0]["ports"]] == [8080]
    secret = manifests.get("Secret", f"{FULLNAME}-consoles")
    assert len(base64.b64decode(secret["data"]["session-key"])) >= 32
    assert not manifests.of_kind("Ingress")  # off unless asked
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_consoles_ingress_and_an_existing_secret() -> None:
    sets = [*CONSOLES_ON, "consoles.ingress.enabled=true", "consoles.existingSecret=my-consoles"]
    manifests = Manifests(render([], sets))
    ingress = manifests.get("Ingress", f"{FULLNAME}-consoles")
    routes = {
        r["host"]: r["http"]["paths"][0]["backend"]["service"]["name"]
        for r in ingress["spec"]["rules"]
    }
    assert routes == {f"{c}.crm.example.com": f"{FULLNAME}-{c}-console" for c in CONSOLES}
    assert not manifests.has("Secret", f"{FULLNAME}-consoles")
    env = manifests.container_env(manifests.container("sales-console"))
    assert env["CRM_OIDC_CLIENT_SECRET"] == "<secret my-consoles/oidc-client-secret>"
    kubernetes_validate.validate(ingress, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("consoles.oidc.apiToken=refresh_token", "apiToken"),
        ("consoles.oidc.issuer=http://insecure.example", "issuer"),
        ("consoles.sales.replicas=-1", "replicas"),
    ],
)
def test_the_values_schema_refuses_bad_console_settings(bad: str, message: str) -> None:
    assert message in render_fails([*CONSOLES_ON, bad])
