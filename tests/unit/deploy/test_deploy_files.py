"""Deployment files, checked structurally (no Docker engine or cluster here): they parse,
they agree with each other, and they only use what the server really exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.server.config import Settings
from service.server.config_loading import load_settings
from service.server.metrics import Metrics
from service.server.workers import RESTARTS_METRIC

ROOT = Path(__file__).resolve().parents[3]


def load(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


def exposed_metric_names() -> set[str]:
    names = {RESTARTS_METRIC + "_total"}  # the worker supervisor's
    for family in Metrics().registry.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def used_metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bclassifier_[a-z_]+\b", text))


def test_compose_serves_the_cpu_image_with_models_and_prometheus() -> None:
    compose = load("docker-compose.yml")
    services = compose["services"]
    classifier = services["classifier"]
    assert classifier["build"]["target"] == "cpu"
    assert {"50051:50051", "8000:8000", "9090:9090"} <= set(classifier["ports"])
    assert Settings.model_fields["http_port"].default == 8000
    assert "./models:/models:ro" in classifier["volumes"]
    assert "deploy" not in classifier  # the GPU reservation stays commented out
    assert "driver: nvidia" in (ROOT / "docker-compose.yml").read_text()
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = volume.split(":")[0]
        assert (ROOT / source).exists(), source
    drain = Settings.model_fields["drain_seconds"].default
    grace = Settings.model_fields["grace_seconds"].default
    assert float(classifier["stop_grace_period"].rstrip("s")) > drain + grace
    for key, value in classifier["environment"].items():  # settings the server accepts
        assert key.startswith("CLASSIFIER_")
        assert key.removeprefix("CLASSIFIER_").lower() in Settings.model_fields
        load_settings(**{key.removeprefix("CLASSIFIER_").lower(): value})


def test_prometheus_scrapes_the_classifier_metrics_port() -> None:
    config = load("deploy/prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["classifier:9090"]
    assert Settings.model_fields["metrics_port"].default == 9090


@pytest.mark.parametrize(
    "path", ["deploy/prometheus-rules.yml", "deploy/grafana/dashboards/classifier.json"]
)
def test_alerts_and_dashboard_use_only_real_metrics(path: str) -> None:
    text = (ROOT / path).read_text()
    used = used_metric_names(text)
    assert used, "no metric referenced"
    assert used <= exposed_metric_names(), used - exposed_metric_names()
    if path.endswith(".json"):
        dashboard = json.loads(text)
        assert all(p["targets"] for p in dashboard["panels"])
    else:
        rules = yaml.safe_load(text)["groups"][0]["rules"]
        assert all({"alert", "expr"} <= set(rule) for rule in rules)


def test_kubernetes_manifests_fit_together() -> None:
    docs = {
        (d["kind"], d["metadata"]["name"]): d
        for d in yaml.safe_load_all((ROOT / "deploy/k8s/classifier.yaml").read_text())
    }
    deployment = docs[("Deployment", "imgclf")]
    service = docs[("Service", "imgclf-headless")]
    hpa = docs[("HorizontalPodAutoscaler", "imgclf")]
    config = docs[("ConfigMap", "imgclf-config")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "http": 8000, "metrics": 9090}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    settings = yaml.safe_load(config["data"]["serve.yaml"])
    validated = load_settings(**settings)  # the config map is valid server settings
    assert (validated.port, validated.http_port) == (ports["grpc"], ports["http"])
    # Kubernetes kills the pod after terminationGracePeriodSeconds: drain and grace fit.
    assert validated.drain_seconds + validated.grace_seconds < pod["terminationGracePeriodSeconds"]
    # The drain lasts long enough for the readiness probe to see NOT_SERVING and the
    # endpoints to drop the pod.
    probe = container["readinessProbe"]
    assert validated.drain_seconds >= probe["periodSeconds"] * probe["failureThreshold"]
    # Connections are recycled, so pods the HPA adds get traffic from existing clients.
    assert 0 < validated.max_connection_age_seconds <= 600
    assert validated.repository_poll_seconds > 0  # the "publish without a rollout" comment
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in docs


def dockerfile_instruction(name: str, target: str, containing: str = "") -> str:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stage = text.split(f" AS {target}", 1)[1].split("\nFROM ", 1)[0]
    return next(
        line for line in stage.splitlines() if line.startswith(name + " ") and containing in line
    )


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_dockerfile_runs_the_server_and_checks_health_with_the_client(target: str) -> None:
    entrypoint = json.loads(dockerfile_instruction("ENTRYPOINT", target).split(" ", 1)[1])
    assert entrypoint == ["python", "-m", "service"]
    health = dockerfile_instruction("HEALTHCHECK", target)
    command = json.loads(health.split("CMD", 1)[1])
    assert command[:3] == ["python", "-m", "service.client"] and command[-1] == "health"
    assert dockerfile_instruction("USER", target).split()[1] == "10001:10001"
    install = dockerfile_instruction("RUN", target, containing="/wheels/*.whl")
    assert "-r /tmp/serve.lock" in install or "-r /tmp/gpu.txt" in install
    assert "--no-deps /wheels/*.whl" in install
    assert "torch" not in install.replace("'torch' not in sys.modules", "")


def test_the_scoring_image_adds_the_scoring_lock_to_the_cpu_image() -> None:
    assert "FROM cpu AS scoring" in (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(dockerfile_instruction("ENTRYPOINT", "scoring").split(" ", 1)[1])
    assert entrypoint == ["python", "-m", "service.scoring"]
    assert "-r /tmp/scoring.lock" in dockerfile_instruction("RUN", "scoring", "scoring.lock")
    assert dockerfile_instruction("USER", "scoring", "10001").split()[1] == "10001:10001"


def test_rayjob_runs_the_scoring_cli_with_the_ray_engine() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy/ray/rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:3] == ["python", "-m", "service.scoring"]
    assert entrypoint[entrypoint.index("--engine") + 1] == "ray"
    assert entrypoint[entrypoint.index("--address") + 1] == "auto"
    from service.scoring.__main__ import build_parser

    args = build_parser().parse_args(entrypoint[3:])  # every flag exists
    assert args.engine == "ray" and args.task == "localize"
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")["metadata"]["name"]
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    for group in workers:
        volumes = group["template"]["spec"]["volumes"]
        assert volumes[0]["persistentVolumeClaim"]["claimName"] == claim


K8S_FILES = ["deploy/k8s/classifier.yaml", "deploy/k8s/hpa-pending-images.yaml"]


@pytest.mark.parametrize("path", K8S_FILES)
def test_kubernetes_manifests_pass_the_schema_validator(path: str) -> None:
    import kubernetes_validate

    for doc in yaml.safe_load_all((ROOT / path).read_text()):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_queue_hpa_replaces_the_cpu_one_and_scales_on_a_served_metric() -> None:
    base = {
        (d["kind"], d["metadata"]["name"]): d
        for d in yaml.safe_load_all((ROOT / "deploy/k8s/classifier.yaml").read_text())
    }
    queue = yaml.safe_load((ROOT / "deploy/k8s/hpa-pending-images.yaml").read_text())
    cpu = base[("HorizontalPodAutoscaler", "imgclf")]
    assert queue["metadata"] == cpu["metadata"]  # applying it replaces the CPU HPA
    assert queue["spec"]["scaleTargetRef"] == cpu["spec"]["scaleTargetRef"]
    (metric,) = queue["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in exposed_metric_names()
    (rule,) = yaml.safe_load((ROOT / "deploy/k8s/prometheus-adapter-rules.yaml").read_text())
    assert rule["name"]["as"] == name and name in rule["seriesQuery"]
