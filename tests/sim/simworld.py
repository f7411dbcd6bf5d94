"""A broker and agents on the simulated network, with real QUIC in virtual time.

The broker is natter_proto's BrokerCore with the in-memory registry and relay table; each
agent is an AgentMachine with the shell's Router, and its tunnels are real sans-IO QUIC
connections of natter's engines (qh3 by default) fed in virtual time. Nothing here opens
a socket or reads a clock.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from simnet import Network, Realm

from natter_agent.engines import make_engine
from natter_agent.engines.base import (
    CidIssued,
    CidRetired,
    PeerAuthenticated,
    PingAcked,
    StreamData,
    Terminated,
    TunnelConnection,
)
from natter_agent.router import Router
from natter_agent.tls import credentials_for
from natter_proto import frames
from natter_proto.agent.actions import (
    Action,
    CloseSocket,
    CloseTunnel,
    DeliverDatagram,
    Notice,
    OpenSockets,
    OpenStream,
    PathChanged,
    PeerReady,
    PeerUnreachable,
    PingTunnel,
    RouteTunnel,
    SendFrame,
    StartTunnel,
    TunnelUp,
)
from natter_proto.agent.kinds import BROKER_STREAM, QUIC_PEER, Path, PathKind, Role
from natter_proto.agent.machine import AgentMachine
from natter_proto.agent.settings import AgentSettings
from natter_proto.broker import BrokerCore, RecentSessions
from natter_proto.endpoints import Endpoint
from natter_proto.frames import ConnectRequest, FrameError, Keepalive, MappingQuery, MappingReply, Register
from natter_proto.identity import Identity
from natter_proto.registry import PeerTable
from natter_proto.relay import (
    RELAY_PREFIX,
    RelayFrameError,
    RelaySession,
    RelayTable,
    decode_relay,
    encode_relay,
    session_key,
)

TTL = 60.0


class SimBroker:
    """A single broker (the embedded default), with its probe port and relay."""

    def __init__(self, net: Network, addr: Endpoint, *, relay: bool = True, probe: bool = True) -> None:
        self.net, self.addr = net, addr
        self.core = BrokerCore("sim", 20, punch_delay_ms=0)
        self.core.relay = relay
        self.table = PeerTable(TTL)
        self.keys: dict[str, bytes] = {}
        self.recent = RecentSessions()
        self.relays = RelayTable(1 << 30, 3600)
        self.relayed_bytes = 0
        self.keepalives: list[tuple[float, str]] = []  # when, from whom
        self.up = True
        self.tcp = True  # takes agents' TCP streams (TLS, WebSocket)
        self.streams: dict[Endpoint, SimStream] = {}
        net.internet.bind(addr, self.receive)
        if probe:
            self.probe_addr = Endpoint(addr.host, addr.port + 1)
            self.core.probe_port = self.probe_addr.port
            net.internet.bind(self.probe_addr, self.probe)

    def send(self, message: frames.Message, to: Endpoint) -> None:
        self.deliver(to, frames.encode(message))

    def deliver(self, to: Endpoint, data: bytes) -> None:
        """To an agent's TCP stream if ``to`` is one, else over UDP."""
        stream = self.streams.get(to)
        if stream is not None:
            stream.to_agent(data)
        else:
            self.net.internet.send(self.addr, to, data)

    def stream_received(self, data: bytes, source: Endpoint) -> None:
        self.receive(data, source)

    def restart(self) -> None:
        """A standalone broker restarts: it forgets every registration and cookie."""
        relay, probe = self.core.relay, self.core.probe_port
        self.core = BrokerCore("sim", 20, punch_delay_ms=0)
        self.core.relay, self.core.probe_port = relay, probe
        self.table = PeerTable(TTL)
        self.keys.clear()
        self.recent = RecentSessions()
        self.relays = RelayTable(1 << 30, 3600)

    def probe(self, data: bytes, source: Endpoint) -> None:
        if self.up and isinstance(frames.decode(data), MappingQuery):
            self.net.internet.send(self.probe_addr, source, frames.encode(MappingReply(source)))

    def receive(self, data: bytes, source: Endpoint) -> None:
        if not self.up:
            return
        now = self.net.clock.now
        if data[0] == RELAY_PREFIX:
            self._relay(data, source)
            return
        try:
            message = frames.decode(data)
        except FrameError:
            return
        if isinstance(message, MappingQuery):  # the main port answers it too (agents on TCP)
            self.deliver(source, frames.encode(MappingReply(source)))
            return
        admission = self.core.admit(message, source, len(data), now)
        if not admission.ok:
            if admission.reply is not None:
                self.send(admission.reply, source)
            return
        if isinstance(message, Register):
            record, reply = self.core.on_register(message, source, now)
            if record is not None:
                owner = self.keys.setdefault(record.name, record.public_key or b"")
                if owner != record.public_key:
                    reply = self.core.name_taken(message, owner)
                else:
                    self.table.put(record)
            self.send(reply, source)
        elif isinstance(message, Keepalive):
            self.keepalives.append((now, message.name))
            record = self.table.get(message.name)
            known = record is not None and record.public == source
            if record is not None and known:
                self.table.put(record.seen(now))
            self.send(self.core.on_keepalive(message, source, known, now), source)
        elif isinstance(message, ConnectRequest):
            session = self.recent.session_for(message.peer_from, message.request_id, now)
            decision = self.core.on_connect(
                message,
                source,
                self.table.get(message.peer_from),
                self.table.get(message.peer_to),
                now,
                TTL,
                session,
            )
            if decision.refusal is not None:
                self.send(*decision.refusal)
                return
            intro = decision.introduction
            assert intro is not None
            self.relays.allow(
                session_key(session), RelaySession(intro.requester.name, intro.target.name, now)
            )
            for frame in intro.to_target:
                self.send(frame, intro.target.public)
            self.send(intro.to_requester, intro.requester.public)

    def _relay(self, data: bytes, source: Endpoint) -> None:
        try:
            key, packet = decode_relay(data)
        except RelayFrameError:
            return
        records = (self.table.get(name) for name in self.table.names())
        sender = next((r.name for r in records if r is not None and r.public == source), None)
        if sender is None:
            return
        receiver, _ = self.relays.charge(key, sender, len(packet), self.net.clock.now)
        record = self.table.get(receiver) if receiver is not None else None
        if record is not None:
            self.relayed_bytes += len(packet)
            self.deliver(record.public, encode_relay(key, packet))


