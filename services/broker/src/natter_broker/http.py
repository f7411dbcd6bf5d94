"""The broker's side port: /healthz, /readyz and /metrics over plain HTTP/1.1.

A tiny asyncio server is enough for probes and scrapes, and keeps it on the broker's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST

MAX_REQUEST = 8192


class HealthServer:
    def __init__(self, is_ready: Callable[[], bool], render_metrics: Callable[[], bytes]) -> None:
        self._is_ready = is_ready
        self._render = render_metrics
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            writer.close()
            return
        parts = head.split(b"\r\n", 1)[0].split()
        method = parts[0] if parts else b""
        path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        status, body, ctype = self._route(method, path)
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + (body if method != b"HEAD" else b"")
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def _route(self, method: bytes, path: bytes) -> tuple[str, bytes, str]:
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"method not allowed\n", "text/plain"
        if path == b"/healthz":
            return "200 OK", b"ok\n", "text/plain"
        if path == b"/readyz":
            if self._is_ready():
                return "200 OK", b"ready\n", "text/plain"
            return "503 Service Unavailable", b"not ready\n", "text/plain"
        if path == b"/metrics":
            return "200 OK", self._render(), CONTENT_TYPE_LATEST
        return "404 Not Found", b"not found\n", "text/plain"
