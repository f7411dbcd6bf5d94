"""The fleet load test's coordinator: a Redis Cluster, three broker replicas on it, and
simulated agents (fleetswarm.py workers) through a registration storm, a steady state
with connects between random pairs, then a replica SIGKILLed and a Redis master killed.
Used by bench/fleet_bench.py (20,000 agents at the real keepalive interval) and by a
bounded integration test.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procs import NATTER, free_port
from redis_cluster import RedisCluster

SWARM = Path(__file__).with_name("fleetswarm.py")
PER_WORKER = 5000  # sockets per process stay well under the open-file limit


@dataclass
class Broker:
    replica: str
    port: int
    metrics: int
    proc: subprocess.Popen[bytes]

    def cpu(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/readyz", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def metric(self, name: str) -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=2) as answer:
                text = answer.read().decode()
        except OSError:
            return 0.0
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@dataclass
class Report:
    agents: int
    interval: float
    rows: list[tuple[str, str]] = field(default_factory=list)
    registered: int = 0
    storm_seconds: float = 0.0  # until the brokers counted every agent
    storm_p50: float = 0.0
    storm_p99: float = 0.0
    rereg: dict[str, tuple[int, float, float, float]] = field(default_factory=dict)  # n, p50, p99, max
    connects: dict[str, int] = field(default_factory=dict)
    failed_errors: list[list[str]] = field(default_factory=list)
    cpu_per_1000: float = 0.0
    redis_bytes_per_agent: float = 0.0
    redis_commands_per_agent_s: float = 0.0

    def row(self, what: str, value: str) -> None:
        self.rows.append((what, value))
        print(f"  {what:<62} {value}", flush=True)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _redis_totals(cluster: RedisCluster) -> tuple[int, int]:
    """(used memory, commands processed) over the live masters."""
    memory = commands = 0
    for node in cluster.nodes:
        if node.proc.poll() is not None or cluster.cli(node, "role").split("\n")[0] != "master":
            continue
        info = dict(line.split(":", 1) for line in cluster.cli(node, "info").splitlines() if ":" in line)
        memory += int(info.get("used_memory", 0))
        commands += int(info.get("total_commands_processed", 0))
    return memory, commands


def run(agents: int, interval: float, connect_rate: float, *, settle: float | None = None) -> Report:
    """The whole scenario; ``settle`` is how long each fault is given (default two
    keepalive intervals and 10 s)."""
    settle = settle if settle is not None else 2 * interval + 10
    report = Report(agents, interval)
    workdir = Path(tempfile.mkdtemp(prefix="natter-fleet-load-"))
    cluster = RedisCluster().start()
    brokers: list[Broker] = []
    workers: list[subprocess.Popen[str]] = []
    try:
        for i in (1, 2, 3):
            port, metrics = free_port(), free_port()
            argv = [
                NATTER, "broker", "--listen", f"127.0.0.1:{port}", "--redis", cluster.url,
                "--broker-id", f"r{i}", "--ip-rate", "10000000", "--keepalive", f"{interval:g}",
                "--ttl", f"{3 * interval:g}", "--metrics", f"127.0.0.1:{metrics}", "--log-level", "error",
            ]  # fmt: skip
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            brokers.append(Broker(f"r{i}", port, metrics, proc))
        _wait(lambda: all(b.ready() for b in brokers), 30, "brokers ready")
        memory_before, _ = _redis_totals(cluster)
        names = ",".join(f"127.0.0.1:{b.port}" for b in brokers)
        for first in range(0, agents, PER_WORKER):
            count = min(PER_WORKER, agents - first)
            argv = [
                sys.executable, str(SWARM), "worker", "--first", str(first), "--count", str(count),
                "--agents", str(agents), "--brokers", names, "--interval", f"{interval:g}",
                "--duration", "3600", "--connect-rate", f"{connect_rate * count / agents:g}",
                "--connect-after", "3600", "--out", str(workdir / f"w{first}.json"),
            ]  # fmt: skip
            workers.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        started = time.time()
        # the storm: everyone registers at once; wait until the brokers count them all
        storm_max = max(60.0, agents / 50)
        _wait(lambda: sum(b.metric("natter_broker_active_peers") for b in brokers) >= agents, storm_max, "")
        report.storm_seconds = time.time() - started
        time.sleep(interval)  # the first keepalives after the storm
        for worker in workers:
            worker.send_signal(signal.SIGUSR1)  # connects between random pairs from now on
        memory_after, commands_before = _redis_totals(cluster)
        cpu_before = [b.cpu() for b in brokers]
        window_start = time.monotonic()
        time.sleep(2 * interval)  # steady state: keepalives and connects
        window = time.monotonic() - window_start
        _, commands_after = _redis_totals(cluster)
        cpu = sum(b.cpu() - c for b, c in zip(brokers, cpu_before, strict=True))
        killed_replica = time.time()
        brokers[0].proc.kill()  # SIGKILL: no goaway, its agents notice the silence
        time.sleep(settle)
        victim = cluster.master_of_slot(cluster.keyslot("natter:bus:r2"))
        killed_redis = time.time()
        cluster.kill(victim)
        time.sleep(settle)
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=120)
        outputs = [workdir / f"w{first}.json" for first in range(0, agents, PER_WORKER)]
        results = [json.loads(path.read_text()) for path in outputs]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        for broker in brokers:
            if broker.proc.poll() is None:
                broker.proc.kill()
            broker.proc.wait()
        cluster.close()
    _summarise(report, results, started, killed_replica, killed_redis)
    report.cpu_per_1000 = cpu / window / (agents / 1000)
    report.redis_bytes_per_agent = (memory_after - memory_before) / agents
    report.redis_commands_per_agent_s = (commands_after - commands_before) / window / agents
    report.row(
        "broker CPU per 1,000 agents (steady state, all replicas)", f"{report.cpu_per_1000 * 1000:.1f} ms/s"
    )
    report.row("Redis memory per agent (masters)", f"{report.redis_bytes_per_agent:.0f} bytes")
    report.row("Redis commands per agent per second (masters)", f"{report.redis_commands_per_agent_s:.4f}")
    return report


def _summarise(report: Report, results: list[dict[str, Any]], started: float, *kills: float) -> None:
    everyone = [agent for result in results for agent in result["agents"]]
    firsts = [agent["ups"][0][0] - started for agent in everyone if agent["ups"]]
    report.registered = len(firsts)
    report.storm_p50, report.storm_p99 = _quantile(firsts, 0.5), _quantile(firsts, 0.99)
    report.row("agents registered in the storm", f"{report.registered} of {report.agents}")
    report.row("registration storm: until the brokers counted every agent", f"{report.storm_seconds:.1f} s")
    report.row(
        "registration storm: time to registered, p50 / p99",
        f"{report.storm_p50:.2f} / {report.storm_p99:.2f} s",
    )
    for label, at, until in (
        ("replica SIGKILLed", kills[0], kills[1]),
        ("Redis master killed", kills[1], float("inf")),
    ):
        times = []
        for agent in everyone:
            lost = [t for t, _ in agent["losses"] if at <= t < until]
            if lost:
                back = [t for t, _ in agent["ups"] if t >= lost[0]]
                times.append((back[0] if back else float("inf")) - at)
        finite = [t for t in times if t != float("inf")]
        n = len(times)
        p50, p99 = _quantile(times, 0.5), _quantile(times, 0.99)
        worst = max(finite) if finite else float("nan")
        report.rereg[label] = (n, p50, p99, worst)
        never = n - len(finite)
        report.row(
            f"{label}: agents that re-registered, p50 / p99 / max",
            f"{n} ({never} never), {p50:.2f} / {p99:.2f} / {worst:.2f} s"
            f" (p99 {p99 / report.interval:.2f} keepalive intervals)",
        )
    outcomes: dict[str, int] = {}
    for result in results:
        for connect in result["connects"]:
            outcomes[connect["outcome"]] = outcomes.get(connect["outcome"], 0) + 1
            if connect["outcome"] == "failed":
                report.failed_errors.append(connect["errors"])
    report.connects = outcomes
    report.row(
        "connects: first try / lost but healed by retry / failed",
        f"{outcomes.get('ok', 0)} / {outcomes.get('healed', 0)} / {outcomes.get('failed', 0)}",
    )


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    if what:
        raise RuntimeError(f"not within {timeout:g} s: {what}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
