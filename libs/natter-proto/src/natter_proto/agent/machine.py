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

import itertools
import secrets
from collections import Counter, deque
from dataclasses import dataclass, replace

from .. import frames
from ..connect import ConnectAnswered, ConnectAttempt, ConnectFailed
from ..endpoints import Endpoint
from ..frames import (
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
from ..identity import Identity
from ..punch import PathFound, PunchTimedOut
from ..registration import PublicEndpointChanged, Registration, RegState
from ..relay import RELAY_PREFIX, RelayFrameError, decode_relay
from .actions import (
    Action,
    CloseSocket,
    CloseTunnel,
    DeliverDatagram,
    Level,
    Notice,
    NoticeKind,
    OpenSockets,
    PeerReady,
    PeerUnreachable,
    SendFrame,
    StartTunnel,
)
from .kinds import MAIN_SOCKET, NatKind, Path, PathKind, Role, direct_path, relay_path
from .paths import Health, PeerPaths, Purpose
from .punching import Session, Sessions
from .registration_notes import NatNotes, registration_notice
from .settings import AgentSettings

QUIC_MIN_INITIAL = 1200  # RFC 9000 14.1: a client's Initial datagram is at least this big


def is_quic_initial(data: bytes) -> bool:
    """A long-header Initial (QUIC v1) big enough to be a client's first datagram."""
    return len(data) >= QUIC_MIN_INITIAL and data[0] & 0xF0 == 0xC0


@dataclass
class Pending:
    """A punch asked for before we could ask the broker (not registered, NAT unknown)."""

    target: str
    purpose: Purpose
    deadline: float  # registered by then, or the connect fails
    nat_deadline: float  # NAT type known by then, or we ask without it


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
        self.identity = identity
        self.brokers = brokers
        self.settings = settings
        self.token = token
        self.listening = False
        self.registration = Registration(
            name, local_endpoints, keepalive_interval=settings.keepalive_interval, brokers=len(brokers)
        )
        self.nat = NatNotes()
        self.stats: Counter[str] = Counter()
        self.peers: dict[str, PeerPaths] = {}
        self.sessions = Sessions(settings)
        self._out: deque[Action] = deque()
        self._tunnel_ids = itertools.count(1)
        self._peer_of: dict[int, str] = {}  # tunnel -> peer
        self._handshakes: dict[int, float] = {}  # tunnel -> deadline
        self._attempts: dict[str, tuple[ConnectAttempt, Purpose]] = {}
        self._pending: dict[str, Pending] = {}
        self._endpoint_checked: float | None = None
        self._closed = False

    # -- state ------------------------------------------------------------------------
    @property
    def broker(self) -> Endpoint:
        return self.brokers[self.registration.broker_index]

    @property
    def registered(self) -> bool:
        return self.registration.state is RegState.REGISTERED

    def next_action(self) -> Action | None:
        return self._out.popleft() if self._out else None

    def paths(self, peer: str) -> PeerPaths:
        paths = self.peers.get(peer)
        if paths is None:
            paths = self.peers[peer] = PeerPaths(
                peer, self.settings, self._out, lambda: next(self._tunnel_ids)
            )
        return paths

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
        for tunnel_id in list(self._peer_of):
            self._out.append(CloseTunnel(tunnel_id, "agent shutting down"))
        for peer in list(self.peers):
            if self._building(peer):
                self._unreachable(peer, "closed", "agent closed")

    # -- what the shell's tunnels did --------------------------------------------------
    def tunnel_ready(self, tunnel_id: int, now: float) -> None:
        peer = self._peer_of.get(tunnel_id)
        if peer is None:
            return
        self._handshakes.pop(tunnel_id, None)
        self.paths(peer).ready(tunnel_id, now)
        self._service(now)

    def tunnel_closed(self, tunnel_id: int, reason: str, now: float) -> None:
        peer = self._peer_of.pop(tunnel_id, None)
        if peer is None:
            return
        paths = self.paths(peer)
        tunnel = paths.tunnels.get(tunnel_id)
        was_current = paths.current == tunnel_id
        if self._handshakes.pop(tunnel_id, None) is not None and tunnel is not None:
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
        elif was_current and not self._closed:
            self._note(NoticeKind.TUNNEL_CLOSED, Level.WARNING, "tunnel closed", peer=peer, reason=reason)
        paths.closed(tunnel_id, now)
        self._release_socket(tunnel.route if tunnel is not None else None)
        self._service(now)

    def tunnel_pong(self, tunnel_id: int, uid: int, busy: bool, now: float) -> None:
        peer = self._peer_of.get(tunnel_id)
        if peer is not None:
            self.paths(peer).pong(tunnel_id, uid, busy, now)
            self._service(now)

    def tunnel_activity(self, tunnel_id: int, now: float) -> None:
        peer = self._peer_of.get(tunnel_id)
        if peer is not None:
            self.paths(peer).activity(tunnel_id, now)

    def tunnel_heard_on(self, tunnel_id: int, path: Path, now: float) -> None:
        """The router placed a datagram on a path that is not the tunnel's route."""
        peer = self._peer_of.get(tunnel_id)
        if peer is not None:
            kind = PathKind.RELAYED if path.relayed else PathKind.DIRECT
            self.paths(peer).heard_on(tunnel_id, path, kind, now)
            self._service(now)

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
        if isinstance(message, Probe | ProbeAck):
            session = self.sessions.by_id.get(message.session_id)
            source = session.source_of(socket) if session is not None else None
            if session is None or source is None:
                self.stats["dropped_unknown_session"] += 1
                return
            session.punch.receive(message, addr, now, source)
            self.stats["accepted_probe"] += 1
            return
        if socket != MAIN_SOCKET:
            self.stats["dropped_unknown_session"] += 1
            return
        if isinstance(message, MappingReply):
            if not self.nat.receive(message, addr):
                self.stats["dropped_not_from_broker"] += 1
                return
            self.stats["accepted_broker"] += 1
            return
        if addr != self.broker:
            self.stats["dropped_not_from_broker"] += 1
            return
        self.stats["accepted_broker"] += 1
        self._on_broker_message(message, now)

    def _on_broker_message(self, message: Message, now: float) -> None:
        if self.registration.receive(message, now):
            return
        if isinstance(message, Punch | Error) and message.request_id in self._attempts:
            self._attempts[message.request_id][0].receive(message)
        elif isinstance(message, Punch) and message.role == Role.SERVER.value:
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
        if socket != MAIN_SOCKET or addr != self.broker:
            self.stats["dropped_relay_not_from_broker"] += 1
            return
        try:
            key, packet = decode_relay(data)
        except RelayFrameError:
            self.stats["dropped_relay_bad_frame"] += 1
            return
        path = relay_path(addr, key)
        if owner is not None and owner in self._peer_of:
            self.stats["accepted_relay"] += 1
            self.tunnel_heard_on(owner, path, now)  # the client moved this tunnel onto the relay
            self._out.append(DeliverDatagram(owner, packet))
            return
        session = self.sessions.relaying(key)
        if session is None or not self.listening or not is_quic_initial(packet):
            self.stats["dropped_relay_unknown_session"] += 1
            return
        self.stats["accepted_relay"] += 1
        session.punch.succeed(addr)
        self._start_tunnel(session, Role.SERVER, path, PathKind.RELAYED, 0, now, initial=packet)

    def _on_quic(self, socket: int, addr: Endpoint, data: bytes, now: float, owner: int | None) -> None:
        if owner is not None and owner in self._peer_of:
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
        self._start_tunnel(session, Role.SERVER, session.path(addr, source), kind, probes, now, initial=data)

    # -- time -------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        times = [self.registration.get_timer(), self.nat.get_timer(), self.sessions.next_timer()]
        times += [attempt.get_timer() for attempt, _ in self._attempts.values()]
        times += [paths.get_timer() for paths in self.peers.values()]
        times += list(self._handshakes.values())
        times += [p.nat_deadline if self.registered else p.deadline for p in self._pending.values()]
        return min((t for t in times if t is not None), default=None)

    def handle_timer(self, now: float) -> None:
        self.registration.handle_timer(now)
        self.nat.handle_timer(now)
        for attempt, _ in list(self._attempts.values()):
            attempt.handle_timer(now)
        for session in list(self.sessions.by_id.values()):
            session.punch.handle_timer(now)
        for session in self.sessions.expired(now):
            self._end_session(session)
        for paths in list(self.peers.values()):
            paths.handle_timer(now)
        for tunnel_id, deadline in list(self._handshakes.items()):
            if now >= deadline:
                self._out.append(CloseTunnel(tunnel_id, "QUIC handshake timed out"))
                self.tunnel_closed(tunnel_id, "QUIC handshake timed out", now)
        for peer, pending in list(self._pending.items()):
            if not self.registered and now >= pending.deadline:
                del self._pending[peer]
                self._fail_purpose(
                    peer,
                    pending.purpose,
                    "timeout",
                    f"broker {self.broker} did not answer within {self.settings.register_timeout:g} s",
                    now,
                )
        self._service(now)

    # -- asking the broker ---------------------------------------------------------------
    def _ask(self, peer: str, target: str, purpose: Purpose, now: float) -> None:
        s = self.settings
        if self.registered and not self.nat.pending:
            self._send_connect(peer, target, purpose, now)
        elif peer not in self._pending:
            self._pending[peer] = Pending(target, purpose, now + s.register_timeout, now + s.nat_probe_wait)

    def _send_connect(self, peer: str, target: str, purpose: Purpose, now: float) -> None:
        request_id = secrets.token_hex(6)
        attempt = ConnectAttempt(
            request_id, self.name, peer, target, now, deadline=self.settings.connect_timeout
        )
        self._attempts[request_id] = (attempt, purpose)
        self._note(
            NoticeKind.ASKING_BROKER,
            Level.INFO,
            "asking broker for peer",
            peer=peer,
            request_id=request_id,
            purpose=purpose.value,
        )

    def _flush_pending(self, now: float) -> None:
        if not self.registered:
            return
        for peer, pending in list(self._pending.items()):
            if not self.nat.pending or now >= pending.nat_deadline:
                del self._pending[peer]
                self._send_connect(peer, pending.target, pending.purpose, now)

    def _fail_purpose(self, peer: str, purpose: Purpose, code: str, message: str, now: float) -> None:
        if purpose is Purpose.NEW:
            self._unreachable(peer, code, message)
        else:
            self.paths(peer).refused(purpose, message, now)

    def _building(self, peer: str) -> bool:
        """Is a new tunnel to peer on its way? Read off the parts, never a flag of its own
        (a flag that an outcome forgets to clear would swallow every later connect)."""
        if (pending := self._pending.get(peer)) is not None and pending.purpose is Purpose.NEW:
            return True
        for attempt, purpose in self._attempts.values():
            if purpose is Purpose.NEW and attempt.request.peer_to == peer:
                return True
        for session in self.sessions.by_id.values():
            punch = session.punch
            if (
                session.purpose is Purpose.NEW
                and session.role is Role.CLIENT
                and punch.peer == peer
                and punch.state.value == "probing"
            ):
                return True
        paths = self.peers.get(peer)
        return paths is not None and any(
            t.health is Health.HANDSHAKING and t.role is Role.CLIENT for t in paths.tunnels.values()
        )

    def _unreachable(self, peer: str, code: str, message: str) -> None:
        self._out.append(PeerUnreachable(peer, code, message))

    # -- punching -------------------------------------------------------------------------
    def _start_punch(self, punch: Punch, purpose: Purpose, now: float) -> None:
        if punch.role == Role.SERVER.value and not self.listening:
            self._note(NoticeKind.IGNORED, Level.WARNING, "ignoring punch: not listening", peer=punch.peer)
            return
        if punch.session_id in self.sessions.by_id:
            return  # a repeated instruction for a session already under way
        self._note(
            NoticeKind.PUNCHING,
            Level.INFO,
            f"punching to {punch.peer}",
            peer_nat=punch.peer_nat or "unknown",
            role=punch.role,
            public=str(punch.peer_public),
            candidates=len(punch.peer_locals) + 1,
            session=punch.session_id,
            request_id=punch.request_id,
        )
        session = self.sessions.start(self.name, punch, purpose, self.nat.kind, self.broker, now)
        if session.sockets or session.punch.predicting:
            self._note(
                NoticeKind.BIRTHDAY,
                Level.INFO,
                "peer behind a symmetric NAT: birthday punching",
                sockets=len(session.sockets) + 1,
                spray=self.settings.spray_probes if not session.sockets else 0,
            )
        if session.sockets:
            self._out.append(OpenSockets(tuple(session.sockets)))
        hard = NatKind.HARD
        if (
            session.role is Role.CLIENT
            and punch.relay
            and purpose is Purpose.NEW
            and self.nat.kind is hard
            and NatKind.parse(punch.peer_nat) is hard
        ):
            # two symmetric NATs: no probe can meet a mapping, so do not wait for the punch
            session.punch.succeed(self.broker)
            self._relay_tunnel(session, "both NATs are symmetric", now)

    def _on_punch_event(self, session: Session, event: PathFound | PunchTimedOut, now: float) -> None:
        peer = session.punch.peer
        if isinstance(event, PathFound):
            self._note(
                NoticeKind.PUNCH_ANSWERED,
                Level.INFO,
                "punch answered",
                peer=peer,
                path=str(event.path),
                probe_rtt_ms=round(event.rtt * 1000, 2),
            )
            if session.role is not Role.CLIENT:
                return
            path = session.path(event.path, event.source)
            kind, probes = session.kind(event.path)
            paths = self.paths(peer)
            if session.purpose is not Purpose.NEW and paths.client_tunnel() is not None:
                paths.punch_found(session.purpose, path, kind, probes, now)
            else:
                self._start_tunnel(session, Role.CLIENT, path, kind, probes, now)
            return
        tried = ", ".join(str(c) for c in event.tried)
        self._note(NoticeKind.PUNCH_FAILED, Level.WARNING, "punch failed: no answer", peer=peer, tried=tried)
        if session.role is not Role.CLIENT:
            return
        relay = session.relay() if session.punch.punch.relay else None
        if session.purpose is not Purpose.NEW and self.paths(peer).client_tunnel() is not None:
            self.paths(peer).punch_failed(session.purpose, relay, now)
        elif relay is not None:
            self._relay_tunnel(session, "no probe was answered", now)
        else:
            self._unreachable(peer, "punch_failed", f"no direct path to {peer} (tried {tried})")

    def _relay_tunnel(self, session: Session, why: str, now: float) -> None:
        peer = session.punch.peer
        self._note(
            NoticeKind.RELAY_FALLBACK,
            Level.INFO,
            f"no direct path to {peer} ({why}): tunnelling through the broker's relay",
        )
        self._start_tunnel(session, Role.CLIENT, session.relay(), PathKind.RELAYED, 0, now)

    def _start_tunnel(
        self,
        session: Session,
        role: Role,
        path: Path,
        kind: PathKind,
        probes: int,
        now: float,
        *,
        initial: bytes = b"",
    ) -> None:
        punch = session.punch.punch
        tunnel = self.paths(punch.peer).add(role, path, kind, now, probes)
        self._peer_of[tunnel.id] = punch.peer
        self._handshakes[tunnel.id] = now + self.settings.handshake_timeout
        self._out.append(StartTunnel(tunnel.id, punch.peer, role, path, kind, punch.peer_key, initial))

    def _end_session(self, session: Session) -> None:
        """Its linger is over: close its extra sockets but those a tunnel uses."""
        in_use = self._sockets_in_use()
        for socket in session.sockets:
            if socket not in in_use:
                self._out.append(CloseSocket(socket))

    def _release_socket(self, route: Path | None) -> None:
        if route is None or route.socket == MAIN_SOCKET:
            return
        if self.sessions.for_socket(route.socket) is None and route.socket not in self._sockets_in_use():
            self._out.append(CloseSocket(route.socket))

    def _sockets_in_use(self) -> set[int]:
        return {
            t.route.socket
            for paths in self.peers.values()
            for t in paths.tunnels.values()
            if t.health is not Health.CLOSED
        }

    # -- draining the parts ----------------------------------------------------------------
    def _service(self, now: float) -> None:
        """Send what the parts want sent and act on what they report."""
        if self._closed:
            return
        reg = self.registration
        for message in self.nat.frames_to_send():
            self._out.append(SendFrame(MAIN_SOCKET, self.nat.target, frames.encode(message)))
        learned = self.nat.learned()
        if learned is not None:
            self._out.append(learned)
            if reg.nat != self.nat.kind.value:
                reg.update(nat=self.nat.kind.value, now=now)
        for message in reg.frames_to_send():
            self._send_broker(message)
        while (event := reg.next_event()) is not None:
            self._out.append(registration_notice(event, self.name, self.broker, self.brokers, self.listening))
            self.nat.on_registration(event, reg, self.broker, now)
            if isinstance(event, PublicEndpointChanged):
                for paths in self.peers.values():
                    paths.endpoint_moved(now)
        self._flush_pending(now)
        for rid, (attempt, purpose) in list(self._attempts.items()):
            for message in attempt.frames_to_send():
                self._send_broker(message)
            while (cevent := attempt.next_event()) is not None:
                del self._attempts[rid]
                peer = attempt.request.peer_to
                if isinstance(cevent, ConnectAnswered):
                    self._start_punch(cevent.punch, purpose, now)
                elif isinstance(cevent, ConnectFailed):
                    self._note(
                        NoticeKind.INTRODUCTION_FAILED,
                        Level.WARNING,
                        "broker could not introduce us",
                        peer=peer,
                        broker=str(self.broker),
                        reason=cevent.message,
                    )
                    self._fail_purpose(peer, purpose, cevent.code, cevent.message, now)
        for session in list(self.sessions.by_id.values()):
            for message, addr, source in session.punch.frames_to_send():
                self._out.append(SendFrame(session.socket_of(source), addr, frames.encode(message)))
            while (pevent := session.punch.next_event()) is not None:
                self._on_punch_event(session, pevent, now)
        for peer, paths in self.peers.items():
            while paths.wants:
                self._ask(peer, "", paths.wants.popleft(), now)
            if paths.check_endpoint:
                paths.check_endpoint = False
                self._check_endpoint(now)

    def _check_endpoint(self, now: float) -> None:
        """Ask the broker where it sees us (a tunnel went quiet), at most this often."""
        last = self._endpoint_checked
        if self.registered and (last is None or now - last >= self.settings.endpoint_check_interval):
            self._endpoint_checked = now
            self.registration.check_endpoint(now)
            for message in self.registration.frames_to_send():
                self._send_broker(message)

    def _send_broker(self, message: Message) -> None:
        self._out.append(SendFrame(MAIN_SOCKET, self.broker, frames.encode(self._stamp(message))))

    def _stamp(self, message: Message) -> Message:
        """Frames to the broker carry its latest cookie; a register also carries our key,
        the token and a signature over all of it."""
        cookie = self.registration.cookie
        if isinstance(message, Register):
            message = replace(
                message, public_key=self.identity.public_key, cookie=cookie, token=self.token or None
            )
            return replace(message, signature=self.identity.sign_register(message))
        if isinstance(message, Keepalive | ConnectRequest):
            return replace(message, cookie=cookie)
        return message

    def _note(self, kind: NoticeKind, level: Level, text: str, **fields: object) -> None:
        self._out.append(Notice(kind, level, text, fields))
