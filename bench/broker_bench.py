"""Broker throughput: control frames per second, connects per second, Redis commands per frame.

    .venv/bin/python bench/broker_bench.py [--agents 1000] [--seconds 4]

Simulated agents are real UDP sockets on loopback (one per agent, so each has its own
endpoint); the brokers are real ``natter broker`` processes, the Redis a real redis-server
on a free port. Prints a table; asserts nothing (see bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from dataclasses import replace

from natter_proto import frames
from natter_proto.identity import Identity
from procs import free_port, natter
from redis_server import RedisProcess


class Swarm:
    """Many simulated agents, each one UDP socket and one identity, driven by one epoll loop."""

    def __init__(self, count: int) -> None:
        self.socks = []
        self.identities = [Identity.generate() for _ in range(count)]
        self.cookies: list[bytes | None] = [None] * count
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            self.socks.append(s)
        self.poller = select.epoll()
        self.by_fd = {s.fileno(): i for i, s in enumerate(self.socks)}
        for s in self.socks:
            self.poller.register(s.fileno(), select.EPOLLIN)

    def register_frame(self, index: int, listening: bool) -> bytes:
        identity = self.identities[index]
        unsigned = frames.Register(
            name=f"a{index}", listening=listening, public_key=identity.public_key, cookie=self.cookies[index]
        )
        return frames.encode(replace(unsigned, signature=identity.sign_register(unsigned)))

    def drain(self, timeout: float) -> list[tuple[int, bytes]]:
        got = []
        for fd, _ in self.poller.poll(timeout):
            sock = self.socks[self.by_fd[fd]]
            while True:
                try:
                    got.append((self.by_fd[fd], sock.recv(2048)))
                except BlockingIOError:
                    break
        return got

    def round(
        self, payloads: list[tuple[int, bytes, tuple[str, int]]], want: str, timeout: float = 2.0
    ) -> int:
        """Send each payload, wait for one answer of type ``want`` per sender; return answers."""
        for index, data, addr in payloads:
            self.socks[index].sendto(data, addr)
        pending = {index for index, _, _ in payloads}
        deadline = time.monotonic() + timeout
        answered = 0
        while pending and time.monotonic() < deadline:
            for index, data in self.drain(0.05):
                try:
                    message = frames.decode(data)
                except frames.FrameError:
                    continue
                cookie = getattr(message, "cookie", None)
                if cookie is not None:
                    self.cookies[index] = cookie
                if want == message.TYPE and index in pending:
                    pending.discard(index)
                    answered += 1
        return answered

    def close(self) -> None:
        for s in self.socks:
            s.close()


def redis_calls_by_command(redis: RedisProcess) -> dict[str, int]:
    out = subprocess.run(
        ["redis-cli", "-h", redis.host, "-p", str(redis.port), "INFO", "commandstats"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    calls = {}
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            name = line.split(":")[0][len("cmdstat_") :]
            calls[name] = int(line.split("calls=")[1].split(",")[0])
    return calls


# commands that Redis counts but that nobody sent: the bench's own INFO, connection set-up,
# and what the keepalive script runs inside one EVALSHA
NOT_SENT = {"info", "hello", "ping", "client|setinfo", "hget", "hset", "expire"}


def flush(redis: RedisProcess) -> None:
    """Each phase has fresh identities for the same names: start from an empty registry."""
    subprocess.run(
        ["redis-cli", "-h", redis.host, "-p", str(redis.port), "FLUSHALL"], capture_output=True, check=True
    )


def sent_by_broker(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(after[k] - before.get(k, 0) for k in after if k not in NOT_SENT)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_broker(redis_url: str, broker_id: str) -> tuple[object, tuple[str, int]]:
    port = free_port(socket.SOCK_DGRAM)
    args = ["broker", "--listen", f"127.0.0.1:{port}", "--broker-id", broker_id, "--log-level", "warning"]
    args += ["--ip-rate", "1000000"]  # every simulated agent shares 127.0.0.1
    if redis_url:
        args += ["--redis", redis_url]
    proc = natter(*args)
    time.sleep(0.8)
    return proc, ("127.0.0.1", port)


def register_all(swarm: Swarm, brokers: list[tuple[str, int]], listening: bool) -> None:
    """Register every agent: first contact earns a cookie (challenge), then a signed register."""
    for want in ("challenge", "registered"):
        batch = [
            (i, swarm.register_frame(i, listening), brokers[i % len(brokers)])
            for i in range(len(swarm.socks))
        ]
        for start in range(0, len(batch), 200):
            swarm.round(batch[start : start + 200], want, timeout=5)


def keepalive_rate(swarm: Swarm, broker: tuple[str, int], seconds: float, window: int) -> tuple[float, int]:
    frames_by_agent = [
        frames.encode(frames.Keepalive(name=f"a{i}", cookie=swarm.cookies[i]))
        for i in range(len(swarm.socks))
    ]
    done = 0
    cursor = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = []
        for _ in range(window):
            batch.append((cursor, frames_by_agent[cursor], broker))
            cursor = (cursor + 1) % len(frames_by_agent)
        done += swarm.round(batch, "registered")
    return done / (time.perf_counter() - start), done


def connect_rate(
    swarm: Swarm, brokers: list[tuple[str, int]], seconds: float, window: int
) -> tuple[float, int]:
    """Agents with even index ask for the odd one registered with the *other* broker."""
    count = len(swarm.socks)
    requesters = list(range(0, count, 2))
    done = 0
    serial = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = []
        for _ in range(window):
            i = requesters[serial % len(requesters)]
            target = (i + 1) % count if len(brokers) == 1 else (i + 3) % count
            message = frames.ConnectRequest(
                f"q{serial}", f"a{i}", f"a{target}", "localhost:22", swarm.cookies[i]
            )
            batch.append((i, frames.encode(message), brokers[i % len(brokers)]))
            serial += 1
        done += swarm.round(batch, "punch")
        swarm.drain(0)
    return done / (time.perf_counter() - start), done


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is needed (./scripts/setup.sh installs it)")
        return 1
    rows: list[tuple[str, str]] = []
    tmp = tempfile.mkdtemp()
    redis = RedisProcess().start()
    procs = []
    try:
        for mode in ("memory", "redis"):
            url = redis.url if mode == "redis" else ""
            flush(redis)
            proc, broker = start_broker(url, f"bench-{mode}")
            procs.append(proc)
            swarm = Swarm(args.agents)
            register_all(swarm, [broker], listening=True)
            before = redis_calls_by_command(redis)
            cpu_before = cpu_seconds(proc.pid)  # type: ignore[attr-defined]
            rate, count = keepalive_rate(swarm, broker, args.seconds, args.window)
            cpu = cpu_seconds(proc.pid) - cpu_before  # type: ignore[attr-defined]
            per = sent_by_broker(before, redis_calls_by_command(redis)) / max(1, count)
            rows.append((f"keepalives/s, 1 replica ({mode})", f"{rate:,.0f}"))
            rows.append((f"keepalives per broker CPU-second ({mode})", f"{count / max(cpu, 1e-9):,.0f}"))
            if mode == "redis":
                rows.append(("redis commands per keepalive (one EVALSHA per batch)", f"{per:.4f}"))
            swarm.close()
            proc.stop()  # type: ignore[attr-defined]
        for replicas in (1, 2):
            flush(redis)
            started = [start_broker(redis.url, f"bench-c{replicas}-{i}") for i in range(replicas)]
            procs += [p for p, _ in started]
            brokers = [b for _, b in started]
            swarm = Swarm(args.agents)
            register_all(swarm, brokers, listening=True)
            before = redis_calls_by_command(redis)
            rate, count = connect_rate(swarm, brokers, args.seconds, args.window)
            after = redis_calls_by_command(redis)
            per = sent_by_broker(before, after) / max(1, count)
            rows.append((f"connects/s, {replicas} replica(s) on one Redis", f"{rate:,.0f}"))
            rows.append((f"redis commands per connect, {replicas} replica(s)", f"{per:.2f}"))
            swarm.close()
            for p, _ in started:
                p.stop()  # type: ignore[attr-defined]
    finally:
        for p in procs:
            p.stop()  # type: ignore[attr-defined]
        redis.close()
        shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(k) for k, _ in rows)
    cores = os.cpu_count()
    print(f"\nbroker bench: {args.agents} simulated agents, {cores} cores, {args.seconds:g} s per figure")
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
