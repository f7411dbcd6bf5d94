"""Path lifecycles on the simulated network: real QUIC, virtual time, no root."""

from __future__ import annotations

from simnet import Filtering, Mapping
from simworld import SimAgent, World

from natter_proto.agent.actions import Notice, NoticeKind, PathChanged, PeerReady, TunnelUp
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


def settled(agent: SimAgent) -> list[PathKind]:
    """The kinds of path the tunnel took, in order (its start, then each move)."""
    return kinds(agent)[:1] + [new for _, new in changes(agent)]


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
    asked = world.net.clock.now
    connect(world, alice, seconds=12.0)
    # a birthday punch may take longer than the relay's head start: such a tunnel starts on
    # the relay and moves to the predicted path (relay first, punch in parallel)
    assert settled(alice) in ([expected], [PathKind.RELAYED, expected])
    assert settled(bob) == settled(alice)
    assert ready_after(alice, asked) < 1.0  # never a punch timeout (5 s) before the first byte


def ready_after(agent: SimAgent, since: float) -> float:
    """Seconds from ``since`` to the agent's first usable tunnel."""
    return next(t for e, t in zip(agent.events, agent.times, strict=True) if isinstance(e, PeerReady)) - since


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


def notices(agent: SimAgent, *kinds_: NoticeKind) -> list[Notice]:
    return [e for e in agent.events if isinstance(e, Notice) and e.kind in kinds_]


def test_forward_recovers_when_the_client_re_registers_before_the_listener() -> None:
    """Seen: after a broker restart alice asked for bob before bob was back, was told
    'unknown peer', and no connect ever went to the broker again (a re-punch marker that
    only a punch outcome cleared). Now every outcome ends its own attempt."""
    world = World()
    alice, bob = pair(world)
    connect(world, alice)
    b_nat = world.net.internet.nats["203.0.113.20"]
    b_nat.paused = True
    world.broker.restart()
    alice.send("bob", b"x" * 1000)
    world.run(12.0)
    assert alice.machine.registered
    assert alice.unreachable.get("bob") is not None  # told, not left waiting
    b_nat.paused = False
    world.run(12.0)  # bob notices, re-registers
    assert bob.machine.registered
    connect(world, alice, seconds=3.0)  # the forward's next try
    tunnel = alice.tunnel_to("bob")
    assert tunnel is not None and tunnel.ready
    alice.send("bob", b"after", fin=True)
    world.run(1.0)
    assert bob.received_from("alice").endswith(b"after")


def test_both_ends_agree_on_the_path_after_the_listener_was_stopped() -> None:
    """Seen: bob stopped for 30 s, both went to the relay; bob resumed, alice said direct
    while bob kept sending through the relay (and the broker carried 215 MB)."""
    world = World(settings=AgentSettings(upgrade_interval=10.0))
    alice, bob = pair(world)
    connect(world, alice)
    b_nat = world.net.internet.nats["203.0.113.20"]
    b_nat.deny.add("203.0.113.10")  # the direct path fails first: the tunnel goes to the relay
    alice.send("bob", b"x" * 1000)
    world.run(10.0)
    b_nat.paused = True  # then bob stops altogether
    world.run(30.0)
    b_nat.paused = False  # bob resumes; the direct path still fails
    world.run(10.0)
    connect(world, alice, seconds=10.0)  # the forward's retry: a relayed tunnel
    assert alice.tunnel_to("bob") is not None
    b_nat.deny.clear()  # now a direct path works: the upgrade takes both ends there
    world.run(15.0)
    mine, theirs = alice.tunnel_to("bob"), bob.tunnel_to("alice")
    assert mine is not None and theirs is not None and mine.id in alice.tunnels
    assert mine.kind is PathKind.DIRECT and theirs.kind is PathKind.DIRECT
    relayed = world.broker.relayed_bytes
    stream = alice.send("bob", b"")
    for _ in range(20):
        alice.send("bob", b"z" * 50_000, stream=stream)
        bob.send("alice", b"w" * 50_000)
        world.run(0.1)
    world.run(2.0)
    assert world.broker.relayed_bytes - relayed < 5_000  # neither side relays any more


def test_a_one_way_bulk_transfer_does_not_trip_the_silence_check() -> None:
    """Seen: 'hears nothing back: punching again' after every bulk upload. Silence is now
    judged by acknowledged pings, not by gaps in what comes back."""
    world = World(loss=0.01)
    alice, bob = pair(world)
    connect(world, alice)
    stream = alice.send("bob", b"")
    for _ in range(200):  # 10 s of sending
        alice.send("bob", b"u" * 30_000, stream=stream)
        world.run(0.05)
    world.run(5.0)  # and the quiet after it
    for agent in (alice, bob):
        assert not notices(agent, NoticeKind.SILENT, NoticeKind.REPUNCH), agent.name


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy-a-moment-ago"])
def test_a_restarted_listener_is_reached_again_within_seconds(busy: bool) -> None:
    """Seen: after kill -9 and a restart of bob, new connections worked only after 60 s
    (QUIC's idle timeout) while alice re-punched onto the dead connection. And, on a faster
    machine, 2.6 s when the tunnel had moved bytes a moment before (its last ping said busy,
    so a new connection sent no ping of its own and waited for the next one)."""
    world = World()
    alice, bob = pair(world)
    connect(world, alice)
    old = alice.tunnel_to("bob")
    if busy:
        stream = alice.send("bob", b"")
        for _ in range(10):
            alice.send("bob", b"b" * 2000, stream=stream)
            world.run(0.15)  # pings answered while bytes move: the tunnel counts as busy
    world.kill(bob)
    bob2 = world.agent("bob", bob.realm, bob.ip, identity=bob.identity, port=40001)
    world.start(bob2, listen=(bob2,))
    for _ in range(40):  # back as soon as the broker has it (0.37 s in the NAT lab)
        world.run(0.025)
        if bob2.machine.registered:
            break
    assert bob2.machine.registered
    start = world.net.clock.now
    alice.send("bob", b"new connection")  # the stream a new TCP connection opens
    while world.net.clock.now - start < 10 and (alice.tunnel_to("bob") in (None, old)):
        world.run(0.1)
    took = world.net.clock.now - start
    assert alice.tunnel_to("bob") not in (None, old)
    assert took < 2.0, took  # the target: within 2 s of the listener's return


def test_a_quiet_tunnel_asks_the_broker_where_it_sees_us_at_once() -> None:
    """The endpoint check leaves with the silence that calls for it, not with the next
    timer tick: the broker has the keepalive one hop later."""
    world = World()
    alice, _bob = pair(world)
    connect(world, alice)
    world.net.internet.nats["203.0.113.10"].deny.add("203.0.113.20")
    alice.send("bob", b"x" * 1000)
    world.run(3.0)
    (quiet,) = [
        t
        for t, e in zip(alice.times, alice.events, strict=True)
        if isinstance(e, Notice) and e.kind is NoticeKind.SILENT
    ]
    asked = [t for t, name in world.broker.keepalives if name == "alice" and t >= quiet]
    assert asked and asked[0] - quiet <= 2 * world.net.latency + 1e-9
