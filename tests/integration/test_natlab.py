"""alice and bob behind two real MASQUERADE NATs, the broker on the "internet" between.

Needs root and network namespaces: skipped elsewhere with the reason, never in CI.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from engines import ENGINES
from labscene import Scene
from natlab import INET_IP, NatLab, require_lab
from procs import direct, tool
from redis_server import RedisProcess

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(240)]

NAT_A_WAN = "10.200.0.2"
NAT_B_WAN = "10.200.0.3"


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The data-path tests run once per QUIC engine."""
    return str(request.param)


@pytest.fixture(scope="module")
def symmetric_lab() -> Iterator[NatLab]:
    require_lab()
    with NatLab(kind_b="symmetric") as built:
        yield built


class UdpBetweenNats:
    """Rules on alice's NAT that drop all UDP to and from bob's NAT; lifted on exit."""

    RULES = (
        ("FORWARD", "-d", NAT_B_WAN, "-p", "udp", "-j", "DROP"),
        ("FORWARD", "-s", NAT_B_WAN, "-p", "udp", "-j", "DROP"),
    )

    def __init__(self, lab: NatLab) -> None:
        self.lab = lab
        self.blocked = False

    def block(self) -> None:
        for rule in self.RULES:
            self.lab.sh("natA", "iptables", "-I", *rule)
        self.blocked = True

    def unblock(self) -> None:
        if self.blocked:
            for rule in self.RULES:
                self.lab.sh("natA", "iptables", "-D", *rule)
            self.blocked = False

    def __enter__(self) -> UdpBetweenNats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unblock()


def test_lab_nats_drop_unsolicited_inbound_udp(lab: NatLab) -> None:
    before = lab.dropped("natA")
    send = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', ('%s', 40000))"
    )
    for _ in range(3):
        subprocess.run([*lab.prefix("inet"), sys.executable, "-c", send % NAT_A_WAN], check=True)
    assert lab.dropped("natA") >= before + 3
    # and alice cannot be reached on her private address from the internet at all
    ping = subprocess.run(
        [*lab.prefix("inet"), "ping", "-c1", "-W1", "192.168.1.2"], capture_output=True, check=False
    )
    assert ping.returncode != 0


def test_forward_crosses_two_nats_on_a_direct_path_and_outlives_the_broker(lab: NatLab, engine: str) -> None:
    with Scene(lab, engine) as scene:
        echo_port = scene.service("echo")
        sink_port = scene.service("sink")
        broker = scene.broker()
        bob = scene.agent("bob", "bob", 10000, "-listen")
        registered = bob.wait_kind("registered", name="bob")
        assert registered["public_endpoint"].startswith(f"{NAT_B_WAN}:")  # seen through natB
        alice = scene.agent("alice", "alice", 10000, f"8022:bob:{echo_port}", f"8023:bob:{sink_port}")
        alice_up = alice.wait_path("bob", direct, timeout=30)
        bob_up = bob.wait_path("alice", direct, timeout=30)
        # direct: each side's QUIC peer is the other's NAT, not the broker and not a LAN address
        assert bob_up["endpoint"].split(":")[0] == NAT_A_WAN
        assert alice_up["endpoint"].split(":")[0] == NAT_B_WAN

        alice_ns = lab.prefix("alice")
        assert tool("echo-check", "127.0.0.1", "8022", str(4 << 20), prefix=alice_ns) == "ok"
        scene.send_checked(8023, 20 << 20)

        # the broker is never on the data path: stop it, new connections still work
        assert broker.stop() == 0
        for _ in range(3):
            assert tool("echo-check", "127.0.0.1", "8022", str(1 << 20), prefix=alice_ns) == "ok"
        scene.send_checked(8023, 20 << 20)
        assert alice.popen.poll() is None and bob.popen.poll() is None


def test_fleet_in_the_internet_namespace_introduces_across_replicas(lab: NatLab) -> None:
    """Two replicas and Redis on the "internet"; alice on replica 1, bob on replica 2."""
    redis = RedisProcess(prefix=lab.prefix("inet"), port=6379)
    try:
        redis.start()
        with Scene(lab) as scene:
            replicas = scene.replicas(redis.url, (10000, 10001))
            sink_port = scene.service("sink")
            bob = scene.listener(10001)
            scene.agent("alice", "alice", 10000, f"8024:bob:{sink_port}")
            bob_up = bob.wait_path("alice", direct, timeout=30)
            assert bob_up["endpoint"].split(":")[0] == NAT_A_WAN
            replicas[1].wait_event("introduced on behalf of replica")
            scene.send_checked(8024, 10 << 20)
    finally:
        redis.close()