class SimStream:
    """An agent's TCP stream to the broker: reliable and in order, one RTT and a half to
    open (TCP, TLS and the upgrade are overlapped in this model: three one-way delays),
    seen by the broker from the agent's outermost NAT's address and a port of its own."""

    ports = itertools.count(61000)

    def __init__(self, agent: SimAgent, broker: SimBroker, public_ip: str) -> None:
        self.agent, self.broker = agent, broker
        self.source = Endpoint(public_ip, next(SimStream.ports))
        self.delay = agent.world.net.latency * 3
        self.open = False

    def connect(self) -> None:
        clock = self.agent.world.net.clock

        def opened() -> None:
            if self.agent.streams.get(BROKER_STREAM) is not self:
                return
            if not self.broker.up or not self.broker.tcp:
                self.agent.stream_failed(self, "connection refused")
                return
            self.open = True
            self.broker.streams[self.source] = self
            self.agent.machine.stream_opened(BROKER_STREAM, clock.now)
            self.agent.pump()

        clock.at(clock.now + 3 * self.delay, opened)

    def to_broker(self, data: bytes) -> None:
        self._later(lambda: self.broker.stream_received(data, self.source))

    def to_agent(self, data: bytes) -> None:
        self._later(lambda: self.agent.datagram(BROKER_STREAM, data, self.broker.addr))

    def _later(self, arrive: Callable[[], None]) -> None:
        """One way across, if the stream is still open when it gets there."""
        clock = self.agent.world.net.clock
        if self.open:
            clock.at(clock.now + self.delay, lambda: arrive() if self.open else None)

    def close(self) -> None:
        self.open = False
        if self.broker.streams.get(self.source) is self:
            del self.broker.streams[self.source]


@dataclass
class SimTunnel:
    """One tunnel's QUIC connection, driven in virtual time."""

    id: int
    peer: str
    role: Role
    conn: TunnelConnection
    route: Path
    kind: PathKind
    expected_key: bytes | None
    ready: bool = False
    closed: str = ""
    received: dict[int, bytearray] = field(default_factory=lambda: defaultdict(bytearray))
    fins: set[int] = field(default_factory=set)
    moved: int = 0  # payload bytes since the last ping


