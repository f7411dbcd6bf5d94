"""Punches and what their outcomes mean: a new tunnel, a moved one, or the relay.

A punch's outcome is read in the light of its purpose (``Purpose``): a new tunnel on the
path found, or the relay; for a re-punch, the tunnel's ``PeerPaths`` decides.
"""

from __future__ import annotations

from collections import deque

from ..frames import Punch, encode
from ..punch import PathFound, PeerLostTunnel, PunchEvent, PunchState
from .actions import (
    Action,
    CloseSocket,
    Level,
    Notice,
    NoticeKind,
    OpenSockets,
    PeerUnreachable,
    SendFrame,
    StartTunnel,
)
from .kinds import MAIN_SOCKET, NatKind, Path, PathKind, Role, Transport
from .pathstate import Health, Purpose, Tunnel
from .peers import Peers
from .punching import Session, Sessions
from .settings import AgentSettings


class Puncher:
    def __init__(self, name: str, settings: AgentSettings, peers: Peers, outbox: deque[Action]) -> None:
        self.name = name
        self.settings = settings
        self.peers = peers
        self.sessions = Sessions(settings)
        self._out = outbox

    def building(self, peer: str) -> bool:
        """A punch for a new tunnel to peer is under way."""
        return any(
            s.purpose is Purpose.NEW
            and s.role is Role.CLIENT
            and s.punch.peer == peer
            and s.punch.state is PunchState.PROBING
            for s in self.sessions.by_id.values()
        )

    def service(self, now: float) -> None:
        """Send the probes the sessions want sent; act on their outcomes."""
        for session in list(self.sessions.by_id.values()):
            for message, addr, source in session.punch.frames_to_send():
                self._out.append(SendFrame(session.socket_of(source), addr, encode(message)))
            while (event := session.punch.next_event()) is not None:
                self._outcome(session, event, now)

    def handle_timer(self, now: float) -> None:
        for session in list(self.sessions.by_id.values()):
            session.punch.handle_timer(now)
            if session.relay_at is not None and now >= session.relay_at:
                session.relay_at = None
                if session.punch.state is PunchState.PROBING and session.tunnel is None:
                    if session.via.transport is Transport.TCP_RELAY:
                        why = "our UDP gets no answer from the broker"
                    else:
                        why = f"no probe answered within {self.settings.relay_head_start:g} s"
                    self._relay_tunnel(session, why, now)
        for session in self.sessions.expired(now):
            self._end(session)

    def _note(self, kind: NoticeKind, level: Level, text: str, **fields: object) -> None:
        self._out.append(Notice(kind, level, text, fields))

    def start(
        self, punch: Punch, purpose: Purpose, nat: NatKind, via: Path, listening: bool, now: float
    ) -> None:
        """Begin the punch an instruction from the broker asks for (once per session)."""
        if punch.role == Role.SERVER.value and not listening:
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
        paths = self.peers.by_name.get(punch.peer)
        alive = paths is not None and any(t.health is not Health.CLOSED for t in paths.tunnels.values())
        no_tunnel = punch.role == Role.SERVER.value and not alive
        session = self.sessions.start(self.name, punch, purpose, nat, via, now, no_tunnel=no_tunnel)
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
        if session.role is not Role.CLIENT or not punch.relay or purpose is not Purpose.NEW:
            return
        if nat is NatKind.HARD and NatKind.parse(punch.peer_nat) is NatKind.HARD:
            # two symmetric NATs: no probe can meet a mapping, so do not wait for the punch
            session.punch.succeed(via.addr)
            self._relay_tunnel(session, "both NATs are symmetric", now)
        else:
            # relay first: the handshake starts there unless a probe answers by then, and the
            # punch goes on (a direct path it finds takes the tunnel over: direct_found)
            # (with no UDP to the broker a punch is unlikely to work: the relay at once)
            head_start = 0.0 if via.transport is Transport.TCP_RELAY else self.settings.relay_head_start
            session.relay_at = now + punch.delay_ms / 1000 + head_start

    def _outcome(self, session: Session, event: PunchEvent, now: float) -> None:
        peer = session.punch.peer
        if isinstance(event, PeerLostTunnel):
            if session.role is not Role.CLIENT or session.purpose is Purpose.NEW:
                return
            paths = self.peers.get(peer)
            found = session.punch.path
            if paths.peer_lost_tunnel(now):
                if found is not None:  # the punch found the peer there: the new tunnel starts at once
                    kind, probes = session.kind(found)
                    self.start_tunnel(
                        session,
                        Role.CLIENT,
                        session.path(found, session.punch.path_source),
                        kind,
                        probes,
                        now,
                    )
                else:
                    paths.wants.append(Purpose.NEW)
            return
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
            paths = self.peers.get(peer)
            session.relay_at = None
            if session.purpose is not Purpose.NEW and paths.client_tunnel() is not None:
                paths.punch_found(session.purpose, path, kind, probes, now)
            elif session.tunnel is not None and self._relayed_first(session):
                paths.direct_found(session.tunnel, path, kind, probes, now)
            else:
                self.start_tunnel(session, Role.CLIENT, path, kind, probes, now)
            return
        tried = ", ".join(str(c) for c in event.tried)
        if self._relayed_first(session):  # its tunnel carries on on the relay (and tries to upgrade)
            self._note(
                NoticeKind.PUNCH_FAILED,
                Level.INFO,
                f"no direct path to {peer} answers: staying on the relay",
                peer=peer,
                tried=tried,
            )
            return
        self._note(NoticeKind.PUNCH_FAILED, Level.WARNING, "punch failed: no answer", peer=peer, tried=tried)
        if session.role is not Role.CLIENT:
            return
        relay = session.relay() if session.punch.punch.relay else None
        if session.purpose is not Purpose.NEW and self.peers.get(peer).client_tunnel() is not None:
            self.peers.get(peer).punch_failed(session.purpose, relay, now)
        elif relay is not None:
            self._relay_tunnel(session, "no probe was answered", now)
        else:
            self._out.append(
                PeerUnreachable(peer, "punch_failed", f"no direct path to {peer} (tried {tried})")
            )

    def _relayed_first(self, session: Session) -> bool:
        """Is the tunnel this session started on the relay (relay first) still there?"""
        paths = self.peers.by_name.get(session.punch.peer)
        return session.tunnel is not None and paths is not None and session.tunnel in paths.tunnels

    def _relay_tunnel(self, session: Session, why: str, now: float) -> None:
        peer = session.punch.peer
        probing = session.punch.state is PunchState.PROBING
        self._note(
            NoticeKind.RELAY_FALLBACK,
            Level.INFO,
            f"no direct path to {peer} yet ({why}): starting on the broker's relay, still punching"
            if probing
            else f"no direct path to {peer} ({why}): tunnelling through the broker's relay",
            peer=peer,
            relay=str(session.via),
        )
        tunnel = self.start_tunnel(session, Role.CLIENT, session.relay(), PathKind.RELAYED, 0, now)
        session.tunnel = tunnel.id

    def start_tunnel(
        self,
        session: Session,
        role: Role,
        path: Path,
        kind: PathKind,
        probes: int,
        now: float,
        *,
        initial: bytes = b"",
    ) -> Tunnel:
        punch = session.punch.punch
        tunnel = self.peers.add(punch.peer, role, path, kind, probes, now)
        self._out.append(StartTunnel(tunnel.id, punch.peer, role, path, kind, punch.peer_key, initial))
        return tunnel

    def _end(self, session: Session) -> None:
        """Its linger is over: close its extra sockets but those a tunnel uses."""
        in_use = self.peers.sockets_in_use()
        for socket in session.sockets:
            if socket not in in_use:
                self._out.append(CloseSocket(socket))

    def release_socket(self, route: Path | None) -> None:
        """A tunnel closed: the birthday socket it used goes, unless a session or tunnel still needs it."""
        if route is None or route.socket == MAIN_SOCKET:
            return
        if self.sessions.for_socket(route.socket) is None and route.socket not in self.peers.sockets_in_use():
            self._out.append(CloseSocket(route.socket))
