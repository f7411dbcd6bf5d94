"""The punch sessions an agent runs, with the extra sockets the birthday method needs.

A session lingers after its punch ends: the peer may still be probing and needs answers,
and a QUIC server accepts the peer's first datagram only from a path the session knows.
Extra sockets are numbered by the agent; a session refers to them by its own source
index (0: the agent's main socket).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from ..endpoints import Endpoint
from ..frames import Punch
from ..punch import PunchSession
from ..relay import session_key
from .kinds import MAIN_SOCKET, NatKind, Path, PathKind, Role, direct_path
from .pathstate import Purpose
from .settings import AgentSettings


@dataclass
class Session:
    punch: PunchSession
    purpose: Purpose
    via: Path  # the relay of the broker that introduced it (and how it is reached; no key)
    linger_until: float
    sockets: list[int] = field(default_factory=list)  # source index k -> sockets[k - 1]
    relay_at: float | None = None  # a new tunnel's handshake starts on the relay then
    tunnel: int | None = None  # the tunnel started on the relay while the punch goes on

    @property
    def role(self) -> Role:
        return Role(self.punch.role)

    def socket_of(self, source: int) -> int:
        return self.sockets[source - 1] if 0 < source <= len(self.sockets) else MAIN_SOCKET

    def source_of(self, socket: int) -> int | None:
        if socket == MAIN_SOCKET:
            return 0
        return self.sockets.index(socket) + 1 if socket in self.sockets else None

    def path(self, addr: Endpoint, source: int) -> Path:
        return direct_path(addr, self.socket_of(source))

    def relay(self) -> Path:
        return replace(self.via, relay_key=session_key(self.punch.session_id))

    def kind(self, addr: Endpoint) -> tuple[PathKind, int]:
        """lan, predicted (birthday method, with its probes) or direct; for status and logs."""
        instruction = self.punch.punch
        if addr in instruction.peer_locals and addr != instruction.peer_public:
            return PathKind.LAN, 0
        if self.punch.predicting:
            return PathKind.PREDICTED, self.punch.probes_sent
        return PathKind.DIRECT, 0


def birthday(me: NatKind, peer: NatKind, settings: AgentSettings) -> tuple[int, int]:
    """(sockets, spray): many sockets on the hard side, many probes on the easy side."""
    if me is NatKind.HARD and peer is NatKind.EASY:
        return settings.hard_nat_sockets, 0
    if me is NatKind.EASY and peer is NatKind.HARD:
        return 1, settings.spray_probes
    return 1, 0


class Sessions:
    """The sessions under way or lingering, by session id, and the sockets they own."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.by_id: dict[str, Session] = {}
        self._socket_ids = itertools.count(MAIN_SOCKET + 1)

    def start(
        self,
        me: str,
        punch: Punch,
        purpose: Purpose,
        nat: NatKind,
        via: Path,
        now: float,
        *,
        no_tunnel: bool = False,
    ) -> Session:
        sources, spray = birthday(nat, NatKind.parse(punch.peer_nat), self.settings)
        s = self.settings
        linger = punch.delay_ms / 1000 + s.punch_timeout + s.handshake_timeout
        session = Session(
            PunchSession(
                me,
                punch,
                now,
                interval=s.punch_interval,
                timeout=s.punch_timeout,
                sources=sources,
                spray=spray,
                no_tunnel=no_tunnel,
            ),
            purpose,
            via,
            now + linger,
            [next(self._socket_ids) for _ in range(sources - 1)],
        )
        self.by_id[punch.session_id] = session
        return session

    def expired(self, now: float) -> list[Session]:
        gone = [s for s in self.by_id.values() if now >= s.linger_until]
        for session in gone:
            del self.by_id[session.punch.session_id]
        return gone

    def for_socket(self, socket: int) -> Session | None:
        for session in self.by_id.values():
            if socket in session.sockets:
                return session
        return None

    def serving(self, addr: Endpoint, socket: int) -> Session | None:
        """A server session whose peer may be at addr on that socket (QUIC may start there)."""
        for session in self.by_id.values():
            source = session.source_of(socket)
            if session.role is Role.SERVER and source is not None and session.punch.knows(addr, source):
                return session
        return None

    def relaying(self, key: bytes) -> Session | None:
        """The server session whose relay key this is, if the broker relays it."""
        for session in self.by_id.values():
            if session.role is Role.SERVER and session.punch.punch.relay and session.relay().relay_key == key:
                return session
        return None

    def next_timer(self) -> float | None:
        times = [t for s in self.by_id.values() if (t := s.punch.get_timer()) is not None]
        times += [s.linger_until for s in self.by_id.values()]
        times += [s.relay_at for s in self.by_id.values() if s.relay_at is not None]
        return min(times, default=None)
