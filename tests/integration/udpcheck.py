"""Small UDP and SOCKS tools for the tests, in-process or as a script in a namespace.

python udpcheck.py echo PORT            UDP echo server; prints "ready PORT"
python udpcheck.py ask HOST PORT N SIZE N request/answer rounds from one socket;
                                        prints "<answered> <median ms>"
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import struct
import sys
import time


class UdpEcho(asyncio.DatagramProtocol):
    """Answers every datagram with itself, to its sender; counts what it saw."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0
        self.sources: set[tuple[str, int]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        self.sources.add(addr[:2])
        assert self.transport is not None
        self.transport.sendto(data, addr)


async def udp_echo(host: str = "127.0.0.1", port: int = 0) -> tuple[asyncio.DatagramTransport, UdpEcho]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(UdpEcho, local_addr=(host, port))
    return transport, protocol


def ask(host: str, port: int, payload: bytes, timeout: float = 0.5, tries: int = 20) -> bytes | None:
    """Send until an answer comes (UDP: the first may be lost while the tunnel comes up)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        for _ in range(tries):
            sock.sendto(payload, (host, port))
            try:
                data, _ = sock.recvfrom(65536)
                return data
            except TimeoutError:
                continue
    return None


def rounds(host: str, port: int, count: int, size: int) -> tuple[int, float]:
    """``count`` request/answer rounds; (answered, median round trip in ms)."""
    times: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        for i in range(count):
            payload = struct.pack("!I", i) + b"x" * max(0, size - 4)
            start = time.perf_counter()
            sock.sendto(payload, (host, port))
            try:
                while True:
                    data, _ = sock.recvfrom(65536)
                    if data[:4] == payload[:4]:
                        times.append((time.perf_counter() - start) * 1000)
                        break
            except TimeoutError:
                continue
    return len(times), statistics.median(times) if times else float("nan")


def socks_request(
    proxy: tuple[str, int],
    command: int,
    atyp: int,
    address: bytes,
    port: int,
    auth: tuple[str, str] | None = None,
) -> tuple[int, socket.socket]:
    """A SOCKS5 request by hand: (reply code, the connected socket)."""
    sock = socket.create_connection(proxy, timeout=30)
    if auth is None:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
    else:
        sock.sendall(b"\x05\x01\x02")
        assert sock.recv(2) == b"\x05\x02"
        user, password = (part.encode() for part in auth)
        sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        status = sock.recv(2)
        if status != b"\x01\x00":
            return 0x100 | status[1] if len(status) == 2 else 0x1FF, sock
    sock.sendall(b"\x05" + bytes([command, 0, atyp]) + address + struct.pack("!H", port))
    reply = b""
    while len(reply) < 10:
        chunk = sock.recv(10 - len(reply))
        if not chunk:
            break
        reply += chunk
    return (reply[1] if len(reply) >= 2 else -1), sock


def domain(name: str) -> bytes:
    raw = name.encode()
    return bytes([len(raw)]) + raw


async def _serve_echo(port: int) -> None:
    transport, _ = await udp_echo("0.0.0.0", port)
    print(f"ready {transport.get_extra_info('sockname')[1]}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    if argv[0] == "echo":
        asyncio.run(_serve_echo(int(argv[1])))
    elif argv[0] == "ask":
        answered, median = rounds(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
        print(f"{answered} {median:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
