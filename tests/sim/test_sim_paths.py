"""Path lifecycles on the simulated network: real QUIC, virtual time, no root."""

from __future__ import annotations

from simnet import Filtering, Mapping
from simworld import SimAgent, World

from natter_proto.agent.actions import PathChanged, TunnelUp
from natter_proto.agent.kinds import PathKind
from natter_proto.agent.settings import AgentSettings


def pair(
    world: World,
    *,
    alice_nat: dict[str, object] | None = None,
    bob_nat: dict[str, object] | None = None,
) -> tuple[SimAgent, SimAgent]:
    net = world.net
    a_nat = net.nat(net.internet, "203.0.113.10", **(alice_nat or {}))
    b_nat = net.nat(net.internet, "203.0.113.20", **(bob_nat or {}))
    alice = world.agent("alice", a_nat.inside, "192.168.1.2")
    bob = world.agent("bob", b_nat.inside, "192.168.2.2")
    world.start(alice, bob, listen=(bob,))
    world.run(1.0)
    return alice, bob


def connect(world: World, alice: SimAgent, peer: str = "bob", seconds: float = 8.0) -> None:
    alice.machine.connect(peer, "localhost:22", world.net.clock.now)
    alice.pump()
    world.run(seconds)


def kinds(agent: SimAgent) -> list[PathKind]:
    return [e.kind for e in agent.events if isinstance(e, TunnelUp)]


def test_direct_path_between_two_port_restricted_nats() -> None:
    world = World()
    alice, bob = pair(world)
    assert alice.machine.registered and bob.machine.registered
    connect(world, alice)
    assert kinds(alice) == [PathKind.DIRECT]
    assert kinds(bob) == [PathKind.DIRECT]
    alice.send("bob", b"x" * 100_000, fin=True)
    world.run(2.0)
    assert bob.received_from("alice") == b"x" * 100_000


def test_symmetric_nats_on_both_sides_use_the_relay() -> None:
    world = World()
    hard = {"mapping": Mapping.DEPENDENT}
    alice, bob = pair(world, alice_nat=hard, bob_nat=hard)
    connect(world, alice)
    assert kinds(alice) == [PathKind.RELAYED]
    alice.send("bob", b"y" * 50_000, fin=True)
    world.run(2.0)
    assert bob.received_from("alice") == b"y" * 50_000
    assert world.broker.relayed_bytes > 50_000


def changes(agent: SimAgent) -> list[tuple[PathKind, PathKind]]:
    return [(e.old_kind, e.new_kind) for e in agent.events if isinstance(e, PathChanged) and not e.replaced]


MATRIX = [
    # (alice mapping, alice filtering, bob mapping, bob filtering) -> expected path kind
    (Mapping.INDEPENDENT, Filtering.NONE, Mapping.INDEPENDENT, Filtering.NONE, PathKind.DIRECT),
    (Mapping.INDEPENDENT, Filtering.ADDRESS, Mapping.INDEPENDENT, Filtering.PORT, PathKind.DIRECT),
    (Mapping.INDEPENDENT, Filtering.PORT, Mapping.INDEPENDENT, Filtering.PORT, PathKind.DIRECT),
    (Mapping.DEPENDENT, Filtering.PORT, Mapping.INDEPENDENT, Filtering.NONE, PathKind.PREDICTED),
    (Mapping.DEPENDENT, Filtering.PORT, Mapping.INDEPENDENT, Filtering.PORT, PathKind.PREDICTED),
    (Mapping.INDEPENDENT, Filtering.PORT, Mapping.DEPENDENT, Filtering.PORT, PathKind.PREDICTED),
    (Mapping.DEPENDENT, Filtering.PORT, Mapping.DEPENDENT, Filtering.PORT, PathKind.RELAYED),
]


import pytest  # noqa: E402


@pytest.mark.parametrize(("am", "af", "bm", "bf", "expected"), MATRIX)
def test_nat_matrix(am: Mapping, af: Filtering, bm: Mapping, bf: Filtering, expected: PathKind) -> None:
    world = World()
    alice, bob = pair(
        world, alice_nat={"mapping": am, "filtering": af}, bob_nat={"mapping": bm, "filtering": bf}
    )
    connect(world, alice, seconds=12.0)
    assert kinds(alice) == [expected]
    assert kinds(bob) == [expected]


def test_lan_when_both_sit_behind_one_nat() -> None:
    world = World()
    nat = world.net.nat(world.net.internet, "203.0.113.30")  # no hairpinning
    alice = world.agent("alice", nat.inside, "192.168.1.2")
    bob = world.agent("bob", nat.inside, "192.168.1.3")
    world.start(alice, bob, listen=(bob,))
    world.run(1.0)
    connect(world, alice)
    assert kinds(alice) == [PathKind.LAN]


def test_relay_fallback_then_upgrade_to_direct_mid_transfer() -> None:
    world = World(settings=AgentSettings(upgrade_interval=5.0))
    alice, bob = pair(world)
    a_nat = world.net.internet.nats["203.0.113.10"]
    a_nat.deny.add("203.0.113.20")  # a firewall between them: no punch can work
    connect(world, alice)
    assert kinds(alice) == [PathKind.RELAYED]
    stream = alice.send("bob", b"a" * 200_000)
    world.run(1.0)
    a_nat.deny.clear()
    world.run(6.0)
    assert changes(alice) == [(PathKind.RELAYED, PathKind.DIRECT)]
    assert changes(bob) == [(PathKind.RELAYED, PathKind.DIRECT)]  # both ends agree
    relayed = world.broker.relayed_bytes
    alice.send("bob", b"b" * 300_000, fin=True, stream=stream)
    world.run(3.0)
    assert bob.received_from("alice") == b"a" * 200_000 + b"b" * 300_000
    assert world.broker.relayed_bytes - relayed < 5_000  # the bulk went direct, both ways


def test_direct_path_dies_tunnel_moves_to_the_relay() -> None:
    world = World()
    alice, bob = pair(world)
    connect(world, alice)
    stream = alice.send("bob", b"c" * 100_000)
    world.run(1.0)
    world.net.internet.nats["203.0.113.10"].deny.add("203.0.113.20")
    alice.send("bob", b"d" * 100_000, stream=stream)
    world.run(15.0)
    assert (PathKind.DIRECT, PathKind.RELAYED) in changes(alice)
    alice.send("bob", b"e" * 10, fin=True, stream=stream)
    world.run(3.0)
    assert bob.received_from("alice") == b"c" * 100_000 + b"d" * 100_000 + b"e" * 10
    assert len([e for e in alice.events if isinstance(e, TunnelUp)]) == 1  # the same tunnel


@pytest.mark.parametrize("who", ["alice", "bob", "both"])
def test_nat_rebinding_mid_transfer(who: str) -> None:
    world = World(relay=False)  # recovery must find the direct path again
    alice, bob = pair(world)
    connect(world, alice)
    stream = alice.send("bob", b"")
    sent = bytearray()
    for step in range(200):  # 20 KB every 50 ms for 10 s, the NATs rebinding at 2 s
        chunk = bytes([step % 251]) * 20_000
        alice.send("bob", chunk, stream=stream)
        sent += chunk
        world.run(0.05)
        if step == 40:
            for name, ip in (("alice", "203.0.113.10"), ("bob", "203.0.113.20")):
                if who in (name, "both"):
                    world.net.internet.nats[ip].rebind()
    alice.send("bob", b"h", fin=True, stream=stream)
    world.run(10.0)
    assert bob.received_from("alice") == bytes(sent) + b"h"
    assert len([e for e in alice.events if isinstance(e, TunnelUp)]) == 1  # the same tunnel
