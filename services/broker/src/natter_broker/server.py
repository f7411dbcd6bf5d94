"""The broker: an asyncio UDP server around natter_proto's BrokerCore.

It learns each agent's public endpoint from the source of its datagrams, answers
registrations and keepalives, and introduces peers. It never carries tunnel data.
Registrations and keepalives that arrive while the previous batch is in flight are
handled as one batch, so that a fleet replica answers many with one Redis round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import structlog

from natter_proto import frames
from natter_proto.broker import BrokerCore, new_session_id
from natter_proto.config import Config
from natter_proto.cookies import CookieJar
from natter_proto.endpoints import AddressError, Endpoint, endpoint, from_socket, split_host_port
from natter_proto.frames import (
    ConnectRequest,
    Error,
    ErrorCode,
    FrameError,
    Goaway,
    Keepalive,
    MappingQuery,
    MappingReply,
    Message,
    Register,
)
from natter_proto.identity import fingerprint
from natter_proto.names import NameBook, NamesFileError, parse_names_file
from natter_proto.ratelimit import RateLimiter
from natter_proto.registry import PeerRecord
from natter_proto.relay import RELAY_PREFIX, RelayTable
from natter_proto.tlskey import key_fingerprint
from natter_proto.tokens import TokenList, TokenListError

from .batcher import Batcher
from .http import HealthServer
from .mesh import Mesh
from .metrics import BrokerMetrics
from .namestore import NameStore
from .registry import MemoryRegistry, Registry
from .relaying import Relayer
from .replicas import ReplicaIntroductions
from .streams import StreamLimits, StreamListener
from .tlscert import server_context
from .udp import BrokerSocket

log = structlog.get_logger("natter.broker")

Parsed = TypeVar("Parsed")


def load_tokens(path: str) -> TokenList:
    return _operator_file(path, "token file", TokenList.parse)


def load_names(path: str) -> dict[str, str]:
    return _operator_file(path, "names file", parse_names_file)


def _operator_file(path: str, what: str, parse: Callable[[str], Parsed]) -> Parsed:
    """Read and parse a file the operator names (--tokens, --names); a broken one is a
    startup error worth one clear line."""
    try:
        with open(path, encoding="utf-8") as handle:
            return parse(handle.read(1 << 21))
    except OSError as exc:
        raise AddressError(f"cannot read {what} {path}: {exc.strerror}") from None
    except (TokenListError, NamesFileError, UnicodeDecodeError) as exc:
        raise AddressError(f"bad {what} {path}: {exc}") from None


def listen_address(addr: str) -> tuple[str, int]:
    """``":10000"`` -> ("0.0.0.0", 10000)."""
    return split_host_port(addr, default_host="0.0.0.0")


# seconds a keepalive waits for Redis to confirm it; then it is answered from memory (an
# agent retries an unanswered keepalive a quarter interval later, and gives up after three)
KEEPALIVE_BUDGET = 1.0


class Broker:
    """The seed's ``Broker``: ``await Broker(Config(broker_addr=":10000")).serve()``.

    With ``Config.redis_url`` it is one replica of a fleet sharing registrations in Redis.
    """

    def __init__(self, config: Config, *, registry: Registry | None = None) -> None:
        self.config = config
        if not isinstance(config.broker_addr, str):
            raise AddressError("a broker listens on one address")
        self.host, self.port = listen_address(config.broker_addr)
        self.broker_id = config.broker_id or f"{socket.gethostname()}-{secrets.token_hex(3)}"
        self.core = BrokerCore(
            self.broker_id,
            keepalive_s=int(config.keepalive_interval),
            cookies=CookieJar(window=config.cookie_window),
            tokens=load_tokens(config.tokens_file) if config.tokens_file else None,
            per_ip=RateLimiter(config.rate_per_ip, config.burst_per_ip),
            per_identity=RateLimiter(config.rate_per_identity, config.burst_per_identity),
        )
        self.metrics = BrokerMetrics()
        fixed = load_names(config.names_file) if config.names_file else {}
        self.names = NameBook(config.name_grace, fixed)  # the names file's, and (alone) the learned ones
        self.registry: Registry = registry or self._make_registry()
        self.address: Endpoint | None = None
        self.metrics_address: tuple[str, int] | None = None
        self._socket = BrokerSocket(self.datagram_received)
        self._probe = BrokerSocket(self.probe_received)
        self.probe_address: Endpoint | None = None
        self._streams: StreamListener | None = None
        self._mesh: Mesh | None = None
        self.tcp_address: Endpoint | None = None  # the TCP (TLS, WebSocket) way in
        self.tls_key = ""  # its certificate's key, as agents pin it
        self._health: HealthServer | None = None
        self._registers: Batcher[tuple[Register, Endpoint]] | None = None
        self._keepalives: Batcher[tuple[Keepalive, Endpoint]] | None = None
        self._connects: Batcher[tuple[ConnectRequest, Endpoint]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._heard: dict[str, tuple[Endpoint, float]] = {}  # agents this replica serves
        self.core.relay = config.relay_bytes > 0
        self.relayer = Relayer(
            self.broker_id,
            RelayTable(config.relay_bytes, config.relay_seconds),
            self._heard,
            lambda data, addr: self._sendto(data, addr),
            self.registry,
            self.metrics,
        )
        self.replicas = ReplicaIntroductions(
            self.broker_id,
            self.registry,
            self.relayer,
            self.metrics,
            lambda data, addr: self._sendto(data, addr),
        )
        self._stopped = asyncio.Event()
        self._closing = False
        self._log = log.bind(broker_id=self.broker_id)

    def _make_registry(self) -> Registry:
        if not self.config.redis_url:
            if not self.config.state_dir:  # an embedded broker (tests, examples): memory only
                return MemoryRegistry(self.config.registration_ttl, self.names)
            directory = Path(self.config.state_dir).expanduser()
            try:
                store = NameStore(directory)
            except (OSError, sqlite3.Error) as exc:
                raise AddressError(f"cannot keep name bindings in {directory}: {exc}") from None
            return MemoryRegistry(self.config.registration_ttl, self.names, store)
        from .redis_registry import RedisRegistry

        return RedisRegistry(
            self.config.redis_url,
            forget_after=self.config.registration_ttl * 10,
            metrics=self.metrics,
        )

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> Endpoint:
        try:
            host, port = self._socket.bind(self.host, self.port)
        except OSError as exc:
            raise AddressError(f"cannot listen on {self.config.broker_addr}: {exc.strerror}") from None
        self.address = Endpoint(host, port)
        if self.config.probe_addr:
            probe_host, probe_port = split_host_port(self.config.probe_addr, default_host=self.host)
            try:
                bound = self._probe.bind(probe_host, probe_port)
            except OSError as exc:
                self._socket.close()
                raise AddressError(f"cannot listen on {self.config.probe_addr}: {exc.strerror}") from None
            self.probe_address = Endpoint(bound[0], bound[1])
            self.core.probe_port = bound[1]
        try:
            await self._start_streams()
        except AddressError:
            self._socket.close()
            self._probe.close()
            raise
        await self.registry.start(self.broker_id, self.replicas.on_bus)
        self._start_mesh()
        self._registers = Batcher(lambda batch: self._guard(self._on_registers(batch), "register"))
        self._keepalives = Batcher(lambda batch: self._guard(self._on_keepalives(batch), "keepalive"))
        self._connects = Batcher(lambda batch: self._guard(self._on_connects(batch), "connect"))
        self._spawn(self._housekeeping())
        if self.config.metrics_addr:
            host, port = split_host_port(self.config.metrics_addr, default_host="0.0.0.0")
            self._health = HealthServer(self.is_ready, self._render_metrics)
            try:
                self.metrics_address = await self._health.start(host, port)
            except OSError as exc:
                await self.close()
                raise AddressError(
                    f"cannot serve metrics on {self.config.metrics_addr}: {exc.strerror}"
                ) from None
        mode = "fleet (redis)" if self.config.redis_url else "standalone (memory)"
        self._log.info(
            f"broker listening on {self.address}",
            mode=mode,
            metrics=self.config.metrics_addr or None,
            tcp=str(self.tcp_address) if self.tcp_address else None,
            tls_key=self.tls_key or None,
        )
        return self.address

    def _start_mesh(self) -> None:
        """The relay mesh, where the fleet has a secret and this replica a mesh address."""
        c = self.config
        if not c.mesh_addr:
            return
        if not c.fleet_secret or not c.redis_url:
            raise AddressError("the relay mesh (--mesh-listen) needs a fleet secret and --redis")
        mesh = Mesh(self.broker_id, c.fleet_secret.encode(), self.registry.mesh_address,
                    self.relayer.on_mesh, self.metrics)  # fmt: skip
        try:
            bound = mesh.bind(c.mesh_addr)
        except OSError as exc:
            raise AddressError(f"cannot listen on {c.mesh_addr} for the relay mesh: {exc.strerror}") from None
        advertised = c.mesh_advertise or f"{bound.host}:{bound.port}"
        self.registry.announce_mesh(advertised)
        self.relayer.mesh = self._mesh = mesh
        self._log.info("relay mesh listening", mesh=str(bound), advertised=advertised)

    async def _start_streams(self) -> None:
        """The TCP way in, on the UDP address's port unless told otherwise. Where that
        port is taken for TCP the broker serves UDP alone, and says so; an address given
        with --tcp-listen must be free."""
        wanted = self.config.tcp_addr
        if wanted == "off":
            return
        host, port = split_host_port(wanted, default_host=self.host) if wanted else (self.host, self.port)
        port = port or (self.address.port if self.address is not None else 0)
        tls, der, warning = server_context(self.config.tls_cert, self.config.tls_key, self.config.state_dir)
        if warning:
            self._log.warning(warning)
        c = self.config
        limits = StreamLimits(c.tcp_per_ip, c.tcp_max, c.tcp_handshake_timeout, c.tcp_idle_timeout)
        streams = StreamListener(self.datagram_received, tls, limits, self.metrics)
        try:
            self.tcp_address = await streams.start(host, port)
        except OSError as exc:
            if wanted:
                raise AddressError(f"cannot listen on TCP {wanted}: {exc.strerror}") from None
            self._log.warning(
                f"cannot listen on TCP {host}:{port} ({exc.strerror}): agents whose UDP is "
                "blocked cannot reach this broker (--tcp-listen picks another address)"
            )
            return
        self._streams = streams
        self.tls_key = key_fingerprint(der)

    def is_ready(self) -> bool:
        return self._socket.is_open and not self._closing and self.registry.is_ready()

    async def serve(self) -> None:
        """Run until ``close()`` (the seed's ListenAndServe)."""
        if not self._socket.is_open:
            await self.start()
        await self._stopped.wait()

    async def close(self, *, goaway: bool = True) -> None:
        """Stop; first tell the agents this replica serves to move to another (goaway)."""
        if self._closing:
            await self._stopped.wait()
            return
        self._closing = True
        if goaway and self._socket.is_open:
            self._send_goaways()
            await asyncio.sleep(0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for batcher in (self._registers, self._keepalives, self._connects):
            if batcher is not None:
                await batcher.close()
        if self._health is not None:
            await self._health.close()
        if self._streams is not None:
            await self._streams.close()
        await self.registry.close()
        self._socket.close()
        self._probe.close()
        if self._mesh is not None:
            self._mesh.close()
        self._stopped.set()

    def _send_goaways(self) -> None:
        goaway = frames.encode(Goaway("broker shutting down"))
        for _, (addr, _) in self._heard.items():
            self._sendto(goaway, addr)
            self.metrics.goaways.inc()
        if self._heard:
            self._log.info("sent goaway", agents=len(self._heard))

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
    def datagram_received(self, data: bytes, host: str, port: int) -> None:
        if data and data[0] == RELAY_PREFIX:
            try:
                source = endpoint(host, port)
            except AddressError:
                return
            if self.core.relay:
                self.relayer.datagram(data, source)
            else:
                self.metrics.dropped.labels("relay_off").inc()
            return
        try:
            source = endpoint(host, port)
            message = frames.decode(data)
        except FrameError as exc:
            self._reject(exc, from_socket(host, port), len(data))
            return
        except AddressError:
            self.metrics.dropped.labels("bad_source").inc()
            return
        admission = self.core.admit(message, source, len(data), time.time())
        if not admission.ok:
            self.metrics.dropped.labels(admission.reason).inc()
            if admission.reply is not None:
                self._send(admission.reply, source)
            return
        self.metrics.accepted.inc()
        if self._closing or self._registers is None or self._keepalives is None or self._connects is None:
            return
        if isinstance(message, Keepalive):
            self._keepalives.submit((message, source))
        elif isinstance(message, Register):
            self._registers.submit((message, source))
        elif isinstance(message, ConnectRequest):
            self._connects.submit((message, source))
        elif isinstance(message, MappingQuery):  # an agent on TCP asks whether UDP works again
            self._answer_mapping(message, source, len(data), self._socket)
        else:
            self.metrics.dropped.labels("unexpected_type").inc()

    def probe_received(self, data: bytes, host: str, port: int) -> None:
        """The probe port answers one question, statelessly: where do you see me? Never
        with more bytes than were asked with."""
        try:
            source = endpoint(host, port)
            message = frames.decode(data)
        except (FrameError, AddressError):
            self.metrics.dropped.labels("probe_bad_frame").inc()
            return
        if not isinstance(message, MappingQuery):
            self.metrics.dropped.labels("probe_unexpected").inc()
            return
        self._answer_mapping(message, source, len(data), self._probe)

    def _answer_mapping(self, query: MappingQuery, source: Endpoint, size: int, sock: BrokerSocket) -> None:
        """Where we see the asker, from ``sock``; never more bytes than were asked with."""
        reply = frames.encode(MappingReply(source))
        if len(reply) > size:
            self.metrics.dropped.labels("probe_small").inc()
            return
        self.metrics.probes.inc()
        sock.sendto(reply, (source.host, source.port))

    def _reject(self, exc: FrameError, addr: Endpoint, size: int) -> None:
        """Count and log a bad frame; tell the sender why, where the answer is no larger
        than the frame (a version mismatch deserves words, a spoofer no amplification)."""
        self.metrics.dropped.labels(exc.code).inc()
        self._log.debug("dropped frame", source=str(addr), code=exc.code, reason=exc.reason)
        if exc.code in (ErrorCode.VERSION_MISMATCH, ErrorCode.UNKNOWN_TYPE):
            reply = frames.encode(Error(exc.code, exc.reason[:200], exc.request_id))
            if len(reply) <= size:
                self._sendto(reply, addr)

    async def _guard(self, work: Any, what: str) -> None:
        """A registry failure (Redis down) costs the batch an answer, never the broker."""
        try:
            await work
        except Exception as exc:
            self.metrics.dropped.labels(f"{what}_failed").inc()
            self._log.warning(f"{what} failed", error=f"{type(exc).__name__}: {exc}")

    async def _on_registers(self, batch: list[tuple[Register, Endpoint]]) -> None:
        now = time.time()
        accepted: list[tuple[Register, PeerRecord, Message]] = []
        for message, addr in batch:
            record, reply = self.core.on_register(message, addr, now)
            if record is None:
                self._refuse_registration(message, addr, reply)
                continue
            fixed = self.names.owner(message.name, now)  # the names file binds for every backend
            if (
                fixed is not None
                and fixed.fixed
                and fixed.fingerprint != fingerprint(record.public_key or b"")
            ):
                self._refuse_registration(message, addr, self.core.name_taken(message, fixed.fingerprint))
                continue
            accepted.append((message, record, reply))
        if not accepted:
            return
        owners = await self.registry.register([record for _, record, _ in accepted])
        for (message, record, reply), owner in zip(accepted, owners, strict=True):
            if owner is not None:
                self._refuse_registration(message, record.public, self.core.name_taken(message, owner))
                continue
            self.metrics.registrations.inc()
            self._heard[record.name] = (record.public, now)
            self._log.info(
                "registered",
                name=record.name,
                public=str(record.public),
                listening=record.listening,
                key=fingerprint(record.public_key or b""),
                nat=record.nat,
            )
            self._send(reply, record.public)

    def _refuse_registration(self, message: Register, addr: Endpoint, reply: Message) -> None:
        code = reply.code if isinstance(reply, Error) else "refused"
        self.metrics.refused.labels(code).inc()
        text = reply.message if isinstance(reply, Error) else ""
        self._log.warning("refused registration", name=message.name, source=str(addr), code=code, reason=text)
        self._send(reply, addr)

    async def _on_keepalives(self, batch: list[tuple[Keepalive, Endpoint]]) -> None:
        now = time.time()
        items = [(m.name, addr) for m, addr in batch]
        try:
            known = await asyncio.wait_for(self.registry.touch(items, now, self.broker_id), KEEPALIVE_BUDGET)
        except Exception as exc:  # Redis down or slow: the same as no answer for every peer
            self._log.warning("keepalive failed", error=f"{type(exc).__name__}: {exc}")
            known = [None] * len(batch)
        for (message, addr), ok in zip(batch, known, strict=True):
            if ok is None:
                self._keepalive_unconfirmed(message, addr, now)
                continue
            self.metrics.keepalives.labels("ok" if ok else "unknown").inc()
            if ok:
                self._heard[message.name] = (addr, now)
            self._send(self.core.on_keepalive(message, addr, ok, now), addr)

    def _keepalive_unconfirmed(self, message: Keepalive, addr: Endpoint, now: float) -> None:
        """Redis could not confirm this agent (its master failing over, an outage): an
        agent this replica confirmed from the same address within three keepalive
        intervals is answered from memory, so a Redis hiccup does not send the fleet
        re-registering (which needs Redis too). After that it gets no answer and moves on."""
        seen = self._heard.get(message.name)
        recent = seen is not None and seen[0] == addr and now - seen[1] < 3 * self.config.keepalive_interval
        self.metrics.keepalives.labels("answered_from_memory" if recent else "unconfirmed").inc()
        if recent:
            self._send(self.core.on_keepalive(message, addr, True, now), addr)

    async def _on_connects(self, batch: list[tuple[ConnectRequest, Endpoint]]) -> None:
        now = time.time()
        lookups = [(m.peer_from, m.peer_to, m.request_id, new_session_id()) for m, _ in batch]
        found = await self.registry.lookup_connects(lookups, now)
        remote = []
        for (message, addr), (requester, target, session) in zip(batch, found, strict=True):
            work = self._on_connect(message, addr, requester, target, session, now)
            if work is not None:
                remote.append(work)
        if remote:
            await asyncio.gather(*remote)

    def _on_connect(
        self,
        message: ConnectRequest,
        addr: Endpoint,
        requester: PeerRecord | None,
        target: PeerRecord | None,
        session: str,
        now: float,
    ) -> Awaitable[None] | None:
        """Answer at once where this replica can; return the work that needs another replica."""
        decision = self.core.on_connect(
            message, addr, requester, target, now, self.config.registration_ttl, session
        )
        rlog = self._log.bind(
            request_id=message.request_id, peer_from=message.peer_from, peer_to=message.peer_to
        )
        if decision.refusal is not None:
            reply, to = decision.refusal
            outcome = reply.code if isinstance(reply, Error) else "refused"
            self.metrics.connects.labels(outcome).inc()
            rlog.info("connect refused", outcome=outcome)
            self._send(reply, to)
            return None
        intro = decision.introduction
        assert intro is not None
        owner = intro.target.broker_id
        local = owner in ("", self.broker_id) or isinstance(self.registry, MemoryRegistry)
        target_replica = self.broker_id if local else owner
        self.relayer.allow(session, intro.requester.name, intro.target.name, (self.broker_id, target_replica))
        if local:
            self._introduce_target(intro.target.public, [frames.encode(m) for m in intro.to_target])
            self._send(intro.to_requester, intro.requester.public)
            self.metrics.punches.inc()
            self.metrics.connects.labels("introduced").inc()
            rlog.info("connect introduced", session=session)
            return None
        return self.replicas.introduce(intro, owner, message.request_id, rlog)

    def _introduce_target(self, addr: Endpoint, datagrams: list[bytes]) -> None:
        for data in datagrams:
            self._sendto(data, addr)

    # -- output and housekeeping -------------------------------------------------------
    def _send(self, message: Message, addr: Endpoint) -> None:
        self._sendto(frames.encode(message), addr)

    def _sendto(self, data: bytes, addr: Endpoint) -> None:
        """To an agent's TCP connection if addr is one, else over UDP."""
        if self._streams is not None and self._streams.sendto(data, addr):
            return
        self._socket.sendto(data, (addr.host, addr.port))

    def _render_metrics(self) -> bytes:
        self.metrics.ready.set(1 if self.is_ready() else 0)
        self.metrics.active_peers.set(len(self._heard))
        return self.metrics.render()

    async def _housekeeping(self) -> None:
        """Forget silent agents and stale cross-replica introductions."""
        while True:
            await asyncio.sleep(max(0.5, min(5.0, self.config.registration_ttl / 4)))
            now = time.time()
            ttl = self.config.registration_ttl
            for name in [n for n, (_, seen) in self._heard.items() if now - seen > ttl]:
                del self._heard[name]
            self.replicas.expire(now)
            with contextlib.suppress(Exception):
                for name in await self.registry.expire(now):
                    self._log.info("forgot silent agent", name=name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
