"""The broker's UDP socket, read in batches: asyncio's datagram transport reads one
datagram per event-loop turn, which caps a broker at a few thousand frames per second and
leaves nothing to batch for Redis."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

BATCH = 256
BUFFER_SIZE = 4 << 20


class BrokerSocket:
    def __init__(self, on_datagram: Callable[[bytes, str, int], None]) -> None:
        self._on_datagram = on_datagram
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.send_errors = 0

    def bind(self, host: str, port: int) -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_SIZE)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        host, port = sock.getsockname()[:2]
        return host, port

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(data, addr)
        except OSError:
            self.send_errors += 1  # full buffer or unreachable: the agent retries

    def _readable(self) -> None:
        sock = self._sock
        for _ in range(BATCH):
            if sock is None:
                return
            try:
                data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # ICMP errors surface here on Linux
            self._on_datagram(data, addr[0], addr[1])

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    @property
    def is_open(self) -> bool:
        return self._sock is not None
