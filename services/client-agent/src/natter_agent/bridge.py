"""Pipe one local byte stream (TCP connection or stdio) through one QUIC stream.

Both directions run at once and honour half-close: EOF on one side becomes FIN on the
other, and the pipe ends only when both directions have ended. Memory stays bounded:
the QUIC side blocks writers on a full send backlog, and credit goes back to the peer only
after the bytes were written to the local side and drained.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from natter_proto import streamhdr

from .stream import StreamChannel, StreamClosed
from .tcpend import TcpEnd

CHUNK = 256 * 1024


class LocalEnd(Protocol):
    """The local half of a pipe: a TCP connection or this process's stdio."""

    async def read(self, size: int) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def abort(self) -> None: ...
    async def close(self) -> None: ...


async def read_header(channel: StreamChannel) -> tuple[dict[str, object], bytes]:
    """Read the stream header; returns it with any payload bytes that followed it."""
    buffer = b""
    while True:
        chunk = await channel.read()
        if not chunk:
            raise streamhdr.StreamHeaderError("stream ended before its header")
        channel.consumed(len(chunk))
        buffer += chunk
        header, rest = streamhdr.split_header(buffer)
        if header is not None:
            return header, rest
        if len(buffer) > streamhdr.MAX_HEADER + 2:
            raise streamhdr.StreamHeaderError("stream header too long")


async def pump_local_to_stream(local: LocalEnd, channel: StreamChannel) -> None:
    while True:
        data = await local.read(CHUNK)
        if not data:
            channel.write_eof()
            return
        await channel.write(data)


async def pump_stream_to_local(channel: StreamChannel, local: LocalEnd, first: bytes = b"") -> None:
    if first:
        await local.write(first)
    if isinstance(local, TcpEnd):
        channel.deliver_directly(local.try_write)  # from now on; what is queued goes below
    while True:
        data = await channel.read()
        if not data:
            local.write_eof()
            return
        await local.write(data)
        channel.consumed(len(data))


async def splice(local: LocalEnd, channel: StreamChannel, first: bytes = b"") -> tuple[int, int]:
    """Run both directions to completion; on failure of either, abort both.

    Returns (bytes sent to the peer, bytes received from it).
    """
    if isinstance(local, TcpEnd):
        local.deliver_directly(channel.try_write)
    up = asyncio.ensure_future(pump_local_to_stream(local, channel))
    down = asyncio.ensure_future(pump_stream_to_local(channel, local, first))
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in done if t.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
        await asyncio.gather(up, down)
    except (StreamClosed, OSError, ConnectionError):
        channel.reset()
        local.abort()
    except asyncio.CancelledError:
        channel.reset()
        local.abort()
        raise
    finally:
        if isinstance(local, TcpEnd):
            local.deliver_directly(None)
        channel.deliver_directly(None)
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        channel.link.release(channel)
        await local.close()
    return channel.bytes_out, channel.bytes_in
