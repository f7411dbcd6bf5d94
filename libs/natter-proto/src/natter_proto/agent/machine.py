"""AgentMachine: the whole client-agent protocol, free of I/O.

It takes datagrams (with the local socket they came on), the time and commands (start,
listen, connect, close), and gives back actions (``natter_proto.agent.actions``): frames to
send, sockets to open, tunnels to start, route and close, and events to tell. Its parts
are the sans-IO machines of natter_proto (Registration, NatProbe, ConnectAttempt,
PunchSession) and one ``PeerPaths`` per peer; this class only routes between them. The
shell (natter_agent) carries the actions out and runs QUIC; it hands over only what its
router cannot place, and tells the machine what its tunnels did.
"""

from __future__ import annotations

from collections import Counter, deque

from .. import frames
from ..connect import ConnectAnswered
from ..endpoints import Endpoint
from ..frames import (
    ConnectOffer,
    FrameError,
    MappingReply,
    Message,
    NoTunnel,
    Probe,
    ProbeAck,
    Punch,
)
from ..identity import Identity
from ..registration import Registration
from ..relay import RELAY_PREFIX, RelayFrameError, decode_relay
from .actions import (
    Action,
    CloseTunnel,
    DeliverDatagram,
    Level,
    Notice,
    NoticeKind,
    PeerReady,
    PeerUnreachable,
)
from .brokerlink import BrokerLink
from .introductions import Introductions, Outcome
from .kinds import BROKER_STREAM, MAIN_SOCKET, Path, PathKind, Role, direct_path, relay_path
from .paths import PeerPaths
from .pathstate import Health, Purpose
from .peers import Peers
from .punches import Puncher
from .registration_notes import NatNotes
from .settings import AgentSettings

QUIC_MIN_INITIAL = 1200  # RFC 9000 14.1: a client's Initial datagram is at least this big


def is_quic_initial(data: bytes) -> bool:
    """A long-header Initial (QUIC v1) big enough to be a client's first datagram."""
    return len(data) >= QUIC_MIN_INITIAL and data[0] & 0xF0 == 0xC0


