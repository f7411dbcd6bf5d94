"""The client agent: registration, introductions, hole punching and tunnels to peers.

Everything crosses one UDP socket. The sans-IO machines of natter_proto decide; this
module feeds them datagrams and time, sends what they produce and turns their events into
``PeerLink`` tunnels and log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import structlog

from natter_proto import frames
from natter_proto.acl import PeerAllowList, parse_peer_rule
from natter_proto.config import Config, broker_list
from natter_proto.connect import ConnectAnswered, ConnectAttempt, ConnectFailed
from natter_proto.endpoints import AddressError, Endpoint, endpoint, split_host_port
from natter_proto.frames import (
    ConnectOffer,
    ConnectRequest,
    Error,
    FrameError,
    Keepalive,
    MappingReply,
    Message,
    Probe,
    ProbeAck,
    Punch,
    Register,
)
from natter_proto.natmap import NatProbe
from natter_proto.punch import PathFound, PunchSession, PunchTimedOut
from natter_proto.registration import (
    BrokerChanged,
    PublicEndpointChanged,
    Registration,
    RegistrationLost,
    RegistrationRefused,
    RegistrationUp,
    RegState,
)
from natter_proto.relay import RELAY_PREFIX, RelayFrameError, decode_relay, encode_relay
from natter_proto.relay import session_key as relay_key

from .engine import QuicEngine, make_engine, warm_up
from .interfaces import local_ipv4_addresses
from .keystore import KNOWN_PEERS, KnownPeers, load_identity, state_dir
from .link import PeerLink, StreamChannel
from .tls import credentials_for
from .trust import PeerTrust
from .udp import AgentSocket

log = structlog.get_logger("natter.agent")


class NatterError(Exception):
    """A failure worth one clear line to the user."""


class PeerUnavailable(NatterError):
    """The broker could not introduce us to the peer (unknown, offline, not listening...)."""

    def __init__(self, peer: str, code: str, message: str) -> None:
        super().__init__(message)
        self.peer = peer
        self.code = code


def resolve_brokers(addrs: str | list[str]) -> list[Endpoint]:
    """Resolve broker HOST:PORTs to IPv4 endpoints (the agent's socket is IPv4).

    A name with several addresses yields each of them: several brokers to fail over between.
    """
    found: dict[Endpoint, None] = {}
    for addr in broker_list(addrs):
        host, port = split_host_port(addr, default_host="127.0.0.1")
        if port == 0:
            raise AddressError(f"broker address {addr!r} needs a port")
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise AddressError(f"cannot resolve broker host {host!r}: {exc.strerror}") from None
        for info in infos:
            ip, resolved_port = info[4][:2]
            found.setdefault(endpoint(str(ip), int(resolved_port)), None)
    if not found:
        raise AddressError("no broker address given")
    return list(found)


IncomingHandler = Callable[[StreamChannel, str], Awaitable[None]]
NAT_PROBE_WAIT = 3.0  # how long a first connect waits for the NAT type
CID_LENGTH = 8  # aioquic's default host connection ID length
RELAY_PATH = Endpoint("0.0.0.0", 9)  # the QUIC path address of a relayed tunnel (never sent to)
PATH_CHECK_INTERVAL = 5.0  # at most one "where do you see us" check this often


class Agent:
    """One natter client: a name, a broker, one UDP socket, and tunnels to peers."""

    def __init__(self, config: Config, *, engine: QuicEngine | None = None) -> None:
        if not frames.valid_name(config.client_user):
            raise AddressError(f"invalid name {config.client_user!r}: use letters, digits, '.', '_' or '-'")
        self.config = config
        self.name = config.client_user
        self.brokers = resolve_brokers(config.broker_addr)
        directory = state_dir(config.state_dir)
        self.identity, created = load_identity(directory)
        self.identity_created = created
        self.trust = PeerTrust(
            pinned=dict(config.pinned_peers),
            known=KnownPeers(directory / KNOWN_PEERS),
            allow=PeerAllowList(
                [parse_peer_rule(r) for r in config.allow_peers] if config.allow_peers is not None else None
            ),
            me=self.name,
        )
        self.engine = engine or make_engine(
            config.quic_engine,
            credentials=credentials_for(self.identity, self.name),
            max_datagram_size=config.max_datagram_size,
            idle_timeout=config.idle_timeout,
            stream_window=config.stream_window,
            connection_window=config.connection_window,
        )
        self.sock = AgentSocket(self._on_control, self._on_quic, self._service)
        self.registration: Registration | None = None
        self.registered = asyncio.Event()
        self.listening = False
        self.incoming_handler: IncomingHandler | None = None
        self.stats: Counter[str] = Counter()
        self._log = log.bind(name=self.name)
        self._attempts: dict[str, ConnectAttempt] = {}
        self._sessions: dict[str, PunchSession] = {}
        self._waiters: dict[str, asyncio.Future[PeerLink]] = {}
        self._links: dict[str, PeerLink] = {}
        self._links_by_addr: dict[Endpoint, PeerLink] = {}
        self._relay_links: dict[bytes, PeerLink] = {}
        self._extra: dict[str, list[AgentSocket]] = {}  # birthday sockets per punch session
        self._extra_links: dict[tuple[str, int], PeerLink] = {}
        self._upgrading: set[str] = set()  # peers we are re-punching for while relayed
        self._refreshing: set[str] = set()  # peers re-punched because our endpoint moved
        self._endpoint_checked = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nat_probe: NatProbe | None = None
        self._nat_reported = False
        self._nat_known = asyncio.Event()
        self.nat = "unknown"

    @property
    def broker(self) -> Endpoint:
        """The broker this agent talks to now."""
        index = self.registration.broker_index if self.registration is not None else 0
        return self.brokers[index]

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        if self.registration is not None:
            return
        self._loop = asyncio.get_running_loop()
        bound = self.sock.bind(self.config.udp_host, self.config.udp_port)
        locals_ = tuple(Endpoint(ip, bound.port) for ip in local_ipv4_addresses())
        self.registration = Registration(
            self.name,
            locals_,
            listening=self.listening,
            keepalive_interval=self.config.keepalive_interval,
            brokers=len(self.brokers),
        )
        brokers = ", ".join(str(b) for b in self.brokers)
        self._log.info(
            "agent started",
            udp=str(bound),
            brokers=brokers,
            key=self.identity.fingerprint,
            new_key=self.identity_created,
            quic_engine=self.engine.name,
        )
        self.registration.start(self._now())
        self._service()
        warm_up(self.engine)  # while the broker answers: the first tunnel comes up sooner
        self._track(self._loop_create(self._path_watch_loop()))

    async def _path_watch_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(1.0)
            self._watch_paths()

    async def wait_registered(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.registered.wait(), timeout)
        except TimeoutError:
            raise NatterError(
                f"broker {broker_list(self.config.broker_addr)} did not answer within {timeout:g} s"
            ) from None

    def set_listening(self, handler: IncomingHandler) -> None:
        self.listening = True
        self.incoming_handler = handler
        if self.registration is not None:
            self.registered.clear()
            self.registration.update(listening=True, now=self._now())
            self._service()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for link in [*self._links_by_addr.values(), *self._relay_links.values(), *self._extra_links.values()]:
            link.close("agent shutting down")
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(NatterError("agent closed"))
                waiter.exception()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        await asyncio.sleep(0)  # let the CONNECTION_CLOSE datagrams leave
        self.sock.close()
        for sockets in self._extra.values():
            for sock in sockets:
                sock.close()

    # -- tunnels --------------------------------------------------------------------
    def links(self) -> list[PeerLink]:
        """Live tunnels, one per peer."""
        return [link for link in self._links.values() if link.is_alive]

    def link_to(self, peer: str) -> PeerLink | None:
        link = self._links.get(peer)
        return link if link is not None and link.is_alive else None

    async def connect(self, peer: str, target: str = "") -> PeerLink:
        """Return a live tunnel to peer, asking the broker and punching if there is none."""
        link = self.link_to(peer)
        if link is not None:
            return link
        waiter = self._waiters.get(peer)
        if waiter is None or waiter.done():
            waiter = self._start_connect(peer, target)
        return await asyncio.shield(waiter)

    def _start_connect(self, peer: str, target: str) -> asyncio.Future[PeerLink]:
        if self._closed:
            raise NatterError("agent closed")
        if not frames.valid_name(peer):
            raise AddressError(f"invalid peer name {peer!r}")
        assert self._loop is not None
        waiter: asyncio.Future[PeerLink] = self._loop.create_future()
        self._waiters[peer] = waiter
        ready = self.registration is not None and self.registration.state is RegState.REGISTERED
        if ready and not self._nat_pending():
            self._send_connect(peer, target)
        else:
            self._track(self._loop.create_task(self._connect_when_ready(peer, target, waiter)))
        return waiter

    def _nat_pending(self) -> bool:
        return self._nat_probe is not None and not self._nat_reported

    async def _connect_when_ready(self, peer: str, target: str, waiter: asyncio.Future[PeerLink]) -> None:
        """Registered, and (where the broker offers a probe port) our NAT type known and told
        to the broker: the punch strategy depends on both sides' NAT types."""
        try:
            await self.wait_registered(self.config.register_timeout)
            if self._nat_pending():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._nat_known.wait(), NAT_PROBE_WAIT)
                await self.wait_registered(self.config.register_timeout)
        except NatterError as exc:
            self._fail_waiter(peer, exc)
            return
        if not waiter.done():
            self._send_connect(peer, target)

    def _send_connect(self, peer: str, target: str) -> None:
        request_id = secrets.token_hex(6)
        attempt = ConnectAttempt(
            request_id, self.name, peer, target, self._now(), deadline=self.config.connect_timeout
        )
        self._attempts[request_id] = attempt
        self._log.info("asking broker for peer", peer=peer, request_id=request_id)
        self._service()

    def _fail_waiter(self, peer: str, exc: Exception) -> None:
        waiter = self._waiters.pop(peer, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
            waiter.exception()

    # -- datagram input ---------------------------------------------------------------
    def _on_control(self, data: bytes, addr: Endpoint) -> None:
        if data[0] == RELAY_PREFIX:
            self._on_relay(data, addr)
            return
        try:
            message = frames.decode(data)
        except FrameError as exc:
            self.stats[f"dropped_{exc.code}"] += 1
            self._log.debug("dropped bad frame", source=str(addr), reason=exc.reason)
            return
        now = self._now()
        if isinstance(message, MappingReply):
            self._on_mapping_reply(message, addr)
            return
        if isinstance(message, Probe | ProbeAck):
            session = self._sessions.get(message.session_id)
            if session is None:
                self.stats["dropped_unknown_session"] += 1
                return
            session.receive(message, addr, now)
            self.stats["accepted_probe"] += 1
            return
        if addr != self.broker:
            self.stats["dropped_not_from_broker"] += 1
            return
        self.stats["accepted_broker"] += 1
        self._on_broker_message(message, now)

    def _on_relay(self, data: bytes, addr: Endpoint) -> None:
        """A QUIC packet of a relayed tunnel, from the broker."""
        if addr != self.broker:
            self.stats["dropped_relay_not_from_broker"] += 1
            return
        try:
            key, packet = decode_relay(data)
        except RelayFrameError:
            self.stats["dropped_relay_bad_frame"] += 1
            return
        link = self._relay_links.get(key)
        if link is not None:
            self.stats["accepted_relay"] += 1
            link.datagram_received(packet, RELAY_PATH)
            return
        session = next((s for s in self._sessions.values() if s.role == "server" and s.punch.relay
                        and relay_key(s.session_id) == key), None)  # fmt: skip
        if session is None or not self.listening:
            self.stats["dropped_relay_unknown_session"] += 1
            return
        conn = self.engine.server_connection(packet)
        if conn is None:
            moved = self._link_by_connection_id(packet)
            if moved is None or moved.role != "server" or moved.peer != session.peer:
                self.stats["dropped_not_initial"] += 1
                return
            # the client moved this tunnel onto the relay (its direct path died)
            self._log_migration(moved, "relayed", str(moved.addr), "relay " + str(self.broker))
            moved.path_kind = "relayed"
            self._use_relay(moved, key, via_relay=False)
            self.stats["accepted_relay"] += 1
            moved.datagram_received(packet, RELAY_PATH)
            return
        self.stats["accepted_relay"] += 1
        session.succeed(RELAY_PATH)
        link = self._new_link(conn, session.punch, RELAY_PATH, "server", relayed=True)
        link.datagram_received(packet, RELAY_PATH)
        self._track(self._loop_create(self._await_handshake(link, session.punch)))

    def _on_mapping_reply(self, message: MappingReply, addr: Endpoint) -> None:
        probe = self._nat_probe
        if probe is None or addr != probe.target:
            self.stats["dropped_not_from_broker"] += 1
            return
        self.stats["accepted_broker"] += 1
        probe.receive(message)

    def _start_nat_probe(self) -> None:
        """Ask the broker's probe port where it sees us: same endpoint means an easy NAT."""
        reg = self.registration
        if reg is None or reg.public is None or reg.probe_port is None:
            return
        target = Endpoint(self.broker.host, reg.probe_port)
        if (
            self._nat_probe is not None
            and self._nat_probe.public == reg.public
            and self._nat_probe.target == target
        ):
            return  # already asked (or asking) for this mapping
        self._nat_probe = NatProbe(reg.public, target, self._now())

    def _service_nat_probe(self) -> None:
        probe = self._nat_probe
        if probe is None:
            return
        for message in probe.frames_to_send():
            self.sock.sendto(frames.encode(message), probe.target)
        if probe.result is not None and not self._nat_reported:
            self._nat_reported = True
            result = probe.result
            words = {
                "easy": "NAT maps endpoint-independently (easy to punch)",
                "hard": "NAT maps per destination (symmetric: hard to punch)",
                "unknown": "NAT type unknown (the broker's probe port did not answer)",
            }
            self.nat = result.kind
            self._nat_known.set()
            self._log.info(
                words[result.kind],
                nat=result.kind,
                seen_by_broker=str(probe.public),
                seen_by_probe=str(result.seen_by_probe) if result.seen_by_probe else None,
            )
            if self.registration is not None and self.registration.nat != result.kind:
                self.registered.clear()  # registered again once the broker has the NAT type
                self.registration.update(nat=result.kind, now=self._now())

    def _on_broker_message(self, message: Message, now: float) -> None:
        assert self.registration is not None
        if self.registration.receive(message, now):
            return
        if isinstance(message, Punch):
            attempt = self._attempts.get(message.request_id)
            if attempt is not None:
                attempt.receive(message)
            elif message.role == "server":
                self._start_punch(message, now)
        elif isinstance(message, Error) and message.request_id is not None:
            attempt = self._attempts.get(message.request_id)
            if attempt is not None:
                attempt.receive(message)
        elif isinstance(message, ConnectOffer):
            if self.listening:
                self._log.info("peer asks for a tunnel", peer=message.peer_from, target=message.target)
            else:
                self._log.warning("ignoring tunnel request: not listening", peer=message.peer_from)
        else:
            self.stats["dropped_unexpected"] += 1

    def _on_quic(self, data: bytes, addr: Endpoint) -> None:
        link = self._links_by_addr.get(addr)
        if link is not None:
            self.stats["accepted_quic"] += 1
            link.datagram_received(data, addr)
            return
        for session in self._sessions.values():
            if session.role == "server" and session.knows(addr) and self.listening:
                conn = self.engine.server_connection(data)
                if conn is None:
                    break  # not an Initial: perhaps a tunnel we have, from a new address
                session.succeed(addr)
                self.stats["accepted_quic"] += 1
                link = self._new_link(conn, session.punch, addr, "server")
                link.datagram_received(data, addr)
                self._track(self._loop_create(self._await_handshake(link, session.punch)))
                return
        moved = self._link_by_connection_id(data)
        if moved is not None:
            # the peer's NAT gave it a new port (a mapping expired or was flushed): QUIC
            # validates the new path itself; we only need to route its datagrams there
            if moved.path_kind == "relayed":
                # the peer took this relayed tunnel onto a direct path (QUIC migration)
                self._log_migration(moved, "direct", "relay " + str(self.broker), str(addr))
                moved.path_kind = "direct"
            else:
                self._log.info(
                    f"path change for {moved.peer}: peer moved", old=str(moved.addr), new=str(addr)
                )
            if self._links_by_addr.get(moved.addr) is moved:
                del self._links_by_addr[moved.addr]
            if moved.role == "client" and not moved.via_relay:
                moved.direct_route = addr  # our QUIC keeps its peer address; we send where it is
            moved.addr = addr
            self._links_by_addr[addr] = moved
            self.stats["accepted_quic"] += 1
            moved.datagram_received(data, addr)
            return
        known = any(s.role == "server" and s.knows(addr) for s in self._sessions.values())
        self.stats["dropped_not_initial" if known else "dropped_quic_unknown_source"] += 1

    def _link_by_connection_id(self, data: bytes) -> PeerLink | None:
        """The tunnel a short-header QUIC packet belongs to, by its destination connection ID."""
        if len(data) < 1 + CID_LENGTH or data[0] & 0x80:
            return None  # long headers (handshakes) never migrate
        dcid = data[1 : 1 + CID_LENGTH]
        for link in [*self._links_by_addr.values(), *self._relay_links.values()]:
            if link.is_alive and link.conn.owns_connection_id(dcid):
                return link
        return None

    # -- the sans-IO machines' outputs --------------------------------------------------
    def _service(self) -> None:
        """Send what the machines want sent, act on their events and re-arm the timer."""
        if self._closed or self.registration is None:
            return
        reg = self.registration
        self._service_nat_probe()  # first: what it learns changes the next register frame
        for message in reg.frames_to_send():
            self._send(message, self.broker)
        while (event := reg.next_event()) is not None:
            self._on_registration_event(event)
        for rid, attempt in list(self._attempts.items()):
            for message in attempt.frames_to_send():
                self._send(message, self.broker)
            while (cevent := attempt.next_event()) is not None:
                del self._attempts[rid]
                peer = attempt.request.peer_to
                if isinstance(cevent, ConnectAnswered):
                    self._start_punch(cevent.punch, self._now())
                elif isinstance(cevent, ConnectFailed):
                    self._log.warning(
                        "broker could not introduce us",
                        peer=peer,
                        broker=str(self.broker),
                        reason=cevent.message,
                    )
                    self._fail_waiter(peer, PeerUnavailable(peer, cevent.code, cevent.message))
        for session in list(self._sessions.values()):
            for message, addr, source in session.frames_to_send():
                self._socket_for(session.session_id, source).sendto(frames.encode(message), addr)
            while (pevent := session.next_event()) is not None:
                self._on_punch_event(session, pevent)
        self._arm_timer()

    def _arm_timer(self) -> None:
        assert self.registration is not None
        timers = [self.registration.get_timer()]
        timers += [a.get_timer() for a in self._attempts.values()]
        timers += [s.get_timer() for s in self._sessions.values()]
        if self._nat_probe is not None:
            timers.append(self._nat_probe.get_timer())
        when = min((t for t in timers if t is not None), default=None)
        if self._timer is not None:
            if when is not None and self._timer.when() == when:
                return
            self._timer.cancel()
            self._timer = None
        if when is not None and self._loop is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._now()
        assert self.registration is not None
        self.registration.handle_timer(now)
        for attempt in list(self._attempts.values()):
            attempt.handle_timer(now)
        for session in list(self._sessions.values()):
            session.handle_timer(now)
        if self._nat_probe is not None:
            self._nat_probe.handle_timer(now)
        self._service()

    def _on_registration_event(self, event: object) -> None:
        if isinstance(event, RegistrationUp):
            self._log.info(
                f"registered as {self.name} at {self.broker}",
                public_endpoint=str(event.public),
                broker_id=event.broker_id,
                listening=self.listening,
            )
            self.registered.set()
            self._start_nat_probe()
        elif isinstance(event, PublicEndpointChanged):
            self._log.warning("public endpoint changed", old=str(event.old), new=str(event.new))
            self._nat_reported = False
            self._start_nat_probe()
            self._refresh_paths()
        elif isinstance(event, RegistrationLost):
            self.registered.clear()
            self._log.warning("lost the broker, registering again", reason=event.reason)
        elif isinstance(event, BrokerChanged):
            self._log.warning(f"moving to broker {self.brokers[event.index]}", reason=event.reason)
        elif isinstance(event, RegistrationRefused):
            self._log.error("broker refused registration", code=event.code, reason=event.message)

    # -- punching -----------------------------------------------------------------------
    def _start_punch(self, punch: Punch, now: float) -> None:
        if punch.role == "server" and not self.listening:
            self._log.warning("ignoring punch: not listening", peer=punch.peer)
            return
        if punch.session_id in self._sessions:
            return  # a repeated instruction for a session already under way
        self._log.info(
            f"punching to {punch.peer}",
            peer_nat=punch.peer_nat or "unknown",
            role=punch.role,
            public=str(punch.peer_public),
            candidates=len(punch.peer_locals) + 1,
            session=punch.session_id,
            request_id=punch.request_id,
        )
        sources, spray = 1, 0
        if self.nat == "hard" and punch.peer_nat == "easy":
            sources = self.config.hard_nat_sockets  # birthday method, hard side
            self._extra[punch.session_id] = self._open_extra_sockets(punch.session_id, sources - 1)
        elif self.nat == "easy" and punch.peer_nat == "hard":
            spray = self.config.spray_probes  # birthday method, easy side
        if sources > 1 or spray:
            self._log.info("peer behind a symmetric NAT: birthday punching", sockets=sources, spray=spray)
        self._sessions[punch.session_id] = PunchSession(
            self.name,
            punch,
            now,
            interval=self.config.punch_interval,
            timeout=self.config.punch_timeout,
            sources=sources,
            spray=spray,
        )
        # Keep the session a while after it ends: the peer may still be probing and needs
        # answers, and the QUIC server accepts the peer's Initial only from a known path.
        linger = punch.delay_ms / 1000 + self.config.punch_timeout + self.config.handshake_timeout
        self._loop_call_later(linger, self._end_session, punch.session_id)
        if punch.role == "client" and punch.relay and self.nat == punch.peer_nat == "hard":
            # two symmetric NATs: no probe can meet a mapping, so do not wait for the punch
            self._sessions[punch.session_id].succeed(RELAY_PATH)
            self._start_relay(self._sessions[punch.session_id], "both NATs are symmetric")

    # -- extra sockets for the birthday method ---------------------------------------------
    def _open_extra_sockets(self, session_id: str, count: int) -> list[AgentSocket]:
        opened = []
        for index in range(1, count + 1):
            sock = AgentSocket(
                functools.partial(self._on_extra_control, session_id, index),
                functools.partial(self._on_extra_quic, session_id, index),
                self._service,
            )
            try:
                sock.bind(self.config.udp_host, 0)
            except OSError:
                break  # out of ports or descriptors: punch with what we have
            opened.append(sock)
        return opened

    def _socket_for(self, session_id: str, source: int) -> AgentSocket:
        extra = self._extra.get(session_id)
        if source == 0 or extra is None or source > len(extra):
            return self.sock
        return extra[source - 1]

    def _on_extra_control(self, session_id: str, source: int, data: bytes, addr: Endpoint) -> None:
        session = self._sessions.get(session_id)
        try:
            message = frames.decode(data)
        except FrameError:
            self.stats["dropped_bad_frame"] += 1
            return
        if session is None or not isinstance(message, Probe | ProbeAck) or message.session_id != session_id:
            self.stats["dropped_unknown_session"] += 1
            return
        self.stats["accepted_probe"] += 1
        session.receive(message, addr, self._now(), source)

    def _on_extra_quic(self, session_id: str, source: int, data: bytes, addr: Endpoint) -> None:
        link = self._extra_links.get((session_id, source))
        if link is not None:
            self.stats["accepted_quic"] += 1
            link.datagram_received(data, addr)
            return
        session = self._sessions.get(session_id)
        if (
            session is None
            or session.role != "server"
            or not self.listening
            or not session.knows(addr, source)
        ):
            self.stats["dropped_quic_unknown_source"] += 1
            return
        conn = self.engine.server_connection(data)
        if conn is None:
            self.stats["dropped_not_initial"] += 1
            return
        self.stats["accepted_quic"] += 1
        session.succeed(addr, source)
        link = self._new_link(conn, session.punch, addr, "server", source=source)
        link.datagram_received(data, addr)
        self._track(self._loop_create(self._await_handshake(link, session.punch)))

    def _end_session(self, session_id: str) -> None:
        """The session's linger is over: close its extra sockets but the one a tunnel uses."""
        self._sessions.pop(session_id, None)
        in_use = {source for (sid, source) in self._extra_links if sid == session_id}
        for index, sock in enumerate(self._extra.get(session_id, []), start=1):
            if index not in in_use:
                sock.close()

    def _on_punch_event(self, session: PunchSession, event: object) -> None:
        if isinstance(event, PathFound):
            self._log.info(
                "punch answered",
                peer=session.peer,
                path=str(event.path),
                probe_rtt_ms=round(event.rtt * 1000, 2),
            )
            if session.role == "client" and session.peer in self._refreshing:
                self._refreshing.discard(session.peer)
                self._log.info(
                    f"path to {session.peer} refreshed: its NAT now lets our new endpoint in",
                    path=str(event.path),
                )
                link = self._links.get(session.peer)
                if link is not None and link.is_alive and event.source == 0 and event.path != link.addr:
                    if link.path_kind == "relayed":
                        self._migrate(link, session.punch, event.path)
                    else:  # the peer's endpoint moved too: send there
                        link.direct_route = event.path
                        self._links_by_addr[event.path] = link
                        link.addr = event.path
            elif (
                session.role == "client"
                and event.source == 0
                and (moving := self._relayed_client(session.peer))
            ):
                self._migrate(moving, session.punch, event.path)
            elif session.role == "client":
                conn = self.engine.client_connection()
                link = self._new_link(conn, session.punch, event.path, "client", source=event.source)
                link.start_client()
                self._track(self._loop_create(self._await_handshake(link, session.punch)))
        elif isinstance(event, PunchTimedOut):
            tried = ", ".join(str(c) for c in event.tried)
            self._log.warning("punch failed: no answer", peer=session.peer, tried=tried)
            if session.role == "client" and session.peer in self._refreshing:
                self._refreshing.discard(session.peer)
                link = self._links.get(session.peer)
                silent = link is not None and link.is_alive and link.silent_for() > self.config.path_silence
                if silent and link is not None and session.punch.relay and link.path_kind != "relayed":
                    self._fall_back_to_relay(link, session.punch)
            elif session.role == "client" and session.punch.relay and session.peer not in self._upgrading:
                self._start_relay(session, "no probe was answered")
            elif session.role == "client":
                self._fail_waiter(
                    session.peer,
                    PeerUnavailable(
                        session.peer,
                        "punch_failed",
                        f"no direct path to {session.peer} (tried {tried})",
                    ),
                )

    def _relayed_client(self, peer: str) -> PeerLink | None:
        """Our relayed tunnel to peer, if we are its QUIC client and are looking for a path."""
        link = self._links.get(peer)
        looking = peer in self._upgrading and link is not None and link.is_alive
        if looking and link is not None and link.path_kind == "relayed" and link.role == "client":
            return link
        return None

    def _start_relay(self, session: PunchSession, why: str) -> None:
        self._log.info(f"no direct path to {session.peer} ({why}): tunnelling through the broker's relay")
        conn = self.engine.client_connection()
        link = self._new_link(conn, session.punch, RELAY_PATH, "client", relayed=True)
        link.start_client()
        self._track(self._loop_create(self._await_handshake(link, session.punch)))

    def _new_link(
        self, conn: object, punch: Punch, addr: Endpoint, role: str, *, relayed: bool = False, source: int = 0
    ) -> PeerLink:
        sock = self._socket_for(punch.session_id, source)
        link = PeerLink(
            send=sock.send_batch,  # a direct path: straight out of the socket
            conn=conn,  # type: ignore[arg-type]
            peer=punch.peer,
            addr=addr,
            role=role,
            on_incoming=self._on_incoming_stream,
            on_closed=self._on_link_closed,
            verify=self._verify_peer,
            expected_key=punch.peer_key,
            ping_interval=self.config.ping_interval,
            send_buffer_limit=self.config.send_buffer_limit,
        )
        if role == "client":
            link.receive_as = (addr.host, addr.port)  # QUIC's peer address, wherever we route
        if relayed:
            link.path_kind = "relayed"
            self._use_relay(link, relay_key(punch.session_id), via_relay=role == "client")
            return link
        link.path_kind, link.probes = self._path_kind(punch, addr)
        if source:
            self._extra_links[(punch.session_id, source)] = link  # its datagrams come on that socket
            return link
        old = self._links_by_addr.get(addr)
        if old is not None:
            old.close("replaced by a new tunnel")
        self._links_by_addr[addr] = link
        return link

    def _use_relay(self, link: PeerLink, key: bytes, *, via_relay: bool) -> None:
        """Let link reach its peer through the broker's relay under session key. A client
        sends everything there (via_relay); a server follows its QUIC peer address, which
        is the relay's placeholder or, after the client moved, a real one."""
        link.via_relay = via_relay
        self._relay_links[key] = link
        broker = self.broker  # the relay is the broker the session was introduced by
        relay_host, relay_port = RELAY_PATH.host, RELAY_PATH.port

        def send(datagrams: list[tuple[bytes, Any]]) -> None:
            direct: list[tuple[bytes, Any]] = []
            route = link.direct_route
            for data, addr in datagrams:
                if link.via_relay or (route is None and addr[1] == relay_port and addr[0] == relay_host):
                    self.sock.sendto(encode_relay(key, data), broker)
                else:
                    direct.append((data, (route.host, route.port) if route is not None else addr))
            if direct:
                self.sock.send_batch(direct)

        link.set_sender(send)

    def _fall_back_to_relay(self, link: PeerLink, punch: Punch) -> None:
        """Our direct tunnel went silent and a new punch found no path: move the same QUIC
        connection onto the broker's relay (the session just introduced allows it); the
        listener finds it there by connection ID. The upgrade loop looks for a path again."""
        self._log_migration(link, "relayed", str(link.addr), "relay " + str(self.broker))
        link.direct_route = None
        link.path_kind = "relayed"
        self._use_relay(link, relay_key(punch.session_id), via_relay=True)
        link.conn.send_ping(0)
        link.flush()
        if self.config.upgrade_interval > 0:
            self._track(self._loop_create(self._keep_trying_direct(link)))

    def _log_migration(self, link: PeerLink, new_kind: str, old: str, new: str) -> None:
        """The one line a tunnel's move gets: the same QUIC connection, another path."""
        self._log.info(
            f"path change for {link.peer}: {link.path_kind} -> {new_kind}",
            old=old,
            new=new,
            open_connections=link.open_streams,
            migrated=True,
        )

    def _path_kind(self, punch: Punch, addr: Endpoint) -> tuple[str, int]:
        """lan, predicted (birthday method, with its probes) or direct; for status and logs."""
        session = self._sessions.get(punch.session_id)
        if addr in punch.peer_locals and addr != punch.peer_public:
            return "lan", 0
        if session is not None and session.predicting:
            return "predicted", session.probes_sent
        return "direct", 0

    def _migrate(self, link: PeerLink, punch: Punch, path: Endpoint) -> None:
        """The relayed tunnel's client found a direct path: send the same QUIC connection
        there. The listener sees our packets arrive from a new address, finds the tunnel by
        connection ID and validates the path (QUIC migration); connections in flight go on."""
        kind, link.probes = self._path_kind(punch, path)
        self._log_migration(link, kind, "relay " + str(self.broker), str(path))
        link.direct_route = path
        link.via_relay = False
        link.addr = path
        link.path_kind = kind
        self._links_by_addr[path] = link
        link.conn.send_ping(0)  # something for the listener to see on the new path at once
        link.flush()
        waiter = self._waiters.pop(link.peer, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(link)

    async def _await_handshake(self, link: PeerLink, punch: Punch) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(link.ready), self.config.handshake_timeout)
        except (TimeoutError, ConnectionError) as exc:
            reason = "QUIC handshake timed out" if isinstance(exc, TimeoutError) else str(exc)
            self._log.warning("tunnel failed", peer=link.peer, path=str(link.addr), reason=reason)
            link.close(reason)
            if link.role == "client":
                self._fail_waiter(link.peer, PeerUnavailable(link.peer, "handshake_failed", reason))
            return
        previous = self._links.get(link.peer)
        self._links[link.peer] = link
        if previous is not None and previous is not link and previous.is_alive:
            self._log.info(
                f"path change for {link.peer}: {previous.path_kind} -> {link.path_kind}",
                old=str(previous.addr),
                new=str(link.addr),
                open_connections=previous.open_streams,
            )
            self._track(self._loop_create(self._drain(previous, f"moved to a {link.path_kind} path")))
        if link.path_kind == "relayed" and link.role == "client" and self.config.upgrade_interval > 0:
            self._track(self._loop_create(self._keep_trying_direct(link)))
        self._log.info(
            f"{'relayed' if link.path_kind == 'relayed' else 'direct'} path up with {link.peer}",
            peer_endpoint=str(link.addr),
            path=link.path_kind,
            probes=link.probes or None,
            relay=str(self.broker) if link.path_kind == "relayed" else None,
            rtt_ms=round(link.rtt * 1000, 2),
            role=link.role,
        )
        waiter = self._waiters.pop(link.peer, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(link)

    async def _drain(self, link: PeerLink, reason: str) -> None:
        """A replaced tunnel serves its open connections to their end, then closes."""
        while link.is_alive and link.open_streams > 0:
            await asyncio.sleep(0.5)
        link.close(reason)

    def _refresh_paths(self) -> None:
        """Our NAT moved us to a new public endpoint. A QUIC client's new address reaches a
        peer whose NAT filters by address only once that peer has sent to it: punch again
        (the broker tells the peer our new endpoint, its probes open its NAT) and keep the
        tunnel, which QUIC moves to the new path (the listener finds it by connection ID)."""
        for peer, link in list(self._links.items()):
            movable = link.is_alive and link.role == "client" and link.path_kind in ("direct", "predicted")
            if movable:
                self._punch_again(peer, f"punching to {peer} again: our public endpoint changed")

    def _watch_paths(self) -> None:
        """A tunnel that sends but hears nothing back may have lost its NAT mapping: ask the
        broker where it sees us now instead of waiting for the next keepalive."""
        now = self._now()
        if self.registration is None or self.registration.state is not RegState.REGISTERED:
            return
        for peer, link in list(self._links.items()):
            if not link.is_alive or link.path_kind == "relayed" or link.role != "client":
                continue
            silent = link.silent_for()
            if silent > self.config.path_silence and now - self._endpoint_checked >= PATH_CHECK_INTERVAL:
                self._endpoint_checked = now
                self.registration.check_endpoint(now)
                self._service()
            if silent > self.config.path_dead:
                # still nothing back, and our endpoint did not move: punch again, and go to
                # the relay if no path answers
                self._punch_again(
                    peer,
                    f"tunnel to {peer} hears nothing back: punching again",
                    warning=True,
                    silent_s=round(silent, 1),
                )

    def _punch_again(self, peer: str, why: str, *, warning: bool = False, **fields: object) -> None:
        """A new punch for a tunnel we keep: its outcome moves the tunnel (see _on_punch_event)."""
        if peer not in self._refreshing and peer not in self._upgrading:
            self._refreshing.add(peer)
            (self._log.warning if warning else self._log.info)(why, **fields)
            self._send_connect(peer, "")

    async def _keep_trying_direct(self, relayed: PeerLink) -> None:
        """While relayed, punch again now and then; a direct path takes new connections."""
        peer = relayed.peer
        while True:
            await asyncio.sleep(self.config.upgrade_interval)
            if not relayed.is_alive or self._links.get(peer) is not relayed or self._closed:
                return
            if relayed.path_kind != "relayed":
                return  # moved onto a direct path
            self._upgrading.add(peer)
            try:
                await asyncio.shield(self._start_connect(peer, ""))
            except (NatterError, ConnectionError):
                self._log.info(f"still no direct path to {peer}; staying on the relay")
            finally:
                self._upgrading.discard(peer)

    def _verify_peer(self, link: PeerLink) -> str | None:
        refusal = self.trust.check(link.peer, link.expected_key, link.peer_key, link.role)
        if refusal is not None:
            self.stats["tunnels_refused"] += 1
            self._log.error("refused tunnel at the TLS layer", peer=link.peer, reason=refusal)
        return refusal

    def _on_link_closed(self, link: PeerLink) -> None:
        if self._links_by_addr.get(link.addr) is link:
            del self._links_by_addr[link.addr]
        for key, relayed in list(self._relay_links.items()):
            if relayed is link:
                del self._relay_links[key]
        for (session_id, source), extra in list(self._extra_links.items()):
            if extra is link:
                del self._extra_links[(session_id, source)]
                if session_id not in self._sessions:
                    self._socket_for(session_id, source).close()
        if self._links.get(link.peer) is link:
            del self._links[link.peer]
            if not self._closed:
                self._log.warning("tunnel closed", peer=link.peer, reason=link.close_reason)

    def _on_incoming_stream(self, channel: StreamChannel) -> None:
        handler = self.incoming_handler
        if handler is None or not self.listening:
            channel.reset()
            channel.link.release(channel)
            return
        self._track(self._loop_create(handler(channel, channel.link.peer)))

    # -- small helpers --------------------------------------------------------------------
    def _send(self, message: Message, addr: Endpoint) -> None:
        if addr == self.broker:
            message = self._stamp(message)
        self.sock.sendto(frames.encode(message), addr)

    def _stamp(self, message: Message) -> Message:
        """Frames to the broker carry its latest cookie; a register also carries our key,
        the token and a signature over all of it."""
        assert self.registration is not None
        cookie = self.registration.cookie
        if isinstance(message, Register):
            message = replace(
                message, public_key=self.identity.public_key, cookie=cookie, token=self.config.token or None
            )
            return replace(message, signature=self.identity.sign_register(message))
        if isinstance(message, Keepalive | ConnectRequest):
            return replace(message, cookie=cookie)
        return message

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _loop_create(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        assert self._loop is not None
        return self._loop.create_task(coro)  # type: ignore[arg-type]

    def _loop_call_later(self, delay: float, func: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        self._loop.call_later(delay, func, *args)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
