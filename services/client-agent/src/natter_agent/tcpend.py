"""A local TCP connection as the pipe's local end, as an asyncio protocol.

asyncio's StreamReader copies every byte twice (into its bytearray, then out of it) and
moves the rest of its buffer down on each partial read; with 100 busy connections that was
a tenth of the sending agent's CPU. Here the bytes stay the objects the socket read
produced, kept in a queue whose size pauses the socket above ``READ_LIMIT``; writes follow
the transport's own flow control.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

READ_LIMIT = 256 * 1024  # buffered from the socket before reading pauses


class TcpEnd(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._lost: Exception | None = None
        self._paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed_waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._deliver: Callable[[bytes], bool] | None = None

    def deliver_directly(self, deliver: Callable[[bytes], bool] | None) -> None:
        """Hand bytes read from the socket straight to ``deliver`` when nothing is buffered
        before them and it takes them (the tunnel stream has room): no reader is woken."""
        self._deliver = deliver

    def try_write(self, data: bytes) -> bool:
        """Write at once if the socket is not pushing back; False leaves it to write()."""
        transport = self.transport
        if self._write_paused or transport is None or transport.is_closing() or self._closed_waiter.done():
            return False
        transport.write(data)
        return True

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        deliver = self._deliver
        if deliver is not None and not self._chunks and deliver(data):
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= READ_LIMIT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        _wake(self._read_waiter)

    def eof_received(self) -> bool:
        self._eof = True
        _wake(self._read_waiter)
        return True  # keep our direction open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc
        self._eof = True
        _wake(self._read_waiter)
        _wake(self._drain_waiter)
        if not self._closed_waiter.done():
            self._closed_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        _wake(self._drain_waiter)

    # -- the pipe's local end (natter_agent.bridge.LocalEnd) -------------------------
    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes as they arrived; b"" at end of stream."""
        while not self._chunks:
            if self._lost is not None:
                raise self._lost
            if self._eof:
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        data = self._chunks.popleft()
        if len(data) > size:
            self._chunks.appendleft(data[size:])
            data = data[:size]
        self._buffered -= len(data)
        if self._paused and self._buffered < READ_LIMIT // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        if self._closed_waiter.done() or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection lost")
        self.transport.write(data)
        while self._write_paused and not self._closed_waiter.done():
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._closed_waiter.done():
            raise ConnectionResetError("connection lost")

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and transport.can_write_eof() and not transport.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            with contextlib.suppress(Exception):
                await self._closed_waiter


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


async def open_tcp(host: str, port: int) -> TcpEnd:
    _transport, end = await asyncio.get_running_loop().create_connection(TcpEnd, host, port)
    return end


async def open_first(hosts: list[str], port: int) -> TcpEnd:
    """The first of hosts (one name's addresses, in order) that takes the connection, as
    ssh -L does: "localhost" is ::1 before 127.0.0.1 on most hosts, and many services
    listen on one of them only. Raises the last failure."""
    failure: OSError | None = None
    for host in hosts:
        try:
            return await open_tcp(host, port)
        except OSError as exc:
            failure = exc
    assert failure is not None
    raise failure