class SimAgent:
    """An AgentMachine on a host of the simulated network, with the shell's duties done
    here in virtual time: sockets, routing, QUIC."""

    def __init__(
        self,
        world: World,
        name: str,
        realm: Realm,
        ip: str,
        broker: Endpoint,
        settings: AgentSettings,
        engine: str,
        identity: Identity | None = None,
        port: int = 40000,
    ) -> None:
        self.world, self.name, self.realm, self.ip = world, name, realm, ip
        self.identity = identity or Identity.generate()
        self.engine = make_engine(engine, credentials=credentials_for(self.identity, name))
        self.main = Endpoint(ip, port)
        self.sockets: dict[int, Endpoint] = {0: self.main}
        self.machine = AgentMachine(name, self.identity, [broker], (self.main,), settings)
        self.router = Router()
        self.tunnels: dict[int, SimTunnel] = {}
        self.events: list[Action] = []
        self.times: list[float] = []  # when each event came
        self.ready: dict[str, int] = {}
        self.unreachable: dict[str, PeerUnreachable] = {}
        self._ports = itertools.count(41000)
        self.streams: dict[int, SimStream] = {}
        self.stream_attempts = 0
        realm.bind(self.main, lambda data, src: self.datagram(0, data, src))

    @property
    def now(self) -> float:
        return self.world.net.clock.now

    # -- the shell's duties ----------------------------------------------------------------
    def datagram(self, socket: int, data: bytes, src: Endpoint) -> None:
        placed = self.router.place(socket, src, data)
        if placed is None:
            self.machine.handle_datagram(socket, src, data, self.now, self.router.owner_of(data))
        else:
            tunnel_id, path, packet = placed
            tunnel = self.tunnels.get(tunnel_id)
            if tunnel is not None:
                if path != tunnel.route:
                    self.machine.tunnel_heard_on(tunnel_id, path, self.now)
                self._feed(tunnel, [packet])
        self.pump()

    def pump(self) -> None:
        while (action := self.machine.next_action()) is not None:
            self.act(action)

    def act(self, action: Action) -> None:
        if isinstance(action, SendFrame):
            self._send_on(action.socket, action.addr, action.data)
        elif isinstance(action, OpenSockets):
            for socket in action.sockets:
                addr = Endpoint(self.ip, next(self._ports))
                self.sockets[socket] = addr
                self.realm.bind(addr, lambda data, src, s=socket: self.datagram(s, data, src))
        elif isinstance(action, CloseSocket):
            stream = self.streams.pop(action.socket, None)
            if stream is not None:
                stream.close()
            addr = self.sockets.pop(action.socket, None)
            if addr is not None:
                self.realm.unbind(addr)
        elif isinstance(action, OpenStream):
            self._open_stream()
        elif isinstance(action, StartTunnel):
            self._start(action)
        elif isinstance(action, RouteTunnel):
            tunnel = self.tunnels.get(action.tunnel)
            if tunnel is not None:
                tunnel.route, tunnel.kind = action.path, action.kind
                self.router.route(action.tunnel, action.path)
        elif isinstance(action, DeliverDatagram):
            tunnel = self.tunnels.get(action.tunnel)
            if tunnel is not None:
                self._feed(tunnel, [action.data])
        elif isinstance(action, PingTunnel):
            tunnel = self.tunnels.get(action.tunnel)
            if tunnel is not None and not tunnel.closed:
                tunnel.conn.send_ping(action.uid)
                self._flush(tunnel)
        elif isinstance(action, CloseTunnel):
            tunnel = self.tunnels.get(action.tunnel)
            if tunnel is not None and not tunnel.closed:
                tunnel.conn.close(0, None, action.reason)
                self._flush(tunnel)
                self._closed(tunnel, action.reason)
        elif isinstance(action, PeerReady):
            self.ready[action.peer] = action.tunnel
            self.unreachable.pop(action.peer, None)
        elif isinstance(action, PeerUnreachable):
            self.unreachable[action.peer] = action
        if isinstance(action, Notice | TunnelUp | PathChanged | PeerReady | PeerUnreachable):
            self.events.append(action)
            self.times.append(self.now)

    def _open_stream(self) -> None:
        """TCP to the broker: through every NAT up to the internet, unless one blocks TCP."""
        old = self.streams.pop(BROKER_STREAM, None)
        if old is not None:
            old.close()
        nat, public_ip = self.realm.upstream, self.ip
        blocked = False
        while nat is not None:
            blocked = blocked or nat.tcp_blocked
            public_ip, nat = nat.public_ip, nat.outside.upstream
        stream = SimStream(self, self.world.broker, public_ip)
        self.streams[BROKER_STREAM] = stream
        self.stream_attempts += 1
        if blocked:
            clock = self.world.net.clock
            clock.at(clock.now + 1.0, lambda: self.stream_failed(stream, "no connection"))
        else:
            stream.connect()

    def stream_failed(self, stream: SimStream, reason: str) -> None:
        if self.streams.get(BROKER_STREAM) is stream:
            del self.streams[BROKER_STREAM]
            stream.close()
            self.machine.stream_closed(BROKER_STREAM, reason, self.now)
            self.pump()

    def _start(self, action: StartTunnel) -> None:
        if action.role is Role.CLIENT:
            conn: TunnelConnection | None = self.engine.client_connection()
            assert conn is not None
            conn.connect((QUIC_PEER.host, QUIC_PEER.port), now=self.now)
        else:
            conn = self.engine.server_connection(action.initial)
            if conn is None:
                self.machine.tunnel_closed(action.tunnel, "not a QUIC Initial", self.now)
                return
        tunnel = SimTunnel(
            action.tunnel, action.peer, action.role, conn, action.path, action.kind, action.expected_key
        )
        self.tunnels[tunnel.id] = tunnel
        self.router.add(tunnel.id, conn, action.initial)
        self.router.route(tunnel.id, action.path)
        if action.initial:
            self._feed(tunnel, [action.initial])
        else:
            self._flush(tunnel)

    def _feed(self, tunnel: SimTunnel, packets: list[bytes]) -> None:
        if tunnel.closed:
            return
        tunnel.conn.receive_datagrams(packets, (QUIC_PEER.host, QUIC_PEER.port), self.now)
        self._events(tunnel)
        self._flush(tunnel)

    def _events(self, tunnel: SimTunnel) -> None:
        while (event := tunnel.conn.poll_event()) is not None:
            if isinstance(event, PeerAuthenticated):
                key = tunnel.conn.peer_public_key()
                if tunnel.expected_key is not None and key != tunnel.expected_key:
                    tunnel.conn.close(0, None, "wrong key")
                    self._closed(tunnel, "wrong key")
                    return
                tunnel.conn.accept_peer()
            elif isinstance(event, CidIssued | CidRetired):
                self.router.connection_id(tunnel.id, event.cid, issued=isinstance(event, CidIssued))
            elif isinstance(event, PingAcked):
                busy, tunnel.moved = tunnel.moved > 0, 0
                self.machine.tunnel_pong(tunnel.id, event.uid, busy, self.now)
            elif isinstance(event, StreamData):
                tunnel.received[event.stream_id] += event.data
                tunnel.moved += len(event.data)
                tunnel.conn.consume(event.stream_id, len(event.data))
                if event.end_stream:
                    tunnel.fins.add(event.stream_id)
            elif isinstance(event, Terminated):
                self._closed(tunnel, event.reason or "terminated")
                return
        confirmed = tunnel.role is Role.SERVER or tunnel.conn.handshake_confirmed()
        if not tunnel.ready and confirmed and tunnel.conn.peer_public_key() is not None:
            tunnel.ready = True
            self.machine.tunnel_ready(tunnel.id, self.now)

    def _flush(self, tunnel: SimTunnel) -> None:
        if tunnel.closed and tunnel.id not in self.tunnels:
            return
        for data, _addr in tunnel.conn.datagrams_to_send(self.now):
            route = tunnel.route
            if route.relayed:
                self._send_on(route.socket, route.addr, encode_relay(route.relay_key, data))
            else:
                self._send_on(route.socket, route.addr, data)

    def _send_on(self, socket: int, addr: Endpoint, data: bytes) -> None:
        stream = self.streams.get(socket)
        if stream is not None:
            stream.to_broker(data)
            return
        src = self.sockets.get(socket)
        if src is not None:
            self.realm.send(src, addr, data)

    def _closed(self, tunnel: SimTunnel, reason: str) -> None:
        if tunnel.closed:
            return
        tunnel.closed = reason
        self.router.forget(tunnel.id)
        self.tunnels.pop(tunnel.id, None)
        self.machine.tunnel_closed(tunnel.id, reason, self.now)

    # -- time ------------------------------------------------------------------------------
    def next_timer(self) -> float | None:
        times = [self.machine.get_timer()]
        times += [t.conn.get_timer() for t in self.tunnels.values()]
        return min((t for t in times if t is not None), default=None)

    def on_timer(self) -> None:
        now = self.now
        when = self.machine.get_timer()
        if when is not None and when <= now:
            self.machine.handle_timer(now)
        for tunnel in list(self.tunnels.values()):
            when = tunnel.conn.get_timer()
            if when is not None and when <= now:
                tunnel.conn.handle_timer(now)
                self._events(tunnel)
                self._flush(tunnel)
        self.pump()

    # -- what a test does ------------------------------------------------------------------
    def move_to(self, realm: Realm, ip: str) -> None:
        """The host moves to another network (roaming): its sockets get new addresses."""
        for socket, addr in list(self.sockets.items()):
            self.realm.unbind(addr)
            new = Endpoint(ip, addr.port)
            self.sockets[socket] = new
            realm.bind(new, lambda data, src, s=socket: self.datagram(s, data, src))
        self.realm, self.ip = realm, ip

    def tunnel_to(self, peer: str) -> SimTunnel | None:
        tunnel_id = self.ready.get(peer)
        tunnel = self.tunnels.get(tunnel_id) if tunnel_id is not None else None
        return tunnel if tunnel is not None and not tunnel.closed else None

    def send(self, peer: str, data: bytes, *, fin: bool = False, stream: int | None = None) -> int:
        tunnel = self.tunnel_to(peer)
        assert tunnel is not None, f"{self.name} has no tunnel to {peer}"
        stream_id = stream if stream is not None else tunnel.conn.new_stream_id()
        tunnel.conn.send_stream_data(stream_id, data, end_stream=fin)
        tunnel.moved += len(data)
        if stream is None:  # a new connection, as the shell tells the machine (Agent.connect)
            self.machine.tunnel_activity(tunnel.id, self.now)
        self._flush(tunnel)
        return stream_id

    def received_from(self, peer: str) -> bytes:
        return b"".join(bytes(data) for t in self._all_tunnels(peer) for data in t.received.values())

    def _all_tunnels(self, peer: str) -> list[SimTunnel]:
        return [t for t in self.tunnels.values() if t.peer == peer]


