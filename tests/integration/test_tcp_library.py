"""The broker's TCP way in, through the library on loopback: an agent whose UDP to the
broker gets no answer registers over TCP (TLS, WebSocket) and relays over it, then moves
to a direct path when UDP between the peers answers; strict broker verification; and
hostile TCP clients, each given a bounded answer while the broker keeps serving.

"UDP blocked" without root: alice is given a broker port whose TCP is the broker's
(``tcp_addr``) and whose UDP is a socket that never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from libconfig import config
from natter import Broker, Client
from natter_agent.errors import NatterError
from natter_broker.tlscert import CERT_FILE, self_signed_pair
from natter_proto import websocket as ws
from netcheck import echo_check, echo_handler

pytestmark = pytest.mark.timeout(180)


@dataclass
class Scene:
    broker: Broker
    udp_addr: str  # where UDP works
    tcp_only_addr: str  # TCP: the broker's; UDP: a socket that never answers
    echo_port: int
    state_dir: str


@pytest.fixture
async def scene() -> AsyncIterator[Scene]:
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hole.bind(("127.0.0.1", 0))  # takes the UDP port, answers nothing
    port = hole.getsockname()[1]
    state = tempfile.mkdtemp(prefix="natter-broker-")
    broker = Broker(
        config(
            broker_addr="127.0.0.1:0",
            tcp_addr=f"127.0.0.1:{port}",
            state_dir=state,
            tcp_handshake_timeout=1.0,
            tcp_idle_timeout=3.0,
            tcp_per_ip=16,
            tcp_max=400,
        )
    )
    await broker.start()
    assert broker.address is not None and broker.tcp_address is not None
    echo = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    try:
        yield Scene(
            broker,
            f"127.0.0.1:{broker.address.port}",
            f"127.0.0.1:{port}",
            echo.sockets[0].getsockname()[1],
            state,
        )
    finally:
        await broker.close()
        echo.close()
        hole.close()


@pytest.mark.parametrize("engine", ["aioquic", "qh3"])
async def test_no_udp_answer_registers_over_tcp_relays_then_moves_direct(scene: Scene, engine: str) -> None:
    async with Client(config(client_user="bob", broker_addr=scene.udp_addr, quic_engine=engine)) as bob:
        await bob.listen()
        alice = Client(config(client_user="alice", broker_addr=scene.tcp_only_addr, quic_engine=engine))
        try:
            forward = await alice.forward("127.0.0.1:0", "bob", f"127.0.0.1:{scene.echo_port}")
            assert forward.local is not None
            port = forward.local.port
            assert await echo_check("127.0.0.1", port, os.urandom(1 << 20))
            machine = alice.agent.machine
            assert machine is not None and machine.link.path.via == "tcp"
            first = alice.agent.link_to("bob")
            assert first is not None
            for _ in range(100):  # the punch goes on: UDP between the peers answers
                link = alice.agent.link_to("bob")
                if link is not None and not link.route.relayed:
                    break
                await asyncio.sleep(0.05)
            link = alice.agent.link_to("bob")
            assert link is not None and link.status()["path"] == "direct", link.status() if link else None
            assert link is first  # the same tunnel: it started on the relay (tcp) and moved
            assert await echo_check("127.0.0.1", port, os.urandom(1 << 20))
            assert scene.broker.metrics.sample("natter_broker_tcp_connections") == 1
        finally:
            await alice.close()


async def test_a_pinned_broker_key_is_checked(scene: Scene) -> None:
    good = Client(
        config(client_user="carol", broker_addr=scene.tcp_only_addr, broker_key=scene.broker.tls_key)
    )
    await good.start()
    try:
        await good.agent.wait_registered(10)
    finally:
        await good.close()
    wrong = "SHA256:" + "A" * 43
    bad = Client(config(client_user="dave", broker_addr=scene.tcp_only_addr, broker_key=wrong))
    await bad.start()
    try:
        with pytest.raises(NatterError) as failed:
            await bad.agent.wait_registered(3)
        text = str(failed.value)
        assert text.startswith(f"broker {scene.tcp_only_addr}: no UDP answer; TCP: broker key SHA256:"), text
        assert f"is not the pinned {wrong}" in text
    finally:
        await bad.close()


async def test_a_broker_ca_file_verifies_the_certificate(scene: Scene) -> None:
    ca = str(Path(scene.state_dir) / CERT_FILE)  # the self-signed one is its own CA
    async with Client(config(client_user="erin", broker_addr=scene.tcp_only_addr, broker_ca=ca)) as erin:
        await erin.start()
        await erin.agent.wait_registered(10)
    other = Path(tempfile.mkdtemp()) / "other-ca.pem"
    other.write_bytes(self_signed_pair()[0])  # a CA that did not sign the broker's certificate
    frank = Client(config(client_user="frank", broker_addr=scene.tcp_only_addr, broker_ca=str(other)))
    await frank.start()
    try:
        with pytest.raises(NatterError, match="TCP: TLS: CERTIFICATE_VERIFY_FAILED"):
            await frank.agent.wait_registered(3)
    finally:
        await frank.close()


# -- hostile clients ----------------------------------------------------------------------
def tls_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the broker sent before it closed the connection (fails if it did not)."""
    got = bytearray()
    async with asyncio.timeout(seconds):
        while chunk := await reader.read(4096):
            got += chunk
    return bytes(got)


