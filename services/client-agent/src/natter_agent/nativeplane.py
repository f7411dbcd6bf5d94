"""The agent's side of the native engine: read its events on the event loop and hand each
to whoever decides about it (the agent for datagrams and paths, a link for its tunnel,
the forward or listener waiting on a connection).

The engine wakes the loop with a byte on ``wake_fd``; events are taken in batches, so a
busy data plane costs Python one wake-up per batch, never a call per packet.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from natter_proto.agent.kinds import Path, direct_path
from natter_proto.endpoints import Endpoint, from_socket

log = structlog.get_logger("natter.native")

BATCH = 256
MAX_TOKENS = 4096  # the engine bounds its own table alike


class Tunnel(Protocol):
    def authenticated(self, key: bytes | None) -> None: ...
    def pong(self, uid: int) -> None: ...
    def tunnel_datagram(self, data: bytes) -> None: ...
    def peer_accepted(self) -> None: ...
    def engine_closed(self, reason: str) -> None: ...


class NativePlane:
    def __init__(
        self,
        engine: Any,
        *,
        on_datagram: Callable[[bytes, Endpoint], None],
        on_send: Callable[[int, list[bytes]], None],
        on_batch_done: Callable[[], None],
        link_of: Callable[[int], Tunnel | None],
        on_moved: Callable[[int, Path], None],
        on_send_on: Callable[[Path, list[bytes]], None],
    ) -> None:
        self.engine = engine
        self._on_datagram = on_datagram
        self._on_send = on_send
        self._on_batch_done = on_batch_done
        self._link_of = link_of
        self._on_moved = on_moved
        self._on_send_on = on_send_on
        self._tokens: dict[Path, int] = {}  # paths only Python carries, named for the engine
        self._paths: dict[int, Path] = {}
        self.forwards: dict[int, Callable[[int], None]] = {}  # forward id -> on accepted conn
        self.on_incoming: Callable[[int, int, bytes], None] | None = None  # tunnel, conn, header
        self.on_refused: Callable[[int, str], None] | None = None  # tunnel, reason
        self._answers: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
        self._early: dict[int, tuple[Any, ...]] = {}  # answers that came before their waiter
        self._forward_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.engine.wake_fd(), self._wake)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.engine.wake_fd())
        self.engine.shutdown()
        for future in self._answers.values():
            if not future.done():
                future.set_result(("done", 0, 0, 0, "agent shutting down"))

    def new_forward(self, on_accepted: Callable[[int], None]) -> int:
        forward = next(self._forward_ids)
        self.forwards[forward] = on_accepted
        return forward

    def answer(self, conn: int) -> asyncio.Future[tuple[Any, ...]]:
        """The engine's next word about a connection: ("reply", conn, header),
        ("connect_failed", conn, reason) or ("done", conn, sent, received, error)."""
        assert self._loop is not None
        future: asyncio.Future[tuple[Any, ...]] = self._loop.create_future()
        early = self._early.pop(conn, None)
        if early is not None:
            future.set_result(early)
        else:
            self._answers[conn] = future
        return future

    def stranger(self, path: Path, packet: bytes) -> None:
        """A short-header QUIC packet on a path of no tunnel (a relay session the peer moved
        the tunnel onto): the engine finds its connection by ID and says so (moved_via)."""
        token = self._tokens.get(path)
        if token is None:
            if len(self._tokens) >= MAX_TOKENS:
                self._tokens.clear()
                self._paths.clear()
            token = self._tokens[path] = len(self._paths) + 1
            self._paths[token] = path
        self.engine.inject_stranger(token, packet)

    def _wake(self) -> None:
        self.engine.drain_wake()
        while events := self.engine.poll_events(BATCH):
            for event in events:
                try:
                    self._dispatch(event)
                except Exception:  # one bad event must not stop the others (nor the agent)
                    log.exception("native event failed", kind=event[0])
            if len(events) < BATCH:
                break
        self._on_batch_done()

    def _dispatch(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "datagram":
            self._on_datagram(event[1], from_socket(event[2], event[3]))
        elif kind == "send":
            self._on_send(event[1], event[2])
        elif kind in ("reply", "connect_failed", "done"):
            conn = event[1]
            future = self._answers.pop(conn, None)
            if future is not None and not future.done():
                future.set_result(event)
            elif kind != "done":
                self._early[conn] = event
        elif kind == "accepted":
            on_accepted = self.forwards.get(event[1])
            if on_accepted is None:
                self.engine.refuse(event[2])
            else:
                on_accepted(event[2])
        elif kind == "incoming":
            if self.on_incoming is None:
                self.engine.refuse(event[2])
            else:
                self.on_incoming(event[1], event[2], event[3])
        elif kind == "moved":
            self._on_moved(event[1], direct_path(from_socket(event[2], event[3])))
        elif kind == "moved_via":
            if (path := self._paths.get(event[2])) is not None:
                self._on_moved(event[1], path)
        elif kind == "send_via":
            if (path := self._paths.get(event[1])) is not None:
                self._on_send_on(path, event[2])
        elif kind == "refused":
            if self.on_refused is not None:
                self.on_refused(event[1], event[2])
        else:
            link = self._link_of(event[1])
            if link is None:
                return
            if kind == "authenticated":
                link.authenticated(event[2])
            elif kind == "peer_accepted":
                link.peer_accepted()
            elif kind == "pong":
                link.pong(event[2])
            elif kind == "tunnel_datagram":
                link.tunnel_datagram(event[2])
            elif kind == "closed":
                link.engine_closed(event[2])
