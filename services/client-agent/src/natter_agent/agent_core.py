"""The client agent's core: registration, introductions, datagram input and tunnels.

Everything crosses one UDP socket. The sans-IO machines of natter_proto decide; this
module feeds them datagrams and time, sends what they produce and turns their events into
``PeerLink`` tunnels and log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace

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
from natter_proto.punch import PunchSession
from natter_proto.registration import (
    BrokerChanged,
    PublicEndpointChanged,
    Registration,
    RegistrationLost,
    RegistrationRefused,
    RegistrationUp,
    RegState,
)
from natter_proto.relay import RELAY_PREFIX, RelayFrameError, decode_relay
from natter_proto.relay import session_key as relay_key

from .engine import QuicEngine, make_engine, warm_up
from .errors import NatterError, PeerUnavailable
from .interfaces import local_ipv4_addresses
from .keystore import KNOWN_PEERS, KnownPeers, load_identity, state_dir
from .link import PeerLink, StreamChannel
from .tls import credentials_for
from .trust import PeerTrust
from .udp import AgentSocket

log = structlog.get_logger("natter.agent")


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


class AgentCore:
    """One natter client: a name, a broker, one UDP socket, and tunnels to peers. ``Agent``
    adds how the tunnels find and keep their paths."""

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

    # -- paths: Agent (natter_agent.agent) implements these; the core only calls them --
    def _start_punch(self, punch: Punch, now: float) -> None:
        raise NotImplementedError

    def _on_punch_event(self, session: PunchSession, event: object) -> None:
        raise NotImplementedError

    def _new_link(
        self, conn: object, punch: Punch, addr: Endpoint, role: str, *, relayed: bool = False, source: int = 0
    ) -> PeerLink:
        raise NotImplementedError

    async def _await_handshake(self, link: PeerLink, punch: Punch) -> None:
        raise NotImplementedError

    def _log_migration(self, link: PeerLink, new_kind: str, old: str, new: str) -> None:
        raise NotImplementedError

    def _use_relay(self, link: PeerLink, key: bytes, *, via_relay: bool) -> None:
        raise NotImplementedError

    def _socket_for(self, session_id: str, source: int) -> AgentSocket:
        raise NotImplementedError

    def _watch_paths(self) -> None:
        raise NotImplementedError

    def _refresh_paths(self) -> None:
        raise NotImplementedError

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
