"""deploy/kubernetes: valid against the Kubernetes API's schemas, and consistent with the
server's own settings, routes and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bge_trio import metrics
from bge_trio.api.openapi import Limits, document
from bge_trio.cli import build_parser
from bge_trio.config import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES = "1.32.0"  # the first release where preStop's sleep action is GA


def _documents() -> list[dict[str, Any]]:
    return [d for p in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]


def _kind(kind: str) -> dict[str, Any]:
    (found,) = [d for d in _documents() if d["kind"] == kind]
    return found


@pytest.mark.parametrize(
    "manifest", _documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_every_manifest_is_valid_against_the_kubernetes_schema(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, KUBERNETES, strict=True)


def _container() -> dict[str, Any]:
    (container,) = _kind("Deployment")["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = container
    return found


def test_the_container_settings_are_ones_the_server_accepts() -> None:
    container = _container()
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = Settings.from_env(env)  # raises on a value the server would refuse
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert settings.model == mounts["model"]
    assert str(settings.cache_dir) == mounts["probe-cache"]
    (port,) = container["ports"]
    assert port["containerPort"] == args.port
    annotations = _kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.port)


def test_requests_equal_limits_so_the_budget_is_the_pods() -> None:
    resources = _container()["resources"]
    assert resources["requests"] == resources["limits"]
    assert set(resources["limits"]) >= {"cpu", "memory"}


def test_probes_use_the_servers_routes_and_the_startup_probe_covers_the_memory_probe() -> None:
    container = _container()
    paths = document(Limits(1, 1, 1))["paths"]
    ready, live, startup = (
        container[k] for k in ("readinessProbe", "livenessProbe", "startupProbe")
    )
    assert ready["httpGet"]["path"] == "/health"
    assert live["httpGet"]["path"] == "/live"
    assert startup["httpGet"]["path"] == "/health"
    for probe in (ready, live, startup):
        assert probe["httpGet"]["path"] in paths
        assert probe["httpGet"]["port"] == container["ports"][0]["name"]
    # BGE-M3's cold start with a probe-cache miss: minutes on a few cores
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_the_grace_period_covers_pre_stop_and_the_drain() -> None:
    pod = _kind("Deployment")["spec"]["template"]["spec"]
    args = build_parser().parse_args(_container()["args"])
    pre_stop = _container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + args.graceful_timeout + 5


def test_the_service_and_autoscaler_point_at_the_deployment_and_a_real_metric() -> None:
    deployment, service, hpa = (
        _kind("Deployment"),
        _kind("Service"),
        _kind("HorizontalPodAutoscaler"),
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == _container()["ports"][0]["name"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    (queued,) = metrics.QUEUED_ITEMS.describe()
    assert metric["pods"]["metric"]["name"] == queued.name
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in deployment["spec"]["template"]["spec"]["volumes"]
    }
    assert claims == {
        d["metadata"]["name"] for d in _documents() if d["kind"] == "PersistentVolumeClaim"
    }
