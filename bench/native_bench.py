"""natter with each QUIC engine beside its anchors, all in one run on loopback, every
figure taken with the same independent load (bench/load.py: blocking sockets, processes
of their own).

    .venv/bin/python bench/native_bench.py [--size-mb 300] [--engine native --engine qh3 ...]

For each tool (plain TCP, ssh -L with its default cipher and with aes128-gcm, natter per
engine): one connection's MB/s and CPU s/GB of the tool's own processes; 100 connections
of 3 MB (total, fastest, slowest); a 64-byte request's round trip (median, p99);
redis-benchmark -q -n 50000 -c 50 -t get,set,ping; and the agents' RSS with one tunnel.
quic-portal and iroh are not run here (see bench/README.md). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from procs import Proc, free_port, natter  # noqa: E402

PY = sys.executable
LOAD = [PY, str(ROOT / "bench" / "load.py")]


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def load(*args: str, timeout: float = 600) -> str:
    return subprocess.run([*LOAD, *args], capture_output=True, text=True, check=True, timeout=timeout).stdout


@dataclass
class Targets:
    sink: int
    echo: int
    redis: int | None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


@dataclass
class Tool:
    name: str
    sink: int
    echo: int
    redis: int | None
    pids: list[int]
    agents: list[int] = field(default_factory=list)  # whose RSS is reported


@contextmanager
def targets() -> Iterator[Targets]:
    sink, echo = free_port(), free_port()
    procs = [subprocess.Popen([*LOAD, "sink", str(sink)]), subprocess.Popen([*LOAD, "echo", str(echo)])]
    redis = None
    if shutil.which("redis-server") and shutil.which("redis-benchmark"):
        redis = free_port()
        procs.append(
            subprocess.Popen(
                ["redis-server", "--port", str(redis), "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
        )
    time.sleep(0.5)
    try:
        yield Targets(sink, echo, redis, procs)
    finally:
        for proc in procs:
            proc.terminate()


@contextmanager
def plain(t: Targets) -> Iterator[Tool]:
    yield Tool("plain TCP", t.sink, t.echo, t.redis, [])


@contextmanager
def ssh(t: Targets, cipher: str | None) -> Iterator[Tool | None]:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd) or shutil.which("ssh") is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        host_key, user_key = work / "host_key", work / "user_key"
        for key in (host_key, user_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (work / "authorized_keys").write_text(user_key.with_suffix(".pub").read_text())
        port = free_port()
        (work / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {work / 'authorized_keys'}\nPasswordAuthentication no\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            f"PidFile {work / 'sshd.pid'}\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        daemon = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(work / "sshd_config")], stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)
        local = {name: free_port() for name in ("sink", "echo", "redis")}
        forwards = [
            f"-L127.0.0.1:{local['sink']}:127.0.0.1:{t.sink}",
            f"-L127.0.0.1:{local['echo']}:127.0.0.1:{t.echo}",
        ]
        if t.redis is not None:
            forwards.append(f"-L127.0.0.1:{local['redis']}:127.0.0.1:{t.redis}")
        client = subprocess.Popen(
            ["ssh", "-N", "-i", str(user_key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
             *(["-c", cipher] if cipher else []), *forwards, "root@127.0.0.1"],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.5)
        children = subprocess.run(
            ["pgrep", "-P", str(daemon.pid)], capture_output=True, text=True
        ).stdout.split()
        grandchildren = [
            p
            for c in children
            for p in subprocess.run(["pgrep", "-P", c], capture_output=True, text=True).stdout.split()
        ]
        pids = [client.pid, daemon.pid, *map(int, children), *map(int, grandchildren)]
        try:
            yield Tool(
                f"ssh -L ({cipher or 'default cipher'})",
                local["sink"],
                local["echo"],
                local["redis"] if t.redis else None,
                pids,
            )
        finally:
            client.terminate()
            daemon.terminate()


@contextmanager
def natter_tool(t: Targets, engine: str) -> Iterator[Tool]:
    broker_port = free_port()
    broker = natter("-server", f"127.0.0.1:{broker_port}", "-log-level", "warning")
    time.sleep(0.5)
    common = ["-broker", f"127.0.0.1:{broker_port}", "-quic-engine", engine, "-log-level", "info"]
    bob = natter("-name", "bob", *common, "-listen")
    bob.wait_event("registered as bob")
    local = {name: free_port() for name in ("sink", "echo", "redis")}
    specs = [f"{local['sink']}:bob:{t.sink}", f"{local['echo']}:bob:{t.echo}"]
    if t.redis is not None:
        specs.append(f"{local['redis']}:bob:{t.redis}")
    alice = natter("-name", "alice", *common, *specs)
    alice.wait_event("direct path up with bob", timeout=30)
    procs: list[Proc] = [alice, bob, broker]
    try:
        yield Tool(
            f"natter ({engine})",
            local["sink"],
            local["echo"],
            local["redis"] if t.redis else None,
            [alice.pid, bob.pid],
            [alice.pid, bob.pid],
        )
    finally:
        for proc in procs:
            proc.stop()


def redis_rps(port: int) -> str:
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-q", "-n", "50000", "-c", "50", "-t", "get,set,ping"],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    figures = []
    for line in out.replace("\r", "\n").splitlines():
        if "requests per second" in line:
            name, rest = line.split(":", 1)
            figures.append(f"{name.strip()} {float(rest.split()[0]) / 1000:.0f}k")
    return ", ".join(figures)


def measure(tool: Tool, size: int) -> list[str]:
    load("send", "127.0.0.1", str(tool.sink), str(4 << 20))  # warm: the tunnel is up
    before = sum(cpu_seconds(p) for p in tool.pids)
    got, seconds = load("send", "127.0.0.1", str(tool.sink), str(size)).split()
    cpu = sum(cpu_seconds(p) for p in tool.pids) - before
    rate = int(got) / float(seconds) / 1e6
    total, fastest, slowest = (
        float(x) for x in load("parallel", "127.0.0.1", str(tool.sink), "100", str(3 << 20)).split()
    )
    median, p99 = load("rtt", "127.0.0.1", str(tool.echo), "2000").split()
    redis = redis_rps(tool.redis) if tool.redis is not None else "n/a"
    rss = max((rss_mb(p) for p in tool.agents), default=0.0)
    return [
        tool.name,
        f"{rate:.0f}",
        f"{cpu / (int(got) / 1e9):.2f}" if tool.pids else "-",
        f"{total:.0f}",
        f"{fastest / slowest:.2f}",
        f"{median} / {p99}",
        redis,
        f"{rss:.0f}" if rss else "-",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--engine", action="append", choices=("aioquic", "qh3", "native"))
    args = parser.parse_args()
    engines = args.engine or ["qh3", "native"]
    size = args.size_mb << 20
    header = [
        "tool",
        "MB/s",
        "CPU s/GB",
        "100 conns MB/s",
        "fast/slow",
        "RTT µs median / p99",
        "redis-benchmark rps",
        "agent RSS MB",
    ]
    rows = [header]
    print(f"native bench on loopback, {os.cpu_count()} cores, {args.size_mb} MB per connection", flush=True)
    with targets() as t:
        makers = [lambda: plain(t), lambda: ssh(t, None), lambda: ssh(t, "aes128-gcm@openssh.com")]
        makers += [lambda e=engine: natter_tool(t, e) for engine in engines]
        for make in makers:
            with make() as tool:
                if tool is None:
                    continue
                rows.append(measure(tool, size))
                print("  " + " | ".join(rows[-1]), flush=True)
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows[1:]:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
