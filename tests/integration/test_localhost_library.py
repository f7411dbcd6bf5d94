"""Broker, bob and alice in one process through the library API, on loopback, real QUIC."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import structlog

from engines import ENGINES, NATIVE_MISSING, NATIVE_REASON
from libconfig import config
from natter import Broker, Client, PeerUnavailable
from natter_proto import frames
from netcheck import echo_check, echo_handler, send_and_get_reply, sink_handler

pytestmark = pytest.mark.timeout(180)


@dataclass
class Trio:
    broker: Broker
    bob: Client
    alice: Client
    broker_addr: str
    echo_port: int
    sink_port: int
    engine: str


@pytest.fixture(params=ENGINES)
async def trio(request: pytest.FixtureRequest) -> AsyncIterator[Trio]:
    engine = request.param
    echo = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    sink = await asyncio.start_server(sink_handler(), "127.0.0.1", 0)
    broker = Broker(config(broker_addr="127.0.0.1:0"))
    await broker.start()
    assert broker.address is not None
    addr = f"127.0.0.1:{broker.address.port}"
    bob = Client(config(client_user="bob", broker_addr=addr, quic_engine=engine))
    alice = Client(config(client_user="alice", broker_addr=addr, quic_engine=engine))
    await bob.listen()
    try:
        yield Trio(
            broker,
            bob,
            alice,
            addr,
            echo.sockets[0].getsockname()[1],
            sink.sockets[0].getsockname()[1],
            engine,
        )
    finally:
        await alice.close()
        await bob.close()
        await broker.close()
        echo.close()
        sink.close()


@pytest.mark.parametrize(
    ("count", "size"), [(20, 1 << 20), (250, 64 << 10)], ids=["20x1MB", "250x64KB-beyond-the-stream-limit"]
)
async def test_concurrent_connections(trio: Trio, count: int, size: int) -> None:
    """Many connections at once, each echoed byte-exact. qh3 lets a peer open 100 streams at
    once and aioquic 128: connections beyond that wait for a stream to end (an engine asked
    for one more broke the whole tunnel)."""
    fwd = await trio.alice.forward("127.0.0.1:0", "bob", f":{trio.echo_port}")
    assert fwd.local is not None
    payloads = [os.urandom(size) for _ in range(count)]
    results = await asyncio.gather(*(echo_check("127.0.0.1", fwd.local.port, p) for p in payloads))
    assert all(results)
    assert fwd.cap.connections == count
    assert await echo_check("127.0.0.1", fwd.local.port, b"after" * 1000)
    link = trio.alice.agent.link_to("bob")
    assert (
        link is not None
        and link.role == "client"
        and link.is_alive
        and not getattr(link, "_stream_waiters", ())
    )


async def test_a_connection_aborted_mid_transfer_leaves_the_others_going(trio: Trio) -> None:
    """The aborted stream is reset with bytes still queued in natter and in the engine;
    neither may hold back the tunnel's other streams."""
    sink = await trio.alice.forward("127.0.0.1:0", "bob", f":{trio.sink_port}")
    assert sink.local is not None
    data = os.urandom(10 << 20)
    other = asyncio.ensure_future(send_and_get_reply("127.0.0.1", sink.local.port, data))
    for _ in range(3):
        _reader, writer = await asyncio.open_connection("127.0.0.1", sink.local.port)
        for _ in range(40):
            writer.write(bytes(64 << 10))
            await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST with data in flight
    reply = await asyncio.wait_for(other, 60)
    assert reply.decode().split() == [str(len(data)), hashlib.sha256(data).hexdigest()]
    assert await echo_check_via(trio, b"after the resets" * 1000)


async def echo_check_via(trio: Trio, payload: bytes) -> bool:
    fwd = await trio.alice.forward("127.0.0.1:0", "bob", f":{trio.echo_port}")
    assert fwd.local is not None
    return await asyncio.wait_for(echo_check("127.0.0.1", fwd.local.port, payload), 30)


