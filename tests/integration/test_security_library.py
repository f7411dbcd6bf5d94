"""Identity, pinning, ACLs, reflection, replay and a datagram storm, with a real broker,
real agents and real QUIC on loopback."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
import structlog

from engines import ENGINES
from natter import Broker, Client, Config, PeerUnavailable
from natter_proto import frames
from natter_proto.endpoints import AddressError, Endpoint
from natter_proto.frames import Challenge, Register, Registered
from natter_proto.identity import Identity
from netcheck import echo_check, echo_handler

pytestmark = pytest.mark.timeout(180)


ENGINE = {"name": "qh3"}  # set by the ``engine`` fixture for tests that run on both


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test once per QUIC engine: every Config the test builds uses it."""
    ENGINE["name"] = request.param
    yield request.param
    ENGINE["name"] = "qh3"


def config(**kw: object) -> Config:
    base: dict[str, object] = dict(
        keepalive_interval=2.0, registration_ttl=6.0, punch_timeout=3.0, quic_engine=ENGINE["name"]
    )
    base.update(kw)
    base.setdefault("state_dir", tempfile.mkdtemp(prefix="natter-state-"))
    return Config(**base)  # type: ignore[arg-type]


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    instance = Broker(config(broker_addr="127.0.0.1:0", cookie_window=2.0))
    await instance.start()
    yield instance
    await instance.close()


def addr(broker: Broker) -> str:
    assert broker.address is not None
    return f"127.0.0.1:{broker.address.port}"


