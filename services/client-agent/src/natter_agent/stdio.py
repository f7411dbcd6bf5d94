"""This process's stdin/stdout as the local end of a tunnel (``:bob:22``, ssh ProxyCommand).

Blocking reads and writes run in threads, so stdin and stdout may be pipes, terminals or
plain files alike; a small queue bounds what is read ahead of the tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading

CHUNK = 64 * 1024


class StdioEnd:
    def __init__(self, in_fd: int = 0, out_fd: int = 1) -> None:
        self._loop = asyncio.get_running_loop()
        self._in_fd = in_fd
        self._out_fd: int | None = out_fd
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=8)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_stdin, name="natter-stdin", daemon=True)
        self._thread.start()

    def _read_stdin(self) -> None:
        while not self._stop.is_set():
            try:
                data = os.read(self._in_fd, CHUNK)
            except OSError:
                data = b""
            future = asyncio.run_coroutine_threadsafe(self._queue.put(data), self._loop)
            try:
                future.result()
            except Exception:
                return  # the loop is gone
            if not data:
                return

    async def read(self, size: int) -> bytes:
        return await self._queue.get()

    async def write(self, data: bytes) -> None:
        fd = self._out_fd
        if fd is None:
            raise ConnectionError("stdout is closed")
        view = memoryview(data)
        while view:
            written = await asyncio.to_thread(os.write, fd, view)
            view = view[written:]

    def write_eof(self) -> None:
        if self._out_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._out_fd)
            self._out_fd = None

    def abort(self) -> None:
        self._stop.set()
        self.write_eof()

    async def close(self) -> None:
        self.abort()