class World:
    def __init__(
        self,
        *,
        seed: int = 1,
        latency: float = 0.005,
        loss: float = 0.0,
        settings: AgentSettings | None = None,
        engine: str = "qh3",
        relay: bool = True,
        broker_ip: str = "198.51.100.1",
    ) -> None:
        self.net = Network(seed=seed, latency=latency, loss=loss)
        self.settings = settings or AgentSettings()
        self.engine = engine
        self.broker = SimBroker(self.net, Endpoint(broker_ip, 10000), relay=relay)
        self.agents: list[SimAgent] = []

    def agent(
        self,
        name: str,
        realm: Realm,
        ip: str,
        *,
        identity: Identity | None = None,
        port: int = 40000,
        brokers: list[Endpoint] | None = None,
    ) -> SimAgent:
        """``brokers``: the addresses the agent is given (default: the broker's one)."""
        agent = SimAgent(self, name, realm, ip, self.broker.addr, self.settings, self.engine, identity, port)
        if brokers is not None:
            agent.machine = AgentMachine(name, agent.identity, brokers, (agent.main,), self.settings)
        self.agents.append(agent)
        return agent

    def kill(self, agent: SimAgent) -> None:
        """kill -9: its sockets close, its state is gone."""
        for addr in agent.sockets.values():
            agent.realm.unbind(addr)
        agent.tunnels.clear()
        self.agents.remove(agent)

    def run(self, seconds: float) -> None:
        end = self.net.clock.now + seconds
        spins, last = 0, -1.0
        while True:
            self.net.clock.run_until(end, self._next_timer)
            now = self.net.clock.now
            due = [a for a in self.agents if (t := a.next_timer()) is not None and t <= now]
            for agent in due:
                agent.on_timer()
            spins = spins + 1 if now == last and due else 0
            last = now
            assert spins < 10_000, f"a timer at {now} does not move: {[a.name for a in due]}"
            if now >= end and not due:
                return

    def _next_timer(self) -> float | None:
        return min((t for a in self.agents if (t := a.next_timer()) is not None), default=None)

    def start(self, *agents: SimAgent, listen: tuple[SimAgent, ...] = ()) -> None:
        for agent in agents:
            if agent in listen:
                agent.machine.listen(self.net.clock.now)
            agent.machine.start(self.net.clock.now)
            agent.pump()
