"""Relay first, punch in parallel: a new tunnel never waits for a punch to time out.

Its QUIC handshake starts on the broker's relay once the punch has had its head start
(``relay_head_start``); the punch goes on, and a direct path it finds takes the same
tunnel over, make-before-break, with the bytes in flight intact.
"""

from __future__ import annotations

from simworld import SimAgent, World
from test_sim_paths import changes, connect, kinds, notices, pair, ready_after, settled

from natter_proto.agent.actions import NoticeKind
from natter_proto.agent.kinds import PathKind


def shared_cgnat(world: World) -> tuple[SimAgent, SimAgent]:
    """Two home NATs behind one carrier-grade NAT: one public IP, no hairpinning."""
    net = world.net
    cgnat = net.nat(net.internet, "203.0.113.50")
    a_home = net.nat(cgnat.inside, "100.64.0.2")
    b_home = net.nat(cgnat.inside, "100.64.0.3")
    alice = world.agent("alice", a_home.inside, "192.168.1.2")
    bob = world.agent("bob", b_home.inside, "192.168.2.2")
    world.start(alice, bob, listen=(bob,))
    world.run(1.0)
    return alice, bob


def test_shared_cgnat_carries_bytes_at_once_over_the_relay() -> None:
    world = World()
    alice, bob = shared_cgnat(world)
    asked = world.net.clock.now
    connect(world, alice, seconds=0.6)
    assert ready_after(alice, asked) < 0.5  # before: after the 5 s punch timeout
    assert kinds(alice) == [PathKind.RELAYED]
    alice.send("bob", b"z" * 80_000, fin=True)
    world.run(8.0)  # past the punch's timeout: the tunnel stays, on the relay
    assert bob.received_from("alice") == b"z" * 80_000
    assert settled(alice) == [PathKind.RELAYED] and settled(bob) == [PathKind.RELAYED]
    said = notices(alice, NoticeKind.PUNCH_FAILED)
    assert [n.text for n in said] == ["no direct path to bob answers: staying on the relay"]
    assert len(notices(alice, NoticeKind.RELAY_FALLBACK)) == 1  # one tunnel, started once


def test_a_late_direct_path_takes_over_the_relayed_tunnel_mid_transfer() -> None:
    """The punch answers only after the tunnel is up on the relay (a firewall lets it
    through late): the same tunnel moves to the direct path while bytes flow, and the relay
    carries nothing more."""
    world = World()
    alice, bob = pair(world)
    a_nat = world.net.internet.nats["203.0.113.10"]
    a_nat.deny.add("203.0.113.20")
    asked = world.net.clock.now
    connect(world, alice, seconds=0.5)
    assert ready_after(alice, asked) < 0.5
    stream = alice.send("bob", b"a" * 100_000)
    world.run(0.3)
    a_nat.deny.clear()  # the punch, still probing, now gets through
    world.run(2.0)
    assert changes(alice) == [(PathKind.RELAYED, PathKind.DIRECT)]
    assert changes(bob) == [(PathKind.RELAYED, PathKind.DIRECT)]
    relayed = world.broker.relayed_bytes
    alice.send("bob", b"b" * 300_000, fin=True, stream=stream)
    world.run(3.0)
    assert bob.received_from("alice") == b"a" * 100_000 + b"b" * 300_000
    assert world.broker.relayed_bytes - relayed < 2_000  # relay use ended with the move
    assert len(notices(alice, NoticeKind.RELAY_FALLBACK)) == 1


def test_a_punch_that_answers_within_its_head_start_never_touches_the_relay() -> None:
    world = World()
    alice, _ = pair(world)
    connect(world, alice)
    assert settled(alice) == [PathKind.DIRECT]
    assert world.broker.relayed_bytes == 0
    assert not notices(alice, NoticeKind.RELAY_FALLBACK)


def test_without_a_relay_the_punch_decides_alone() -> None:
    world = World(relay=False)
    alice, _ = shared_cgnat(world)
    connect(world, alice, seconds=8.0)
    assert kinds(alice) == []
    assert alice.unreachable["bob"].code == "punch_failed"