def test_two_clients_behind_one_nat_connect_over_the_lan(lab: NatLab) -> None:
    """The NAT does not hairpin: only the LAN candidate can work, and the punch finds it."""
    with Scene(lab) as scene:
        scene.broker(10002)
        echo_port = scene.service("echo", on="alice")
        alice = scene.agent("alice", "alice", 10002, "-listen")
        alice.wait_kind("registered", name="alice")
        carol = scene.agent("carol", "carol", 10002, f"8025:alice:{echo_port}")
        up = carol.wait_path("alice", "lan", timeout=30)
        assert up["endpoint"].startswith("192.168.1.2:")
        assert tool("echo-check", "127.0.0.1", "8025", str(2 << 20), prefix=lab.prefix("carol")) == "ok"


def test_agents_learn_their_nat_type_and_tell_their_peer(symmetric_lab: NatLab) -> None:
    """natA maps endpoint-independently, natB per destination: each agent finds out from
    the broker's probe port, and the broker passes it to the peer with the punch."""
    with Scene(symmetric_lab) as scene:
        broker = scene.broker(10000, "-probe", "10.200.0.1:10001")
        bob = scene.agent("bob", "bob", 10000, "-listen")
        hard = bob.wait_log(lambda e: e.get("nat") in ("hard", "easy", "unknown"), timeout=20)
        assert hard["nat"] == "hard", hard
        assert hard["seen_by_broker"] != hard["seen_by_probe"]
        # bob re-registers with what he learned; then alice asks for him
        broker.wait_log(lambda e: e.get("event") == "registered" and e.get("nat") == "hard", timeout=20)
        alice = scene.agent("alice", "alice", 10000, "8026:bob:22")
        easy = alice.wait_log(lambda e: e.get("nat") in ("hard", "easy", "unknown"), timeout=20)
        assert easy["nat"] == "easy", easy
        punching = alice.wait_event("punching to bob", timeout=20)
        assert punching["peer_nat"] == "hard"


def test_two_symmetric_nats_fall_back_to_the_relay(engine: str) -> None:
    """Both NATs map per destination: no direct path can answer, so the tunnel goes through
    the broker's relay (which sees only ciphertext), and the bytes still arrive intact."""
    require_lab()
    with NatLab(kind_a="symmetric", kind_b="symmetric") as lab, Scene(lab, engine) as scene:
        scene.broker()
        sink_port = scene.service("sink")
        scene.listener(10000)
        alice = scene.agent("alice", "alice", 10000, f"8027:bob:{sink_port}")
        alice.wait_kind("punch_failed", timeout=30)
        up = alice.wait_kind("tunnel_up", peer="bob", path="relayed", timeout=30)
        assert up["peer_endpoint"] == f"relay {INET_IP}:10000"  # where it goes, no placeholder
        scene.send_checked(8027, 3 << 20)


@pytest.mark.parametrize("mesh", [False, True], ids=["over-redis", "over-the-mesh"])
def test_relay_across_broker_replicas(mesh: bool) -> None:
    """alice talks to replica 1, bob to replica 2, both NATs symmetric: relayed packets cross
    from one replica to the other, over Redis pub/sub or straight over the relay mesh."""
    require_lab()
    with NatLab(kind_a="symmetric", kind_b="symmetric") as lab:
        redis = RedisProcess(prefix=lab.prefix("inet"), port=6379)
        try:
            redis.start()
            with Scene(lab) as scene:
                scene.replicas(redis.url, (10000, 10001), mesh=mesh)
                sink_port = scene.service("sink")
                scene.listener(10001)
                alice = scene.agent("alice", "alice", 10000, f"8028:bob:{sink_port}")
                alice.wait_kind("tunnel_up", peer="bob", path="relayed", timeout=40)
                scene.send_checked(8028, 2 << 20)
                if mesh:  # the packets went replica to replica, not through Redis
                    for port in (12000, 12001):
                        metrics = subprocess.run(
                            [*lab.prefix("inet"), "curl", "-s", f"http://{INET_IP}:{port}/metrics"],
                            capture_output=True, text=True, check=True,
                        ).stdout  # fmt: skip
                        sent = [
                            line
                            for line in metrics.splitlines()
                            if line.startswith("natter_broker_mesh_packets_total")
                        ]
                        assert any(float(line.split()[-1]) > 100 for line in sent), sent
        finally:
            redis.close()


