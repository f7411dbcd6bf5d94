"""Networks people sit on, through real NATs: two homes behind one carrier-grade NAT
(relay first: the first byte does not wait for the punch), UDP blocked (TCP to the
broker), UDP blocked behind an HTTP CONNECT proxy, and both ends roaming (the forwarding
side moving to another network, a shared CGNAT flushed), IPv6-only and dual-stack
networks. Needs root (see test_natlab.py)."""

from __future__ import annotations

import shutil
import time

import pytest

from labscene import Scene
from natlab import INET_IP, INET_IP6, NatLab, remove_stale_namespaces, require_lab
from natmatrix import NETWORKS, block, run_cell
from procs import direct, natter, tool
from test_natlab_recovery import flush, status

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(120)]


def test_shared_cgnat_first_byte_within_half_a_second() -> None:
    """Seen: two home NATs behind one CGNAT (one public address, no hairpinning) gave the
    first byte after 5.5 s, the relay being used only once the punch had timed out."""
    require_lab()
    remove_stale_namespaces()
    result = run_cell("restricted", "restricted", size=2 << 20, network=NETWORKS[0])
    assert result.bytes_ok
    assert result.path == "relayed" and result.first_path == "relayed", result
    assert result.first_byte_s < 0.5, result


@pytest.mark.parametrize("through", ["udp-blocked", "connect-proxy"])
def test_udp_blocked_seed_lines_unchanged(through: str) -> None:
    """Seen: behind a firewall that lets only TCP out, nothing ever connected ('broker did
    not answer within 10 s', retried forever). Now the seed's lines, unchanged, register
    over TCP (TLS, WebSocket) and tunnel through the broker's relay over it. With
    ``connect-proxy`` alice's network lets nothing out at all but an HTTP CONNECT proxy
    (tinyproxy), named by HTTPS_PROXY."""
    require_lab()
    remove_stale_namespaces()
    with NatLab() as lab, Scene(lab) as scene:
        if through == "connect-proxy" and shutil.which("tinyproxy") is None:
            pytest.fail("tinyproxy is missing: scripts/setup.sh installs it")
        env = block(lab, scene, "udp" if through == "udp-blocked" else "proxy")
        scene.broker(10000)
        sink_port = scene.service("sink")
        echo_port = scene.service("echo")
        bob = scene.listener(10000)
        alice = scene.add(
            natter(
                "-name", "alice", "-broker", f"{INET_IP}:10000",
                f"8031:bob:{sink_port}", f"8032:bob:{echo_port}",
                prefix=[*lab.prefix("alice"), *env],
            )
        )  # fmt: skip
        said = alice.wait_kind("broker_transport", transport="tcp", timeout=20)
        assert said["event"] == f"no UDP answer from the broker {INET_IP}:10000: using TCP"
        alice.wait_path("bob", "relayed", timeout=20)
        assert tool("echo-check", "127.0.0.1", "8032", str(1 << 20), prefix=lab.prefix("alice")) == "ok"
        scene.send_checked(8031, 8 << 20)
        tunnels = status(alice)["tunnels"]
        assert isinstance(tunnels, list) and [t["path"] for t in tunnels] == ["relayed (tcp)"], tunnels
        assert bob.popen.poll() is None


def test_the_forwarding_side_moves_to_another_network_mid_transfer() -> None:
    """alice's laptop leaves natA's LAN for natC's mid-transfer: her address and public
    endpoint change under the same socket. She notices the silence, learns her new endpoint
    from the broker, punches again through bob's filtering NAT, and the same tunnel carries
    the transfer on, byte-exact, logged as a path change."""
    require_lab()
    remove_stale_namespaces()
    with NatLab(spare=True) as lab, Scene(lab) as scene:
        scene.broker(10000)
        sink_port = scene.service("sink", str(4 << 20))  # slow start: in flight at the move
        bob = scene.listener(10000)
        alice = scene.agent("alice", "alice", 10000, f"8033:bob:{sink_port}")
        alice.wait_path("bob", direct, timeout=30)
        transfer = scene.send_in_background(8033, 30 << 20)
        time.sleep(2.0)
        lab.move("alice")  # now 192.168.3.2 behind natC (10.200.0.5)
        moved = bob.wait_kind("path_changed", peer="alice", reason="peer moved", timeout=40)
        assert moved["new"].startswith("10.200.0.5:"), moved
        transfer.finish()
        alice.wait_kind("endpoint_changed", timeout=5)
        assert not [e for e in alice.lines if e.get("kind") in ("tunnel_closed", "tunnel_failed")]