async def test_half_open_and_garbage_clients_get_bounded_answers(scene: Scene) -> None:
    host, port = scene.tcp_only_addr.split(":")
    # half-open: TCP, and then nothing (slowloris): cut off at the handshake timeout
    reader, writer = await asyncio.open_connection(host, int(port))
    assert await closed_within(reader, 3.0) == b""
    writer.close()
    # TLS started and never finished
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"\x16\x03\x01\x00\xff")  # a ClientHello's record header, and no more
    assert await closed_within(reader, 3.0) == b""
    writer.close()
    # not TLS at all
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    await closed_within(reader, 3.0)
    writer.close()
    # TLS, then garbage instead of the upgrade: an HTTP 400 with the reason
    reader, writer = await asyncio.open_connection(host, int(port), ssl=tls_client())
    writer.write(b"\x00" * 100 + b"\r\n\r\n")
    answer = await closed_within(reader, 3.0)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"natter broker: " in answer
    writer.close()
    # TLS, the upgrade, then a frame that is not WebSocket: a close frame (protocol error)
    for garbage, code in ((b"\xff" * 64, ws.CloseCode.PROTOCOL_ERROR), (_huge(), ws.CloseCode.TOO_BIG)):
        reader, writer = await upgraded(host, int(port))
        writer.write(garbage)
        events = ws.Decoder(max_message=4096, masked=False).feed(await closed_within(reader, 3.0))
        assert isinstance(events[-1], ws.Closed) and events[-1].code == code, events
        writer.close()
    dropped = scene.broker.metrics.sample
    for reason in ("handshake_timeout", "tls_failed", "bad_upgrade", "bad_frame"):
        assert dropped("natter_broker_tcp_closed_total", reason=reason) >= 1, reason


def _huge() -> bytes:
    """The head of a 1 GiB message: refused before any of it is read."""
    return bytes([0x82, 0xFF]) + (1 << 30).to_bytes(8, "big") + b"\0\0\0\0"


async def upgraded(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port, ssl=tls_client())
    key = os.urandom(16)
    writer.write(ws.client_request(host, key))
    head = await reader.readuntil(b"\r\n\r\n")
    ws.parse_response(head, key)
    return reader, writer


async def test_thousands_of_idle_connections_stay_bounded(scene: Scene) -> None:
    """1,500 connections from 60 loopback addresses that never speak: at most 16 per address
    and 400 in all are held, each only until the handshake timeout; meanwhile an agent
    registers over UDP, and afterwards one registers over TCP."""
    host, port = scene.tcp_only_addr.split(":")
    held: list[socket.socket] = []
    peak = 0
    try:
        for i in range(1500):
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((f"127.0.{1 + i % 60}.{1 + i // 60 % 200}", 0))
            with contextlib.suppress(BlockingIOError):
                sock.connect((host, int(port)))
            held.append(sock)
            if i % 100 == 0:
                await asyncio.sleep(0.01)
                peak = max(peak, int(scene.broker.metrics.sample("natter_broker_tcp_connections")))
        await asyncio.sleep(0.3)
        peak = max(peak, int(scene.broker.metrics.sample("natter_broker_tcp_connections")))
        assert 0 < peak <= 400
        refused = scene.broker.metrics.sample
        assert (
            refused("natter_broker_tcp_closed_total", reason="per_ip")
            + refused("natter_broker_tcp_closed_total", reason="too_many")
            >= 1500 - 400
        )
        async with Client(config(client_user="gina", broker_addr=scene.udp_addr)) as gina:
            await gina.start()
            await gina.agent.wait_registered(10)
        for _ in range(60):  # the handshake timeout (1 s) frees every slot
            if scene.broker.metrics.sample("natter_broker_tcp_connections") == 0:
                break
            await asyncio.sleep(0.1)
        assert scene.broker.metrics.sample("natter_broker_tcp_connections") == 0
    finally:
        for sock in held:
            sock.close()
    async with Client(config(client_user="hana", broker_addr=scene.tcp_only_addr)) as hana:
        await hana.start()
        await hana.agent.wait_registered(10)
