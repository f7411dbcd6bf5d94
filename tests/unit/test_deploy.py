"""Deployment files checked against the code: every Kubernetes manifest validates (offline
schemas), the kustomization renders, the fleet's essentials (externalTrafficPolicy: Local,
probes, preStop) are present, and compose and manifests use only images, ports, variables
and arguments that natter really has."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from natter import cli, options
from natter_broker.http import HealthServer

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
IMAGES = {"natter-broker", "natter-agent", "natter-redis"}
K8S_VERSION = "1.32.0"
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding"}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[dict[str, Any]]:
    """A small kustomize: resources, namespace, images and labels (what natter's files use)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = directory / resource
        docs += render(path) if path.is_dir() else load_all(path)
    docs = copy.deepcopy(docs)
    for doc in docs:
        if "namespace" in spec and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = spec["namespace"]
        for group in spec.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(group["pairs"])
        for container in containers(doc):
            for image in spec.get("images", []):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = (
                        f"{image.get('newName', image['name'])}:{image.get('newTag', 'latest')}"
                    )
    return docs


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(pod.get("containers", []))


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates(path: Path) -> None:
    for doc in load_all(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_overlay_renders_and_validates() -> None:
    docs = render(K8S / "overlays" / "example")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [
        ("Deployment", "natter-broker"),
        ("Service", "natter-broker"),
        ("Service", "natter-broker-metrics"),
        ("PodDisruptionBudget", "natter-broker"),
        ("HorizontalPodAutoscaler", "natter-broker"),
        ("NetworkPolicy", "natter-broker"),
        ("StatefulSet", "natter-redis"),
        ("Deployment", "natter-agent-alice"),
        ("Namespace", "natter"),
    ]:
        assert expected in kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "natter"
    assert all(not c["image"].endswith(":local") for d in docs for c in containers(d))
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "kustomize", str(K8S / "overlays" / "example")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rendered = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out) if d}
        assert rendered == kinds


def test_cluster_overlay_renders_and_validates() -> None:
    """The fleet on a Redis Cluster: the same brokers, six cluster nodes, the Job that
    creates the cluster, and one node's URL in the Secret."""
    docs = render(K8S / "overlays" / "redis-cluster")
    named = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert ("Deployment", "natter-broker") in named and ("StatefulSet", "natter-redis") not in named
    nodes = named[("StatefulSet", "natter-redis-cluster")]
    assert nodes["spec"]["replicas"] == 6
    args = containers(nodes)[0]["args"]
    assert args[args.index("--cluster-enabled") + 1] == "yes"
    assert ("Job", "natter-redis-cluster-create") in named
    url = named[("Secret", "natter-redis")]["stringData"]["url"]
    assert url.startswith("redis://natter-redis-cluster-0.natter-redis-cluster:6379")
    policy = named[("NetworkPolicy", "natter-broker")]
    allowed = [rule for rule in policy["spec"]["egress"] if "to" in rule]
    labels = nodes["spec"]["template"]["metadata"]["labels"]
    assert any(
        all(labels.get(k) == v for k, v in peer.get("podSelector", {}).get("matchLabels", {}).items())
        for rule in allowed
        for peer in rule["to"]
    ), "the brokers' NetworkPolicy must let them reach the cluster's nodes"


def by_kind(kind: str, name: str) -> dict[str, Any]:
    for doc in render(K8S / "base"):
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"{kind}/{name} missing from the base")


def test_broker_service_keeps_client_source_addresses() -> None:
    service = by_kind("Service", "natter-broker")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # SNAT would break punching
    ports = {(p["port"], p["protocol"], p["targetPort"]) for p in service["spec"]["ports"]}
    # UDP, and TCP beside it for networks that block UDP (a mixed-protocol LoadBalancer)
    assert ports == {
        (10000, "UDP", "rendezvous"),
        (10000, "TCP", "rendezvous-tcp"),
        (443, "TCP", "rendezvous-tcp"),
    }
    deployment = by_kind("Deployment", "natter-broker")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    named = {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}
    assert named["rendezvous"] == (10000, "UDP") and named["rendezvous-tcp"] == (10000, "TCP")
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["NATTER_TLS_CERT"].startswith("/etc/natter/tls/") and "/etc/natter/tls" in mounts


