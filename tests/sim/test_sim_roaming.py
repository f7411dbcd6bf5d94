"""Both ends roaming on the simulated network: the forwarding side moves to another
network mid-transfer, and a shared CGNAT forgets every mapping under a relayed tunnel."""

from __future__ import annotations

from simworld import World
from test_sim_paths import changes, connect, kinds, pair, settled
from test_sim_relay_first import shared_cgnat

from natter_proto.agent.actions import TunnelUp
from natter_proto.agent.kinds import PathKind


def test_the_forwarding_side_moves_to_another_network_mid_transfer() -> None:
    world = World()
    alice, bob = pair(world)
    connect(world, alice)
    stream = alice.send("bob", b"")
    sent = bytearray()
    elsewhere = world.net.nat(world.net.internet, "203.0.113.99")  # a café's router
    for step in range(120):  # 20 KB every 50 ms for 6 s; alice moves at 2 s
        chunk = bytes([step % 251]) * 20_000
        alice.send("bob", chunk, stream=stream)
        sent += chunk
        world.run(0.05)
        if step == 40:
            alice.move_to(elsewhere.inside, "10.0.0.7")
    alice.send("bob", b"!", fin=True, stream=stream)
    world.run(10.0)
    assert bob.received_from("alice") == bytes(sent) + b"!"
    assert len([e for e in alice.events if isinstance(e, TunnelUp)]) == 1  # the same tunnel
    tunnel = bob.tunnel_to("alice")
    assert tunnel is not None and tunnel.route.addr.host == "203.0.113.99"  # bob followed
    assert (PathKind.DIRECT, PathKind.DIRECT) in changes(bob)


def test_a_shared_cgnat_that_forgets_everything_under_a_relayed_tunnel() -> None:
    world = World()
    alice, bob = shared_cgnat(world)
    connect(world, alice, seconds=1.0)
    assert kinds(alice) == [PathKind.RELAYED]
    stream = alice.send("bob", b"r" * 100_000)
    world.run(1.0)
    cgnat = world.net.internet.nats["203.0.113.50"]
    for nat in (cgnat, *cgnat.inside.nats.values()):
        nat.rebind()
    alice.send("bob", b"s" * 100_000, fin=True, stream=stream)
    world.run(20.0)
    assert bob.received_from("alice") == b"r" * 100_000 + b"s" * 100_000
    assert settled(alice)[-1] is PathKind.RELAYED