def test_one_symmetric_nat_is_punched_with_the_birthday_method(symmetric_lab: NatLab) -> None:
    """bob's NAT maps per destination, alice's does not: bob opens many sockets, alice
    sprays probes at bob's address, and a direct path (not the relay) comes up (the tunnel
    may start on the relay while the spray goes on: relay first)."""
    with Scene(symmetric_lab) as scene:
        broker = scene.broker(10003, "-probe", "10.200.0.1:10004")
        sink_port = scene.service("sink")
        bob = scene.agent("bob", "bob", 10003, "-listen")
        assert bob.wait_log(lambda e: "nat" in e and "seen_by_probe" in e, timeout=20)["nat"] == "hard"
        broker.wait_log(lambda e: e.get("event") == "registered" and e.get("nat") == "hard", timeout=20)
        alice = scene.agent("alice", "alice", 10003, f"8029:bob:{sink_port}")
        alice.wait_log(lambda e: e.get("nat") == "easy" and "seen_by_probe" in e, timeout=20)
        up = alice.wait_path("bob", "predicted", timeout=40)  # from the start, or from the relay
        assert up["endpoint"].split(":")[0] == NAT_B_WAN, up
        bob.wait_kind("birthday")
        scene.send_checked(8029, 2 << 20)


def test_two_percent_loss_on_one_nat(lab: NatLab, engine: str) -> None:
    """2% of the packets through alice's NAT vanish, both ways: punch and tunnel cope, and
    the bytes arrive intact."""
    rule = ["FORWARD", "-m", "statistic", "--mode", "random", "--probability", "0.02", "-j", "DROP"]
    lab.sh("natA", "iptables", "-I", *rule)
    try:
        with Scene(lab, engine) as scene:
            scene.broker(10005)
            sink_port = scene.service("sink")
            scene.listener(10005, timeout=30)
            alice = scene.agent("alice", "alice", 10005, f"8031:bob:{sink_port}")
            alice.wait_path("bob", direct, timeout=40)
            scene.send_checked(8031, 5 << 20)
            dropped = lab.sh("natA", "iptables", "-L", "FORWARD", "-v", "-n", "-x").stdout
            assert "statistic mode random probability 0.02" in dropped
    finally:
        lab.sh("natA", "iptables", "-D", *rule)


def test_transfer_survives_a_conntrack_flush_on_alices_nat(lab: NatLab, engine: str) -> None:
    """Mid-transfer, alice's NAT forgets every mapping (conntrack -F): the next packets make
    new ones and the transfer completes byte-exact."""
    with Scene(lab, engine) as scene:
        scene.broker(10006)
        sink_port = scene.service("sink", str(4 << 20))  # slow start
        scene.listener(10006)
        alice = scene.agent("alice", "alice", 10006, f"8032:bob:{sink_port}")
        alice.wait_path("bob", direct, timeout=30)
        transfer = scene.send_in_background(8032, 50 << 20)
        time.sleep(2.0)  # in the sink's slow phase: the transfer is in flight
        flushed = subprocess.run([*lab.prefix("natA"), "conntrack", "-F"], capture_output=True, check=False)
        assert flushed.returncode == 0, flushed.stderr
        transfer.finish()


def test_relayed_tunnel_moves_to_a_direct_path_when_one_appears(lab: NatLab, engine: str) -> None:
    """UDP between the two NATs is blocked: the tunnel starts relayed. Unblocked, the agents
    find the direct path at the next attempt and the same QUIC connection moves onto it
    (migration): a 50 MB transfer begun on the relay completes byte-exact, and new
    connections ride the same tunnel, now direct."""
    with UdpBetweenNats(lab) as udp, Scene(lab, engine) as scene:
        udp.block()
        scene.broker(10007)
        sink_port = scene.service("sink", str(4 << 20))  # slow start
        bob = scene.listener(10007)
        alice = scene.agent("alice", "alice", 10007, f"8033:bob:{sink_port}", "-upgrade-interval", "3")
        alice.wait_kind("tunnel_up", peer="bob", path="relayed", timeout=40)
        transfer = scene.send_in_background(8033, 50 << 20)
        time.sleep(1.0)
        udp.unblock()
        change = alice.wait_kind(
            "path_changed", peer="bob", old_kind="relayed", new_kind="direct", timeout=30
        )
        assert change["open_connections"] >= 1 and change["migrated"]  # the transfer moved along
        moved = bob.wait_kind("path_changed", peer="alice", old_kind="relayed", new_kind="direct", timeout=30)
        assert moved["new"].startswith(NAT_A_WAN)
        transfer.finish()
        scene.send_checked(8033, 1 << 20)  # a new connection, on the same tunnel
        assert not [e for e in alice.lines if e.get("kind") in ("tunnel_closed", "tunnel_failed")]
        assert len([e for e in alice.lines if "path up with bob" in str(e.get("event"))]) == 1


