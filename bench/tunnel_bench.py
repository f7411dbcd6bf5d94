"""The tunnel side by side with its anchors on loopback, all in one run.

    .venv/bin/python bench/tunnel_bench.py [--size-mb 200] [--skip-ssh]

1. throughput, one TCP connection: plain TCP, ssh -L (OpenSSH from Debian), raw aioquic
   (bench/rawquic.py), natter; MB/s and CPU seconds per GB (both ends' processes)
2. 100 parallel connections of 2 MB through one tunnel: total, fastest and slowest
3. latency: cold time to first byte (agents just started, split into broker round trip,
   punch, QUIC handshake and stream open), warm time to first byte, and the round trip of
   a small request through the tunnel against the raw loopback round trip
4. memory: agent RSS idle, with a tunnel, with 100 open connections; broker RSS per 1,000
   registered agents

Prints a table; asserts nothing. See bench/README.md for figures and what they mean.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "bench"))

from broker_bench import Swarm, register_all  # noqa: E402

from netcheck import request_rtt  # noqa: E402
from procs import Proc, free_port, natter, server, tool  # noqa: E402

PY = sys.executable
ROWS: list[tuple[str, str, str]] = []


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def row(what: str, value: str, note: str = "") -> None:
    ROWS.append((what, value, note))
    print(f"  {what:<52} {value:>14}  {note}", flush=True)


def timed_send(
    port: int, size: int, pids: list[int], host: str = "127.0.0.1", prefix: Sequence[str] = ()
) -> tuple[float, float]:
    """Send size bytes to a sink at host:port (from the namespace prefix runs in); returns
    (MB/s, CPU s per GB of those pids)."""
    before = sum(cpu_seconds(p) for p in pids)
    start = time.perf_counter()
    reply = tool("blast", host, str(port), str(size), timeout=600, prefix=prefix)
    elapsed = time.perf_counter() - start
    assert reply.split()[0] == str(size), reply
    cpu = sum(cpu_seconds(p) for p in pids) - before
    return size / elapsed / 1e6, cpu / (size / 1e9)


def agent(name: str, broker_port: int, engine: str, *args: str) -> Proc:
    """natter -name NAME -broker 127.0.0.1:PORT -quic-engine ENGINE ARGS..."""
    return natter("-name", name, "-broker", f"127.0.0.1:{broker_port}", "-quic-engine", engine, *args)


class Natter:
    """A broker, bob (listening) and alice (forwarding) as processes."""

    def __init__(self, target_port: int, engine: str = "qh3") -> None:
        self.broker_port = free_port()
        self.local = free_port()
        self.broker = natter("-server", f"127.0.0.1:{self.broker_port}", "-log-level", "warning")
        time.sleep(0.5)  # warning-level logs: no "listening" line to wait for
        self.bob = agent("bob", self.broker_port, engine, "-listen")
        self.bob.wait_event("registered as bob")
        self.started = time.monotonic()
        self.alice = agent("alice", self.broker_port, engine, f"{self.local}:bob:{target_port}")
        self.alice.wait_event("direct path up with bob")

    def stop(self) -> None:
        for proc in (self.alice, self.bob, self.broker):
            proc.stop()


def ssh_tunnel(
    target_port: int,
    workdir: Path,
    *,
    server_prefix: Sequence[str] = (),
    client_prefix: Sequence[str] = (),
    listen: str = "127.0.0.1",
    connect: str = "127.0.0.1",
    port: int | None = None,
) -> tuple[list[subprocess.Popen[bytes]], int] | None:
    """sshd (in server_prefix's namespace, on listen:port) and ssh -L from client_prefix's
    namespace through connect:port to the server side's 127.0.0.1:target_port; returns the
    processes and the local port, or None without OpenSSH."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd) or shutil.which("ssh") is None:
        return None
    host_key, user_key = workdir / "host_key", workdir / "user_key"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    authorized = workdir / "authorized_keys"
    authorized.write_text(user_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    port, local = port or free_port(), free_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress {listen}\nHostKey {host_key}\nAuthorizedKeysFile {authorized}\n"
        "PasswordAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        f"PidFile {workdir / 'sshd.pid'}\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    daemon = subprocess.Popen(
        [*server_prefix, sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)
    client = subprocess.Popen(
        [*client_prefix, "ssh", "-N", "-i", str(user_key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
         "-L", f"127.0.0.1:{local}:127.0.0.1:{target_port}", f"root@{connect}"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    probe = f"import socket; socket.create_connection(('127.0.0.1', {local}), 1).close()"
    for _ in range(50):
        if subprocess.run([*client_prefix, PY, "-c", probe], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    return [daemon, client], local


def sshd_children(daemon_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(daemon_pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def throughput(size: int, skip_ssh: bool, engines: list[str]) -> None:
    print("\n1. throughput, one TCP connection", flush=True)
    sink, sink_port = server("count", "0")
    try:
        mbps, cpu = timed_send(sink_port, size, [sink.pid])
        row("plain TCP (loopback, Python asyncio ends)", f"{mbps:.0f} MB/s", f"{cpu:.1f} CPU s/GB (sink)")
        ssh_rate = None
        if not skip_ssh:
            with tempfile.TemporaryDirectory() as tmp:
                started = ssh_tunnel(sink_port, Path(tmp))
                if started is None:
                    row("ssh -L", "n/a", "openssh-server not installed")
                else:
                    procs, local = started
                    tool("send", "127.0.0.1", str(local), "1000")
                    pids = [p.pid for p in procs] + sshd_children(procs[0].pid)
                    ssh_rate, cpu = timed_send(local, size, pids)
                    row("ssh -L (OpenSSH)", f"{ssh_rate:.1f} MB/s", f"{cpu:.1f} CPU s/GB (ssh + sshd)")
                    for proc in procs:
                        proc.terminate()
        natter_rates = {}
        for engine in engines:
            raw_rate = raw_engine(engine, size)
            tunnel = Natter(sink_port, engine)
            try:
                tool("send", "127.0.0.1", str(tunnel.local), "1000000")
                rate, cpu = timed_send(tunnel.local, size, [tunnel.alice.pid, tunnel.bob.pid])
                natter_rates[engine] = rate
                row(f"natter tunnel ({engine})", f"{rate:.1f} MB/s", f"{cpu:.1f} CPU s/GB (both agents)")
                row(f"natter / raw {engine}", f"{rate / raw_rate:.0%}", "target >= 80%")
            finally:
                tunnel.stop()
        if ssh_rate:
            fastest = max(natter_rates, key=natter_rates.__getitem__)
            row(
                f"natter ({fastest}) / ssh -L",
                f"{natter_rates[fastest] / ssh_rate:.0%}",
                "target >= 50% with the fastest engine",
            )
    finally:
        sink.stop()


def raw_engine(
    engine: str,
    size: int,
    *,
    server_prefix: Sequence[str] = (),
    client_prefix: Sequence[str] = (),
    bind: str = "127.0.0.1",
    connect: str = "127.0.0.1",
    port: int | None = None,
) -> float:
    """One stream between two bare engine endpoints (bench/rawquic.py), the server in
    server_prefix's namespace on bind:port, the client sending to connect:port from
    client_prefix's; prints and returns the receiver's MB/s."""
    port = port or free_port(socket.SOCK_DGRAM)
    rawquic = [PY, str(ROOT / "bench" / "rawquic.py")]
    raw_server = Proc([*rawquic, "server", str(port), engine, bind], prefix=server_prefix)
    raw_server.read_line()
    start_cpu = cpu_seconds(raw_server.pid)
    subprocess.run(
        [*client_prefix, *rawquic, "client", str(port), str(size), engine, connect],
        capture_output=True,
        check=True,
        timeout=600,
    )
    raw_rate = float(raw_server.read_line().split(": ")[1].split()[0])
    server_cpu = cpu_seconds(raw_server.pid) - start_cpu
    raw_server.stop()
    row(
        f"raw {engine}, one stream",
        f"{raw_rate:.1f} MB/s",
        f"receiver {server_cpu / (size / 1e9):.1f} CPU s/GB",
    )
    return raw_rate


def parallel(
    port: int, count: int, size: int, host: str = "127.0.0.1", prefix: Sequence[str] = ()
) -> tuple[float, float, float]:
    """count connections at once, each sending size zero bytes the way the single-connection
    figure's sender does (netcheck blast) into the same counting sink; (total, fastest,
    slowest connection) in MB/s."""
    out = tool("parallel", host, str(port), str(count), str(size), prefix=prefix, timeout=600)
    total, fastest, slowest = (float(x) for x in out.split())
    return total, fastest, slowest


def many_connections(engine: str, size: int) -> None:
    print(f"\n2. 100 parallel connections of 2 MB through one tunnel ({engine})", flush=True)
    sink, sink_port = server("count", "0")
    plain, _, _ = parallel(sink_port, 100, 2 << 20)
    row(
        "the same 100 connections straight to the sink",
        f"{plain:.1f} MB/s",
        "no tunnel: the load's own ceiling",
    )
    tunnel = Natter(sink_port, engine)
    try:
        compare_parallel(tunnel.local, [tunnel.alice.pid, tunnel.bob.pid], size)
    finally:
        tunnel.stop()
        sink.stop()


def compare_parallel(
    port: int, pids: list[int], size: int, host: str = "127.0.0.1", prefix: Sequence[str] = ()
) -> None:
    """One connection, then 100 at once, through the same tunnel: the ratio is one run's."""
    tool("blast", host, str(port), str(1 << 20), prefix=prefix)  # the tunnel is up and warm
    single, single_cpu = timed_send(port, size, pids, host, prefix)
    row("one connection (the same tunnel)", f"{single:.1f} MB/s", f"{single_cpu:.1f} CPU s/GB (both agents)")
    cpu = sum(cpu_seconds(p) for p in pids)
    total, fastest, slowest = parallel(port, 100, 2 << 20, host, prefix)
    used = (sum(cpu_seconds(p) for p in pids) - cpu) / (100 * (2 << 20) / 1e9)
    row("100 connections, total", f"{total:.1f} MB/s", f"{used:.1f} CPU s/GB (both agents)")
    row("total / one connection", f"{total / single:.0%}", "target >= 100%")
    row("fastest / slowest connection", f"{fastest:.2f} / {slowest:.2f} MB/s")
    row("slowest / fair share", f"{slowest / (total / 100):.0%}", "target >= 50%")


def log_time(proc: Proc, text: str) -> float:
    entry = proc.wait_event(text)
    stamp = str(entry["timestamp"]).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()


async def first_byte(port: int) -> float:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x")
    await reader.readexactly(1)
    writer.close()
    return time.perf_counter() - start


def latency(engine: str) -> None:
    print(f"\n3. latency ({engine})", flush=True)
    echo, echo_port = server("echo", "0")
    broker_port, local = free_port(), free_port()
    broker = natter("-server", f"127.0.0.1:{broker_port}")
    time.sleep(0.5)
    bob = agent("bob", broker_port, engine, "-listen")
    bob.wait_event("registered as bob")
    start = time.time()
    alice = agent("alice", broker_port, engine, f"{local}:bob:{echo_port}")
    try:
        up = log_time(alice, "direct path up")
        cold = asyncio.run(first_byte(local))
        started = log_time(alice, "agent started")
        registered = log_time(alice, "registered as alice")
        asked = log_time(alice, "asking broker for peer")
        punching = log_time(alice, "punching to bob")
        answered = log_time(alice, "punch answered")
        row(
            "cold: process start to agent up",
            f"{(started - start) * 1000:.0f} ms",
            "Python start and imports",
        )
        row(
            "cold: registration (broker round trips)",
            f"{(registered - started) * 1000:.1f} ms",
            "challenge + register",
        )
        row(
            "cold: connect request to punch instruction",
            f"{(punching - asked) * 1000:.1f} ms",
            "broker round trip",
        )
        row("cold: punch", f"{(answered - punching) * 1000:.1f} ms", "first probe answered")
        row("cold: QUIC handshake and key checks", f"{(up - answered) * 1000:.1f} ms")
        row(
            "cold: first byte on a new connection after that",
            f"{cold * 1000:.1f} ms",
            "stream open + service",
        )
        warm = sorted(asyncio.run(first_byte(local)) for _ in range(20))[10]
        raw = sorted(asyncio.run(first_byte(echo_port)) for _ in range(20))[10]
        row(
            "warm: time to first byte, new connection",
            f"{warm * 1000:.2f} ms",
            f"raw TCP {raw * 1000:.2f} ms",
        )
        through = asyncio.run(request_rtt("127.0.0.1", local))
        direct = asyncio.run(request_rtt("127.0.0.1", echo_port))
        row(
            "request/response round trip through the tunnel",
            f"{through * 1000:.2f} ms",
            f"raw {direct * 1000:.3f} ms",
        )
    finally:
        for proc in (alice, bob, broker, echo):
            proc.stop()


async def hold_connections(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        await writer.drain()
        await reader.readexactly(1)
        writers.append(writer)
    return writers


def memory(engine: str) -> None:
    print(f"\n4. memory ({engine})", flush=True)
    echo, echo_port = server("echo", "0")
    broker_port, local = free_port(), free_port()
    broker = natter("-server", f"127.0.0.1:{broker_port}", "-ip-rate", "1000000")
    time.sleep(0.5)
    bob = agent("bob", broker_port, engine, "-listen")
    bob.wait_event("registered as bob")
    try:
        time.sleep(1)
        row("agent RSS, idle (registered, listening)", f"{rss_mb(bob.pid):.1f} MB")
        alice = agent("alice", broker_port, engine, f"{local}:bob:{echo_port}")
        alice.wait_event("direct path up with bob")
        tool("echo-check", "127.0.0.1", str(local), "100000")
        time.sleep(0.5)
        row("agent RSS, one tunnel", f"{rss_mb(alice.pid):.1f} MB", "target <= 60 MB")

        async def with_100() -> tuple[float, float]:
            writers = await hold_connections(local, 100)
            await asyncio.sleep(0.5)
            result = rss_mb(alice.pid), rss_mb(bob.pid)
            for writer in writers:
                writer.close()
            return result

        a, b = asyncio.run(with_100())
        row("agent RSS, 100 open connections", f"{a:.1f} MB", f"listener {b:.1f} MB")
        alice.stop()
        base = rss_mb(broker.pid)
        swarm = Swarm(1000)
        register_all(swarm, [("127.0.0.1", broker_port)], listening=False)
        time.sleep(0.5)
        grown = rss_mb(broker.pid) - base
        swarm.close()
        row(
            "broker RSS per 1,000 registered agents",
            f"{grown * 1024:.0f} KB",
            f"{grown * 1024 / 1000:.2f} KB each",
        )
    finally:
        for proc in (bob, broker, echo):
            proc.stop()


def multi_core(size: int, engine: str) -> None:
    """Two tunnels in two pairs of processes (each its own QUIC connection and core) against
    one tunnel, moving the same bytes: does spreading connections over processes help?"""
    print(f"\n5. multi-core: one tunnel against two in separate processes ({engine})", flush=True)
    sink, sink_port = server("count", "0")
    try:
        one = Natter(sink_port, engine)
        try:
            tool("send", "127.0.0.1", str(one.local), "1000000")
            rate, cpu = timed_send(one.local, size, [one.alice.pid, one.bob.pid])
            row("one tunnel, one connection", f"{rate:.1f} MB/s", f"{cpu:.1f} CPU s/GB")
        finally:
            one.stop()
        pair = [Natter(sink_port, engine) for _ in range(2)]
        try:
            for tunnel in pair:
                tool("send", "127.0.0.1", str(tunnel.local), "1000000")
            results: list[float] = []

            def blast(tunnel: Natter) -> None:
                results.append(timed_send(tunnel.local, size // 2, [])[0])

            start = time.perf_counter()
            threads = [threading.Thread(target=blast, args=(tunnel,)) for tunnel in pair]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            total = size / (time.perf_counter() - start) / 1e6
            row(
                "two tunnels in two process pairs, together",
                f"{total:.1f} MB/s",
                f"each {results[0]:.1f} / {results[1]:.1f}",
            )
        finally:
            for tunnel in pair:
                tunnel.stop()
    finally:
        sink.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--skip-ssh", action="store_true")
    parser.add_argument("--only", choices=("throughput", "parallel", "latency", "memory", "multicore"))
    parser.add_argument("--engine", action="append", choices=("aioquic", "qh3"), help="default: both")
    args = parser.parse_args()
    engines = args.engine or ["aioquic", "qh3"]
    print(f"tunnel bench on loopback, {os.cpu_count()} cores, engines {', '.join(engines)}", flush=True)
    steps = {
        "throughput": lambda: throughput(args.size_mb << 20, args.skip_ssh, engines),
        "parallel": lambda: [many_connections(e, args.size_mb << 20) for e in engines],
        "latency": lambda: [latency(e) for e in engines],
        "memory": lambda: [memory(e) for e in engines],
        "multicore": lambda: [multi_core(args.size_mb << 20, e) for e in engines],
    }
    for name, step in steps.items():
        if args.only in (None, name):
            step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
