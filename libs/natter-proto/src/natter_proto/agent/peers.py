"""The peers an agent has paths to: one ``PeerPaths`` each, which peer every tunnel
belongs to, the handshakes under way and the sockets tunnels use."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

from .actions import Action
from .kinds import Path, PathKind, Role
from .paths import PeerPaths
from .pathstate import Health, Tunnel
from .settings import AgentSettings


class Peers:
    def __init__(self, settings: AgentSettings, outbox: deque[Action]) -> None:
        self.settings = settings
        self._out = outbox
        self.by_name: dict[str, PeerPaths] = {}
        self._peer_of: dict[int, str] = {}  # tunnel -> peer
        self._handshakes: dict[int, float] = {}  # tunnel -> deadline
        self._ids = itertools.count(1)

    def __iter__(self) -> Iterator[PeerPaths]:
        return iter(list(self.by_name.values()))

    def get(self, peer: str) -> PeerPaths:
        paths = self.by_name.get(peer)
        if paths is None:
            paths = self.by_name[peer] = PeerPaths(peer, self.settings, self._out, lambda: next(self._ids))
        return paths

    def of(self, tunnel: int) -> PeerPaths | None:
        """The peer a live tunnel belongs to."""
        peer = self._peer_of.get(tunnel)
        return self.by_name.get(peer) if peer is not None else None

    def tunnels(self) -> list[int]:
        return list(self._peer_of)

    def add(self, peer: str, role: Role, path: Path, kind: PathKind, probes: int, now: float) -> Tunnel:
        tunnel = self.get(peer).add(role, path, kind, now, probes)
        self._peer_of[tunnel.id] = peer
        self._handshakes[tunnel.id] = now + self.settings.handshake_timeout
        return tunnel

    def handshake_done(self, tunnel: int) -> None:
        self._handshakes.pop(tunnel, None)

    def remove(self, tunnel: int) -> tuple[PeerPaths, Tunnel | None, bool] | None:
        """Forget a closed tunnel: its peer, the tunnel, and whether it was handshaking."""
        peer = self._peer_of.pop(tunnel, None)
        if peer is None:
            return None
        paths = self.by_name[peer]
        return paths, paths.tunnels.get(tunnel), self._handshakes.pop(tunnel, None) is not None

    def handshakes_overdue(self, now: float) -> list[int]:
        return [tunnel for tunnel, deadline in self._handshakes.items() if now >= deadline]

    def sockets_in_use(self) -> set[int]:
        return {
            t.route.socket
            for paths in self.by_name.values()
            for t in paths.tunnels.values()
            if t.health is not Health.CLOSED
        }

    def timers(self) -> list[float | None]:
        return [paths.get_timer() for paths in self.by_name.values()] + list(self._handshakes.values())