def test_broker_deployment_probes_and_shutdown() -> None:
    deployment = by_kind("Deployment", "natter-broker")
    assert deployment["spec"]["replicas"] >= 3
    pod = deployment["spec"]["template"]["spec"]
    assert pod["affinity"]["podAntiAffinity"]
    (broker,) = pod["containers"]
    assert broker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert broker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert broker["lifecycle"]["preStop"]
    assert pod["terminationGracePeriodSeconds"] > 5
    assert broker["resources"]["requests"] and broker["resources"]["limits"]


def test_probe_paths_exist_in_the_health_server() -> None:
    server = HealthServer(lambda: True, lambda: b"")
    for path in (b"/readyz", b"/healthz", b"/metrics"):
        assert server._route(b"GET", path)[0].startswith("200")


def environment_of(container: dict[str, Any]) -> dict[str, str]:
    out = {}
    for item in container.get("env", []):
        out[item["name"]] = item.get("value", "from-elsewhere")
    return out


def check_invocation(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The arguments and NATTER_* variables parse with the real CLI parser."""
    unknown = {k for k in env if k.startswith("NATTER_")} - set(options.ENVIRONMENT.values())
    assert not unknown, f"variables the CLI does not read: {unknown}"
    with monkeypatch.context() as patch:
        for key, value in env.items():
            if key == "NATTER_REDIS" and value == "from-elsewhere":
                value = "redis://redis:6379/0"
            if key == "NATTER_BROKER_ID" and value == "from-elsewhere":
                value = "pod-name"
            if key == "NATTER_FLEET_SECRET" and value == "from-elsewhere":
                value = "a-fleet-secret-from-a-kubernetes-secret"
            if value.startswith("$(POD_IP)"):
                value = "10.1.2.3" + value.removeprefix("$(POD_IP)")
            patch.setenv(key, value)
        return options.parse(args)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_manifests_use_only_what_the_code_has(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(K8S / "base") + [
        d for d in render(K8S / "overlays" / "example") if "agent" in d["metadata"]["name"]
    ]
    for doc in docs:
        for container in containers(doc):
            image = container["image"].split(":")[0].rsplit("/", 1)[-1]
            assert image in IMAGES or image in {"broker", "agent", "redis"}, container["image"]
            if "redis" in image:
                continue
            env = environment_of(container)
            args = check_invocation(list(container.get("args", [])), env, monkeypatch)
            declared = {(p["containerPort"], p["protocol"]) for p in container.get("ports", [])}
            if args.command == "broker":
                assert (port_of(args.server), "UDP") in declared
                assert (port_of(args.mesh_listen), "UDP") in declared
                assert (port_of(args.metrics), "TCP") in declared
                probe = container["readinessProbe"]["httpGet"]["port"]
                assert probe in {
                    p["name"] for p in container["ports"] if p["containerPort"] == port_of(args.metrics)
                }
            else:
                for spec in args.forwards:
                    assert (port_of(spec.local), "TCP") in declared


def test_compose_uses_only_what_the_code_has(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    commands = set()
    for name, service in compose["services"].items():
        assert service["image"].split(":")[0] in IMAGES, name
        if "build" in service:
            assert (ROOT / "docker" / Path(service["build"]["dockerfile"]).name).exists()
        if service["image"].startswith("natter-redis"):
            continue
        default = ["broker"] if service["image"].startswith("natter-broker") else ["listen"]
        args = check_invocation(
            list(service.get("command", default)), dict(service.get("environment", {})), monkeypatch
        )
        commands.add(args.command)
    assert commands == {"broker", "listen", "forward"}


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(cli.sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, *sorted(map(str, (ROOT / "docker").glob("*.Dockerfile")))], capture_output=True
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
