"""A load generator that owes nothing to natter: blocking sockets, one thread per
connection, a process of its own. Every figure in bench/native_bench.py is taken with it,
for every tool alike.

    load.py sink PORT                  counting sink: reads and drops; answers each
                                       connection's end with the byte count
    load.py echo PORT                  echoes (for the request round trip)
    load.py send HOST PORT SIZE        one connection: SIZE zero bytes by sendall, then the
                                       sink's count; prints "BYTES SECONDS"
    load.py parallel HOST PORT N SIZE  N connections at once; prints "TOTAL FASTEST SLOWEST" MB/s
    load.py rtt HOST PORT ROUNDS       64-byte requests one after another on one connection;
                                       prints the median and p99 in microseconds
"""

from __future__ import annotations

import socket
import statistics
import sys
import threading
import time

CHUNK = 256 * 1024


def _serve(port: int, handle: object) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(conn,), daemon=True).start()  # type: ignore[arg-type]


def _count(conn: socket.socket) -> None:
    buffer = bytearray(CHUNK)
    total = 0
    with conn:
        while n := conn.recv_into(buffer):
            total += n
        conn.sendall(f"{total}\n".encode())


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(CHUNK):
            conn.sendall(data)


def send(host: str, port: int, size: int) -> tuple[int, float]:
    """(bytes the sink counted, seconds from connect to its answer)."""
    zeros = bytes(CHUNK)
    start = time.perf_counter()
    with socket.create_connection((host, port)) as conn:
        left = size
        while left > 0:
            conn.sendall(zeros[: min(CHUNK, left)])
            left -= CHUNK
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(64):
            answer += chunk
    return int(answer or b"0"), time.perf_counter() - start


def parallel(host: str, port: int, count: int, size: int) -> tuple[float, float, float]:
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def one() -> None:
        got = send(host, port, size)
        with lock:
            results.append(got)

    start = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    rates = [got / seconds / 1e6 for got, seconds in results]
    return sum(got for got, _ in results) / elapsed / 1e6, max(rates), min(rates)


def rtt(host: str, port: int, rounds: int) -> tuple[float, float]:
    request = bytes(64)
    samples = []
    with socket.create_connection((host, port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            start = time.perf_counter()
            conn.sendall(request)
            got = 0
            while got < len(request):
                got += len(conn.recv(CHUNK))
            samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "sink":
        _serve(int(args[0]), _count)
    elif command == "echo":
        _serve(int(args[0]), _echo)
    elif command == "send":
        got, seconds = send(args[0], int(args[1]), int(args[2]))
        print(got, f"{seconds:.6f}")
    elif command == "parallel":
        print(*(f"{x:.2f}" for x in parallel(args[0], int(args[1]), int(args[2]), int(args[3]))))
    elif command == "rtt":
        print(*(f"{x:.1f}" for x in rtt(args[0], int(args[1]), int(args[2]))))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