class RawSocket:
    """A UDP socket the test drives by hand (a captured or spoofed sender)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.endpoint = Endpoint("127.0.0.1", self.sock.getsockname()[1])

    def send(self, data: bytes, to: Endpoint) -> None:
        self.sock.sendto(data, (to.host, to.port))

    async def replies(self, wait: float = 0.3) -> list[bytes]:
        await asyncio.sleep(wait)
        got = []
        while True:
            try:
                got.append(self.sock.recv(4096))
            except BlockingIOError:
                return got

    def close(self) -> None:
        self.sock.close()


def signed(identity: Identity, cookie: bytes | None, name: str = "bob") -> bytes:
    unsigned = Register(name=name, listening=True, public_key=identity.public_key, cookie=cookie)
    return frames.encode(replace(unsigned, signature=identity.sign_register(unsigned)))


async def test_hijack_is_refused_and_forwards_reach_the_real_bob(
    broker: Broker, echo_port: int, engine: str
) -> None:
    bob = Client(config(client_user="bob", broker_addr=addr(broker)))
    mallory = Client(config(client_user="bob", broker_addr=addr(broker)))  # same name, other key
    alice = Client(config(client_user="alice", broker_addr=addr(broker)))
    try:
        await bob.listen()
        with structlog.testing.capture_logs() as logs:
            await mallory.start()
            await asyncio.sleep(1.0)
        refusals = [e for e in logs if e["event"] == "broker refused registration"]
        assert refusals and refusals[0]["code"] == frames.ErrorCode.NAME_TAKEN
        assert bob.agent.identity.fingerprint in refusals[0]["reason"]
        assert any(e["event"] == "refused registration" and e["code"] == "name_taken" for e in logs)
        assert not mallory.agent.registered.is_set()
        fwd = await alice.forward("127.0.0.1:0", "bob", f":{echo_port}")
        assert fwd.local is not None
        assert await echo_check("127.0.0.1", fwd.local.port, os.urandom(100_000))
        link = alice.agent.link_to("bob")
        assert link is not None and link.peer_key == bob.agent.identity.public_key
    finally:
        for client in (alice, mallory, bob):
            await client.close()


async def test_pinned_key_refuses_an_impostor_at_the_tls_layer(echo_port: int, engine: str) -> None:
    real_bob = Identity.generate().fingerprint  # the key alice expects
    hits = 0

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hits
        hits += 1
        writer.close()

    target = await asyncio.start_server(counting, "127.0.0.1", 0)
    target_port = target.sockets[0].getsockname()[1]
    async with Broker(config(broker_addr="127.0.0.1:0")) as fresh:  # a fresh broker: no binding
        impostor = Client(config(client_user="bob", broker_addr=addr(fresh)))
        alice = Client(config(client_user="alice", broker_addr=addr(fresh), pinned_peers={"bob": real_bob}))
        try:
            await impostor.listen()
            with structlog.testing.capture_logs() as logs, pytest.raises(PeerUnavailable) as info:
                await alice.connect("bob")
            assert "does not match the pinned fingerprint" in str(info.value)
            assert any(e["event"] == "refused tunnel at the TLS layer" for e in logs)
            fwd = await alice.forward("127.0.0.1:0", "bob", f":{target_port}")
            assert fwd.local is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", fwd.local.port)
            writer.write(b"secret bytes")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 30) == b""  # alice gave up on it
            writer.close()
            assert hits == 0  # not one connection, let alone a byte, reached the impostor
            assert alice.agent.link_to("bob") is None
        finally:
            await alice.close()
            await impostor.close()
    target.close()


async def test_known_peers_refuse_a_changed_key(broker: Broker, echo_port: int, engine: str) -> None:
    alice_state = tempfile.mkdtemp()
    bob = Client(config(client_user="bob", broker_addr=addr(broker)))
    alice = Client(config(client_user="alice", broker_addr=addr(broker), state_dir=alice_state))
    await bob.listen()
    await alice.connect("bob")  # learned on first use
    known = (alice.agent.trust.known.path or "").__str__()
    await alice.close()
    await bob.close()
    with open(known) as handle:
        assert bob.agent.identity.fingerprint in handle.read()
    async with Broker(config(broker_addr="127.0.0.1:0")) as other:
        new_bob = Client(config(client_user="bob", broker_addr=addr(other)))
        alice2 = Client(config(client_user="alice", broker_addr=addr(other), state_dir=alice_state))
        try:
            await new_bob.listen()
            with structlog.testing.capture_logs() as logs:
                with pytest.raises(PeerUnavailable) as info:
                    await alice2.connect("bob")
                assert "KEY CHANGED for bob" in str(info.value)
                # every new connection after it: refused at once, no new introduction
                for _ in range(20):
                    with pytest.raises(PeerUnavailable) as info:
                        await asyncio.wait_for(alice2.connect("bob"), 0.5)
                    assert "KEY CHANGED for bob" in str(info.value) and "trying again in" in str(info.value)
            refusals = [e for e in logs if e["event"] == "refused tunnel at the TLS layer"]
            asked = [e for e in logs if e.get("kind") == "asking_broker" and e.get("name") == "alice"]
            assert len(refusals) == 1 and len(asked) == 1
        finally:
            await alice2.close()
            await new_bob.close()


async def test_listener_acls(broker: Broker, engine: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello from 2222")
        await writer.drain()
        writer.close()

    allowed = await asyncio.start_server(answer, "127.0.0.1", 0)
    other = await asyncio.start_server(answer, "127.0.0.1", 0)
    allowed_port = allowed.sockets[0].getsockname()[1]
    other_port = other.sockets[0].getsockname()[1]
    bob = Client(
        config(client_user="bob", broker_addr=addr(broker), allow_targets=[f"127.0.0.1:{allowed_port}"])
    )
    alice = Client(config(client_user="alice", broker_addr=addr(broker)))
    carol_only = Client(config(client_user="dave", broker_addr=addr(broker), allow_peers=["carol"]))
    try:
        await bob.listen()
        await carol_only.listen()
        ok = await alice.forward("127.0.0.1:0", "bob", f"127.0.0.1:{allowed_port}")
        refused = await alice.forward("127.0.0.1:0", "bob", f"127.0.0.1:{other_port}")
        assert ok.local is not None and refused.local is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", ok.local.port)
        assert await asyncio.wait_for(reader.read(), 20) == b"hello from 2222"
        writer.close()
        with structlog.testing.capture_logs() as logs:
            reader, writer = await asyncio.open_connection("127.0.0.1", refused.local.port)
            assert await asyncio.wait_for(reader.read(), 20) == b""
            writer.close()
        reasons = [str(e.get("reason")) for e in logs if e["event"] == "connection closed"]
        assert any(f"bob refused 127.0.0.1:{other_port}: target not allowed" in r for r in reasons), reasons
        # the forward itself stays up
        reader, writer = await asyncio.open_connection("127.0.0.1", ok.local.port)
        assert await asyncio.wait_for(reader.read(), 20) == b"hello from 2222"
        writer.close()
        # dave accepts only carol: alice is refused
        with pytest.raises(PeerUnavailable) as info:
            await alice.connect("dave")
        assert "not allowed" in str(info.value)
    finally:
        for client in (alice, carol_only, bob):
            await client.close()
        allowed.close()
        other.close()


async def test_no_reflection_amplification_from_unvalidated_sources(broker: Broker) -> None:
    spoofed = RawSocket()  # never echoes a cookie, like a victim whose address is spoofed
    assert broker.address is not None
    identity = Identity.generate()
    requests = [signed(identity, None, name=f"n{i}") for i in range(50)]
    requests += [frames.encode(frames.Keepalive(name="bob"))] * 50
    requests += [frames.encode(frames.ConnectRequest(f"r{i}", "a", "bob", "x:1")) for i in range(50)]
    requests += [bytes([frames.PREFIX]) + b"\x80"] * 20  # a tiny valid-looking map
    sent = 0
    received: list[bytes] = []
    for data in requests:
        spoofed.send(data, broker.address)
        sent += len(data)
        received += await spoofed.replies(0.005)
    received += await spoofed.replies(0.3)
    assert len(received) <= len(requests)
    reply_bytes = sum(len(r) for r in received)
    assert reply_bytes <= sent, (reply_bytes, sent)
    assert all(isinstance(frames.decode(r), Challenge) for r in received)
    smallest_answered = min(len(r) for r in requests if len(r) >= 50)
    assert all(len(reply) <= smallest_answered for reply in received)
    print(f"reflection: {len(requests)} requests, {sent} bytes in, {reply_bytes} bytes out")
    assert broker.metrics.sample("natter_broker_registrations_total") == 0
    spoofed.close()


async def test_captured_register_frame_cannot_be_replayed(broker: Broker) -> None:
    assert broker.address is not None
    victim, thief = RawSocket(), RawSocket()
    identity = Identity.generate()
    victim.send(signed(identity, None), broker.address)
    (challenge,) = await victim.replies()
    cookie = frames.decode(challenge).cookie  # type: ignore[attr-defined]
    captured = signed(identity, cookie)
    victim.send(captured, broker.address)
    (answer,) = await victim.replies()
    assert isinstance(frames.decode(answer), Registered)
    # replayed from another address at once: the cookie is bound to the victim's address
    thief.send(captured, broker.address)
    (reply,) = await thief.replies()
    assert isinstance(frames.decode(reply), Challenge)
    # replayed later from the victim's own address: the cookie has expired
    await asyncio.sleep(3.2)
    victim.send(captured, broker.address)
    (reply,) = await victim.replies()
    assert isinstance(frames.decode(reply), Challenge)
    assert broker.metrics.sample("natter_broker_registrations_total") == 1
    victim.close()
    thief.close()


def mutations(seed: int) -> list[bytes]:
    """Valid frames of every type, then random, truncated, extended and bit-flipped ones."""
    rng = random.Random(seed)
    e = Endpoint("127.0.0.1", 9)
    valid = [
        frames.encode(m)
        for m in (
            frames.Keepalive("bob", cookie=b"c" * 20),
            frames.Register(name="bob", public_key=b"k" * 32),
            frames.Probe("0011223344556677", "alice", 3),
            frames.ProbeAck("0011223344556677", "alice", 3, e),
            frames.Punch("r", "s", "alice", e, (e,), "server", peer_key=b"k" * 32),
            frames.Challenge(b"c" * 20),
            frames.Error("x", "y", "r"),
            frames.Goaway("bye"),
        )
    ]
    out = []
    for i in range(100_000):
        kind = i % 5
        if kind == 0:
            out.append(os.urandom(rng.randint(1, 1300)))
        else:
            base = bytearray(rng.choice(valid))
            if kind == 1:
                for _ in range(rng.randint(1, 4)):
                    base[rng.randrange(len(base))] = rng.randrange(256)
            elif kind == 2:
                base = base[: rng.randrange(1, len(base))]
            elif kind == 3:
                base += os.urandom(rng.randint(1, 40))
            else:
                base[0] = rng.randrange(0x40)
            out.append(bytes(base))
    return out


async def test_datagram_storm_is_accounted_for_and_harmless(echo_port: int, engine: str) -> None:
    async with Broker(config(broker_addr="127.0.0.1:0", rate_per_ip=1e9, burst_per_ip=1e9)) as storm_broker:
        # no frames of their own in the count: no keepalives, and no path checks or new
        # punches when the storm starves the tunnel (all of it shares this one process)
        quiet = dict(keepalive_interval=300, path_silence=300.0, path_dead=300.0)
        bob = Client(config(client_user="bob", broker_addr=addr(storm_broker), **quiet))
        alice = Client(config(client_user="alice", broker_addr=addr(storm_broker), **quiet))
        storm = RawSocket()
        try:
            await bob.listen()
            fwd = await alice.forward("127.0.0.1:0", "bob", f":{echo_port}")
            assert fwd.local is not None
            assert await echo_check("127.0.0.1", fwd.local.port, os.urandom(50_000))
            assert storm_broker.address is not None
            bob_addr = bob.agent.sock.local_endpoint
            targets = {
                "broker": (storm_broker.address, lambda: broker_seen(storm_broker)),
                "agent": (Endpoint("127.0.0.1", bob_addr.port), lambda: agent_seen(bob)),
            }
            for name, (to, seen) in targets.items():
                datagrams = mutations(seed=7 if name == "broker" else 8)
                before = seen()
                for start in range(0, len(datagrams), 200):
                    for data in datagrams[start : start + 200]:
                        storm.send(data, to)
                    for _ in range(200):  # let the receiver catch up before the next burst
                        if seen() - before >= start + 200 or seen() - before == len(datagrams):
                            break
                        await asyncio.sleep(0.001)
                for _ in range(500):
                    if seen() - before >= len(datagrams):
                        break
                    await asyncio.sleep(0.01)
                assert seen() - before == len(datagrams), (name, seen() - before)
            assert await echo_check("127.0.0.1", fwd.local.port, os.urandom(200_000))
            assert bob.agent.link_to("alice") is not None
        finally:
            storm.close()
            await alice.close()
            await bob.close()


def broker_seen(broker: Broker) -> float:
    return broker.metrics.dropped_total() + broker.metrics.sample("natter_broker_frames_accepted_total")


def agent_seen(client: Client) -> int:
    return sum(v for k, v in client.agent.stats.items() if k.startswith(("dropped_", "accepted_")))


def spoofed_udp(source_port: int, dest: Endpoint, payload: bytes) -> None:
    """One UDP datagram from 127.0.0.1:source_port, a port another socket owns (root only)."""
    header = struct.pack("!HHHH", source_port, dest.port, 8 + len(payload), 0)  # checksum 0: none
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP) as raw:
        raw.sendto(header + payload, (dest.host, 0))


@pytest.mark.skipif(os.geteuid() != 0, reason="spoofing a source port needs a raw socket (root)")
async def test_forged_and_replayed_keepalives_do_not_make_an_agent_re_register(broker: Broker) -> None:
    """Seen: 20 keepalives spoofed from alice's endpoint with random cookies, and replays of
    captured ones, each made the broker challenge alice, and each challenge re-registered
    her. Now a challenge that cannot be the answer to her own keepalive is answered with at
    most one keepalive a second and her registration stands."""
    assert broker.address is not None
    alice = Client(config(client_user="alice", broker_addr=f"127.0.0.1:{broker.address.port}"))
    try:
        await alice.start()
        await alice.agent.wait_registered(10)
        port = alice.agent.sock.local_endpoint.port
        registration = alice.agent.registration
        assert registration is not None and registration.cookie is not None
        captured = frames.encode(frames.Keepalive("alice", cookie=registration.cookie))
        registrations = broker.metrics.sample("natter_broker_registrations_total")
        with structlog.testing.capture_logs() as logs:
            for _ in range(20):
                forged = frames.encode(frames.Keepalive("alice", cookie=os.urandom(20)))
                spoofed_udp(port, broker.address, forged)
                await asyncio.sleep(0.05)
            await asyncio.sleep(2.5)  # the captured cookie expires (the broker's window is 2 s)
            for _ in range(17):
                spoofed_udp(port, broker.address, captured)
                await asyncio.sleep(0.05)
            await asyncio.sleep(2.5)  # alice's own keepalives go on meanwhile
        assert not [e for e in logs if "registration lost" in e["event"] or "fresh cookie" in str(e)]
        assert alice.agent.registered.is_set()
        assert broker.metrics.sample("natter_broker_registrations_total") == registrations
        stats = alice.agent.stats
        assert stats["unbound_challenge_answered"] + stats["unbound_challenge_ignored"] >= 30
        assert stats["unbound_challenge_answered"] <= 8  # at most one a second
    finally:
        await alice.close()


async def test_a_restarted_broker_keeps_names_bound_and_an_impostor_that_races_is_refused(
    echo_port: int,
) -> None:
    """Seen: a lone broker forgot after a restart which key owned which name; an impostor
    that registered "bob" first got the name, and a client that had never seen bob sent it
    a stream header. Now the bindings are on disk in the broker's state directory."""
    state = tempfile.mkdtemp(prefix="natter-broker-")
    first = Broker(config(broker_addr="127.0.0.1:0", state_dir=state))
    await first.start()
    assert first.address is not None
    port = first.address.port
    bob = Client(config(client_user="bob", broker_addr=f"127.0.0.1:{port}"))
    mallory = Client(config(client_user="bob", broker_addr=f"127.0.0.1:{port}"))  # same name, other key
    alice = Client(config(client_user="alice", broker_addr=f"127.0.0.1:{port}"))  # has never seen bob
    second: Broker | None = None
    try:
        await bob.listen()
        await first.close(goaway=False)  # a crash, as far as the agents can tell
        second = Broker(config(broker_addr=f"127.0.0.1:{port}", state_dir=state))
        await second.start()
        with structlog.testing.capture_logs() as logs:
            await mallory.start()  # at once: before bob's next keepalive finds the new broker
            await asyncio.sleep(3.0)
        refusals = [e for e in logs if e["event"] == "broker refused registration"]
        assert refusals and refusals[0]["code"] == frames.ErrorCode.NAME_TAKEN
        assert bob.agent.identity.fingerprint in refusals[0]["reason"]
        assert not mallory.agent.registered.is_set()
        await bob.agent.wait_registered(10)
        fwd = await alice.forward("127.0.0.1:0", "bob", f":{echo_port}")
        assert fwd.local is not None
        assert await echo_check("127.0.0.1", fwd.local.port, b"the real bob" * 100)
        link = alice.agent.link_to("bob")
        assert link is not None and link.peer_key == bob.agent.identity.public_key
    finally:
        for client in (alice, mallory, bob):
            await client.close()
        if second is not None:
            await second.close()


async def test_a_names_file_binds_names_before_anyone_registers(tmp_path: Any) -> None:
    bob_key = Identity.generate()
    names = tmp_path / "names"
    names.write_text(f"# reserved names\nbob {bob_key.fingerprint}\n")
    async with Broker(config(broker_addr="127.0.0.1:0", names_file=str(names))) as fresh:
        mallory = Client(config(client_user="bob", broker_addr=addr(fresh)))  # first, but not bob's key
        carol = Client(config(client_user="carol", broker_addr=addr(fresh)))  # a name nobody reserved
        try:
            with structlog.testing.capture_logs() as logs:
                await mallory.start()
                await carol.start()
                await carol.agent.wait_registered(10)
                await asyncio.sleep(1.0)
            refusals = [e for e in logs if e["event"] == "broker refused registration"]
            assert refusals and bob_key.fingerprint in refusals[0]["reason"]
            assert not mallory.agent.registered.is_set()
        finally:
            await mallory.close()
            await carol.close()
    names.write_text("bob nt1-notafingerprint\n")
    with pytest.raises(AddressError, match="bad names file"):
        Broker(config(broker_addr="127.0.0.1:0", names_file=str(names)))
