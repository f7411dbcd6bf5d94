"""The broker: an asyncio UDP server around natter_proto's BrokerCore.

It learns each agent's public endpoint from the source of its datagrams, answers
registrations and keepalives, and introduces peers. It never carries tunnel data.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections import Counter
from types import TracebackType

import structlog
from natter_proto import frames
from natter_proto.broker import BrokerCore
from natter_proto.config import Config
from natter_proto.endpoints import AddressError, Endpoint, endpoint, split_host_port
from natter_proto.frames import (
    ConnectRequest,
    Error,
    ErrorCode,
    FrameError,
    Keepalive,
    Message,
    Register,
)

from .registry import MemoryRegistry, Registry

log = structlog.get_logger("natter.broker")


def listen_address(addr: str) -> tuple[str, int]:
    """``":10000"`` -> ("0.0.0.0", 10000); a host must be an IP literal or a local name."""
    host, port = split_host_port(addr, default_host="0.0.0.0")
    return host, port


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.broker.datagram_received(data, Endpoint(str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        self.broker.stats["socket_errors"] += 1


class Broker:
    """The seed's ``Broker``: ``await Broker(Config(broker_addr=":10000")).serve()``."""

    def __init__(self, config: Config, *, registry: Registry | None = None) -> None:
        self.config = config
        self.host, self.port = listen_address(config.broker_addr)
        self.broker_id = f"{socket.gethostname()}-{secrets.token_hex(3)}"
        self.core = BrokerCore(self.broker_id, keepalive_s=int(config.keepalive_interval))
        self.registry: Registry = registry or MemoryRegistry(config.registration_ttl)
        self.stats: Counter[str] = Counter()
        self.address: Endpoint | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._expiry: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._log = log.bind(broker_id=self.broker_id)

    async def start(self) -> Endpoint:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=(self.host, self.port), family=socket.AF_INET
            )
        except OSError as exc:
            raise AddressError(
                f"cannot listen on {self.config.broker_addr}: {exc.strerror}"
            ) from None
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        self.address = Endpoint(sockname[0], sockname[1])
        self._expiry = loop.create_task(self._expire_loop())
        self._log.info(f"broker listening on {self.address}", registry=type(self.registry).__name__)
        return self.address

    async def serve(self) -> None:
        """Run until ``close()`` (the seed's ListenAndServe)."""
        if self._transport is None:
            await self.start()
        await self._stopped.wait()

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._stopped.set()

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- datagrams ----------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Endpoint) -> None:
        try:
            source = endpoint(addr.host, addr.port)
            message = frames.decode(data)
        except FrameError as exc:
            self._reject(exc, addr, len(data))
            return
        except AddressError:
            self.stats["dropped_bad_source"] += 1
            return
        task = asyncio.get_running_loop().create_task(self._handle(message, source))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _reject(self, exc: FrameError, addr: Endpoint, size: int) -> None:
        """Count and log a bad frame; tell the sender why only where the answer is small."""
        self.stats[f"dropped_{exc.code}"] += 1
        self._log.info("dropped frame", source=str(addr), code=exc.code, reason=exc.reason)
        if exc.code in (ErrorCode.VERSION_MISMATCH, ErrorCode.UNKNOWN_TYPE):
            reply = frames.encode(Error(exc.code, exc.reason[:200], exc.request_id))
            if len(reply) <= max(size, 64):
                self._sendto(reply, addr)

    async def _handle(self, message: Message, addr: Endpoint) -> None:
        now = asyncio.get_running_loop().time()
        ttl = self.config.registration_ttl
        try:
            if isinstance(message, Register):
                record, reply = self.core.on_register(message, addr, now)
                await self.registry.put(record)
                self.stats["registrations"] += 1
                self._log.info(
                    "registered", name=record.name, public=str(addr), listening=record.listening
                )
                self._send(reply, addr)
            elif isinstance(message, Keepalive):
                known = await self.registry.get(message.name)
                updated, reply = self.core.on_keepalive(message, addr, known, now)
                if updated is not None:
                    await self.registry.put(updated)
                self.stats["keepalives"] += 1
                self._send(reply, addr)
            elif isinstance(message, ConnectRequest):
                requester = await self.registry.get(message.peer_from)
                target = await self.registry.get(message.peer_to)
                outgoing = self.core.on_connect(message, addr, requester, target, now, ttl)
                outcome = outgoing[0][0].code if isinstance(outgoing[0][0], Error) else "introduced"
                self.stats[f"connect_{outcome}"] += 1
                self._log.info(
                    "connect request",
                    request_id=message.request_id,
                    peer_from=message.peer_from,
                    peer_to=message.peer_to,
                    outcome=outcome,
                )
                for reply, to in outgoing:
                    self._send(reply, to)
            else:
                self.stats["dropped_unexpected"] += 1
        except Exception:  # a registry failure must not kill the broker
            self.stats["handler_errors"] += 1
            self._log.exception("failed to handle frame", type=message.TYPE, source=str(addr))

    def _send(self, message: Message, addr: Endpoint) -> None:
        self._sendto(frames.encode(message), addr)

    def _sendto(self, data: bytes, addr: Endpoint) -> None:
        if self._transport is not None:
            self._transport.sendto(data, (addr.host, addr.port))

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.config.registration_ttl / 4))
            gone = await self.registry.expire(asyncio.get_running_loop().time())
            for name in gone:
                self.stats["expired"] += 1
                self._log.info("expired silent agent", name=name)
