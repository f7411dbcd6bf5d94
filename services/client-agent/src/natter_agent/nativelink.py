"""A tunnel of the native engine, as the agent, the forwards and status see a tunnel.

The connection lives in native code; this object holds what Python decides and shows:
the peer, the path the machine chose (told to the engine's socket), verification and
readiness, and the figures ``natter status`` prints.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from natter_proto.agent.kinds import MAIN_SOCKET, Path, PathKind, Role, path_label

from .engines.base import explain_engine_mismatch

log = structlog.get_logger("natter.link")


class NativeLink:
    def __init__(
        self,
        *,
        tunnel: int,
        engine: Any,
        peer: str,
        route: Path,
        kind: PathKind,
        role: Role,
        on_ready: Callable[[NativeLink], None],
        on_pong: Callable[[NativeLink, int, bool], None],
        on_closed: Callable[[NativeLink], None],
        on_datagram: Callable[[NativeLink, bytes], None],
        verify: Callable[[NativeLink], str | None],
        expected_key: bytes | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.tunnel = tunnel
        self._engine = engine
        self.peer = peer
        self.kind = kind
        self.role = role
        self.ready = False
        self.closed = asyncio.Event()
        self.close_reason = ""
        self._on_ready, self._on_pong, self._on_closed, self._verify = on_ready, on_pong, on_closed, verify
        self._on_datagram = on_datagram
        self.expected_key = expected_key
        self.peer_key: bytes | None = None
        self.vetted = True
        self.started = self.loop.time()
        self.streams_opened = 0
        self._moved_at_ping = 0
        self._route = route
        self.route = route

    # -- the path ------------------------------------------------------------------
    @property
    def route(self) -> Path:
        return self._route

    @route.setter
    def route(self, path: Path) -> None:
        """The machine moved the tunnel: the engine sends there (a path on the main socket
        straight from native code; a relay or another socket through the agent)."""
        old, self._route = self._route, path
        if not path.relayed and path.socket == MAIN_SOCKET:
            self._engine.route(self.tunnel, path.addr.host, path.addr.port)
        else:
            self._engine.route(self.tunnel, None)
        if old is not path and not old.relayed and old.socket == MAIN_SOCKET:
            self._engine.hear_on(self.tunnel, old.addr.host, old.addr.port)  # its stragglers

    # -- what the agent and status read ---------------------------------------------
    @property
    def is_alive(self) -> bool:
        return not self.closed.is_set()

    def _stats(self) -> tuple[float, int, int, int, int, int]:
        found = self._engine.stats(self.tunnel) if self.is_alive else None
        return found if found is not None else (0.0, 0, 0, 0, 0, 0)

    @property
    def rtt(self) -> float:
        return self._stats()[0]

    @property
    def mtu(self) -> int:
        return self._stats()[1]

    @property
    def bytes_sent(self) -> int:
        return self._stats()[2]

    @property
    def bytes_received(self) -> int:
        return self._stats()[3]

    @property
    def open_streams(self) -> int:
        return self._stats()[4]

    def status(self) -> dict[str, object]:
        rtt, mtu, sent, received, open_now, lost = self._stats()
        return {
            "peer": self.peer,
            "path": path_label(self.route, self.kind),
            "endpoint": str(self.route),
            "role": self.role.value,
            "rtt_ms": round(rtt * 1000, 2),
            "mtu": mtu,
            "bytes_sent": sent,
            "bytes_received": received,
            "open_connections": open_now,
            "connections": self.streams_opened,
            "lost_packets": lost,
            "uptime_s": round(self.loop.time() - self.started, 1),
            "engine": "native",
        }

    # -- what the agent does with it -------------------------------------------------
    def start_client(self) -> None:
        try:
            self._engine.connect(self.tunnel)
        except OSError as exc:
            self._terminated(str(exc))

    def datagram_received(self, data: bytes) -> None:
        """A QUIC packet of this tunnel that reached Python (relayed, or on another socket)."""
        self._engine.inject(self.tunnel, data)

    # -- DATAGRAM frames (UDP forwards: through Python on this engine too) -------------
    def datagram_room(self) -> int:
        return int(self._engine.datagram_room(self.tunnel)) if self.ready else 0

    def send_datagram(self, data: bytes) -> bool:
        return self.ready and self.is_alive and bool(self._engine.send_datagram(self.tunnel, data))

    def tunnel_datagram(self, data: bytes) -> None:
        if self.ready:  # nothing from a peer not yet checked
            self._on_datagram(self, data)

    def ping(self, uid: int) -> None:
        if self.is_alive:
            self._engine.ping(self.tunnel, uid)

    def close(self, reason: str = "closed") -> None:
        if self.is_alive:
            self._engine.close_tunnel(self.tunnel, reason)
            self._terminated(reason)

    # -- what the engine tells ---------------------------------------------------------
    def authenticated(self, key: bytes | None) -> None:
        self.peer_key = key
        refusal = self._verify(self)
        self._engine.verdict(self.tunnel, refusal)
        if refusal is not None:
            self._terminated(refusal)
        elif self.role is Role.SERVER:
            self._up()
        # as the client: up when the server accepted us too (peer_accepted)

    def peer_accepted(self) -> None:
        if self.peer_key is not None or self.role is Role.CLIENT:
            self._up()

    def _up(self) -> None:
        if not self.ready and self.is_alive:
            self.ready = True
            self._on_ready(self)

    def pong(self, uid: int) -> None:
        moved = self.bytes_sent + self.bytes_received
        busy, self._moved_at_ping = moved != self._moved_at_ping, moved
        self._on_pong(self, uid, busy)

    def engine_closed(self, reason: str) -> None:
        reason = explain_engine_mismatch(self.peer, reason)
        self._terminated(f"connection closed: {reason}" if not reason.startswith("refused") else reason)

    def _terminated(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        self._on_closed(self)