async def test_fifty_megabytes_and_half_close(trio: Trio) -> None:
    fwd = await trio.alice.forward("127.0.0.1:0", "bob", f":{trio.sink_port}")
    assert fwd.local is not None
    data = os.urandom(50 << 20)
    # the sink answers only after our FIN: half-close must carry the reply back
    reply = await send_and_get_reply("127.0.0.1", fwd.local.port, data)
    assert reply.decode().split() == [str(len(data)), hashlib.sha256(data).hexdigest()]


async def test_half_close_keeps_the_read_side_open(trio: Trio) -> None:
    fwd = await trio.alice.forward("127.0.0.1:0", "bob", f":{trio.echo_port}")
    assert fwd.local is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.local.port)
    writer.write(b"hello ")
    writer.write(b"world")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 20) == b"hello world"
    writer.close()


async def test_second_forward_reuses_the_tunnel(trio: Trio) -> None:
    first = await trio.alice.forward("127.0.0.1:0", "bob", f":{trio.echo_port}")
    assert first.local is not None
    assert await echo_check("127.0.0.1", first.local.port, b"x" * 1000)
    link = trio.alice.agent.link_to("bob")
    second = await trio.alice.forward("127.0.0.1:0", "bob", f":{trio.sink_port}")
    assert second.local is not None
    reply = await send_and_get_reply("127.0.0.1", second.local.port, b"y" * 5000)
    assert reply.startswith(b"5000 ")
    assert trio.alice.agent.link_to("bob") is link
    assert len(trio.bob.agent.tunnels) == 1


async def test_unknown_and_not_listening_peers_get_clear_errors(trio: Trio) -> None:
    with pytest.raises(PeerUnavailable) as info:
        await trio.alice.connect("carol")
    assert info.value.code == frames.ErrorCode.UNKNOWN_PEER and "carol" in str(info.value)
    # bob connecting to alice: alice is registered but does not listen
    with pytest.raises(PeerUnavailable) as info:
        await trio.bob.connect("alice")
    assert info.value.code == frames.ErrorCode.NOT_LISTENING


async def test_forward_to_absent_peer_keeps_retrying_until_it_appears(trio: Trio) -> None:
    with structlog.testing.capture_logs() as logs:
        fwd = await trio.alice.forward("127.0.0.1:0", "carol", f":{trio.echo_port}")
        assert fwd.local is not None
        await asyncio.sleep(1.5)
        assert any("cannot reach carol" in e["event"] for e in logs)
        # a connection accepted now says at once why it waits, and waits (ssh would only
        # have seen "Connection closed by remote host")
        early = asyncio.ensure_future(echo_check("127.0.0.1", fwd.local.port, b"early" * 1000))
        await asyncio.sleep(1.0)
        waits = [e for e in logs if e["event"] == "connection waits for a tunnel to carol"]
        assert waits and "unknown" in waits[0]["reason"] and not early.done()
        assert fwd.problem and "carol" in fwd.problem
        carol = Client(config(client_user="carol", broker_addr=trio.broker_addr, quic_engine=trio.engine))
        await carol.listen()
        try:
            assert await asyncio.wait_for(early, 30)
            ok = await asyncio.wait_for(echo_check("127.0.0.1", fwd.local.port, b"z" * 10000), 30)
            assert ok
        finally:
            await carol.close()


async def test_refused_target_closes_one_connection_and_keeps_the_forward(trio: Trio) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    bad = await trio.alice.forward("127.0.0.1:0", "bob", f":{closed_port}")
    assert bad.local is not None
    with structlog.testing.capture_logs() as logs:
        reader, writer = await asyncio.open_connection("127.0.0.1", bad.local.port)
        assert await asyncio.wait_for(reader.read(), 20) == b""
        writer.close()
        assert any("refused" in str(e.get("reason", "")) for e in logs)
    good = await trio.alice.forward("127.0.0.1:0", "bob", f":{trio.echo_port}")
    assert good.local is not None
    assert await echo_check("127.0.0.1", good.local.port, b"still fine" * 100)


