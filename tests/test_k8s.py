"""The Kubernetes and KServe manifests, rendered by kubectl kustomize, hold the service's own invariants."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.config import Settings
from tests.conftest import ROOT

OVERLAYS = ["development", "production"]
RSS_MB = 192.4  # reports/bench-serve.json: after warm-up and 5,000 requests


def tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(found).is_file(), f"{name} is missing: pip install -r requirements-dev.txt"
    return found


def render(path: str) -> list[dict]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(resources: list[dict], kind: str) -> dict:
    [found] = [r for r in resources if r["kind"] == kind]
    return found


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2**20


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, render(f"deploy/k8s/overlays/{request.param}")


def test_every_overlay_has_the_full_set_of_resources(overlay):
    name, resources = overlay
    kinds = sorted(r["kind"] for r in resources)
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace", "NetworkPolicy",
                "PodDisruptionBudget", "Service"]  # fmt: skip
    assert kinds == sorted(expected + (["ServiceMonitor"] if name == "production" else []))
    namespace = one(resources, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(r["metadata"].get("namespace") == namespace["metadata"]["name"] for r in resources if r is not namespace)


def test_probes_point_at_the_service_endpoints(overlay):
    _, resources = overlay
    [serve] = one(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    port = {p["name"]: p["containerPort"] for p in serve["ports"]}["http"]
    assert port == Settings.from_env().port
    assert serve["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert serve["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert serve["startupProbe"]["httpGet"]["path"] == "/health"
    startup = serve["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60  # model load + warm-up, with room


def test_pods_run_locked_down(overlay):
    _, resources = overlay
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["initContainers"] + pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert "/tmp" in mounts  # the read-only root still has a writable /tmp
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all("emptyDir" in volumes[m["name"]] for c in pod["containers"] for m in c["volumeMounts"])
    [serve] = pod["containers"]
    assert {m["mountPath"]: m.get("readOnly") for m in serve["volumeMounts"]}["/models"] is True


def test_graceful_termination_outlasts_the_service_own(overlay):
    _, resources = overlay
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    [serve] = pod["containers"]
    graceful = int(env_of(serve)["GRACEFUL_TIMEOUT"]["value"])
    pre_stop = int(serve["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + graceful
    assert graceful >= Settings.from_env().graceful_timeout


def test_threads_and_concurrency_follow_the_cpu_limit(overlay):
    _, resources = overlay
    [serve] = one(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    resources_ = serve["resources"]
    assert resources_["requests"] == resources_["limits"]  # Guaranteed QoS: per-pod throughput is predictable
    limit = cpus(resources_["limits"]["cpu"])
    env = env_of(serve)
    assert int(env["WORKERS"]["value"]) * int(env["ORT_THREADS"]["value"]) <= limit
    field = env["INFERENCE_CONCURRENCY"]["valueFrom"]["resourceFieldRef"]
    assert field["resource"] == "limits.cpu" and field["containerName"] == serve["name"]
    assert limit / cpus(field["divisor"]) == 2 * limit  # two in flight per CPU, the service's own default
    assert mebibytes(resources_["limits"]["memory"]) >= 2 * RSS_MB


def test_production_sizing_matches_compose():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["serve"]
    limits = compose["deploy"]["resources"]["limits"]
    [serve] = one(render("deploy/k8s/overlays/production"), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert cpus(serve["resources"]["limits"]["cpu"]) == float(limits["cpus"])
    assert mebibytes(serve["resources"]["limits"]["memory"]) >= mebibytes(limits["memory"])
    assert int(compose["environment"]["INFERENCE_CONCURRENCY"]) == 2 * float(limits["cpus"])


def test_selectors_and_references_line_up(overlay):
    name, resources = overlay
    deployment = one(resources, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one(resources, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(resources, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    hpa = one(resources, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    config = one(resources, "ConfigMap")
    [fetch] = deployment["spec"]["template"]["spec"]["initContainers"]
    assert fetch["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]  # hashed: new model, rollout
    assert {"MODEL_URL", "MODEL_SHA256", "MODEL_VERSION"} <= config["data"].keys()
    assert fetch["command"] == ["python", "-m", "server.fetch_model"]
    if name == "production":
        monitor = one(resources, "ServiceMonitor")["spec"]
        assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
        assert monitor["endpoints"][0]["path"] == "/metrics"
        assert all("@sha256:" in c["image"] for c in deployment["spec"]["template"]["spec"]["containers"])


def test_production_replicas_share_one_feedback_store_from_a_secret():
    """Feedback must not depend on which pod answers: every replica gets the same PostgreSQL URL, from a Secret,
    and the NetworkPolicy lets it out to PostgreSQL's port."""
    resources = render("deploy/k8s/overlays/production")
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    [serve] = [c for c in pod["containers"] if c["name"] == "serve"]
    source = env_of(serve)["FEEDBACK_DB"]["valueFrom"]["secretKeyRef"]
    assert source == {"name": "catsdogs-feedback-db", "key": "url"}
    egress = one(resources, "NetworkPolicy")["spec"]["egress"]
    assert {"port": 5432, "protocol": "TCP"} in [port for rule in egress for port in rule["ports"]]
    assert not any(r["kind"] == "Secret" for r in resources)  # the operator's, never committed


def test_kserve_inference_service_is_a_v2_custom_predictor():
    [service] = render("deploy/kserve")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    predictor = service["spec"]["predictor"]
    [container] = predictor["containers"]
    env = env_of(container)
    assert container["name"] == "kserve-container" and container["ports"][0]["containerPort"] == 8080
    assert env["PORT"]["value"] == "8080" and env["MODEL_PATH"]["value"].startswith("/mnt/models/")
    assert env["STORAGE_URI"]["value"].startswith("https://")
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "@sha256:" in container["image"]


def test_kubernetes_validate_strict_accepts_every_rendering(tmp_path):
    files = []
    for path in ["deploy/k8s/base", *(f"deploy/k8s/overlays/{o}" for o in OVERLAYS), "deploy/kserve"]:
        out = tmp_path / (path.replace("/", "-") + ".yaml")
        out.write_text(yaml.safe_dump_all(render(path)))
        files.append(str(out))
    result = subprocess.run([tool("kubernetes-validate"), "--strict", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = {line.split("kind ")[1].split(" ")[0] for line in result.stdout.splitlines() if "Couldn't find" in line}
    assert skipped == {"ServiceMonitor", "InferenceService"}  # CRDs: no schema, so not validated (docs/kubernetes.md)
