"""The agent's one UDP socket: broker frames, punch probes and QUIC share it.

Demultiplexing is by the first byte (RFC 9443): natter frames start below 0x40, QUIC
packets always have bit 0x40 set. Datagrams are read in batches per readiness wake-up,
which matters for QUIC throughput in Python, and with Linux's UDP segmentation offload
both ways: runs of equal-size datagrams leave in one system call (GSO) and arrive in one
(GRO: the kernel hands a run from one sender over whole, with its segment size).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from natter_proto.endpoints import Endpoint, dual_stack, from_socket, to_socket

Handler = Callable[[bytes, Endpoint], None]

BUFFER_SIZE = 4 << 20
BATCH = 128
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # Linux GSO (4.18+)
UDP_GRO = getattr(socket, "UDP_GRO", 104)  # Linux GRO for UDP sockets (5.0+)
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)  # the segment size, a C int
GSO_MAX_SEGMENTS = 32  # 32 x 1350 bytes stays below the 64 KiB of one UDP send


class AgentSocket:
    def __init__(self, on_control: Handler, on_quic: Handler, on_batch_done: Callable[[], None]):
        self._on_control = on_control
        self._on_quic = on_quic
        self._on_batch_done = on_batch_done
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.send_errors = 0
        offload = not os.environ.get("NATTER_NO_GSO")  # NATTER_NO_GSO=1: both ways off
        self.gso = offload and hasattr(socket.socket, "sendmsg")  # off for good after a refusal
        self.gro = offload
        self._reading = False
        self.v6 = False  # a dual-stack (or IPv6) socket: IPv4 peers are v4-mapped

    def bind(self, host: str, port: int) -> Endpoint:
        """Bind to host:port; "any" (0.0.0.0) takes both families where IPv6 works."""
        sock = bound_udp(host, port)
        self.v6 = sock.family == socket.AF_INET6
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):  # capped by net.core.*mem_max: fine
                sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_SIZE)
        if self.gro:
            try:
                sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
            except OSError:
                self.gro = False  # an older kernel: one datagram per read
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self._reading = True
        return self.local_endpoint

    def hand_over(self) -> int:
        """Stop reading here and return a duplicate of the socket for the native engine,
        which reads from now on (this object still sends the agent's own frames)."""
        assert self._sock is not None and self._loop is not None
        self._loop.remove_reader(self._sock.fileno())
        self._reading = False
        return os.dup(self._sock.fileno())

    @property
    def local_endpoint(self) -> Endpoint:
        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        return from_socket(host, port)

    def sendto(self, data: bytes, addr: Endpoint | tuple[str, int]) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(data, to_socket(addr, self.v6))
        except (BlockingIOError, InterruptedError):
            self.send_errors += 1  # a full buffer is loss; QUIC and the probes resend
        except OSError:
            self.send_errors += 1  # unreachable network etc.; same treatment

    def send_batch(self, datagrams: list[tuple[bytes, Any]]) -> None:
        """Send one flush's datagrams; runs of equal size to one address go out in one
        system call with UDP GSO (the kernel cuts them apart), the rest one by one."""
        if not self.gso or len(datagrams) < 2:
            for data, addr in datagrams:
                self.sendto(data, addr)
            return
        start = 0
        while start < len(datagrams):
            size, addr = len(datagrams[start][0]), datagrams[start][1]
            end = start + 1
            while (
                end < len(datagrams)
                and end - start < GSO_MAX_SEGMENTS
                and datagrams[end][1] == addr
                and len(datagrams[end][0]) <= size
            ):
                end += 1
                if len(datagrams[end - 1][0]) < size:
                    break  # a shorter datagram may only end a run
            if end - start == 1:
                self.sendto(datagrams[start][0], addr)
            else:
                self._send_segments([data for data, _ in datagrams[start:end]], size, addr)
            start = end

    def _send_segments(self, segments: list[bytes], size: int, addr: Any) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendmsg(
                [b"".join(segments)],
                [(socket.SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))],
                0,
                to_socket(addr, self.v6),
            )
        except (BlockingIOError, InterruptedError):
            self.send_errors += 1  # as in sendto: loss that QUIC recovers
        except OSError:
            self.gso = False  # the kernel or the device refused GSO: send one by one from now on
            for data in segments:
                self.sendto(data, addr)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        received = 0
        while received < BATCH:
            try:
                if self.gro:
                    data, ancillary, _flags, addr = sock.recvmsg(65536, GRO_CMSG_SPACE)
                else:
                    data, addr = sock.recvfrom(65536)
                    ancillary = []
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                received += 1
                continue  # ICMP errors surface here on Linux; nothing to do
            received += 1
            if not data:
                continue
            source = from_socket(addr[0], addr[1])
            if ancillary and ancillary[0][1] == UDP_GRO:
                step = int.from_bytes(ancillary[0][2][:4], sys.byteorder)
                if 0 < step < len(data):
                    for start in range(0, len(data), step):
                        self._dispatch(data[start : start + step], source)
                    received += len(data) // step
                    continue
            self._dispatch(data, source)
        self._on_batch_done()

    def _dispatch(self, data: bytes, source: Endpoint) -> None:
        if data[0] < 0x40:
            self._on_control(data, source)
        else:
            self._on_quic(data, source)

    def close(self) -> None:
        if self._sock is not None:
            if self._reading and self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


def bound_udp(host: str, port: int) -> socket.socket:
    """A UDP socket bound to host:port; for "any", IPv6 with IPv4 too (v4-mapped) where the
    host has IPv6, else IPv4 alone. (The broker's socket opens the same way: its own
    package, natter_proto being free of sockets.)"""
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