async def test_garbage_datagrams_are_counted_and_harmless(trio: Trio) -> None:
    fwd = await trio.alice.forward("127.0.0.1:0", "bob", f":{trio.echo_port}")
    assert fwd.local is not None
    assert await echo_check("127.0.0.1", fwd.local.port, b"a" * 1000)
    bob_port = trio.bob.agent.sock.local_endpoint.port
    assert trio.broker.address is not None
    junk = [
        b"\x1e\xc1",
        b"\x1e" + b"\xff" * 50,
        b"\x00\x01\x00\x00",
        b"\xc0" + os.urandom(1300),
        b"\x1e\x93\x01\x02\x03",
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for data in junk:
            s.sendto(data, ("127.0.0.1", bob_port))
            s.sendto(data, ("127.0.0.1", trio.broker.address.port))
    await asyncio.sleep(0.3)
    assert sum(v for k, v in trio.bob.agent.stats.items() if k.startswith("dropped")) >= 4
    assert trio.broker.metrics.dropped_total() >= 4
    assert await echo_check("127.0.0.1", fwd.local.port, os.urandom(200_000))


async def test_tunnel_comes_back_after_the_listener_restarts(trio: Trio) -> None:
    fwd = await trio.alice.forward("127.0.0.1:0", "bob", f":{trio.echo_port}")
    assert fwd.local is not None
    assert await echo_check("127.0.0.1", fwd.local.port, b"1" * 1000)
    await trio.bob.close()
    # the same bob (same state directory, same key) comes back
    bob2 = Client(
        config(
            client_user="bob",
            broker_addr=trio.broker_addr,
            state_dir=trio.bob.config.state_dir,
            quic_engine=trio.engine,
        )
    )
    await bob2.listen()
    try:
        # the old tunnel is gone (bob sent CONNECTION_CLOSE); the forward builds a new one
        ok = await asyncio.wait_for(_retry_echo(fwd.local.port), 40)
        assert ok
    finally:
        await bob2.close()


async def _retry_echo(port: int) -> bool:
    while True:
        try:
            if await echo_check("127.0.0.1", port, b"2" * 1000):
                return True
        except ConnectionError:
            pass
        await asyncio.sleep(0.5)


NATIVE = pytest.mark.skipif(NATIVE_MISSING, reason=NATIVE_REASON)


@pytest.mark.parametrize(
    ("bob_engine", "alice_engine"),
    [("native", "aioquic"), ("aioquic", "native")],
)
@NATIVE
async def test_native_and_aioquic_agents_build_tunnels_with_each_other(
    bob_engine: str, alice_engine: str
) -> None:
    """Both speak natter/1 (mutual TLS, QUIC's own flow control, natter_proto's stream
    headers): a fleet moves to the native engine one agent at a time."""
    echo = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    async with Broker(config(broker_addr="127.0.0.1:0")) as broker:
        assert broker.address is not None
        addr = f"127.0.0.1:{broker.address.port}"
        bob = Client(config(client_user="bob", broker_addr=addr, quic_engine=bob_engine))
        alice = Client(config(client_user="alice", broker_addr=addr, quic_engine=alice_engine))
        try:
            await bob.listen()
            fwd = await alice.forward("127.0.0.1:0", "bob", f":{echo_port}")
            assert fwd.local is not None
            payloads = [os.urandom(256 << 10) for _ in range(8)]
            results = await asyncio.gather(*(echo_check("127.0.0.1", fwd.local.port, p) for p in payloads))
            assert all(results)
        finally:
            await alice.close()
            await bob.close()
            echo.close()


@pytest.mark.parametrize(
    ("bob_engine", "alice_engine"),
    [
        ("aioquic", "qh3"),
        ("qh3", "aioquic"),
        pytest.param("qh3", "native", marks=NATIVE),
        pytest.param("native", "qh3", marks=NATIVE),
    ],
)
async def test_peers_with_different_quic_engines_are_told_so(bob_engine: str, alice_engine: str) -> None:
    async with Broker(config(broker_addr="127.0.0.1:0")) as broker:
        assert broker.address is not None
        addr = f"127.0.0.1:{broker.address.port}"
        bob = Client(config(client_user="bob", broker_addr=addr, quic_engine=bob_engine))
        alice = Client(config(client_user="alice", broker_addr=addr, quic_engine=alice_engine))
        try:
            await bob.listen()
            with pytest.raises(PeerUnavailable) as info:
                await alice.connect("bob")
            assert "runs another QUIC engine" in str(info.value)
            assert "--quic-engine" in str(info.value)
        finally:
            await alice.close()
            await bob.close()
