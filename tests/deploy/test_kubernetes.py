"""The Kubernetes manifests (deploy/k8s): every overlay renders with `kubectl kustomize`, every object is
valid for the Kubernetes version the manifests are written for, and the properties the service relies on
hold: probes on the health service, a grace period that covers the drain, no session affinity, a locked
down pod, settings that exist, pinned images.

kubernetes-validate knows the built-in kinds only; the PodMonitor (a Prometheus Operator CRD) is checked
field by field here instead.
"""

from __future__ import annotations

import functools
import os
import subprocess
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from pydantic import BaseModel

from service.api.health import NOT_SERVING, SERVING, Readiness
from service.api.kserve_messages import SERVICE as KSERVE_SERVICE
from service.server import NATIVE_SERVICE
from service.settings import Settings
from tests.deploy.conftest import DEPLOY, tool

K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod", "gpu")
# The oldest Kubernetes the manifests are for: the kubelet's preStop `sleep` action is on from 1.30.
KUBERNETES_VERSION = "1.30.0"
CRD_API_VERSIONS = {"monitoring.coreos.com/v1"}
PORT_GRPC = 8500
PORT_METRICS = 9090
PORT_REDIS = 6379
SERVER = "rnnserve"

Obj = dict[str, Any]


@functools.cache
def _render(overlay: str) -> tuple[Obj, ...]:
    done = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(done.stdout) if obj)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def objects(overlay: str, kind: str) -> list[Obj]:
    return [obj for obj in _render(overlay) if obj["kind"] == kind]


