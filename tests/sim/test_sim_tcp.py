"""UDP blocked: the agent's TCP stream to the broker, on the simulated network.

The stream is modelled as the broker sees it (a reliable channel from the agent's
outermost NAT's address); the agent machine decides when to open it and what goes over it.
"""

from __future__ import annotations

from simnet import Filtering, Nat
from simworld import SimAgent, World
from test_sim_paths import connect, notices, ready_after, settled

from natter_proto.agent.actions import NoticeKind, TunnelUp
from natter_proto.agent.kinds import BROKER_STREAM, PathKind, Transport
from natter_proto.agent.settings import AgentSettings


def udp_blocked_pair(
    world: World, *, bob_filtering: Filtering = Filtering.PORT, tcp: bool = True
) -> tuple[SimAgent, SimAgent, Nat]:
    """alice behind a NAT that drops all UDP (and TCP too, unless ``tcp``), bob behind an
    ordinary one; both started, bob listening."""
    net = world.net
    a_nat = net.nat(net.internet, "203.0.113.10", udp_blocked=True, tcp_blocked=not tcp)
    b_nat = net.nat(net.internet, "203.0.113.20", filtering=bob_filtering)
    alice = world.agent("alice", a_nat.inside, "192.168.1.2")
    bob = world.agent("bob", b_nat.inside, "192.168.2.2")
    world.start(alice, bob, listen=(bob,))
    world.run(2.0)
    return alice, bob, a_nat


def test_udp_blocked_registers_over_tcp_and_relays_over_it() -> None:
    world = World()
    alice, bob, _ = udp_blocked_pair(world)
    assert alice.machine.registered and alice.machine.link.path.via == "tcp"
    assert bob.machine.link.path.via == "udp"
    said = notices(alice, NoticeKind.BROKER_TRANSPORT)
    assert [n.text for n in said] == [f"no UDP answer from the broker {world.broker.addr}: using TCP"]
    asked = world.net.clock.now
    connect(world, alice, seconds=1.0)
    assert ready_after(alice, asked) < 0.3  # no punch head start: no UDP from here
    (up,) = [e for e in alice.events if isinstance(e, TunnelUp)]
    assert up.path.transport is Transport.TCP_RELAY and up.path.socket == BROKER_STREAM
    alice.send("bob", b"t" * 200_000, fin=True)
    world.run(5.0)
    assert bob.received_from("alice") == b"t" * 200_000
    assert settled(alice) == [PathKind.RELAYED]


def test_a_tunnel_relayed_over_tcp_moves_to_a_direct_path_when_udp_answers() -> None:
    world = World(settings=AgentSettings(upgrade_interval=5.0))
    alice, bob, a_nat = udp_blocked_pair(world, bob_filtering=Filtering.NONE)
    connect(world, alice, seconds=1.0)
    stream = alice.send("bob", b"a" * 100_000)
    world.run(1.0)
    a_nat.udp_blocked = False  # the firewall lets UDP out again
    world.run(8.0)  # the next upgrade punch finds the direct path
    assert settled(alice) == [PathKind.RELAYED, PathKind.DIRECT]
    assert settled(bob) == [PathKind.RELAYED, PathKind.DIRECT]
    relayed = world.broker.relayed_bytes
    alice.send("bob", b"b" * 200_000, fin=True, stream=stream)
    world.run(3.0)
    assert bob.received_from("alice") == b"a" * 100_000 + b"b" * 200_000
    assert world.broker.relayed_bytes - relayed < 2_000


def test_nothing_gets_through_says_what_was_tried_and_keeps_trying_with_backoff() -> None:
    world = World()
    alice, _, _ = udp_blocked_pair(world, tcp=False)
    world.run(60.0)
    assert not alice.machine.registered
    assert alice.machine.link.path.unanswered(world.broker.addr) == (
        f"broker {world.broker.addr}: no UDP answer; TCP: no connection"
    )
    attempts = alice.stream_attempts
    assert 3 <= attempts <= 10, attempts  # backoff: 1, 2, 4, 8, 16, 30 s ...


def test_registration_moves_back_to_udp_when_it_answers_again() -> None:
    """Registered over TCP, the agent asks the broker's UDP port now and then; once it
    answers, the agent registers over UDP and closes the stream. A transfer relayed over the
    stream meanwhile carries on, byte-exact, on another path (the stream is gone)."""
    world = World(settings=AgentSettings(udp_recheck_interval=5.0))
    alice, bob, a_nat = udp_blocked_pair(world)
    connect(world, alice, seconds=1.0)
    stream = alice.send("bob", b"c" * 100_000)
    world.run(1.0)
    a_nat.udp_blocked = False
    world.run(12.0)
    assert alice.machine.registered and alice.machine.link.path.via == "udp"
    assert world.broker.streams == {}  # the stream is closed
    alice.send("bob", b"d" * 100_000, fin=True, stream=stream)
    world.run(10.0)
    assert bob.received_from("alice") == b"c" * 100_000 + b"d" * 100_000
    assert len([e for e in alice.events if isinstance(e, TunnelUp)]) == 1  # the same tunnel
