"""The path lifecycle as data: a tunnel's health, the signals that move it, and the table
of transitions (in the manner of h11's ``_state.py``). ``PeerPaths`` carries the effects out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .kinds import Path, PathKind, Role


class Health(enum.Enum):
    HANDSHAKING = "handshaking"
    HEALTHY = "healthy"
    SUSPECT = "suspect"  # pings unanswered for path_silence: is our endpoint still ours?
    DEAD = "dead"  # unanswered for path_dead: the client punches again
    VERIFYING = "verifying"  # moved onto a re-punched path: a pong must follow
    CLOSED = "closed"


class Signal(enum.Enum):
    READY = "ready"  # handshake done and the peer's key checked
    PONG = "pong"  # a ping was acknowledged
    QUIET = "quiet"  # pings unanswered for path_silence
    SILENT = "silent"  # pings unanswered for path_dead
    PATH_FOUND = "path_found"  # a re-punch found a path
    NO_PATH = "no_path"  # a re-punch found none
    REFUSED = "refused"  # the broker could not introduce us again
    LOST = "lost"  # the peer says it has no tunnel with us
    CLOSED = "closed"


class Purpose(enum.Enum):
    """Why a punch was asked for; its outcome is read in that light, and ends it."""

    NEW = "new"  # no usable tunnel: build one
    REFRESH = "refresh"  # a tunnel's path went silent, or our endpoint moved
    UPGRADE = "upgrade"  # relayed: look for a direct path


# (health, signal) -> (next health, effect). A missing pair changes nothing.
TRANSITIONS: dict[tuple[Health, Signal], tuple[Health, str]] = {
    (Health.HANDSHAKING, Signal.READY): (Health.HEALTHY, "up"),
    (Health.HEALTHY, Signal.QUIET): (Health.SUSPECT, "suspect"),
    (Health.SUSPECT, Signal.PONG): (Health.HEALTHY, ""),
    (Health.SUSPECT, Signal.SILENT): (Health.DEAD, "repair"),
    (Health.DEAD, Signal.PONG): (Health.HEALTHY, "recovered"),
    (Health.DEAD, Signal.PATH_FOUND): (Health.VERIFYING, "move"),
    (Health.DEAD, Signal.NO_PATH): (Health.DEAD, "fall_back"),
    (Health.DEAD, Signal.REFUSED): (Health.CLOSED, "give_up"),
    (Health.VERIFYING, Signal.PONG): (Health.HEALTHY, "refreshed"),
    (Health.VERIFYING, Signal.QUIET): (Health.CLOSED, "replace"),
    (Health.SUSPECT, Signal.LOST): (Health.CLOSED, "lost"),
    (Health.DEAD, Signal.LOST): (Health.CLOSED, "lost"),
    (Health.VERIFYING, Signal.LOST): (Health.CLOSED, "lost"),
    (Health.HEALTHY, Signal.PATH_FOUND): (Health.HEALTHY, "move"),  # our endpoint moved, or an upgrade
    (Health.SUSPECT, Signal.PATH_FOUND): (Health.VERIFYING, "move"),
    (Health.SUSPECT, Signal.NO_PATH): (Health.DEAD, "fall_back"),
    (Health.SUSPECT, Signal.REFUSED): (Health.CLOSED, "give_up"),
}
for _health in Health:
    TRANSITIONS[(_health, Signal.CLOSED)] = (Health.CLOSED, "")


@dataclass
class Tunnel:
    """One QUIC connection to the peer and the path it is on."""

    id: int
    role: Role
    route: Path
    kind: PathKind
    started: float
    probes: int = 0
    health: Health = Health.HANDSHAKING
    route_since: float = 0.0
    routes: set[Path] = field(default_factory=set)  # every path it has used
    ping_uid: int = 0  # the oldest unanswered ping, 0: none
    silent_since: float | None = None  # when that ping left
    next_ping: float = 0.0
    busy: bool = True  # moved bytes lately: pinged often, so a dead path is noticed soon
    found: Path | None = None  # the path a re-punch found, while verifying it
    found_kind: PathKind = PathKind.DIRECT
    repairs: int = 0  # re-punches since it last answered
    retry_at: float | None = None  # dead, no relay: punch again then
    rtt: float = 0.0  # of the last answered ping
    quick_quiet: float | None = None  # idle until a new connection came: quiet from then

    @property
    def usable(self) -> bool:
        """May new connections use it? Not while dead or being replaced."""
        return self.health in (Health.HEALTHY, Health.SUSPECT, Health.VERIFYING)
