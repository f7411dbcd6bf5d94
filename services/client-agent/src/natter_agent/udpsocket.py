"""A UDP socket read in batches, for the UDP forwards' ends.

asyncio's datagram transport reads one datagram per event-loop turn; at tens of
thousands of datagrams a second the loop's own overhead is most of the cost, and the
tunnel flushes once per turn, so datagrams read together leave in fewer packets' worth
of work. Sending never blocks: a datagram the kernel cannot take now is dropped (False).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("natter.udp")

BATCH = 64  # datagrams read per readiness event, at most (other work gets its turn)
RECEIVE_BUFFER = 4 << 20  # bursts wait in the kernel while Python catches up
MAX_DATAGRAM = 65535

Address = tuple[Any, ...]
Receiver = Callable[[bytes, Address], None]


class BatchedUdpSocket:
    def __init__(self, sock: socket.socket, on_datagram: Receiver) -> None:
        self.sock = sock
        self._on_datagram = on_datagram
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self._loop.add_reader(sock.fileno(), self._readable)
        self.closed = False

    @classmethod
    def bound(cls, host: str, port: int, on_datagram: Receiver) -> BatchedUdpSocket:
        """Listening on ``host:port`` (raises OSError if it cannot)."""
        return cls(_opened(host, port, socket.socket.bind), on_datagram)

    @classmethod
    def connected(cls, address: str, port: int, on_datagram: Receiver) -> BatchedUdpSocket:
        """Towards one target: the kernel drops datagrams from anyone else."""
        return cls(_opened(address, port, socket.socket.connect), on_datagram)

    @property
    def address(self) -> Address:
        return tuple(self.sock.getsockname())

    def _readable(self) -> None:
        for _ in range(BATCH):
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier send (port unreachable)
                log.debug("udp socket error", error=exc.strerror or str(exc))
                return
            self._on_datagram(data, addr)
            if self.closed:
                return

    def send(self, data: bytes, addr: Address | None = None) -> bool:
        """Send now, or drop (False) if the kernel has no room or the socket is closed."""
        if self.closed:
            return False
        try:
            if addr is None:
                self.sock.send(data)
            else:
                self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.debug("udp send failed", error=exc.strerror or str(exc))
            return False
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


def _opened(host: str, port: int, attach: Callable[[socket.socket, tuple[str, int]], None]) -> socket.socket:
    """A UDP socket of the address's family, bound or connected to it (closed if that fails)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        attach(sock, (host, port))
    except OSError:
        sock.close()
        raise
    return sock
