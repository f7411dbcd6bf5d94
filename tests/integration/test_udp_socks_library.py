"""UDP forwards and SOCKS5 forwards through the library, on loopback, on every engine:
real QUIC DATAGRAM frames, a real UDP echo server, real SOCKS clients (curl among them)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import random
import shutil
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from engines import ENGINES
from libconfig import config
from natter import Broker, Client
from natter_proto import udpframes
from natter_proto.udpflows import Drop
from netcheck import echo_handler
from udpcheck import ask, domain, socks_request, udp_echo

pytestmark = pytest.mark.timeout(120)

CONNECT, BIND, UDP_ASSOCIATE = 1, 2, 3
IPV4, DOMAIN, IPV6 = 1, 3, 4


@dataclass
class Pair:
    broker_addr: str
    bob: Client
    alice: Client
    engine: str


@pytest.fixture(params=ENGINES)
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    engine = request.param
    broker = Broker(config(broker_addr="127.0.0.1:0"))
    await broker.start()
    assert broker.address is not None
    addr = f"127.0.0.1:{broker.address.port}"
    bob = Client(config(client_user="bob", broker_addr=addr, quic_engine=engine, udp_idle_timeout=2.0))
    alice = Client(config(client_user="alice", broker_addr=addr, quic_engine=engine, udp_idle_timeout=2.0))
    await bob.listen()
    try:
        yield Pair(addr, bob, alice, engine)
    finally:
        await alice.close()
        await bob.close()
        await broker.close()


def _ask(port: int, payload: bytes) -> bytes | None:
    return ask("127.0.0.1", port, payload)


async def test_udp_forward_echoes_each_source_on_its_own_flow(pair: Pair) -> None:
    transport, echo = await udp_echo()
    try:
        port = transport.get_extra_info("sockname")[1]
        fwd = await pair.alice.forward("127.0.0.1:0", "bob", f":{port}", proto="udp")
        assert fwd.local is not None
        answers = await asyncio.gather(
            *(asyncio.to_thread(_ask, fwd.local.port, f"hello {i}".encode()) for i in range(5))
        )
        assert answers == [f"hello {i}".encode() for i in range(5)]
        assert len(echo.sources) == 5  # one flow, one socket at the listener, per source
        status = fwd.status()
        assert status["flows"] == 5 and status["datagrams_out"] >= 5
        listener = pair.bob.udp_listener
        assert listener is not None and listener.status()["flows"] == 5
        big = await asyncio.to_thread(_ask, fwd.local.port, b"y" * 1100)  # fits any tunnel
        assert big == b"y" * 1100
    finally:
        transport.close()


async def test_udp_flows_expire_after_idle_time(pair: Pair) -> None:
    transport, _ = await udp_echo()
    try:
        port = transport.get_extra_info("sockname")[1]
        fwd = await pair.alice.forward("127.0.0.1:0", "bob", f":{port}", proto="udp")
        assert fwd.local is not None
        assert await asyncio.to_thread(_ask, fwd.local.port, b"ping") == b"ping"
        listener = pair.bob.udp_listener
        assert listener is not None
        for _ in range(100):  # idle timeout 2 s; checked every 0.5 s
            if len(fwd.flows) == 0 and len(listener.flows) == 0:
                break
            await asyncio.sleep(0.1)
        assert len(fwd.flows) == 0 and len(listener.flows) == 0
        assert await asyncio.to_thread(_ask, fwd.local.port, b"again") == b"again"  # a new flow
    finally:
        transport.close()


async def test_oversized_datagram_is_dropped_and_counted(pair: Pair) -> None:
    transport, echo = await udp_echo()
    try:
        port = transport.get_extra_info("sockname")[1]
        fwd = await pair.alice.forward("127.0.0.1:0", "bob", f":{port}", proto="udp")
        assert fwd.local is not None
        assert await asyncio.to_thread(_ask, fwd.local.port, b"first") == b"first"
        seen = echo.received
        with structlog.testing.capture_logs() as logs:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"z" * 60000, ("127.0.0.1", fwd.local.port))
            for _ in range(50):
                if fwd.flows.dropped:
                    break
                await asyncio.sleep(0.02)
        assert fwd.status()["dropped"] == {"too_big": 1}
        assert echo.received == seen  # not truncated, not fragmented: not sent at all
        assert any(e["event"] == "udp datagram dropped" and e["reason"] == "too_big" for e in logs)
        assert await asyncio.to_thread(_ask, fwd.local.port, b"after") == b"after"
    finally:
        transport.close()


async def test_udp_target_not_allowed_is_refused_and_logged_on_both_sides(pair: Pair) -> None:
    with structlog.testing.capture_logs() as logs:
        fwd = await pair.alice.forward("127.0.0.1:0", "bob", "10.255.255.1:53", proto="udp")
        assert fwd.local is not None
        assert await asyncio.to_thread(ask, "127.0.0.1", fwd.local.port, b"q", 0.2, 10) is None
    assert fwd.refusals == {"target not allowed": 1}
    assert any(e["event"] == "refused udp flow" and e["reason"] == "target not allowed" for e in logs)
    assert any(e["event"] == "udp flow refused" and e["reason"] == "target not allowed" for e in logs)
    assert fwd.status()["dropped"].get("refused", 0) >= 1


async def test_udp_allow_target_rule_with_udp_suffix() -> None:
    """``--allow-target PORT/udp`` lets UDP to that port through, and not TCP."""
    transport, _ = await udp_echo()
    port = transport.get_extra_info("sockname")[1]
    broker = Broker(config(broker_addr="127.0.0.1:0"))
    await broker.start()
    assert broker.address is not None
    addr = f"127.0.0.1:{broker.address.port}"
    bob = Client(config(client_user="bob", broker_addr=addr, allow_targets=[f"127.0.0.1:{port}/udp"]))
    alice = Client(config(client_user="alice", broker_addr=addr))
    echo = await asyncio.start_server(echo_handler, "127.0.0.1", port)  # TCP on the same port
    try:
        await bob.listen()
        udp = await alice.forward("127.0.0.1:0", "bob", f"127.0.0.1:{port}", proto="udp")
        tcp = await alice.forward("127.0.0.1:0", "bob", f"127.0.0.1:{port}")
        assert udp.local is not None and tcp.local is not None
        assert await asyncio.to_thread(_ask, udp.local.port, b"u") == b"u"
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp.local.port)
        writer.write(b"t")
        assert await asyncio.wait_for(reader.read(), 20) == b""  # refused: closed, nothing echoed
        writer.close()
        assert pair_refused(bob) >= 1
    finally:
        echo.close()
        await alice.close()
        await bob.close()
        await broker.close()
        transport.close()


def pair_refused(client: Client) -> int:
    assert client.listener is not None
    return client.listener.refused["target"]


async def test_garbage_datagram_frames_from_a_peer_are_counted_and_harmless(pair: Pair) -> None:
    """Whatever a peer puts in DATAGRAM frames: malformed ones are dropped and counted,
    frames for flows nobody opened get a RESET, and UDP forwards keep working."""
    transport, _ = await udp_echo()
    try:
        port = transport.get_extra_info("sockname")[1]
        fwd = await pair.alice.forward("127.0.0.1:0", "bob", f":{port}", proto="udp")
        assert fwd.local is not None
        assert await asyncio.to_thread(_ask, fwd.local.port, b"before") == b"before"
        link = pair.alice.agent.link_to("bob")
        assert link is not None
        rng = random.Random(7)
        garbage = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(500)]
        garbage += [udpframes.encode_data(999_999, b"x"), udpframes.encode_reply(5, b"y")] * 20
        garbage += [udpframes.encode_open(77, "no-port", b"z"), bytes([0x21, 0, 0, 0, 1, 250]) + b"a"]
        for frame in garbage:
            link.send_datagram(frame[: link.datagram_room()])
            if rng.random() < 0.1:
                await asyncio.sleep(0)
        await asyncio.sleep(0.5)
        dropped = pair.bob.agent.stats
        assert dropped["dropped_udp_malformed"] > 0
        listener = pair.bob.udp_listener
        assert listener is not None and listener.flows.dropped[Drop.UNKNOWN_FLOW] >= 1
        assert link.is_alive and pair.bob.agent.link_to("alice") is not None
        assert await asyncio.to_thread(_ask, fwd.local.port, b"after") == b"after"
    finally:
        transport.close()


# -- SOCKS5 ---------------------------------------------------------------------------
@pytest.fixture
def web_root(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    body = bytes(range(256)) * 4096  # 1 MiB
    (tmp_path / "file.bin").write_bytes(body)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], body
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (./scripts/setup.sh installs it)"
)
async def test_curl_through_socks_forward_resolves_on_the_peer(
    pair: Pair, web_root: tuple[int, bytes]
) -> None:
    port, body = web_root
    socks = await pair.alice.socks("127.0.0.1:0", "bob")
    assert socks.local is not None
    url = f"http://localhost:{port}/file.bin"  # "localhost" is resolved on bob's side
    result = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-sS", "--max-time", "60", "--socks5-hostname", f"127.0.0.1:{socks.local.port}", url],
        capture_output=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == body
    assert socks.status()["connections"] == 1


async def test_socks_reply_codes(pair: Pair, web_root: tuple[int, bytes]) -> None:
    port, _ = web_root
    socks = await pair.alice.socks("127.0.0.1:0", "bob")
    assert socks.local is not None
    proxy = ("127.0.0.1", socks.local.port)

    def request(command: int, atyp: int, address: bytes, target_port: int) -> int:
        code, sock = socks_request(proxy, command, atyp, address, target_port)
        with contextlib.closing(sock):
            if code == 0:
                sock.sendall(b"GET /file.bin HTTP/1.0\r\n\r\n")
                assert sock.recv(12).startswith(b"HTTP/1.0 200")
            else:
                sock.settimeout(10)
                assert sock.recv(1) == b""  # a failure closes the connection
        return code

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    free_port = closed.getsockname()[1]
    closed.close()
    assert await asyncio.to_thread(request, CONNECT, IPV4, socket.inet_aton("127.0.0.1"), port) == 0x00
    assert await asyncio.to_thread(request, CONNECT, DOMAIN, domain("localhost"), port) == 0x00
    assert await asyncio.to_thread(request, CONNECT, IPV4, socket.inet_aton("10.255.255.1"), 80) == 0x02
    assert await asyncio.to_thread(request, CONNECT, IPV4, socket.inet_aton("127.0.0.1"), free_port) == 0x05
    assert await asyncio.to_thread(request, CONNECT, DOMAIN, domain("no-such-host.invalid"), 80) == 0x04
    assert await asyncio.to_thread(request, BIND, IPV4, socket.inet_aton("127.0.0.1"), port) == 0x07
    assert await asyncio.to_thread(request, UDP_ASSOCIATE, IPV4, bytes(4), 0) == 0x07
    assert await asyncio.to_thread(request, CONNECT, 0x09, b"", 80) == 0x08
    failures = socks.status()["failures"]
    assert failures == {
        "not_allowed": 1,
        "connection_refused": 1,
        "host_unreachable": 1,
        "handshake": 3,
    }


@pytest.mark.parametrize(
    ("greeting", "answer"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00\x5b" + bytes(6)),  # SOCKS4's "rejected"
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"\x00\x5b" + bytes(6)),  # a SOCKS4 client
        (b"\x05\x00", b"\x05\xff"),  # no methods
        (b"\x05\x01\x80", b"\x05\xff"),  # none we take
        (b"\x05\x05\x00", b""),  # a greeting cut short: the client gives up
        (b"\x05\x01\x00\x05\x09\x00\x01" + bytes(6), b"\x05\x00\x05\x07"),  # command 9
    ],
    ids=["http", "socks4", "no-methods", "unknown-method", "cut-short", "unknown-command"],
)
async def test_hostile_socks_greetings_get_a_clear_reply_and_a_close(
    pair: Pair, greeting: bytes, answer: bytes
) -> None:
    socks = await pair.alice.socks("127.0.0.1:0", "bob")
    assert socks.local is not None

    def hostile() -> bytes:
        with socket.create_connection(("127.0.0.1", socks.local.port), timeout=10) as sock:  # type: ignore[union-attr]
            with contextlib.suppress(OSError):
                sock.sendall(greeting)
                sock.shutdown(socket.SHUT_WR)
            got = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(4096):
                    got += chunk
            return got

    got = await asyncio.to_thread(hostile)
    assert got.startswith(answer) and len(got) <= 12
    assert socks.failures["handshake"] >= 1
    # the forward still serves: a good client after the hostile one
    code, sock = await asyncio.to_thread(
        socks_request, ("127.0.0.1", socks.local.port), CONNECT, IPV4, socket.inet_aton("10.255.255.1"), 80
    )
    sock.close()
    assert code == 0x02


async def test_socks_username_and_password(web_root: tuple[int, bytes]) -> None:
    port, _ = web_root
    broker = Broker(config(broker_addr="127.0.0.1:0"))
    await broker.start()
    assert broker.address is not None
    addr = f"127.0.0.1:{broker.address.port}"
    bob = Client(config(client_user="bob", broker_addr=addr))
    alice = Client(
        config(client_user="alice", broker_addr=addr, socks_username="ann", socks_password="s3cret")
    )
    try:
        await bob.listen()
        socks = await alice.socks("127.0.0.1:0", "bob")
        assert socks.local is not None
        proxy = ("127.0.0.1", socks.local.port)
        target = socket.inet_aton("127.0.0.1")
        code, sock = await asyncio.to_thread(
            socks_request, proxy, CONNECT, IPV4, target, port, ("ann", "nope")
        )
        sock.close()
        assert code == 0x101  # the RFC 1929 failure status
        code, sock = await asyncio.to_thread(
            socks_request, proxy, CONNECT, IPV4, target, port, ("ann", "s3cret")
        )
        sock.close()
        assert code == 0x00

        def without_auth() -> bytes:
            with socket.create_connection(proxy, timeout=10) as plain:
                plain.sendall(b"\x05\x01\x00")
                return plain.recv(2)

        assert await asyncio.to_thread(without_auth) == b"\x05\xff"  # no auth offered: refused
    finally:
        await alice.close()
        await bob.close()
        await broker.close()


async def test_socks_on_a_non_loopback_address_warns(pair: Pair) -> None:
    with structlog.testing.capture_logs() as logs:
        socks = await pair.alice.socks("0.0.0.0:0", "bob")
    assert socks.local is not None
    assert any("not on loopback" in e["event"] and "socks_username" in e["event"] for e in logs)
