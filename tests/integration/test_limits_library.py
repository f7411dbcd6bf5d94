"""What one local client or one peer can hold open, through the library on loopback with real
QUIC: idle connections on one forward cannot block another forward, streams that never
name a target are reset, and unknown identities cannot open tunnels without bound."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import structlog

from libconfig import config
from natter import Broker, Client
from natter_agent.stream import StreamClosed
from natter_proto import streamhdr
from netcheck import echo_check, echo_handler, send_and_get_reply, sink_handler

pytestmark = pytest.mark.timeout(240)


@dataclass
class Scene:
    broker_addr: str
    bob: Client
    engine: str
    echo_port: int
    sink_port: int
    idle_port: int
    idle_held: list[asyncio.StreamWriter]


@pytest.fixture(params=["aioquic", "qh3"])
async def scene(request: pytest.FixtureRequest) -> AsyncIterator[Scene]:
    """A broker, bob listening with the given settings, and three services on bob's side."""
    engine = request.param
    held: list[asyncio.StreamWriter] = []

    async def idle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts and never says a word: an idle connection

    echo = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    sink = await asyncio.start_server(sink_handler(), "127.0.0.1", 0)
    idle_server = await asyncio.start_server(idle, "127.0.0.1", 0, backlog=4096)
    broker = Broker(config(broker_addr="127.0.0.1:0"))
    await broker.start()
    assert broker.address is not None
    addr = f"127.0.0.1:{broker.address.port}"
    marker = request.node.get_closest_marker("bob")
    settings = marker.kwargs if marker is not None else {}
    bob = Client(config(client_user="bob", broker_addr=addr, quic_engine=engine, **settings))
    await bob.listen()
    try:
        yield Scene(
            addr,
            bob,
            engine,
            echo.sockets[0].getsockname()[1],
            sink.sockets[0].getsockname()[1],
            idle_server.sockets[0].getsockname()[1],
            held,
        )
    finally:
        await bob.close()
        await broker.close()
        for writer in held:
            writer.close()
        for server in (echo, sink, idle_server):
            server.close()


def client(scene: Scene, name: str, **kw: object) -> Client:
    return Client(config(client_user=name, broker_addr=scene.broker_addr, quic_engine=scene.engine, **kw))


async def test_two_thousand_idle_connections_on_one_forward_leave_another_forward_working(
    scene: Scene,
) -> None:
    """Seen before: the peer allowed 100 streams at once, so 100 idle connections on one
    forward made every other forward to that peer wait and fail after 23 s. Now the tunnel
    takes thousands, one forward holds at most --max-connections, and what exceeds that is
    refused at once with a logged reason."""
    alice = client(scene, "alice")
    try:
        idle = await alice.forward("127.0.0.1:0", "bob", f":{scene.idle_port}")
        busy_echo = await alice.forward("127.0.0.1:0", "bob", f":{scene.echo_port}")
        busy_sink = await alice.forward("127.0.0.1:0", "bob", f":{scene.sink_port}")
        assert idle.local is not None and busy_echo.local is not None and busy_sink.local is not None
        assert await echo_check("127.0.0.1", busy_echo.local.port, b"warm" * 100)
        cap = alice.config.max_connections
        writers: list[asyncio.StreamWriter] = []
        with structlog.testing.capture_logs() as logs:
            for _ in range(2000):
                _reader, writer = await asyncio.open_connection("127.0.0.1", idle.local.port)
                writers.append(writer)
            for _ in range(600):  # every idle connection that fits is served by bob's service
                if len(scene.idle_held) >= cap and idle.cap.refused == 2000 - cap:
                    break
                await asyncio.sleep(0.05)
            assert len(scene.idle_held) == cap and idle.cap.open_now == cap
            assert idle.cap.refused == 2000 - cap
            assert any(
                e["event"] == "connection refused" and "--max-connections" in e.get("reason", "")
                for e in logs
            )
            # the other forwards to bob: an interactive round trip and a 5 MB download
            data = os.urandom(5 << 20)
            ok, reply = await asyncio.wait_for(
                asyncio.gather(
                    echo_check("127.0.0.1", busy_echo.local.port, b"ssh-like" * 64),
                    send_and_get_reply("127.0.0.1", busy_sink.local.port, data),
                ),
                30,
            )
            assert ok
            assert reply.decode().split() == [str(len(data)), hashlib.sha256(data).hexdigest()]
        for writer in writers + scene.idle_held:  # both ends close (half-close keeps the other)
            writer.close()
        for _ in range(400):  # closed connections give their slots back
            if idle.cap.open_now == 0:
                break
            await asyncio.sleep(0.05)
        assert idle.cap.open_now == 0
        assert await echo_check("127.0.0.1", busy_echo.local.port, b"after" * 100)
    finally:
        await alice.close()


