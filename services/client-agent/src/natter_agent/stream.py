"""One QUIC bidirectional stream of a tunnel, with bounded buffering in both directions.

Reads hand over the peer's chunks as they came; writes wait while the tunnel's backlog
for the stream is full; credit goes back to the peer only for bytes the application
consumed (``consumed``), so a slow reader slows the far writer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .link import PeerLink


class StreamClosed(ConnectionError):
    """The stream or the whole tunnel went away."""


class StreamChannel:
    """One QUIC bidirectional stream with bounded buffering in both directions."""

    def __init__(self, link: PeerLink, stream_id: int) -> None:
        self.link = link
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._error: str | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._write_closed = False
        self._writer_waiting = False  # a write() holds bytes until there is room: keep order
        self._deliver: Callable[[bytes], bool] | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    def deliver_directly(self, deliver: Callable[[bytes], bool] | None) -> None:
        """Hand the peer's bytes straight to ``deliver`` as they arrive, when nothing is queued
        before them and it takes them (it returns False when its sink is full): a small
        request then reaches the local socket in the same turn, without waking a reader.
        What it does not take is queued for read() as before."""
        self._deliver = deliver

    def try_write(self, data: bytes) -> bool:
        """Queue data at once if there is room and no write() is waiting before it."""
        if self._error is not None or self._write_closed or self._writer_waiting:
            return False
        if self.link.send_capacity(self.stream_id) <= 0 or not self.link.is_alive:
            return False
        try:
            self.link.send(self.stream_id, data, end_stream=False)
        except StreamClosed:  # the engine failed just now: write() will say so, not a callback
            return False
        self.bytes_out += len(data)
        return True

    # -- reading (peer -> us) ---------------------------------------------------
    async def read(self) -> bytes:
        """Next chunk from the peer; b"" at end of stream. Raises StreamClosed on reset.

        Chunks are not joined here: it made aioquic a third slower, and qh3's engine already
        joins a stream's data per batch (bench/README.md)."""
        while not self._chunks:
            if self._error is not None:
                raise StreamClosed(self._error)
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        return self._chunks.popleft()

    def consumed(self, size: int) -> None:
        """The application handed ``size`` bytes on: grant the peer that much more credit."""
        self.link.consume(self.stream_id, size)

    # -- writing (us -> peer) ----------------------------------------------------
    async def write(self, data: bytes) -> None:
        """Queue data on the stream, waiting while the unacknowledged backlog is full."""
        while True:
            if self._error is not None:
                raise StreamClosed(self._error)
            if self.link.send_capacity(self.stream_id) > 0:
                break
            self._writable.clear()
            self.link.wait_writable(self)
            self._writer_waiting = True
            try:
                await self._writable.wait()
            finally:
                self._writer_waiting = False
        self.link.send(self.stream_id, data, end_stream=False)
        self.bytes_out += len(data)

    def write_eof(self) -> None:
        if not self._write_closed and self._error is None:
            self._write_closed = True
            self.link.send(self.stream_id, b"", end_stream=True)

    def reset(self) -> None:
        """Abort both directions (the local side failed)."""
        if self._error is None:
            self._error = "reset locally"
            self.link.abort_stream(self.stream_id)
        self._wake()

    # -- fed by the link ---------------------------------------------------------
    def _feed(self, data: bytes, end_stream: bool) -> None:
        if data:
            self.bytes_in += len(data)
            deliver = self._deliver
            if deliver is not None and not self._chunks and self._error is None and deliver(data):
                self.link.consume(self.stream_id, len(data))  # handed to the local socket
                data = b""
            else:
                self._chunks.append(data)
        if not data and not end_stream:
            return
        if end_stream:
            self._eof = True
        self._readable.set()

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        self._wake()

    def _wake(self) -> None:
        self._readable.set()
        self._writable.set()