def test_transfer_follows_the_client_when_its_nat_changes_port(engine: str) -> None:
    """Mid-transfer, alice's NAT forgets her mapping and gives her a new public port; bob
    (no NAT, the QUIC server) finds the tunnel by connection ID, QUIC validates the new
    path, and the transfer completes byte-exact."""
    require_lab()
    with NatLab(kind_a="restricted", kind_b="none") as lab, Scene(lab, engine) as scene:
        scene.broker(10008)
        sink_port = scene.service("sink", str(4 << 20))  # slow start
        bob = scene.listener(10008)
        scene.agent("alice", "alice", 10008, "-udp-port", "40000", f"8034:bob:{sink_port}")
        up = bob.wait_path("alice", direct, timeout=30)
        assert up["endpoint"] == f"{NAT_A_WAN}:40000"
        transfer = scene.send_in_background(8034, 40 << 20)
        time.sleep(2.0)
        lab.sh("natA", "iptables", "-t", "nat", "-I", "POSTROUTING", "1", "-o", "wan", "-p", "udp",
               "-j", "MASQUERADE", "--to-ports", "50000-50100")  # fmt: skip
        subprocess.run([*lab.prefix("natA"), "conntrack", "-F"], capture_output=True, check=True)
        moved = bob.wait_kind("path_changed", peer="alice", reason="peer moved", timeout=30)
        assert moved["new"].startswith(f"{NAT_A_WAN}:50")
        transfer.finish()


def test_a_moved_client_punches_again_through_a_filtering_listener_nat(engine: str) -> None:
    """As above, but bob sits behind a port-restricted NAT, which drops alice's packets from
    her new port until bob has sent there. alice notices the silence, learns her new
    endpoint from the broker and punches again; bob's probes open his NAT, the tunnel moves
    to the new path, and the transfer in flight completes byte-exact."""
    require_lab()
    with NatLab(kind_a="restricted", kind_b="restricted") as lab, Scene(lab, engine) as scene:
        scene.broker(10009)
        sink_port = scene.service("sink", str(4 << 20))  # slow start
        bob = scene.listener(10009)
        alice = scene.agent("alice", "alice", 10009, "-udp-port", "40000", f"8035:bob:{sink_port}")
        up = bob.wait_path("alice", direct, timeout=30)
        assert up["endpoint"] == f"{NAT_A_WAN}:40000"
        transfer = scene.send_in_background(8035, 40 << 20)
        time.sleep(2.0)
        lab.sh("natA", "iptables", "-t", "nat", "-I", "POSTROUTING", "1", "-o", "wan", "-p", "udp",
               "-j", "MASQUERADE", "--to-ports", "50000-50100")  # fmt: skip
        subprocess.run([*lab.prefix("natA"), "conntrack", "-F"], capture_output=True, check=True)
        changed = alice.wait_kind("endpoint_changed", timeout=30)
        assert changed["new"].startswith(f"{NAT_A_WAN}:50")
        # the punch again comes from the silence (2 s) or from the new endpoint, whichever is first
        alice.wait_kind("repunch", peer="bob", timeout=10)
        moved = bob.wait_kind("path_changed", peer="alice", reason="peer moved", timeout=30)
        assert moved["new"].startswith(f"{NAT_A_WAN}:50")
        alice.wait_kind("refreshed", peer="bob", timeout=30)
        transfer.finish()
        assert not [e for e in alice.lines if e.get("kind") == "tunnel_closed"]  # the same tunnel


def test_a_dead_direct_path_falls_back_to_the_relay_and_comes_back(lab: NatLab, engine: str) -> None:
    """Mid-transfer, UDP between the two NATs is blocked: alice's tunnel hears nothing back,
    punches again, finds no path and moves the same QUIC connection onto the broker's relay;
    unblocked, the next attempt moves it back to a direct path. The transfer in flight
    completes byte-exact through both moves, on one tunnel."""
    with UdpBetweenNats(lab) as udp, Scene(lab, engine) as scene:
        scene.broker(10010)
        sink_port = scene.service("sink", str(2 << 20))  # slow start
        bob = scene.listener(10010)
        alice = scene.agent("alice", "alice", 10010, f"8036:bob:{sink_port}", "-upgrade-interval", "3")
        alice.wait_path("bob", direct, timeout=30)
        transfer = scene.send_in_background(8036, 60 << 20)
        time.sleep(1.0)
        udp.block()
        down = alice.wait_kind("path_changed", peer="bob", old_kind="direct", new_kind="relayed", timeout=40)
        assert down["migrated"] and down["open_connections"] >= 1
        bob.wait_kind("path_changed", peer="alice", old_kind="direct", new_kind="relayed", timeout=20)
        time.sleep(1.0)
        udp.unblock()
        up = alice.wait_kind("path_changed", peer="bob", old_kind="relayed", new_kind="direct", timeout=30)
        assert up["migrated"]
        transfer.finish()
        scene.send_checked(8036, 1 << 20)  # a new connection on the same tunnel
        assert not [e for e in alice.lines if e.get("kind") in ("tunnel_closed", "tunnel_failed")]
