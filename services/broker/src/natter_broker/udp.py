"""The broker's UDP socket, read in batches: asyncio's datagram transport reads one
datagram per event-loop turn, which caps a broker at a few thousand frames per second and
leaves nothing to batch for Redis."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable

from natter_proto.endpoints import dual_stack, from_socket, to_socket

BATCH = 256
BUFFER_SIZE = 4 << 20


class BrokerSocket:
    def __init__(self, on_datagram: Callable[[bytes, str, int], None]) -> None:
        self._on_datagram = on_datagram
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.send_errors = 0
        self._v6 = False

    def bind(self, host: str, port: int) -> tuple[str, int]:
        """Bind to host:port; "any" (0.0.0.0) takes both families where IPv6 works."""
        sock = self._bound(host, port)
        self._v6 = sock.family == socket.AF_INET6
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_SIZE)
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        host, port = sock.getsockname()[:2]
        source = from_socket(host, port)
        return source.host, source.port

    @staticmethod
    def _bound(host: str, port: int) -> socket.socket:
        """Bound to host:port; for "any", IPv6 with IPv4 too (v4-mapped) where the host
        has IPv6 (as the agent's socket: natter_proto stays free of sockets)."""
        if dual_stack(host) and socket.has_ipv6:
            try:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            except OSError:
                pass  # no IPv6 here: IPv4 alone
            else:
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    sock.bind(("::", port))
                    return sock
                except OSError as exc:
                    sock.close()
                    if exc.errno == errno.EADDRINUSE:
                        raise
            host = "0.0.0.0"
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return sock

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(data, to_socket(addr, self._v6))
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
            self._on_datagram(data, addr[0], addr[1])  # the handler normalises (endpoint())

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    @property
    def is_open(self) -> bool:
        return self._sock is not None
