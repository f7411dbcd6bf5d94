"""What the agent machine asks its shell to do, and what it reports for logs and status.

Actions are carried out in order; events are only told (logged, counted, shown). Tests
assert on both, never on log text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..endpoints import Endpoint
from .kinds import Path, PathKind, Role

# -- actions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SendFrame:
    """Send these bytes from local socket ``socket`` to ``addr``."""

    socket: int
    addr: Endpoint
    data: bytes


@dataclass(frozen=True)
class OpenSockets:
    """Bind extra UDP sockets with these numbers (the birthday method's)."""

    sockets: tuple[int, ...]


@dataclass(frozen=True)
class CloseSocket:
    socket: int


@dataclass(frozen=True)
class OpenStream:
    """Open the TCP stream (TLS, then WebSocket) to the broker at ``addr`` as socket
    ``socket``; report ``stream_opened`` or ``stream_closed``. Its messages are datagrams."""

    socket: int
    addr: Endpoint


@dataclass(frozen=True)
class StartTunnel:
    """Start a QUIC connection for ``peer`` on ``path``: as its client, or as its server
    from the client's first datagram ``initial``."""

    tunnel: int
    peer: str
    role: Role
    path: Path
    kind: PathKind
    expected_key: bytes | None
    initial: bytes = b""


@dataclass(frozen=True)
class RouteTunnel:
    """From now on the tunnel's datagrams go on ``path`` (datagrams from there are its)."""

    tunnel: int
    path: Path
    kind: PathKind


@dataclass(frozen=True)
class DeliverDatagram:
    """A datagram the router could not place: it belongs to this tunnel."""

    tunnel: int
    data: bytes


@dataclass(frozen=True)
class PingTunnel:
    """Send a QUIC PING; report its acknowledgement with ``tunnel_pong(uid)``."""

    tunnel: int
    uid: int


@dataclass(frozen=True)
class CloseTunnel:
    """Close the tunnel; with ``drain``, once its open connections have ended."""

    tunnel: int
    reason: str
    drain: bool = False


@dataclass(frozen=True)
class PeerReady:
    """New connections to ``peer`` go through this tunnel."""

    peer: str
    tunnel: int


@dataclass(frozen=True)
class PeerUnreachable:
    """No tunnel to ``peer`` now: waiting connections fail with this reason."""

    peer: str
    code: str
    message: str


# -- events (told, not acted on) ----------------------------------------------------------


class Level(enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class NoticeKind(enum.Enum):
    STARTED = "started"
    REGISTERED = "registered"
    ENDPOINT_CHANGED = "endpoint_changed"
    REGISTRATION_LOST = "registration_lost"
    BROKER_CHANGED = "broker_changed"
    REGISTRATION_REFUSED = "registration_refused"
    BROKER_TRANSPORT = "broker_transport"  # UDP got no answer: the stream, and back
    NAT_LEARNED = "nat_learned"
    ASKING_BROKER = "asking_broker"
    INTRODUCTION_FAILED = "introduction_failed"
    OFFER = "offer"
    PUNCHING = "punching"
    BIRTHDAY = "birthday"
    PUNCH_ANSWERED = "punch_answered"
    PUNCH_FAILED = "punch_failed"
    RELAY_FALLBACK = "relay_fallback"
    SILENT = "silent"
    REPUNCH = "repunch"
    REFRESHED = "refreshed"
    STILL_RELAYED = "still_relayed"
    TUNNEL_FAILED = "tunnel_failed"
    TUNNEL_CLOSED = "tunnel_closed"
    TUNNEL_DEAD = "tunnel_dead"
    IGNORED = "ignored"


@dataclass(frozen=True)
class Notice:
    """Something worth a log line: its kind for tests, its text and fields for people."""

    kind: NoticeKind
    level: Level
    text: str
    fields: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class TunnelUp:
    peer: str
    tunnel: int
    role: Role
    path: Path
    kind: PathKind
    probes: int = 0


@dataclass(frozen=True)
class PathChanged:
    """One tunnel moved from one path to another (the same QUIC connection), or a new
    tunnel took over from an old one (``replaced``)."""

    peer: str
    tunnel: int
    old: Path
    new: Path
    old_kind: PathKind
    new_kind: PathKind
    reason: str
    replaced: bool = False


Action = (
    SendFrame
    | OpenSockets
    | CloseSocket
    | OpenStream
    | StartTunnel
    | RouteTunnel
    | DeliverDatagram
    | PingTunnel
    | CloseTunnel
    | PeerReady
    | PeerUnreachable
    | Notice
    | TunnelUp
    | PathChanged
)
