"""The container images for real: Redis, two broker replicas and two agents, each in its own
container, carry checked bytes through a forward; the brokers' HEALTHCHECK turns healthy.

Needs a Docker engine and the images from `make images` (scripts/test.sh builds them);
skipped elsewhere with the reason, never in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from natter_agent.engines.native import available as native_available
from procs import free_port, server, tool
from redis_server import docker_answers

pytestmark = pytest.mark.timeout(180)
IMAGES = ("natter-broker:local", "natter-agent:local", "natter-redis:local")


# the agent image carries the native engine where the host built it (scripts/images.sh)
IMAGE_ENGINE = {"NATTER_QUIC_ENGINE": "native"} if native_available() else {}


def docker(*args: str, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {result.stderr}")
    return result.stdout.strip()


@pytest.fixture
def engine() -> None:
    reason = None
    if not docker_answers():
        reason = "no Docker engine answers (scripts/test.sh starts one where docker.io is installed)"
    elif any(
        subprocess.run(["docker", "image", "inspect", i], capture_output=True).returncode for i in IMAGES
    ):
        reason = "images missing: run `make images`"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"containers required in CI: {reason}")
        pytest.skip(reason)


class Containers:
    def __init__(self) -> None:
        self.tag = f"natter-smoke-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.names: list[str] = []

    def run(self, role: str, image: str, *args: str, env: dict[str, str] | None = None) -> str:
        name = f"{self.tag}-{role}"
        flags = ["--detach", "--name", name, "--network", "host"]
        for key, value in (env or {}).items():
            flags += ["--env", f"{key}={value}"]
        docker("run", *flags, image, *args)
        self.names.append(name)
        return name

    def wait_log(self, name: str, text: str, timeout: float = 30) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, check=False)
            for line in (logs.stdout + logs.stderr).splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if text in str(entry.get("event", "")):
                    return dict(entry)
            time.sleep(0.3)
        raise AssertionError(f"{name}: '{text}' not logged\n{docker('logs', name, check=False)}")

    def remove(self) -> None:
        for name in self.names:
            docker("rm", "--force", name, check=False)


@pytest.fixture
def containers(engine: None) -> Iterator[Containers]:
    created = Containers()
    try:
        yield created
    finally:
        created.remove()


def test_fleet_and_agents_in_containers_carry_bytes(containers: Containers) -> None:
    echo, echo_port = server("echo", "0")
    try:
        redis_port, b1, b2, m1, m2, local = (free_port() for _ in range(6))
        containers.run(
            "redis", "natter-redis:local",
            "redis-server", "--bind", "127.0.0.1", "--port", str(redis_port),
            "--save", "", "--appendonly", "no",
        )  # fmt: skip
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        for i, (port, metrics) in enumerate(((b1, m1), (b2, m2)), start=1):
            containers.run(
                f"broker{i}",
                "natter-broker:local",
                env={
                    "NATTER_LISTEN": f"127.0.0.1:{port}",
                    "NATTER_METRICS": f"127.0.0.1:{metrics}",
                    "NATTER_REDIS": redis_url,
                    "NATTER_BROKER_ID": f"r{i}",
                },
            )
        for name in (f"{containers.tag}-broker1", f"{containers.tag}-broker2"):
            containers.wait_log(name, "redis reachable")
        bob = containers.run(
            "bob",
            "natter-agent:local",
            "listen",
            env={"NATTER_NAME": "bob", "NATTER_BROKER": f"127.0.0.1:{b2}", **IMAGE_ENGINE},
        )
        containers.wait_log(bob, "registered as bob")
        alice = containers.run(
            "alice",
            "natter-agent:local",
            "forward",
            f"127.0.0.1:{local}:bob:{echo_port}",
            env={"NATTER_NAME": "alice", "NATTER_BROKER": f"127.0.0.1:{b1},127.0.0.1:{b2}", **IMAGE_ENGINE},
        )
        up = containers.wait_log(alice, "path up with bob")
        if up.get("path") == "relayed":  # the punch was slower than the relay's head start
            up = containers.wait_log(alice, "path change for bob: relayed -> direct")
        assert str(up.get("peer_endpoint", up.get("new"))).startswith("127.0.0.1:")
        containers.wait_log(f"{containers.tag}-broker2", "introduced on behalf of replica")
        assert tool("echo-check", "127.0.0.1", str(local), str(4 << 20)) == "ok"
        # the agents run as the unprivileged user, the brokers report healthy
        assert docker("exec", alice, "id", "-u") == "10001"
        deadline = time.monotonic() + 40
        status = ""
        while time.monotonic() < deadline:
            status = docker("inspect", "--format", "{{.State.Health.Status}}", f"{containers.tag}-broker1")
            if status == "healthy":
                break
            time.sleep(1)
        assert status == "healthy"
    finally:
        echo.stop()
