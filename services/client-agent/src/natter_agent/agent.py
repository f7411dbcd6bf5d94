"""The client agent: an asyncio shell around ``natter_proto.agent.AgentMachine``.

The machine decides everything about registration, punching and paths. This shell owns
what it cannot: the UDP sockets, one timer, the QUIC connections (``PeerLink``), the
router that takes a tunnel's datagrams straight to it, trust decisions that read files,
and log lines. It feeds the machine what the router cannot place and carries out the
actions the machine returns.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from natter_proto import frames
from natter_proto.agent import actions as act
from natter_proto.agent.kinds import MAIN_SOCKET, Path, Role, relay_path
from natter_proto.agent.machine import AgentMachine
from natter_proto.backoff import Backoff
from natter_proto.config import Config, broker_list
from natter_proto.endpoints import AddressError, Endpoint
from natter_proto.identity import Identity
from natter_proto.registration import Registration
from natter_proto.relay import RELAY_PREFIX, RelayFrameError, decode_relay, encode_relay

from . import nativeforward
from .brokerstream import BrokerStream, proxy_for
from .brokertrust import BrokerTrust
from .engines import AnyEngine, warm_up
from .engines.native import NativeEngine
from .errors import NatterError, PeerUnavailable
from .eventlog import log_event
from .interfaces import local_ipv4_addresses, local_ipv6_addresses
from .link import PeerLink
from .links import AnyLink
from .nativelink import NativeLink
from .nativeplane import NativePlane

if TYPE_CHECKING:
    from .forward import Listener
from .router import Router
from .startup import agent_settings, broker_addresses, load
from .stream import StreamChannel
from .trust import PeerTrust
from .udp import AgentSocket
from .udpdemux import UdpDemux
from .waiters import Waiters

log = structlog.get_logger("natter.agent")

IncomingHandler = Callable[[StreamChannel, str], Awaitable[None]]


@dataclass
class Refusal:
    """A peer whose tunnel we refused (its key changed, say): connections to it fail at once
    with the reason until ``until``, then one introduction tries again (5 s, doubling to 5
    min), so a refusal is said once per interval, not on every incoming connection."""

    reason: str = ""
    until: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=5.0, maximum=300.0))


class Agent:
    """One natter client: a name, a broker, one UDP socket, and tunnels to peers."""

    def __init__(self, config: Config, *, engine: AnyEngine | None = None) -> None:
        if not frames.valid_name(config.client_user):
            raise AddressError(f"invalid name {config.client_user!r}: use letters, digits, '.', '_' or '-'")
        self.config = config
        self.name = config.client_user
        broker_addresses(config.broker_addr)  # a malformed address fails here, the lookup at start
        self.brokers: list[Endpoint] = []
        self._engine = engine
        self.identity_created = False
        self.settings = agent_settings(config)
        self.sock = self._new_socket(MAIN_SOCKET)
        self.sockets: dict[int, AgentSocket | BrokerStream] = {MAIN_SOCKET: self.sock}
        self.router = Router()
        self.tunnels: dict[int, AnyLink] = {}
        self.plane: NativePlane | None = None  # the native engine's data plane, when it runs
        self.machine: AgentMachine | None = None
        self.registered = asyncio.Event()
        self.listening = False
        self.incoming_handler: IncomingHandler | None = None
        self.udp = UdpDemux()  # DATAGRAM frames: UDP forwards' flows and the UDP listener
        self._stats: Counter[str] = Counter()  # the shell's own; the machine counts the rest
        self._log = log.bind(name=self.name)
        self._waiters = Waiters()
        self._refusals: dict[str, Refusal] = {}  # peers whose key we refused: not asked again yet
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None  # when it fires (not every loop's handle can say)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- what status and the forwards read ------------------------------------------------
    @property
    def registration(self) -> Registration | None:
        return self.machine.registration if self.machine is not None else None

    @property
    def broker(self) -> Endpoint:
        """The broker this agent talks to now."""
        if self.machine is not None:
            return self.machine.broker
        return self.brokers[0] if self.brokers else Endpoint("0.0.0.0", 0)

    @property
    def nat(self) -> str:
        return self.machine.nat.kind.value if self.machine is not None else "unknown"

    @property
    def stats(self) -> Counter[str]:
        """Datagrams accepted and dropped, by reason: the machine's counts and the shell's (and
        broker frames that could not be answers to ours: unbound_challenge_answered, ...)."""
        if self.machine is None:
            return Counter(self._stats)
        unbound = Counter({f"unbound_{k}": v for k, v in self.machine.registration.unbound.items()})
        native: Counter[str] = Counter()
        if self.plane is not None:  # what the native engine kept from Python
            full, by_id = self.plane.engine.counters()
            native.update(dropped_native_queue_full=full, accepted_quic_unknown_source_to_engine=by_id)
        return self._stats + self.machine.stats + unbound + native + self.udp.dropped

    def links(self) -> list[AnyLink]:
        """Live tunnels that new connections may use, one per peer."""
        return [link for peer in self._peers() if (link := self.link_to(peer)) is not None]

    def link_to(self, peer: str) -> AnyLink | None:
        paths = self.machine.peers.by_name.get(peer) if self.machine is not None else None
        tunnel = paths.usable() if paths is not None else None
        link = self.tunnels.get(tunnel.id) if tunnel is not None else None
        return link if link is not None and link.is_alive else None

    def _peers(self) -> list[str]:
        return list(self.machine.peers.by_name) if self.machine is not None else []

    # the agent's key, the peers it trusts and its QUIC engine, set by start()
    identity: Identity
    trust: PeerTrust
    engine: AnyEngine
    _broker_names: dict[Endpoint, str]  # the host each broker was named by (TLS server name)
    _broker_trust: BrokerTrust

    def _load(self) -> None:
        """The blocking part of starting: DNS, the key file and known peers, the engine."""
        loaded = load(self.config, self._engine)
        self.brokers, self.identity, self.identity_created = (
            list(loaded.brokers),
            loaded.identity,
            loaded.created,
        )
        self.trust, self.engine = loaded.trust, loaded.engine
        self._broker_names, self._broker_trust = loaded.brokers, loaded.broker_trust

    @property
    def wants_native(self) -> bool:
        """This agent will run the native engine (known before start, for the forwards)."""
        if self._engine is not None:
            return isinstance(self._engine, NativeEngine)
        return self.config.quic_engine == "native"

    def serve_native(self, listener: Listener) -> None:
        """Incoming streams of the native engine go to the listener's checks."""
        plane = self.plane
        assert plane is not None

        def incoming(tunnel: int, conn: int, header: bytes) -> None:
            link = self.tunnels.get(tunnel)
            if not isinstance(link, NativeLink) or not self.listening:
                plane.engine.refuse(conn)
                return
            if self.machine is not None:
                self.machine.tunnel_activity(tunnel, self._now())
            self._track(nativeforward.serve_incoming(listener, plane, link, conn, header))

        def refused(tunnel: int, reason: str) -> None:
            link = self.tunnels.get(tunnel)
            nativeforward.count_refusal(listener, reason, link.peer if link is not None else "?")

        plane.on_incoming, plane.on_refused = incoming, refused

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self.machine is not None:
            return
        self._load()
        self._loop = asyncio.get_running_loop()
        bound = self.sock.bind(self.config.udp_host, self.config.udp_port)
        if isinstance(self.engine, NativeEngine):
            self._start_native(self.engine)
        hosts = local_ipv4_addresses() + (local_ipv6_addresses() if self.sock.v6 else [])
        locals_ = tuple(Endpoint(ip, bound.port) for ip in hosts)
        self.machine = AgentMachine(
            self.name, self.identity, self.brokers, locals_, self.settings, token=self.config.token
        )
        self._log.info(
            "agent started",
            udp=str(bound),
            brokers=", ".join(str(b) for b in self.brokers),
            key=self.identity.fingerprint,
            new_key=self.identity_created,
            quic_engine=self.engine.name,
        )
        if self.listening:
            self.machine.listen(self._now())
        self.machine.start(self._now())
        self._pump()
        if not isinstance(self.engine, NativeEngine):
            warm_up(self.engine)  # while the broker answers: the first tunnel comes up sooner

    def _start_native(self, engine: NativeEngine) -> None:
        """The native engine reads the main socket from now on; what is not a tunnel's
        QUIC comes back here, as if this agent had read it."""
        native = engine.open(
            self.sock.hand_over(),
            header_timeout=self.config.header_timeout,
            max_pending_streams=self.config.max_pending_streams,
        )
        self.plane = NativePlane(
            native,
            on_datagram=functools.partial(self._datagram, MAIN_SOCKET),
            on_send=self._native_send,
            on_batch_done=self._pump,
            link_of=lambda tunnel: link if isinstance(link := self.tunnels.get(tunnel), NativeLink) else None,
            on_moved=self._native_moved,
            on_send_on=lambda path, packets: self._send_on(path, [(p, None) for p in packets]),
        )
        self.plane.start()

    async def wait_registered(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.registered.wait(), timeout)
        except TimeoutError:
            if self.machine is None:
                raise NatterError(f"broker {broker_list(self.config.broker_addr)} did not answer") from None
            tried = self.machine.link.path.unanswered(self.machine.broker)
            raise NatterError(f"{tried} (within {timeout:g} s)") from None

    def set_listening(self, handler: IncomingHandler) -> None:
        self.listening = True
        self.incoming_handler = handler
        if self.machine is not None:
            self.machine.listen(self._now())
            self._pump()

    async def close(self) -> None:
        if self._closed:
            return
        if self.machine is not None:
            self.machine.close(self._now())
            self._pump()
        self._closed = True
        for link in list(self.tunnels.values()):
            link.close("agent shutting down")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        await asyncio.sleep(0)  # let the CONNECTION_CLOSE datagrams leave
        if self.plane is not None:
            await asyncio.sleep(0.05)  # the native engine sends them from its own threads
            self.plane.close()
        for sock in self.sockets.values():
            sock.close()

    async def connect(self, peer: str, target: str = "") -> AnyLink:
        """Return a live tunnel to peer, asking the broker and punching if there is none."""
        link = self.link_to(peer)
        if link is not None:
            assert self.machine is not None
            self.machine.tunnel_activity(link.tunnel, self._now())  # a new connection: check the path
            return link
        if self._closed or self.machine is None:
            raise NatterError("agent closed" if self._closed else "agent not started")
        if not frames.valid_name(peer):
            raise AddressError(f"invalid peer name {peer!r}")
        refusal = self._refusals.get(peer)
        if refusal is not None and self._now() < refusal.until:
            left = refusal.until - self._now()
            raise PeerUnavailable(peer, "refused", f"{refusal.reason} (trying again in {left:.0f} s)")
        waiter, new = self._waiters.wait(peer)
        if new:
            self.machine.connect(peer, target, self._now())
            self._pump()
        return await asyncio.shield(waiter)

    # -- datagrams ----------------------------------------------------------------------
    def _new_socket(self, number: int) -> AgentSocket:
        on_datagram = functools.partial(self._datagram, number)
        return AgentSocket(on_datagram, on_datagram, self._pump)

    def _datagram(self, socket: int, data: bytes, addr: Endpoint) -> None:
        placed = self.router.place(socket, addr, data)
        if placed is not None:
            tunnel_id, path, packet = placed
            link = self.tunnels.get(tunnel_id)
            if link is not None:
                if path is not link.route and self.machine is not None:
                    self.machine.tunnel_heard_on(tunnel_id, path, self._now())
                link.datagram_received(packet)
                return
        if self.machine is None:
            return
        if self.plane is not None and self._native_stranger(self.plane, socket, addr, data):
            return
        self.machine.handle_datagram(socket, addr, data, self._now(), self.router.owner_of(data))
        self._pump()  # at once: the router must know a tunnel started here before the next datagram

    # -- the machine's actions --------------------------------------------------------------
    def _pump(self) -> None:
        """Carry out what the machine asks, then arm its timer."""
        machine = self.machine
        if machine is None:
            return
        while (action := machine.next_action()) is not None:
            self._act(action)
        if machine.registered != self.registered.is_set():
            (self.registered.set if machine.registered else self.registered.clear)()
        self._arm_timer()

    def _act(self, action: act.Action) -> None:
        if isinstance(action, act.SendFrame):
            sock = self.sockets.get(action.socket)
            if sock is not None:
                sock.sendto(action.data, action.addr)
        elif isinstance(action, act.PingTunnel):
            link = self.tunnels.get(action.tunnel)
            if link is not None:
                link.ping(action.uid)
        elif isinstance(action, act.RouteTunnel):
            link = self.tunnels.get(action.tunnel)
            if link is not None:
                link.route, link.kind = action.path, action.kind
                self.router.route(action.tunnel, action.path)
        elif isinstance(action, act.DeliverDatagram):
            link = self.tunnels.get(action.tunnel)
            if link is not None:
                link.datagram_received(action.data)
        elif isinstance(action, act.StartTunnel):
            self._start_tunnel(action)
        elif isinstance(action, act.CloseTunnel):
            self._close_tunnel(action)
        elif isinstance(action, act.OpenSockets):
            self._open_sockets(action.sockets)
        elif isinstance(action, act.OpenStream):
            self._open_stream(action)
        elif isinstance(action, act.CloseSocket):
            sock = self.sockets.pop(action.socket, None)
            if sock is not None:
                sock.close()
        elif isinstance(action, act.PeerReady | act.PeerUnreachable):
            link = self.tunnels.get(action.tunnel) if isinstance(action, act.PeerReady) else None
            self._waiters.settle(action, link)
        else:
            self._tell(action)

    def _start_tunnel(self, action: act.StartTunnel) -> None:
        if self.plane is not None or isinstance(self.engine, NativeEngine):
            assert self.plane is not None, "the native engine runs with its plane"
            self._start_native_tunnel(self.plane, action)
            return
        if action.role is Role.CLIENT:
            conn = self.engine.client_connection()
        else:
            server = self.engine.server_connection(action.initial)
            if server is None:
                self._stats["dropped_not_initial"] += 1
                assert self.machine is not None
                self.machine.tunnel_closed(action.tunnel, "not a QUIC Initial", self._now())
                return
            conn = server
        link = PeerLink(
            tunnel=action.tunnel,
            send=functools.partial(self._send_tunnel, action.tunnel),
            conn=conn,
            peer=action.peer,
            route=action.path,
            kind=action.kind,
            role=action.role,
            on_incoming=self._on_incoming_stream,
            on_ready=self._on_link_ready,
            on_pong=self._on_link_pong,
            on_cid=lambda link, cid, issued: self.router.connection_id(link.tunnel, cid, issued=issued),
            on_closed=self._on_link_closed,
            on_datagram=self.udp.received,
            verify=self._verify_peer,
            expected_key=action.expected_key,
            send_buffer_limit=self.config.send_buffer_limit,
        )
        self.tunnels[action.tunnel] = link
        self.router.add(action.tunnel, conn, action.initial)
        self.router.route(action.tunnel, action.path)
        if action.role is Role.CLIENT:
            link.start_client()
        else:
            link.datagram_received(action.initial)

    def _native_stranger(self, plane: NativePlane, socket: int, addr: Endpoint, data: bytes) -> bool:
        """A relayed short-header QUIC packet of no known path goes to the native engine,
        which alone can tell its tunnel by connection ID (Initials go to the machine)."""
        if data[0] != RELAY_PREFIX or addr != self.broker:
            return False
        try:
            key, packet = decode_relay(data)
        except RelayFrameError:
            return False
        if not packet or packet[0] & 0x80 or packet[0] < 0x40:
            return False
        plane.stranger(relay_path(addr, key, socket), packet)
        return True

    def _native_moved(self, tunnel: int, path: Path) -> None:
        """QUIC followed the peer to a new path (its NAT remapped, it roamed, it moved the
        tunnel onto the relay): the tunnel's paths follow, as for packets placed by ID."""
        if self.machine is not None and tunnel in self.tunnels:
            self.machine.tunnel_heard_on(tunnel, path, self._now())
            self._pump()

    def _start_native_tunnel(self, plane: NativePlane, action: act.StartTunnel) -> None:
        link = NativeLink(
            tunnel=action.tunnel,
            engine=plane.engine,
            peer=action.peer,
            route=action.path,
            kind=action.kind,
            role=action.role,
            on_ready=self._on_link_ready,
            on_pong=self._on_link_pong,
            on_closed=self._on_link_closed,
            on_datagram=self.udp.received,
            verify=self._verify_peer,
            expected_key=action.expected_key,
        )
        self.tunnels[action.tunnel] = link
        self.router.add_initial(action.tunnel, action.initial)
        self.router.route(action.tunnel, action.path)  # relayed packets come back through here
        if action.role is Role.CLIENT:
            link.start_client()
        elif not plane.engine.accept_initial(action.tunnel, action.initial):
            link.close("too many packets waiting for the native engine")

    def _native_send(self, tunnel: int, packets: list[bytes]) -> None:
        self.router.sent(tunnel, packets)
        self._send_tunnel(tunnel, [(packet, None) for packet in packets])

    def _send_tunnel(self, tunnel: int, datagrams: list[tuple[bytes, object]]) -> None:
        """A tunnel's datagrams leave on its current path (QUIC addressed them to QUIC_PEER)."""
        link = self.tunnels.get(tunnel)
        if link is not None:
            self._send_on(link.route, datagrams)

    def _send_on(self, route: Path, datagrams: list[tuple[bytes, object]]) -> None:
        sock = self.sockets.get(route.socket)
        if sock is None:
            return
        if route.relayed:
            for data, _ in datagrams:
                sock.sendto(encode_relay(route.relay_key, data), route.addr)
        else:
            dest = (route.addr.host, route.addr.port)
            sock.send_batch([(data, dest) for data, _ in datagrams])

    def _close_tunnel(self, action: act.CloseTunnel) -> None:
        link = self.tunnels.get(action.tunnel)
        if link is None:
            return
        if action.drain and link.open_streams > 0:
            self._track(self._drain(link, action.reason))
        else:
            link.close(action.reason)

    async def _drain(self, link: AnyLink, reason: str) -> None:
        """A replaced tunnel serves its open connections to their end, then closes."""
        while link.is_alive and link.open_streams > 0:
            await asyncio.sleep(0.5)
        link.close(reason)

    def _open_sockets(self, numbers: tuple[int, ...]) -> None:
        for number in numbers:
            sock = self._new_socket(number)
            try:
                sock.bind(self.config.udp_host, 0)
            except OSError:
                break  # out of ports or descriptors: punch with what we have
            self.sockets[number] = sock

    def _open_stream(self, action: act.OpenStream) -> None:
        """The TCP way to the broker (its UDP gets no answer): TLS, then WebSocket."""
        old = self.sockets.pop(action.socket, None)
        if old is not None:
            old.close()
        name = self._broker_names.get(action.addr, action.addr.host)
        try:
            proxy = proxy_for(name, self.config.proxy)
        except AddressError as exc:
            self._stream_closed(action.socket, None, str(exc))
            return
        stream = BrokerStream(
            action.addr,
            name,
            self._broker_trust,
            proxy,
            functools.partial(self._datagram, action.socket),
            lambda: self._stream_opened(action.socket),
            lambda reason: self._stream_closed(action.socket, stream, reason),
            lambda text: self._log.warning(text, broker=str(action.addr)),
        )
        self.sockets[action.socket] = stream
        self._log.info(
            "no UDP answer from the broker yet: trying TCP",
            broker=str(action.addr),
            proxy=f"{proxy.host}:{proxy.port}" if proxy is not None else None,
        )
        stream.start()

    def _stream_opened(self, socket: int) -> None:
        if self.machine is not None:
            self.machine.stream_opened(socket, self._now())
            self._pump()

    def _stream_closed(self, socket: int, stream: BrokerStream | None, reason: str) -> None:
        if stream is not None and self.sockets.get(socket) is stream:
            del self.sockets[socket]
        self._log.info("TCP stream to the broker ended", reason=reason)
        if self.machine is not None and not self._closed:
            self.machine.stream_closed(socket, reason, self._now())
            self._pump()

    def _tell(self, event: act.Action) -> None:
        """Events become log lines (the machine's words)."""
        tunnel = getattr(event, "tunnel", None)
        log_event(self._log, event, self.tunnels.get(tunnel) if tunnel is not None else None)

    # -- what the tunnels tell ---------------------------------------------------------------
    def _on_link_ready(self, link: AnyLink) -> None:
        if self.machine is not None:
            self.machine.tunnel_ready(link.tunnel, self._now())
            self._pump()

    def _on_link_pong(self, link: AnyLink, uid: int, busy: bool) -> None:
        if self.machine is not None:
            self.machine.tunnel_pong(link.tunnel, uid, busy, self._now())
            self._pump()

    def _on_link_closed(self, link: AnyLink) -> None:
        self.tunnels.pop(link.tunnel, None)
        self.router.forget(link.tunnel)
        if self.machine is not None and not self._closed:
            self.machine.tunnel_closed(link.tunnel, link.close_reason, self._now())
            self._pump()

    def _verify_peer(self, link: AnyLink) -> str | None:
        refusal = self._unvetted_refusal(link)
        if refusal is None:
            refusal = self.trust.check(link.peer, link.expected_key, link.peer_key, link.role.value)
        if refusal is not None:
            self._stats["tunnels_refused"] += 1
            self._log.error("refused tunnel at the TLS layer", peer=link.peer, reason=refusal)
            if link.role is Role.CLIENT:  # ours to ask for: not again before the back-off ends
                refused = self._refusals.setdefault(link.peer, Refusal())
                refused.reason = refusal
                refused.until = self._now() + refused.backoff.next_delay()
        else:
            self._refusals.pop(link.peer, None)
        return refusal

    def _unvetted_refusal(self, link: AnyLink) -> str | None:
        """Any authenticated peer may connect to a listener, but identities cost nothing: at
        most ``max_unvetted_tunnels`` at once from peers the user never named."""
        if link.role is not Role.SERVER or self.trust.names(link.peer):
            return None
        live = sum(1 for other in self.tunnels.values() if other.is_alive and not other.vetted)
        if live >= self.config.max_unvetted_tunnels:
            return (
                f"{self.name} has {live} tunnels open from peers it does not know; "
                "name trusted peers with --allow or --peer"
            )
        link.vetted = False
        return None

    def _on_incoming_stream(self, channel: StreamChannel) -> None:
        handler = self.incoming_handler
        if handler is None or not self.listening:
            channel.reset()
            channel.link.release(channel)
            return
        if self.machine is not None:
            self.machine.tunnel_activity(channel.link.tunnel, self._now())
        self._track(handler(channel, channel.link.peer))

    # -- time ---------------------------------------------------------------------------
    def _arm_timer(self) -> None:
        assert self.machine is not None and self._loop is not None
        when = self.machine.get_timer()
        if self._timer is not None:
            if when is not None and self._timer_at == when:
                return
            self._timer.cancel()
            self._timer = None
        if when is not None and not self._closed:
            self._timer = self._loop.call_at(when, self._on_timer)
            self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        if self.machine is not None and not self._closed:
            self.machine.handle_timer(self._now())
            self._pump()

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _track(self, coro: Awaitable[None]) -> None:
        assert self._loop is not None
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
