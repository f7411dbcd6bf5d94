"""IPv6 on the simulated network: hosts behind stateful firewalls (the home default: no
NAT, unsolicited inbound dropped), a broker at an IPv6 address."""

from __future__ import annotations

from simworld import World
from test_sim_paths import connect, settled

from natter_proto.agent.actions import Notice, NoticeKind
from natter_proto.agent.kinds import PathKind
from natter_proto.endpoints import Endpoint


def test_ipv6_only_hosts_behind_stateful_firewalls_punch_directly() -> None:
    world = World(broker_ip="2001:db8:100::1")
    net = world.net
    a_fw = net.nat(net.internet, "2001:db8:1::2", translate=False)
    b_fw = net.nat(net.internet, "2001:db8:2::2", translate=False)
    alice = world.agent("alice", a_fw.inside, "2001:db8:1::2")
    bob = world.agent("bob", b_fw.inside, "2001:db8:2::2")
    world.start(alice, bob, listen=(bob,))
    world.run(1.0)
    assert alice.machine.registered and bob.machine.registered
    assert bob.machine.registration.public is not None
    assert bob.machine.registration.public.host == "2001:db8:2::2"  # no translation
    connect(world, alice)
    assert settled(alice) == [PathKind.DIRECT] and settled(bob) == [PathKind.DIRECT]
    tunnel = alice.tunnel_to("bob")
    assert tunnel is not None and tunnel.route.addr.host == "2001:db8:2::2"
    alice.send("bob", b"6" * 100_000, fin=True)
    world.run(2.0)
    assert bob.received_from("alice") == b"6" * 100_000
    assert net.stats.filtered > 0  # the firewalls did drop the first unsolicited probes


def test_a_silent_ipv4_broker_address_is_raced_by_its_ipv6_one() -> None:
    """The broker's name gives an IPv4 address that answers nothing (UDP to it dropped
    somewhere) and an IPv6 one that works: 0.25 s in, the registration goes to both, the
    IPv6 one answers first and is kept; no TCP stream is needed."""
    world = World(broker_ip="2001:db8:100::1")
    nat = world.net.nat(world.net.internet, "203.0.113.10")
    dead = Endpoint("198.51.100.99", 10000)
    alice = world.agent("alice", nat.inside, "192.168.1.2", brokers=[dead, world.broker.addr])
    world.start(alice)
    world.run(0.45)
    assert alice.machine.registered and alice.machine.broker == world.broker.addr
    assert alice.stream_attempts == 0
    said = [e for e in alice.events if isinstance(e, Notice) and e.kind is NoticeKind.BROKER_CHANGED]
    assert len(said) == 1 and "answered first" in str(said[0].fields["reason"])
