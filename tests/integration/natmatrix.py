"""One cell of the NAT matrix: alice behind one kind of NAT, bob behind another, a broker
(with its probe port) on the "internet"; bring a forward up and report its path.

Used by tests/integration/test_nat_matrix.py (asserts) and bench/nat_matrix.py (prints).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from labscene import Scene
from natlab import FULL_CONE_PORT, INET_IP, NatLab
from netcheck import digest_of_pattern
from procs import tool

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
    with NatLab(kind_a=kind_a, kind_b=kind_b) as lab, Scene(lab) as scene:
        broker = scene.broker(10000, "-probe", f"{INET_IP}:10001")
        sink_port = scene.service("sink")
        fixed_port = ("-udp-port", str(FULL_CONE_PORT))
        bob = scene.agent("bob", "bob", 10000, *fixed_port, "-listen")
        bob.wait_log(lambda e: "seen_by_probe" in e, timeout=20)
        broker.wait_log(lambda e: e.get("event") == "registered" and e.get("nat") is not None, timeout=20)
        alice = scene.agent("alice", "alice", 10000, *fixed_port, f"8030:bob:{sink_port}")
        started = _stamp(alice.wait_event("agent started"))
        up = alice.wait_log(lambda e: "path up with bob" in str(e.get("event")), timeout=40)
        reply = tool("send", "127.0.0.1", "8030", str(size), prefix=lab.prefix("alice"))
        ok = reply.split() == [str(size), digest_of_pattern(size)]
        return CellResult(str(up["path"]), _stamp(up) - started, ok)