@pytest.mark.bob(max_streams=20)
async def test_forwards_take_turns_for_stream_slots(scene: Scene) -> None:
    """Beyond the peer's stream limit connections wait, each forward in its own line: a forward
    with many waiting connections does not stand in front of another forward's one."""
    alice = client(scene, "alice")
    try:
        crowd = await alice.forward("127.0.0.1:0", "bob", f":{scene.echo_port}")
        other = await alice.forward("127.0.0.1:0", "bob", f":{scene.echo_port}")
        assert crowd.local is not None and other.local is not None
        assert await echo_check("127.0.0.1", other.local.port, b"up" * 10)
        # 20 connections hold every slot; 60 more wait in the crowd's line
        held = [await asyncio.open_connection("127.0.0.1", crowd.local.port) for _ in range(80)]
        for _reader, writer in held:
            writer.write(b"x")
        await asyncio.sleep(1.0)
        link = alice.agent.link_to("bob")
        assert link is not None and link.open_streams == 20
        late = asyncio.ensure_future(echo_check("127.0.0.1", other.local.port, b"my turn" * 10))
        await asyncio.sleep(0.5)
        held[0][1].close()  # two slots free: the lines take turns, so one is the other's
        held[1][1].close()
        assert await asyncio.wait_for(late, 20)
        for _reader, writer in held[2:]:
            writer.close()
    finally:
        await alice.close()


@pytest.mark.bob(header_timeout=1.0, max_pending_streams=10)
async def test_streams_without_a_header_are_reset_and_bounded(scene: Scene) -> None:
    """A peer that opens streams and never names a target: beyond 10 at once they are reset
    at once, and the rest when the header deadline passes; all are counted."""
    mallory = client(scene, "mallory")
    try:
        link = await mallory.connect("bob")
        channels = []
        for _ in range(30):
            channel = await link.open_stream()
            await channel.write(b"\x00")  # the first byte of a header, and nothing more
            channels.append(channel)

        async def reset(channel: object) -> bool:
            try:
                while await channel.read():  # type: ignore[attr-defined]
                    pass
            except StreamClosed:
                return True
            return False

        results = await asyncio.wait_for(asyncio.gather(*(reset(c) for c in channels)), 20)
        assert all(results)
        listener = scene.bob.listener
        assert listener is not None
        assert listener.refused["pending_streams"] == 20
        assert listener.refused["header_timeout"] == 10
        # the tunnel itself stays usable for a well-formed stream
        channel = await link.open_stream()
        await channel.write(streamhdr.encode_open(f"localhost:{scene.echo_port}"))
        header = await asyncio.wait_for(channel.read(), 10)
        assert streamhdr.parse_reply(streamhdr.split_header(header)[0] or {}).ok
        with contextlib.suppress(StreamClosed):
            channel.reset()
    finally:
        await mallory.close()


async def test_tunnels_from_unknown_identities_are_capped(scene: Scene) -> None:
    """Identities cost nothing: a listener that takes any authenticated peer holds at most
    max_unvetted_tunnels tunnels at once from peers it was never told about (a peer learned
    on first use in this run is still one of them). A peer the user named (here: pinned)
    is not counted against it."""
    friend = client(scene, "friend")
    strangers = [client(scene, f"stranger{i}") for i in range(5)]
    await friend.start()
    pins = {"friend": friend.agent.identity.fingerprint}
    carol = client(scene, "carol", max_unvetted_tunnels=3, pinned_peers=pins)
    try:
        await carol.listen()
        with structlog.testing.capture_logs() as logs:
            outcomes = []
            for stranger in strangers:
                try:
                    live = await asyncio.wait_for(stranger.connect("carol"), 15)
                    await asyncio.sleep(0.3)
                    outcomes.append(live.is_alive)
                except Exception:  # refused: the tunnel closes, or it never comes up
                    outcomes.append(False)
            assert outcomes[:3] == [True, True, True]
            assert not any(outcomes[3:])
            assert any("tunnels open from peers it does not know" in str(e.get("reason", "")) for e in logs)
            named = await asyncio.wait_for(friend.connect("carol"), 15)
            assert named.is_alive
    finally:
        for c in [friend, *strangers, carol]:
            await c.close()