def test_shared_cgnat_flushed_mid_transfer_on_the_relay() -> None:
    """Two homes behind one CGNAT, tunnelling through the relay: the CGNAT and both home
    NATs forget every mapping at once mid-transfer. Both agents' ways to the broker move;
    the relayed tunnel recovers (on a fresh relay session if it must) and the transfer
    completes byte-exact."""
    require_lab()
    remove_stale_namespaces()
    with NatLab(cgnat=True) as lab, Scene(lab) as scene:
        scene.broker(10000)
        sink_port = scene.service("sink", str(4 << 20))
        scene.listener(10000)
        alice = scene.agent("alice", "alice", 10000, f"8034:bob:{sink_port}")
        alice.wait_path("bob", "relayed", timeout=30)
        transfer = scene.send_in_background(8034, 20 << 20)
        time.sleep(2.0)
        for nat in ("cgnat", "natA", "natB"):
            flush(lab, nat)
        transfer.finish()
        assert not [e for e in alice.lines if e.get("kind") in ("tunnel_closed", "tunnel_failed")]


@pytest.mark.parametrize("family", ["v6", "dual"])
def test_ipv6_only_and_dual_stack_networks(family: str) -> None:
    """Seen: on an IPv6-only network 'cannot resolve broker host ...: Address family for
    hostname not supported' (the agent's socket was IPv4 only, with no IPv6 candidates).
    Now the seed's lines with a broker at [fd00:200::1]:10000 register over IPv6, and bob,
    behind a stateful IPv6 firewall (no NAT, unsolicited inbound dropped), is punched
    directly. On a dual-stack network a broker listening on :10000 takes both families."""
    require_lab()
    remove_stale_namespaces()
    with NatLab(family=family) as lab, Scene(lab) as scene:
        listen = f"[{INET_IP6}]:10000" if family == "v6" else ":10000"
        broker = scene.add(natter("-server", listen, prefix=lab.prefix("inet")))
        broker.wait_event("broker listening")
        sink_port = scene.service("sink")
        # a name with both families: an IPv6-only host has no route to the IPv4 one, and
        # uses the IPv6 one at once; a dual-stack host takes IPv4 first
        lab.name_hosts(f"{INET_IP} broker.lab\n{INET_IP6} broker.lab\n", "alice", "bob")
        broker_addr = "broker.lab:10000"
        bob = scene.add(natter("-name", "bob", "-broker", broker_addr, "-listen", prefix=lab.prefix("bob")))
        bob.wait_kind("registered", name="bob", timeout=20)
        spec = f"8035:bob:{sink_port}"
        alice = scene.add(natter("-name", "alice", "-broker", broker_addr, spec, prefix=lab.prefix("alice")))
        up = alice.wait_path("bob", direct, timeout=30)
        if family == "v6":
            assert up["endpoint"].startswith("[fd00:2::2]:"), up  # bob's own address: no NAT
        scene.send_checked(8035, 8 << 20)
        assert not [e for e in alice.lines if e.get("kind") == "broker_transport"]  # UDP worked
        registered = alice.wait_kind("registered", name="alice")
        assert registered["broker"] == (f"[{INET_IP6}]:10000" if family == "v6" else f"{INET_IP}:10000")
        assert not [e for e in alice.lines if e.get("kind") == "broker_changed"]  # no failover needed


def test_dual_stack_races_the_broker_families() -> None:
    """Dual-stack, but alice's router drops IPv4 UDP: her registration to the broker's
    IPv4 address gets no answer, so 0.25 s in it goes to its IPv6 address too (RFC 8305),
    which answers first; she registers over IPv6 (no TCP needed) and punches bob there."""
    require_lab()
    remove_stale_namespaces()
    with NatLab(family="dual") as lab, Scene(lab) as scene:
        lab.sh("natA", "iptables", "-I", "FORWARD", "-i", "lan", "-p", "udp", "-j", "DROP")
        broker = scene.add(natter("-server", ":10000", prefix=lab.prefix("inet")))
        broker.wait_event("broker listening")
        sink_port = scene.service("sink")
        lab.name_hosts(f"{INET_IP} broker.lab\n{INET_IP6} broker.lab\n", "alice", "bob")
        bob = scene.add(
            natter("-name", "bob", "-broker", "broker.lab:10000", "-listen", prefix=lab.prefix("bob"))
        )
        bob.wait_kind("registered", name="bob", timeout=20)
        spec = f"8036:bob:{sink_port}"
        alice = scene.add(
            natter("-name", "alice", "-broker", "broker.lab:10000", spec, prefix=lab.prefix("alice"))
        )
        registered = alice.wait_kind("registered", name="alice", timeout=10)
        assert registered["broker"] == f"[{INET_IP6}]:10000", registered
        alice.wait_kind("broker_changed", timeout=1)  # the race's winner, said once
        up = alice.wait_path("bob", direct, timeout=30)
        assert up["endpoint"].startswith("[fd00:2::2]:"), up
        scene.send_checked(8036, 4 << 20)
        assert not [e for e in alice.lines if e.get("kind") == "broker_transport"]  # no TCP
