"""The alert rules and the Grafana dashboard: promtool checks and unit-tests the rules, and
every metric they name is one that a running broker or agent exports (a live scrape)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from libconfig import config
from natter import Broker, Client
from natter.agentstatus import AgentMetrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "natter-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "natter-alerts-test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "natter-dashboard.json"
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")

pytestmark = pytest.mark.timeout(120)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI (./scripts/setup.sh installs Debian's prometheus)")
        pytest.skip("promtool is not installed (./scripts/setup.sh installs Debian's prometheus)")
    return found


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [tool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True
    )
    assert test.returncode == 0, test.stdout + test.stderr


def family(name: str) -> str:
    """A sample's metric family: ``natter_broker_keepalives_total`` -> ``natter_broker_keepalives``."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def names_in(text: str) -> set[str]:
    """Metric families a PromQL expression (or several) uses."""
    return {family(name) for name in re.findall(r"\b(natter_[a-z_]+|up)\b", text)}


async def scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    body = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return body.decode()


def exported(text: str) -> set[str]:
    return {family(name) for name in re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE)}


async def test_every_metric_in_the_rules_and_the_dashboard_is_exported() -> None:
    broker = Broker(config(broker_addr="127.0.0.1:0", metrics_addr="127.0.0.1:0"))
    await broker.start()
    assert broker.address is not None and broker.metrics_address is not None
    addr = f"127.0.0.1:{broker.address.port}"
    bob = Client(config(client_user="bob", broker_addr=addr))
    alice = Client(config(client_user="alice", broker_addr=addr))
    metrics = AgentMetrics(alice)
    try:
        await bob.listen()
        await alice.forward("127.0.0.1:0", "bob", ":53", proto="udp")
        await alice.connect("bob")
        await metrics.start("127.0.0.1:0")
        assert metrics.address is not None
        available = exported(await scrape(broker.metrics_address[1]))
        available |= exported(await scrape(metrics.address[1]))
    finally:
        await metrics.close()
        await alice.close()
        await bob.close()
        await broker.close()
    rules = RULES.read_text()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    dashboard = " ".join(target["expr"] for panel in panels for target in panel["targets"])
    used = names_in(rules) | names_in(dashboard)
    missing = sorted(used - available - PROMETHEUS_OWN)
    assert not missing, f"named in the rules or the dashboard but exported by nobody: {missing}"
    assert {"natter_broker_ready", "natter_broker_redis_no_receiver", "natter_agent_udp_dropped"} <= used