def one(overlay: str, kind: str, name: str = SERVER) -> Obj:
    found = [obj for obj in objects(overlay, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(overlay: str, name: str = SERVER) -> Obj:
    spec: Obj = one(overlay, "Deployment", name)["spec"]["template"]["spec"]
    return spec


def server_container(overlay: str) -> Obj:
    containers: list[Obj] = [c for c in pod_spec(overlay)["containers"] if c["name"] == SERVER]
    assert len(containers) == 1, f"{overlay}: one container named {SERVER}"
    return containers[0]


def config_env(overlay: str) -> dict[str, str]:
    """The variables the server's container gets from its ConfigMaps (envFrom)."""
    env: dict[str, str] = {}
    for source in server_container(overlay).get("envFrom", []):
        assert "configMapRef" in source, f"{overlay}: envFrom takes ConfigMaps only, got {source}"
        env |= one(overlay, "ConfigMap", source["configMapRef"]["name"])["data"]
    return env


def explicit_env(overlay: str) -> dict[str, Obj]:
    return {var["name"]: var for var in server_container(overlay).get("env", [])}


def setting_variables() -> set[str]:
    """Every RNNSERVE_* name Settings reads, walked from its fields (groups as RNNSERVE_<GROUP>__<FIELD>)."""
    prefix = Settings.model_config.get("env_prefix", "")
    delimiter = Settings.model_config.get("env_nested_delimiter") or "__"
    names = set()
    for field, info in Settings.model_fields.items():
        group = info.annotation
        if isinstance(group, type) and issubclass(group, BaseModel):
            names |= {f"{prefix}{field}{delimiter}{sub}".upper() for sub in group.model_fields}
        else:
            names.add(f"{prefix}{field}".upper())
    return names


def settings_for(overlay: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the server would read them from the container's environment; a variable that comes
    from a Secret stands in as a plausible value of its kind."""
    for name in [name for name in os.environ if name.upper().startswith("RNNSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in config_env(overlay).items():
        monkeypatch.setenv(name, value)
    for name, var in explicit_env(overlay).items():
        monkeypatch.setenv(name, var["value"] if "value" in var else "redis://redis.example:6379/0")
    return Settings()


def check_pod_monitor(monitor: Obj, overlay: str) -> None:
    """What the Prometheus Operator's CRD would refuse or silently ignore, for the fields used here."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
    labels = one(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items(), "the PodMonitor selects no server pod"
    # The rules and the dashboard select job="rnnserve" and name pods by instance: the operator's default
    # job (<namespace>/<name>) and instance (podIP:port) would leave RnnServeAbsent firing for ever.
    assert labels[spec["jobLabel"]] == "rnnserve"
    relabels = [r for e in spec["podMetricsEndpoints"] for r in e.get("relabelings", [])]
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "instance"} in relabels
    endpoint_keys = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings"}
    port_names = {port["name"] for port in server_container(overlay)["ports"]}
    assert spec["podMetricsEndpoints"]
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= endpoint_keys, f"unknown PodMonitor endpoint fields: {set(endpoint) - endpoint_keys}"
        assert endpoint["port"] == "metrics" and endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"
        for duration in ("interval", "scrapeTimeout"):
            assert str(endpoint.get(duration, "1s")).endswith(("s", "m")), f"{duration} is not a duration"


def test_every_object_is_valid_for_kubernetes(overlay: str) -> None:
    kinds = set()
    for obj in _render(overlay):
        kinds.add(obj["kind"])
        if obj["apiVersion"] in CRD_API_VERSIONS:
            assert obj["kind"] == "PodMonitor", f"no check for {obj['apiVersion']} {obj['kind']}"
            check_pod_monitor(obj, overlay)
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']}: {err.message} at {list(err.path)}")
    expected = {"Deployment", "Service", "ConfigMap", "ServiceAccount"}
    expected |= {"HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    # dev drops the PodMonitor: a dev cluster seldom has the Prometheus Operator's CRD.
    assert expected | ({"PodMonitor"} if overlay != "dev" else set()) <= kinds


def test_the_custom_metric_autoscaler_example_is_valid() -> None:
    example = yaml.safe_load((K8S / "examples" / "hpa-steps-per-second.yaml").read_text())
    kubernetes_validate.validate(example, KUBERNETES_VERSION, strict=True)
    assert {metric["type"] for metric in example["spec"]["metrics"]} == {"Pods", "Resource"}


def test_probes_ask_the_health_service_on_the_grpc_port(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    container = server_container(overlay)
    assert {"name": "grpc", "containerPort": PORT_GRPC, "protocol": "TCP"} in container["ports"]
    assert settings_for(overlay, monkeypatch).port == PORT_GRPC
    probes = {kind: container[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness")}
    for kind, probe in probes.items():
        assert set(probe) & {"grpc", "tcpSocket", "httpGet", "exec"} == {"grpc"}, f"{kind}: not a gRPC probe"
        assert probe["grpc"]["port"] == PORT_GRPC, f"{kind} probe on the wrong port"
    services = {kind: probe["grpc"].get("service", "") for kind, probe in probes.items()}
    # What each probe's service name answers, by the server's own health logic: readiness follows the store
    # and the drain; liveness and start-up answer SERVING through a Redis outage and a drain.
    readiness = Readiness([NATIVE_SERVICE, KSERVE_SERVICE])
    assert readiness.status(services["readiness"]) == SERVING
    readiness.update(store_ok=False)
    assert readiness.status(services["readiness"]) == NOT_SERVING, "readiness ignores the store"
    assert readiness.status(services["liveness"]) == SERVING, "liveness would restart pods during a Redis outage"
    assert readiness.status(services["startup"]) == SERVING
    readiness.update(store_ok=True)
    readiness.drain()
    assert readiness.status(services["readiness"]) == NOT_SERVING
    assert readiness.status(services["liveness"]) == SERVING, "liveness would kill a draining pod"
    # Generous: a minute of silence before a restart; five minutes to load the models.
    assert probes["liveness"]["periodSeconds"] * probes["liveness"]["failureThreshold"] >= 60
    assert probes["startup"]["periodSeconds"] * probes["startup"]["failureThreshold"] >= 120


def test_the_grace_period_covers_the_endpoint_delay_and_the_drain(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pre_stop = server_container(overlay)["lifecycle"]["preStop"]
    sleep_s = pre_stop["sleep"]["seconds"]
    assert sleep_s >= 3, "preStop must give kube-proxy and resolvers time to drop the pod before SIGTERM"
    grace_s = settings_for(overlay, monkeypatch).shutdown_grace_s
    # The supervisor kills a worker still running 15 s after the grace (service/workers.py): that too must
    # end before the kubelet's SIGKILL.
    assert pod_spec(overlay)["terminationGracePeriodSeconds"] > sleep_s + grace_s + 15


def test_pods_run_locked_down(overlay: str) -> None:
    for deployment in objects(overlay, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        name = deployment["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False, f"{name}: service links inject RNNSERVE_PORT=tcp://…"
        mounted = set()
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "resources" in container and container["resources"]["limits"]["memory"]
            mounted |= {mount["mountPath"] for mount in container.get("volumeMounts", [])}
        if name == SERVER:
            assert spec["securityContext"]["runAsUser"] == 10001
            assert server_container(overlay)["securityContext"]["runAsUser"] == 10001
            # The metrics directory of the workers lives under tempfile.gettempdir().
            (tmp,) = [m for m in server_container(overlay)["volumeMounts"] if m["mountPath"] == "/tmp"]
            (volume,) = [v for v in spec["volumes"] if v["name"] == tmp["name"]]
            assert "emptyDir" in volume
    account = one(overlay, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert pod_spec(overlay)["serviceAccountName"] == account["metadata"]["name"]


def test_the_service_has_no_session_affinity(overlay: str) -> None:
    service = one(overlay, "Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"].get("sessionAffinity", "None") == "None"
    assert service["spec"]["selector"].items() <= pod_labels(overlay).items()
    ports = {port["name"]: (port["port"], port["targetPort"]) for port in service["spec"]["ports"]}
    assert ports == {"grpc": (PORT_GRPC, "grpc"), "metrics": (PORT_METRICS, "metrics")}


def pod_labels(overlay: str) -> dict[str, str]:
    labels: dict[str, str] = one(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def test_the_pods_are_spread_budgeted_and_scaled(overlay: str) -> None:
    labels = pod_labels(overlay).items()
    spread = {c["topologyKey"]: c for c in pod_spec(overlay)["topologySpreadConstraints"]}
    assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert all(c["labelSelector"]["matchLabels"].items() <= labels for c in spread.values())

    budget = one(overlay, "PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels
    assert budget["spec"].get("maxUnavailable") == 1, "one voluntary disruption at a time, never none"

    scaler = one(overlay, "HorizontalPodAutoscaler")
    assert scaler["apiVersion"] == "autoscaling/v2"
    assert scaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SERVER}
    # The autoscaler owns the count: a replicas field would reset it on every apply (a mass drain).
    assert "replicas" not in one(overlay, "Deployment")["spec"]
    assert 1 <= scaler["spec"]["minReplicas"] <= scaler["spec"]["maxReplicas"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in scaler["spec"]["metrics"])


def test_the_network_policy_lets_in_clients_and_monitoring_and_out_redis_and_dns(overlay: str) -> None:
    policy = one(overlay, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels(overlay).items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ingress = {(port["protocol"], port["port"]): rule["from"] for rule in policy["ingress"] for port in rule["ports"]}
    assert set(ingress) == {("TCP", PORT_GRPC), ("TCP", PORT_METRICS)}
    assert ingress[("TCP", PORT_METRICS)] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    egress = {(port["protocol"], port["port"]) for rule in policy["egress"] for port in rule["ports"]}
    assert egress == {("TCP", PORT_REDIS), ("UDP", 53), ("TCP", 53)}


def test_prometheus_scrapes_the_metrics_port(overlay: str) -> None:
    assert {"name": "metrics", "containerPort": PORT_METRICS, "protocol": "TCP"} in server_container(overlay)["ports"]
    if overlay != "dev":
        check_pod_monitor(one(overlay, "PodMonitor"), overlay)


def test_every_variable_is_a_setting_and_parses(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    known = setting_variables()
    assert {"RNNSERVE_PORT", "RNNSERVE_REDIS__URL", "RNNSERVE_RUNTIME__PROVIDERS"} <= known
    names = set(config_env(overlay)) | set(explicit_env(overlay))
    assert names, "the server gets its settings from the environment"
    assert names <= known, f"not settings (see service/settings.py): {sorted(names - known)}"
    settings = settings_for(overlay, monkeypatch)
    assert settings.metrics_port == PORT_METRICS
    # One worker per CPU of the limit: unset, the server would count the node's cores.
    cpu_limit = server_container(overlay)["resources"]["limits"]["cpu"]
    assert settings.workers == int(cpu_limit)


def test_dev_runs_its_own_redis_and_points_the_server_at_it(monkeypatch: pytest.MonkeyPatch) -> None:
    url = urlsplit(settings_for("dev", monkeypatch).redis.url or "")
    service = one("dev", "Service", url.hostname or "")
    assert url.scheme == "redis" and url.port in {port["port"] for port in service["spec"]["ports"]}
    redis = one("dev", "Deployment", url.hostname or "")
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    assert one("dev", "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 1
    for overlay in ("prod", "gpu"):
        assert not [d for d in objects(overlay, "Deployment") if d["metadata"]["name"] != SERVER]


@pytest.mark.parametrize("overlay", ["prod", "gpu"])
def test_prod_takes_redis_from_a_secret_and_mounts_tls(overlay: str) -> None:
    assert "RNNSERVE_REDIS__URL" not in config_env(overlay), "a URL with a password does not go in a ConfigMap"
    source = explicit_env(overlay)["RNNSERVE_REDIS__URL"]["valueFrom"]["secretKeyRef"]
    assert source["name"] and source["key"] and not source.get("optional", False)
    assert not objects(overlay, "Secret"), "secrets are created by the operator, never committed"
    (mount,) = [m for m in server_container(overlay)["volumeMounts"] if m["mountPath"] == "/etc/rnnserve/tls"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod_spec(overlay)["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "rnnserve-tls"


def test_gpu_asks_for_a_gpu_and_runs_cuda_first(monkeypatch: pytest.MonkeyPatch) -> None:
    resources = server_container("gpu")["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert settings_for("gpu", monkeypatch).runtime.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    spec = pod_spec("gpu")
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert server_container("gpu")["image"].rpartition(":")[2].endswith("gpu")
    assert server_container("gpu")["image"].startswith("registry.example.com/rnnserve:")
    for overlay in ("dev", "prod"):
        assert "nvidia.com/gpu" not in server_container(overlay)["resources"]["limits"]
        assert server_container(overlay)["image"].rpartition(":")[2].endswith("cpu")


def test_every_image_is_pinned(overlay: str) -> None:
    for deployment in objects(overlay, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            image = container["image"]
            if "@sha256:" in image:
                continue
            repository, _, tag = image.rpartition(":")
            assert repository and "/" not in tag, f"{image}: no tag"
            assert tag != "latest", f"{image}: pin a tag or a digest"
