"""IPv6 on the simulated network: hosts behind stateful firewalls (the home default: no
NAT, unsolicited inbound dropped), a broker at an IPv6 address."""

from __future__ import annotations

from simworld import World
from test_sim_paths import connect, settled

from natter_proto.agent.kinds import PathKind


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
