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
    path: str  # where the tunnel settled
    first_path: str  # where it started (relayed first while the punch goes on)
    setup_s: float  # alice's start to the tunnel being up
    first_byte_s: float  # alice's start to a byte's echo through the forward
    bytes_ok: bool


def _stamp(entry: dict[str, object]) -> float:
    return datetime.datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()


def run_cell(kind_a: str, kind_b: str, size: int = 1 << 20, *, cgnat: bool = False) -> CellResult:
    """``cgnat``: both home NATs behind one carrier-grade NAT (no hairpinning)."""
    with NatLab(kind_a=kind_a, kind_b=kind_b, cgnat=cgnat) as lab, Scene(lab) as scene:
        broker = scene.broker(10000, "-probe", f"{INET_IP}:10001")
        echo_port = scene.service("echo")
        sink_port = scene.service("sink")
        fixed_port = ("-udp-port", str(FULL_CONE_PORT))
        bob = scene.agent("bob", "bob", 10000, *fixed_port, "-listen")
        bob.wait_log(lambda e: "seen_by_probe" in e, timeout=20)
        broker.wait_log(lambda e: e.get("event") == "registered" and e.get("nat") is not None, timeout=20)
        alice = scene.agent(
            "alice", "alice", 10000, *fixed_port, f"8029:bob:{echo_port}", f"8030:bob:{sink_port}"
        )
        first_byte = float(tool("first-byte", "127.0.0.1", "8029", "30", prefix=lab.prefix("alice")))
        started = _stamp(alice.wait_event("agent started"))
        up = alice.wait_kind("tunnel_up", peer="bob", timeout=40)
        settled = str(up["path"])
        expected = expected_path(kind_a, kind_b) if not cgnat else "relayed"
        if settled != expected:  # started on the relay: the punch goes on
            moved = alice.wait_kind("path_changed", peer="bob", new_kind=expected, timeout=20)
            settled = str(moved["new_kind"])
        reply = tool("send", "127.0.0.1", "8030", str(size), prefix=lab.prefix("alice"))
        ok = reply.split() == [str(size), digest_of_pattern(size)]
        return CellResult(settled, str(up["path"]), _stamp(up) - started, first_byte - started, ok)
