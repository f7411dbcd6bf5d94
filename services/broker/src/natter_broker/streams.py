"""The broker's TCP way in, for agents whose networks block UDP.

TCP, then TLS, then a WebSocket upgrade at ``/natter/v1`` (natter_proto.websocket says
why WebSocket); each binary message is one datagram, handed to the same handler as a UDP
datagram from the connection's address, so the same bounds, validation, rate limits and
relay budgets apply. Answers to that address go back on its connection.

As abuse-proof as the UDP side: connections per source address and in all are capped
before TLS starts; TLS and the upgrade must finish within ``handshake_timeout`` (a
half-open or slowloris client is cut off); a connection with no message for
``idle_timeout`` is closed; a message larger than any datagram closes the connection; what
a slow reader leaves unread is dropped beyond a small bound, as UDP would drop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from natter_proto import websocket as ws
from natter_proto.endpoints import AddressError, Endpoint, dual_stack, endpoint

from .metrics import BrokerMetrics

log = structlog.get_logger("natter.broker")

MAX_MESSAGE = 4096  # no datagram natter sends is larger (the UDP side reads 2,048)
WRITE_LIMIT = 256 << 10  # queued towards one agent beyond this: dropped, as UDP would


@dataclass(frozen=True)
class StreamLimits:
    """Config's tcp_* settings (their defaults are written there)."""

    per_ip: int
    total: int
    handshake_timeout: float
    idle_timeout: float


class StreamListener:
    def __init__(
        self,
        on_datagram: Callable[[bytes, str, int], None],
        tls: ssl.SSLContext,
        limits: StreamLimits,
        metrics: BrokerMetrics,
    ) -> None:
        self._on_datagram = on_datagram
        self._tls = tls
        self.limits = limits
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._per_ip: Counter[str] = Counter()
        self._open = 0
        self._agents: dict[Endpoint, asyncio.StreamWriter] = {}  # upgraded connections
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> Endpoint:
        loop = asyncio.get_running_loop()
        where = None if dual_stack(host) else host  # "any": every family the host has
        self._server = await loop.create_server(lambda: _Gate(self._admit), where, port, reuse_address=True)
        bound = self._server.sockets[0].getsockname()
        return Endpoint(bound[0], bound[1])

    @property
    def connections(self) -> int:
        return self._open

    def sendto(self, data: bytes, addr: Endpoint) -> bool:
        """Send a datagram to an agent on its connection; False if addr is no connection."""
        writer = self._agents.get(addr)
        if writer is None:
            return False
        if writer.is_closing() or writer.transport.get_write_buffer_size() > WRITE_LIMIT:
            self._metrics.tcp_closed.labels("write_dropped").inc()
            return True
        writer.write(ws.encode(data, None))
        return True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._agents.values()):
            with contextlib.suppress(Exception):
                writer.write(ws.close_frame(ws.CloseCode.GOING_AWAY, "broker shutting down", None))
                writer.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # -- one connection -----------------------------------------------------------------
    def _admit(self, transport: asyncio.Transport) -> None:
        """A new TCP connection, not yet read from: within the limits, TLS starts."""
        peer = transport.get_extra_info("peername")
        try:
            source = endpoint(str(peer[0]), int(peer[1]))
        except (AddressError, TypeError, IndexError):
            transport.abort()
            return
        if self._open >= self.limits.total or self._per_ip[source.host] >= self.limits.per_ip:
            reason = "too_many" if self._open >= self.limits.total else "per_ip"
            self._metrics.tcp_closed.labels(reason).inc()
            transport.abort()
            return
        self._open += 1
        self._per_ip[source.host] += 1
        self._metrics.tcp_connections.set(self._open)
        task = asyncio.get_running_loop().create_task(self._connection(transport, source))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _connection(self, raw: asyncio.Transport, source: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=ws.MAX_HEAD * 2, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        writer: asyncio.StreamWriter | None = None
        transport: asyncio.Transport = raw
        reason = "closed"
        try:
            deadline = loop.time() + self.limits.handshake_timeout
            try:
                tls = await loop.start_tls(
                    raw,
                    protocol,
                    self._tls,
                    server_side=True,
                    ssl_handshake_timeout=self.limits.handshake_timeout,
                )
            except (TimeoutError, ConnectionError):
                reason = "handshake_timeout"
                return
            except (ssl.SSLError, OSError):
                reason = "tls_failed"
                return
            if tls is None:
                return
            transport = tls
            protocol.connection_made(tls)
            writer = asyncio.StreamWriter(tls, protocol, reader, loop)
            reason = await self._serve(reader, writer, source, max(0.0, deadline - loop.time()))
        except asyncio.CancelledError:
            reason = "shutdown"
        except (OSError, ssl.SSLError, EOFError):
            reason = "reset"
        finally:
            if writer is not None and self._agents.get(source) is writer:
                del self._agents[source]
            self._open -= 1
            self._per_ip[source.host] -= 1
            if self._per_ip[source.host] <= 0:
                del self._per_ip[source.host]
            self._metrics.tcp_connections.set(self._open)
            self._metrics.tcp_closed.labels(reason).inc()
            if reason in ("idle", "handshake_timeout", "tls_failed") or writer is None:
                transport.abort()  # no goodbye to a client that said nothing (or no TLS)
            else:
                writer.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: Endpoint, left: float
    ) -> str:
        """The upgrade (within what is left of the handshake time), then messages."""
        try:
            leftover = await asyncio.wait_for(self._upgrade(reader, writer), left)
        except TimeoutError:
            return "handshake_timeout"
        except ws.WebSocketError as exc:
            with contextlib.suppress(Exception):
                writer.write(ws.refusal(400, str(exc)))
            return "bad_upgrade"
        self._agents[source] = writer
        decoder = ws.Decoder(max_message=MAX_MESSAGE, masked=True)
        data = leftover
        while True:
            try:
                for event in decoder.feed(data):
                    if isinstance(event, ws.Message):
                        if event.data:
                            self._on_datagram(event.data, source.host, source.port)
                    elif isinstance(event, ws.Ping):
                        writer.write(ws.encode(event.data, None, ws.Opcode.PONG))
                    elif isinstance(event, ws.Closed):
                        writer.write(ws.close_frame(ws.CloseCode.NORMAL, "", None))
                        return "closed"
            except ws.WebSocketError as exc:
                code = ws.CloseCode.TOO_BIG if "larger" in str(exc) else ws.CloseCode.PROTOCOL_ERROR
                writer.write(ws.close_frame(code, str(exc), None))
                log.debug("closed a TCP connection", source=str(source), reason=str(exc))
                return "bad_frame"
            try:
                data = await asyncio.wait_for(reader.read(65536), self.limits.idle_timeout)
            except TimeoutError:
                return "idle"
            if not data:
                return "closed"

    async def _upgrade(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """The WebSocket upgrade; returns what the client sent after its head."""
        buffer = bytearray()
        while (end := ws.head_end(buffer)) < 0:
            chunk = await reader.read(ws.MAX_HEAD)
            if not chunk:
                raise ws.WebSocketError("connection closed during the upgrade")
            buffer += chunk
        key = ws.parse_request(bytes(buffer[:end]))
        writer.write(ws.server_response(key))
        return bytes(buffer[end:])


class _Gate(asyncio.Protocol):
    """A TCP connection before TLS: nothing is read until the listener has admitted it
    (the TLS layer takes over the transport, paused, with nothing lost)."""

    def __init__(self, admit: Callable[[asyncio.Transport], None]) -> None:
        self._admit = admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self._admit(transport)
