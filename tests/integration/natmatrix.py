"""One cell of the NAT matrix: alice behind one kind of NAT, bob behind another, a broker
(with its probe port) on the "internet"; bring a forward up and report its path. Also the
other networks people sit on (NETWORKS): a shared CGNAT, UDP blocked, only a proxy out,
IPv6-only, dual-stack.

Used by tests/integration/test_nat_matrix.py (asserts) and bench/nat_matrix.py (prints).
"""

from __future__ import annotations

import datetime
import tempfile
from dataclasses import dataclass
from pathlib import Path

from labscene import Scene
from natlab import FULL_CONE_PORT, INET_IP, INET_IP6, NatLab
from netcheck import digest_of_pattern
from procs import Proc, natter, tool

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


@dataclass(frozen=True)
class Network:
    """One of the networks people sit on, beyond the NAT matrix (both homes behind
    port-restricted NATs unless said)."""

    name: str
    expected: str  # where the tunnel settles
    cgnat: bool = False  # both homes behind one carrier-grade NAT
    family: str = "v4"  # NatLab.family
    blocked: str = ""  # at alice's router: "udp" (UDP dropped), "proxy" (all but a proxy)


NETWORKS = (
    Network("both homes behind one CGNAT (no hairpin)", "relayed", cgnat=True),
    Network("UDP blocked at alice's side", "relayed", blocked="udp"),
    Network("only an HTTP CONNECT proxy out of alice's", "relayed", blocked="proxy"),
    Network("IPv6-only, stateful firewalls", "direct", family="v6"),
    Network("dual-stack", "direct", family="dual"),
)
PROXY = "http://192.168.1.1:8888"  # tinyproxy on natA's LAN side


def proxy_config(directory: Path) -> Path:
    """tinyproxy on natA's LAN side: CONNECT to the broker's port only, nothing cached."""
    config = directory / "tinyproxy.conf"
    config.write_text(
        "Port 8888\nListen 192.168.1.1\nTimeout 60\nMaxClients 20\nAllow 192.168.1.0/24\n"
        "ConnectPort 10000\nLogLevel Info\n"
    )
    return config


def block(lab: NatLab, scene: Scene, how: str) -> list[str]:
    """Block alice's network as ``how`` says; returns what her command needs (env)."""
    if how == "udp":
        lab.sh("natA", "iptables", "-I", "FORWARD", "-i", "lan", "-p", "udp", "-j", "DROP")
        return []
    lab.sh("natA", "iptables", "-I", "FORWARD", "-i", "lan", "-j", "DROP")
    config = proxy_config(Path(tempfile.mkdtemp(prefix="natter-proxy-")))
    scene.add(Proc(["tinyproxy", "-d", "-c", str(config)], prefix=lab.prefix("natA")))
    return ["env", f"HTTPS_PROXY={PROXY}"]


def run_cell(kind_a: str, kind_b: str, size: int = 1 << 20, *, network: Network | None = None) -> CellResult:
    """A forward from alice to bob through their NATs (or through ``network``): where its
    tunnel starts and settles, alice's start to its tunnel and to a byte's echo."""
    net = network or Network("", expected_path(kind_a, kind_b))
    with NatLab(kind_a=kind_a, kind_b=kind_b, cgnat=net.cgnat, family=net.family) as lab, Scene(lab) as scene:
        v6 = net.family == "v6"
        where = f"[{INET_IP6}]" if v6 else INET_IP
        probe = [] if v6 else ["-probe", f"{INET_IP}:10001"]
        broker = scene.add(natter("-server", f"{where}:10000", *probe, prefix=lab.prefix("inet")))
        broker.wait_event("broker listening")
        env = block(lab, scene, net.blocked) if net.blocked else []
        echo_port = scene.service("echo")
        sink_port = scene.service("sink")
        fixed_port = ("-udp-port", str(FULL_CONE_PORT))
        argv = ("-broker", f"{where}:10000", *fixed_port)
        bob = scene.add(natter("-name", "bob", *argv, "-listen", prefix=lab.prefix("bob")))
        if v6:
            bob.wait_kind("registered", name="bob", timeout=20)
        else:
            bob.wait_log(lambda e: "seen_by_probe" in e, timeout=20)
            broker.wait_log(lambda e: e.get("event") == "registered" and e.get("nat") is not None, timeout=20)
        specs = (f"8029:bob:{echo_port}", f"8030:bob:{sink_port}")
        alice = scene.add(natter("-name", "alice", *argv, *specs, prefix=[*lab.prefix("alice"), *env]))
        first_byte = float(tool("first-byte", "127.0.0.1", "8029", "30", prefix=lab.prefix("alice")))
        started = _stamp(alice.wait_event("agent started"))
        up = alice.wait_kind("tunnel_up", peer="bob", timeout=40)
        settled = str(up["path"])
        if settled != net.expected:  # started on the relay: the punch goes on
            moved = alice.wait_kind("path_changed", peer="bob", new_kind=net.expected, timeout=20)
            settled = str(moved["new_kind"])
        reply = tool("send", "127.0.0.1", "8030", str(size), prefix=lab.prefix("alice"))
        ok = reply.split() == [str(size), digest_of_pattern(size)]
        return CellResult(settled, str(up["path"]), _stamp(up) - started, first_byte - started, ok)