class AgentMachine:
    def __init__(
        self,
        name: str,
        identity: Identity,
        brokers: list[Endpoint],
        local_endpoints: tuple[Endpoint, ...],
        settings: AgentSettings,
        *,
        token: str = "",
    ) -> None:
        self.name = name
        self.settings = settings
        self.listening = False
        self.link = BrokerLink(name, identity, brokers, local_endpoints, settings, token)
        self.stats: Counter[str] = Counter()
        self._out: deque[Action] = deque()
        self.peers = Peers(settings, self._out)
        self.puncher = Puncher(name, settings, self.peers, self._out)
        self.sessions = self.puncher.sessions
        self.introductions = Introductions(name, settings)
        self._closed = False

    # -- state ------------------------------------------------------------------------
    @property
    def broker(self) -> Endpoint:
        return self.link.broker

    @property
    def registered(self) -> bool:
        return self.link.registered

    @property
    def registration(self) -> Registration:
        return self.link.registration

    @property
    def nat(self) -> NatNotes:
        return self.link.nat

    def next_action(self) -> Action | None:
        return self._out.popleft() if self._out else None

    def paths(self, peer: str) -> PeerPaths:
        return self.peers.get(peer)

    # -- commands ---------------------------------------------------------------------
    def start(self, now: float) -> None:
        self.registration.start(now)
        self._service(now)

    def listen(self, now: float) -> None:
        self.listening = True
        self.registration.update(listening=True, now=now)
        self._service(now)

    def connect(self, peer: str, target: str, now: float) -> None:
        """Make a tunnel to peer usable: PeerReady or PeerUnreachable follows."""
        if self._closed:
            self._out.append(PeerUnreachable(peer, "closed", "agent closed"))
            return
        tunnel = self.paths(peer).usable()
        if tunnel is not None:
            self._out.append(PeerReady(peer, tunnel.id))
            return
        if self._building(peer):
            return
        self._ask(peer, target, Purpose.NEW, now)
        self._service(now)

    def close(self, now: float) -> None:
        self._closed = True
        self.registration.stop()
        for tunnel_id in self.peers.tunnels():
            self._out.append(CloseTunnel(tunnel_id, "agent shutting down"))
        for paths in self.peers:
            if self._building(paths.peer):
                self._unreachable(paths.peer, "closed", "agent closed")

    # -- the broker stream ---------------------------------------------------------------
    def stream_opened(self, socket: int, now: float) -> None:
        """The TCP stream to the broker is up (TLS and WebSocket done)."""
        if socket == BROKER_STREAM:
            self.link.stream_opened(now)
            self._service(now)

    def stream_closed(self, socket: int, reason: str, now: float) -> None:
        """The stream failed to open, or ended (``reason`` says how, in a few words)."""
        if socket == BROKER_STREAM:
            self.link.stream_closed(reason, now)
            self._service(now)

    # -- what the shell's tunnels did --------------------------------------------------
    def tunnel_ready(self, tunnel_id: int, now: float) -> None:
        paths = self.peers.of(tunnel_id)
        if paths is not None:
            self.peers.handshake_done(tunnel_id)
            paths.ready(tunnel_id, now)
            self._service(now)

    def tunnel_closed(self, tunnel_id: int, reason: str, now: float) -> None:
        removed = self.peers.remove(tunnel_id)
        if removed is None:
            return
        paths, tunnel, handshaking = removed
        peer = paths.peer
        if handshaking and tunnel is not None:
            self._note(
                NoticeKind.TUNNEL_FAILED,
                Level.WARNING,
                "tunnel failed",
                peer=peer,
                path=str(tunnel.route),
                reason=reason,
            )
            if tunnel.role is Role.CLIENT:
                self._unreachable(peer, "handshake_failed", reason)
        elif paths.current == tunnel_id and not self._closed:
            self._note(NoticeKind.TUNNEL_CLOSED, Level.WARNING, "tunnel closed", peer=peer, reason=reason)
        paths.closed(tunnel_id, now)
        self.puncher.release_socket(tunnel.route if tunnel is not None else None)
        self._service(now)

    def tunnel_pong(self, tunnel_id: int, uid: int, busy: bool, now: float) -> None:
        paths = self.peers.of(tunnel_id)
        if paths is not None:
            paths.pong(tunnel_id, uid, busy, now)
            self._service(now)

    def tunnel_activity(self, tunnel_id: int, now: float) -> None:
        paths = self.peers.of(tunnel_id)
        if paths is not None:
            paths.activity(tunnel_id, now)

    def tunnel_heard_on(self, tunnel_id: int, path: Path, now: float) -> None:
        """The router placed a datagram on a path that is not the tunnel's route."""
        paths = self.peers.of(tunnel_id)
        if paths is not None:
            paths.heard_on(tunnel_id, path, self._kind_of(paths.peer, path), now)
            self._service(now)

    def _kind_of(self, peer: str, path: Path) -> PathKind:
        """What a path the peer's datagrams came on is: relayed, or what the punch session
        that found it says (lan, predicted), else direct."""
        if path.relayed:
            return PathKind.RELAYED
        for session in self.sessions.by_id.values():
            source = session.source_of(path.socket)
            if session.punch.peer == peer and source is not None and session.punch.knows(path.addr, source):
                return session.kind(path.addr)[0]
        return PathKind.DIRECT

    # -- datagrams the router could not place -------------------------------------------
    def handle_datagram(
        self, socket: int, addr: Endpoint, data: bytes, now: float, owner: int | None = None
    ) -> None:
        """``owner``: the tunnel whose connection ID a short-header QUIC packet carries."""
        if not data:
            return
        if data[0] == RELAY_PREFIX:
            self._on_relay(socket, addr, data, now, owner)
        elif data[0] < 0x40:
            self._on_frame(socket, addr, data, now)
        else:
            self._on_quic(socket, addr, data, now, owner)
        self._service(now)

    def _on_frame(self, socket: int, addr: Endpoint, data: bytes, now: float) -> None:
        try:
            message = frames.decode(data)
        except FrameError as exc:
            self.stats[f"dropped_{exc.code}"] += 1
            return
        if isinstance(message, Probe | ProbeAck | NoTunnel):
            session = self.sessions.by_id.get(message.session_id)
            source = session.source_of(socket) if session is not None else None
            if session is None or source is None:
                self.stats["dropped_unknown_session"] += 1
                return
            session.punch.receive(message, addr, now, source)
            self.stats["accepted_probe"] += 1
            return
        if not self.link.path.carries(socket):
            self.stats["dropped_unknown_session"] += 1
            return
        if isinstance(message, MappingReply):
            if not self.link.receive_mapping(message, addr, socket, now):
                self.stats["dropped_not_from_broker"] += 1
                return
            self.stats["accepted_broker"] += 1
            return
        if addr != self.broker and not (socket == MAIN_SOCKET and self.link.adopt(addr)):
            self.stats["dropped_not_from_broker"] += 1
            return
        self.stats["accepted_broker"] += 1
        self.link.heard(socket)
        self._on_broker_message(message, now)

    def _on_broker_message(self, message: Message, now: float) -> None:
        if self.registration.receive(message, now):
            return
        if self.introductions.receive(message):
            return
        if isinstance(message, Punch) and message.role == Role.SERVER.value:
            self._start_punch(message, Purpose.NEW, now)
        elif isinstance(message, ConnectOffer):
            if self.listening:
                self._note(
                    NoticeKind.OFFER,
                    Level.INFO,
                    "peer asks for a tunnel",
                    peer=message.peer_from,
                    target=message.target,
                )
            else:
                self._note(
                    NoticeKind.IGNORED,
                    Level.WARNING,
                    "ignoring tunnel request: not listening",
                    peer=message.peer_from,
                )
        else:
            self.stats["dropped_unexpected"] += 1

    def _on_relay(self, socket: int, addr: Endpoint, data: bytes, now: float, owner: int | None) -> None:
        if socket != self.link.socket or addr != self.broker:
            self.stats["dropped_relay_not_from_broker"] += 1
            return
        try:
            key, packet = decode_relay(data)
        except RelayFrameError:
            self.stats["dropped_relay_bad_frame"] += 1
            return
        path = relay_path(addr, key, socket)
        if owner is not None and self.peers.of(owner) is not None:
            self.stats["accepted_relay"] += 1
            self.tunnel_heard_on(owner, path, now)  # the client moved this tunnel onto the relay
            self._out.append(DeliverDatagram(owner, packet))
            return
        session = self.sessions.relaying(key)
        if session is None or not self.listening or not is_quic_initial(packet):
            self.stats["dropped_relay_unknown_session"] += 1
            return
        self.stats["accepted_relay"] += 1
        # the punch goes on: the client started on the relay first, and moves to a direct
        # path if one answers (our probes keep our NAT open to it)
        self.puncher.start_tunnel(session, Role.SERVER, path, PathKind.RELAYED, 0, now, initial=packet)

    def _on_quic(self, socket: int, addr: Endpoint, data: bytes, now: float, owner: int | None) -> None:
        if owner is not None and self.peers.of(owner) is not None:
            # the peer's NAT gave it a new port, or its client moved the tunnel: QUIC's keys
            # tell the packet is the peer's; the tunnel follows (see PeerPaths.heard_on)
            self.stats["accepted_quic"] += 1
            self.tunnel_heard_on(owner, direct_path(addr, socket), now)
            self._out.append(DeliverDatagram(owner, data))
            return
        session = self.sessions.serving(addr, socket)
        if session is None or not self.listening:
            self.stats["dropped_quic_unknown_source"] += 1
            return
        if not is_quic_initial(data):
            self.stats["dropped_not_initial"] += 1
            return
        source = session.source_of(socket) or 0
        session.punch.succeed(addr, source)
        self.stats["accepted_quic"] += 1
        kind, probes = session.kind(addr)
        self.puncher.start_tunnel(
            session, Role.SERVER, session.path(addr, source), kind, probes, now, initial=data
        )

    # -- time -------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        times = [*self.link.get_timer(), self.sessions.next_timer()]
        times += self.introductions.timers(registered=self.registered)
        times += self.peers.timers()
        return min((t for t in times if t is not None), default=None)

    def handle_timer(self, now: float) -> None:
        self.link.handle_timer(now)
        self.introductions.handle_timer(now)
        self.puncher.handle_timer(now)
        for paths in self.peers:
            paths.handle_timer(now)
        for tunnel_id in self.peers.handshakes_overdue(now):
            self._out.append(CloseTunnel(tunnel_id, "QUIC handshake timed out"))
            self.tunnel_closed(tunnel_id, "QUIC handshake timed out", now)
        for peer, pending in self.introductions.expired(now, registered=self.registered):
            text = f"{self.link.path.unanswered(self.broker)} within {self.settings.register_timeout:g} s"
            self._fail_purpose(peer, pending.purpose, "timeout", text, now)
        self._service(now)

    # -- asking the broker ---------------------------------------------------------------
    def _ask(self, peer: str, target: str, purpose: Purpose, now: float) -> None:
        can_ask = self.registered and not self.nat.pending
        note = self.introductions.ask(peer, target, purpose, now, can_ask=can_ask)
        if note is not None:
            self._out.append(note)

    def _start_punch(self, punch: Punch, purpose: Purpose, now: float) -> None:
        relay = relay_path(self.broker, b"", self.link.socket)  # how the relay is reached now
        self.puncher.start(punch, purpose, self.nat.kind, relay, self.listening, now)

    def _fail_purpose(self, peer: str, purpose: Purpose, code: str, message: str, now: float) -> None:
        if purpose is Purpose.NEW:
            self._unreachable(peer, code, message)
        else:
            self.paths(peer).refused(purpose, message, now)

    def _building(self, peer: str) -> bool:
        """Is a new tunnel to peer on its way? Read off the parts, never a flag of its own
        (a flag that an outcome forgets to clear would swallow every later connect)."""
        if self.introductions.building(peer):
            return True
        if self.puncher.building(peer):
            return True
        paths = self.peers.by_name.get(peer)
        return paths is not None and any(
            t.health is Health.HANDSHAKING and t.role is Role.CLIENT for t in paths.tunnels.values()
        )

    def _unreachable(self, peer: str, code: str, message: str) -> None:
        self._out.append(PeerUnreachable(peer, code, message))

    # -- draining the parts ----------------------------------------------------------------
    def _service(self, now: float) -> None:
        """Send what the parts want sent and act on what they report."""
        if self._closed:
            return
        actions, moved = self.link.service(now, listening=self.listening)
        self._out.extend(actions)
        if moved:
            for paths in self.peers:
                paths.endpoint_moved(now)
        self._out.extend(
            self.introductions.flush(now, registered=self.registered, nat_pending=self.nat.pending)
        )
        for item in self.introductions.frames_and_outcomes():
            if not isinstance(item, Outcome):
                self._send_broker(item)
            elif isinstance(item.event, ConnectAnswered):
                self._start_punch(item.event.punch, item.purpose, now)
            else:
                self._note(
                    NoticeKind.INTRODUCTION_FAILED,
                    Level.WARNING,
                    "broker could not introduce us",
                    peer=item.peer,
                    broker=str(self.broker),
                    reason=item.event.message,
                )
                self._fail_purpose(item.peer, item.purpose, item.event.code, item.event.message, now)
        self.puncher.service(now)
        for paths in self.peers:
            while paths.wants:
                self._ask(paths.peer, "", paths.wants.popleft(), now)
            if paths.check_endpoint:
                paths.check_endpoint = False
                self._out.extend(self.link.check_endpoint(now))

    def _send_broker(self, message: Message) -> None:
        self._out.extend(self.link.frames(message))

    def _note(self, kind: NoticeKind, level: Level, text: str, **fields: object) -> None:
        self._out.append(Notice(kind, level, text, fields))
