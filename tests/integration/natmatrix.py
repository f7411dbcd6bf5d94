"""One cell of the NAT matrix: alice behind one kind of NAT, bob behind another, a broker
(with its probe port) on the "internet"; bring a forward up and report its path.

Used by tests/integration/test_nat_matrix.py (asserts) and bench/nat_matrix.py (prints).
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

from natlab import FULL_CONE_PORT, INET_IP, NatLab
from netcheck import digest_of_pattern
from procs import Proc, natter, server, tool

KINDS = ("none", "full", "restricted", "symmetric")


def expected_path(kind_a: str, kind_b: str) -> str:
    """relayed for two symmetric NATs; against one, a direct path found by the birthday
    method ("predicted"); direct otherwise."""
    symmetric = [kind_a, kind_b].count("symmetric")
    return {0: "direct", 1: "predicted", 2: "relayed"}[symmetric]


@dataclass
class CellResult:
    path: str
    setup_s: float  # alice's start to the tunnel being up
    bytes_ok: bool


def _stamp(entry: dict[str, object]) -> float:
    return datetime.datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()


def run_cell(kind_a: str, kind_b: str, size: int = 1 << 20) -> CellResult:
    procs: list[Proc] = []
    with NatLab(kind_a=kind_a, kind_b=kind_b) as lab:
        try:
            inet = lab.prefix("inet")
            broker = natter("-server", f"{INET_IP}:10000", "-probe", f"{INET_IP}:10001", prefix=inet)
            procs.append(broker)
            broker.wait_event("broker listening")
            sink, sink_port = server("sink", "0", prefix=lab.prefix("bob"))
            procs.append(sink)
            agent = ["-broker", f"{INET_IP}:10000", "-udp-port", str(FULL_CONE_PORT)]
            bob = natter("-name", "bob", *agent, "-listen", prefix=lab.prefix("bob"))
            procs.append(bob)
            bob.wait_log(lambda e: "seen_by_probe" in e, timeout=20)
            broker.wait_log(lambda e: e.get("event") == "registered" and e.get("nat") is not None, timeout=20)
            alice = natter("-name", "alice", *agent, f"8030:bob:{sink_port}", prefix=lab.prefix("alice"))
            procs.append(alice)
            started = _stamp(alice.wait_event("agent started"))
            up = alice.wait_log(lambda e: "path up with bob" in str(e.get("event")), timeout=40)
            reply = tool("send", "127.0.0.1", "8030", str(size), prefix=lab.prefix("alice"))
            ok = reply.split() == [str(size), digest_of_pattern(size)]
            return CellResult(str(up["path"]), _stamp(up) - started, ok)
        finally:
            for proc in reversed(procs):
                proc.stop()
            time.sleep(0.1)
