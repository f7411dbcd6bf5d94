"""Small TCP tools for the tests, usable in-process or as a script inside a namespace.

    python netcheck.py echo PORT                 echo server
    python netcheck.py sink PORT [RATE]          read all (at RATE bytes/s for SLOW s, if given),
                                                 then answer the sha256 hex of what arrived
    python netcheck.py source PORT SIZE [RATE]   send SIZE seeded bytes (the reader may be slow)
    python netcheck.py send HOST PORT SIZE       send SIZE seeded bytes, half-close, print reply
    python netcheck.py fetch HOST PORT [RATE]    read until EOF (slowly first, if RATE given),
                                                 print "<size> <sha256>"
    python netcheck.py count PORT                count what arrives (no hashing: for throughput)
    python netcheck.py blast HOST PORT SIZE      send SIZE zero bytes, half-close, print the reply
    python netcheck.py echo-check HOST PORT SIZE send SIZE bytes to an echo server; print "ok"
                                                 if every byte came back
    python netcheck.py parallel HOST PORT N SIZE N blasts at once; print "<total MB/s> <fastest>
                                                 <slowest>" (each connection's MB/s)
    python netcheck.py rtt HOST PORT [ROUNDS]    64-byte round trips through an echo server;
                                                 print the median in ms
    python netcheck.py first-byte HOST PORT SECS connect (retrying) and send one byte to an
                                                 echo server; print the time its echo came

Servers print "ready PORT" on stdout when they listen, on NETCHECK_HOST (127.0.0.1 unless
set: the benchmarks' port forwards need 0.0.0.0 inside a namespace).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time

CHUNK = 64 * 1024
SLOW_SECONDS = 8.0


def pattern(size: int, seed: int = 1) -> bytes:
    """Deterministic pseudo-random bytes (cheap to make, hard to confuse)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (CHUNK // 32)
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(block[:64] + counter.to_bytes(8, "big")).digest() + block[: CHUNK - 32]
        counter += 1
    return bytes(out[:size])


def digest_of_pattern(size: int, seed: int = 1) -> str:
    return hashlib.sha256(pattern(size, seed)).hexdigest()


async def _paced_read(reader: asyncio.StreamReader, rate: float | None, hasher: hashlib._Hash) -> int:
    total = 0
    start = time.monotonic()
    while True:
        slow = rate is not None and time.monotonic() - start < SLOW_SECONDS
        data = await reader.read(16 * 1024 if slow else CHUNK)
        if not data:
            return total
        hasher.update(data)
        total += len(data)
        if slow and rate:
            await asyncio.sleep(len(data) / rate)


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def sink_handler(rate: float | None = None):  # type: ignore[no-untyped-def]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hasher = hashlib.sha256()
        total = await _paced_read(reader, rate, hasher)
        writer.write(f"{total} {hasher.hexdigest()}\n".encode())
        await writer.drain()
        writer.close()

    return handle


async def count_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    while data := await reader.read(1 << 18):
        total += len(data)
    writer.write(f"{total}\n".encode())
    await writer.drain()
    writer.close()


async def blast(host: str, port: int, size: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    block = bytes(1 << 18)
    sent = 0
    while sent < size:
        piece = block[: min(len(block), size - sent)]
        writer.write(piece)
        await writer.drain()
        sent += len(piece)
    writer.write_eof()
    reply = await reader.read()
    writer.close()
    return reply


def source_handler(size: int, seed: int = 7):  # type: ignore[no-untyped-def]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = pattern(size, seed)
        view = memoryview(data)
        for offset in range(0, size, CHUNK):
            writer.write(view[offset : offset + CHUNK])
            await writer.drain()
        writer.close()

    return handle


async def send_and_get_reply(host: str, port: int, data: bytes) -> bytes:
    """Send data, half-close, return everything the server answered."""
    reader, writer = await asyncio.open_connection(host, port)
    view = memoryview(data)
    for offset in range(0, len(data), CHUNK):
        writer.write(view[offset : offset + CHUNK])
        await writer.drain()
    writer.write_eof()
    reply = await reader.read()
    writer.close()
    return reply


async def fetch(host: str, port: int, rate: float | None = None) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection(host, port)
    hasher = hashlib.sha256()
    total = await _paced_read(reader, rate, hasher)
    writer.close()
    return total, hasher.hexdigest()


async def echo_check(host: str, port: int, data: bytes) -> bool:
    reader, writer = await asyncio.open_connection(host, port)

    async def push() -> None:
        view = memoryview(data)
        for offset in range(0, len(data), CHUNK):
            writer.write(view[offset : offset + CHUNK])
            await writer.drain()
        writer.write_eof()

    pusher = asyncio.create_task(push())
    received = hashlib.sha256()
    total = 0
    while chunk := await reader.read(CHUNK):
        received.update(chunk)
        total += len(chunk)
    await pusher
    writer.close()
    return total == len(data) and received.hexdigest() == hashlib.sha256(data).hexdigest()


async def first_byte(host: str, port: int, within: float) -> float:
    """Connect (again, until the port takes it) and send one byte to an echo service:
    the wall-clock time its echo came back (comparable with a log line's timestamp)."""
    deadline = time.monotonic() + within
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)
    writer.write(b"x")
    await writer.drain()
    echoed = await asyncio.wait_for(reader.readexactly(1), timeout=max(0.1, deadline - time.monotonic()))
    arrived = time.time()
    assert echoed == b"x"
    writer.close()
    return arrived


async def _serve(handler, port: int) -> None:  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(handler, os.environ.get("NETCHECK_HOST", "127.0.0.1"), port)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


async def parallel_blasts(host: str, port: int, count: int, size: int) -> tuple[float, list[float]]:
    """count blasts at once into a counting sink; (total MB/s, each connection's MB/s)."""

    async def one() -> float:
        start = time.perf_counter()
        reply = await blast(host, port, size)
        assert reply.split()[0] == str(size).encode(), reply
        return size / (time.perf_counter() - start) / 1e6

    start = time.perf_counter()
    rates = await asyncio.gather(*(one() for _ in range(count)))
    return count * size / (time.perf_counter() - start) / 1e6, list(rates)


async def request_rtt(host: str, port: int, rounds: int = 200) -> float:
    """Median seconds for a 64-byte request to come back from an echo server."""
    reader, writer = await asyncio.open_connection(host, port)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        writer.write(b"x" * 64)
        await writer.drain()
        got = 0
        while got < 64:
            got += len(await reader.read(64 - got))
        samples.append(time.perf_counter() - start)
    writer.close()
    samples.sort()
    return samples[len(samples) // 2]


def main(argv: list[str]) -> int:
    cmd, *rest = argv
    if cmd == "echo":
        asyncio.run(_serve(echo_handler, int(rest[0])))
    elif cmd == "sink":
        rate = float(rest[1]) if len(rest) > 1 else None
        asyncio.run(_serve(sink_handler(rate), int(rest[0])))
    elif cmd == "count":
        asyncio.run(_serve(count_handler, int(rest[0])))
    elif cmd == "blast":
        print(asyncio.run(blast(rest[0], int(rest[1]), int(rest[2]))).decode().strip())
    elif cmd == "source":
        asyncio.run(_serve(source_handler(int(rest[1])), int(rest[0])))
    elif cmd == "send":
        size = int(rest[2])
        reply = asyncio.run(send_and_get_reply(rest[0], int(rest[1]), pattern(size)))
        print(reply.decode().strip())
    elif cmd == "fetch":
        rate = float(rest[2]) if len(rest) > 2 else None
        total, digest = asyncio.run(fetch(rest[0], int(rest[1]), rate))
        print(total, digest)
    elif cmd == "echo-check":
        ok = asyncio.run(echo_check(rest[0], int(rest[1]), pattern(int(rest[2]), seed=3)))
        print("ok" if ok else "MISMATCH")
        return 0 if ok else 1
    elif cmd == "parallel":
        total, rates = asyncio.run(parallel_blasts(rest[0], int(rest[1]), int(rest[2]), int(rest[3])))
        print(f"{total:.2f} {max(rates):.3f} {min(rates):.3f}")
    elif cmd == "first-byte":
        print(f"{asyncio.run(first_byte(rest[0], int(rest[1]), float(rest[2]))):.6f}")
    elif cmd == "rtt":
        rounds = int(rest[2]) if len(rest) > 2 else 200
        print(f"{asyncio.run(request_rtt(rest[0], int(rest[1]), rounds)) * 1000:.3f}")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
