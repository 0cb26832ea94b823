"""Kubernetes manifests: each overlay renders, validates offline against the Kubernetes
schemas, and is wired to the app (routes, port, settings, metrics labels).

CRDs (ServiceMonitor, KServe) have no schema in kubernetes-validate; their own tests here
check what their controllers need.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from tests.deploy.conftest import DOCKER, K8S, ROOT, kustomize, load_yaml

Obj = dict[str, Any]
CRD_KINDS = {"ServiceMonitor", "InferenceService", "ServingRuntime"}
# The oldest Kubernetes the manifests are meant for, and the newest the schemas know.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
OVERLAYS = ("cpu", "gpu", "cpu-two-models")
SETTINGS = Settings.model_fields
PORT = SETTINGS["port"].default
DRAIN_S = SETTINGS["drain_timeout_s"].default


def setting_name(env: str) -> str:
    assert env.startswith("EXITSERVE_"), env
    return env.removeprefix("EXITSERVE_").lower()


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def one(objs: list[Obj], kind: str) -> Obj:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


def container(objs: list[Obj]) -> Obj:
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Schema validation must work offline: any connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(
    rendered: dict[str, list[Obj]], overlay: str, version: str, no_network: None
) -> None:
    kinds = set()
    for obj in rendered[overlay]:
        kinds.add(obj["kind"])
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {path}: {e.message}")
    assert kinds == {
        "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
        "ServiceMonitor", "NetworkPolicy",
    }  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_match_the_app(
    rendered: dict[str, list[Obj]], overlay: str, get_routes: set[str], live: TestClient
) -> None:
    objs = rendered[overlay]
    c = container(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": PORT}
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for kind, probe in probes.items():
        assert probe["path"] in get_routes, kind
        assert live.get(probe["path"]).status_code == 200, kind  # the tiny app is ready
        assert ports.get(probe["port"], probe["port"]) == PORT, kind
    # A startup budget long enough to load the real model on a busy node (seconds).
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120

    svc = one(objs, "Service")
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert matches(svc["spec"]["selector"], pod_labels)
    (sp,) = svc["spec"]["ports"]
    assert ports[sp["targetPort"]] == PORT


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_holds_real_and_valid_settings(
    rendered: dict[str, list[Obj]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = rendered[overlay]
    cm = one(objs, "ConfigMap")
    c = container(objs)
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [cm["metadata"]["name"]]
    env = dict(cm["data"])
    env.update({e["name"]: "2" for e in c.get("env", [])})  # downward API: the CPU limit
    unknown = {k for k in env if setting_name(k) not in SETTINGS}
    assert not unknown, f"not EXITSERVE_ settings: {sorted(unknown)}"
    # The values pass the app's own validation (as at the pod's start).
    for k in list(os.environ):
        if k.startswith("EXITSERVE_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("app.config.usable_cpus", lambda: 2)
    settings = Settings()
    assert settings.port == PORT
    for d in settings.model_dirs:
        model_dir = Path(str(d).replace("/app/", f"{ROOT}/", 1))
        assert (model_dir / "model.json").is_file(), f"EXITSERVE_MODEL_DIR: {d} not baked in"


def test_threads_follow_the_cpu_limit(rendered: dict[str, list[Obj]]) -> None:
    for objs in rendered.values():
        c = container(objs)
        (threads,) = [e for e in c["env"] if e["name"] == "EXITSERVE_THREADS"]
        ref = threads["valueFrom"]["resourceFieldRef"]
        assert (ref["containerName"], ref["resource"]) == (c["name"], "limits.cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_outlasts_the_drain(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    drain = float(one(objs, "ConfigMap")["data"].get("EXITSERVE_DRAIN_TIMEOUT_S", DRAIN_S))
    (c,) = spec["containers"]
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # preStop, then SIGTERM: the server stops admitting and finishes admitted work.
    assert spec["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain + 1


def dockerfile_uid(path: Path) -> int:
    users = re.findall(r"^USER\s+(\d+)", path.read_text(), re.M)
    return int(users[-1].split(":")[0])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_locked_down(rendered: dict[str, list[Obj]], overlay: str) -> None:
    spec = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == dockerfile_uid(DOCKER / "Dockerfile") != 0
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    # The one writable place, where the image points HOME.
    volumes = {v["name"]: v for v in spec["volumes"]}
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]
    assert "HOME=/tmp" in (DOCKER / "Dockerfile").read_text()
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_and_disruption_budget_target_the_pods(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    dep = one(objs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert matches(dep["spec"]["selector"]["matchLabels"], pod_labels)
    assert "replicas" not in dep["spec"]  # the HPA owns it; an apply would reset it
    hpa = one(objs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"],
    }  # fmt: skip
    pdb = one(objs, "PodDisruptionBudget")["spec"]
    assert matches(pdb["selector"]["matchLabels"], pod_labels)
    # A node drain can always evict one pod and keep the budget.
    assert hpa["minReplicas"] > pdb["minAvailable"]
    netpol = one(objs, "NetworkPolicy")["spec"]
    assert matches(netpol["podSelector"]["matchLabels"], pod_labels)
    ingress_ports = {p["port"] for rule in netpol["ingress"] for p in rule["ports"]}
    assert ingress_ports == {p["name"] for p in container(objs)["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_the_metrics_route(
    rendered: dict[str, list[Obj]], overlay: str, get_routes: set[str]
) -> None:
    objs = rendered[overlay]
    sm, svc = one(objs, "ServiceMonitor"), one(objs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports
        assert ep["path"] == "/metrics" and ep["path"] in get_routes
        assert re.fullmatch(r"\d+[sm]", ep["interval"])
    # The operator names the job after the Service: the job the alert rules select.
    alerts = (DOCKER / "alerts.yml").read_text()
    assert f'job="{svc["metadata"]["name"]}"' in alerts


def test_overlays_pick_their_image_and_device(rendered: dict[str, list[Obj]]) -> None:
    compose = load_yaml(DOCKER / "compose.yaml")
    cpu, gpu = rendered["cpu"], rendered["gpu"]
    assert container(cpu)["image"] == compose["services"]["exitserve"]["image"] == "exitserve:cpu"
    assert container(gpu)["image"] == "exitserve:cuda"
    assert one(cpu, "ConfigMap")["data"]["EXITSERVE_DEVICE"] == "cpu"
    gpu_data = one(gpu, "ConfigMap")["data"]
    assert gpu_data["EXITSERVE_DEVICE"] in ("cuda", "auto")
    assert gpu_data.get("EXITSERVE_QUANTIZATION", "auto") in ("auto", "fp16", "bf16")
    assert "nvidia.com/gpu" not in container(cpu)["resources"]["limits"]
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    tolerations = one(gpu, "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_queue_time_component_scales_on_the_adapter_metric(tmp_path: Path) -> None:
    # kustomize takes relative paths only
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays/cpu", tmp_path)],
        "components": [os.path.relpath(K8S / "components/queue-time-autoscaling", tmp_path)],
    }
    (tmp_path / "kustomization.yaml").write_text(json.dumps(kustomization))
    hpa = one(kustomize(tmp_path), "HorizontalPodAutoscaler")
    kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)
    adapter = load_yaml(K8S / "components/queue-time-autoscaling/prometheus-adapter-values.yaml")
    served = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    pods_metrics = {
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    }
    assert pods_metrics and pods_metrics <= served
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}


def test_kserve_serves_the_v2_protocol_on_the_app_port(get_routes: set[str]) -> None:
    objs = kustomize(K8S / "kserve")
    isvc, runtime = one(objs, "InferenceService"), one(objs, "ServingRuntime")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats

    (c,) = runtime["spec"]["containers"]
    assert c["name"] == "kserve-container"
    assert [p["containerPort"] for p in c["ports"]] == [PORT]
    assert c["readinessProbe"]["httpGet"]["path"] in get_routes
    assert c["readinessProbe"]["httpGet"]["port"] == PORT
    annotations = runtime["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == PORT
    assert annotations["prometheus.kserve.io/path"] in get_routes
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert all(setting_name(k) in SETTINGS for k in env)
    # The v2 routes answer to the served model's name: the InferenceService carries it.
    model_dir = ROOT / env["EXITSERVE_MODEL_DIR"].removeprefix("/app/")
    assert json.loads((model_dir / "model.json").read_text())["name"] == isvc["metadata"]["name"]
    # The container and pod-level fields are plain Kubernetes: check them as a Pod.
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"},
        "spec": {"containers": [c], "volumes": runtime["spec"]["volumes"]},
    }  # fmt: skip
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


def test_schema_validation_catches_mistakes(rendered: dict[str, list[Obj]]) -> None:
    # Guards the check itself: strict validation rejects a misspelt field.
    dep = json.loads(json.dumps(one(rendered["cpu"], "Deployment")))
    dep["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)
