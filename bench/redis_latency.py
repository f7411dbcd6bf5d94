"""Small requests under concurrency: redis-benchmark through natter, through ssh -L and
directly, side by side in one run (loopback).

redis-benchmark (Debian's redis-tools) is the load generator: its own process, 50
connections each with one request in flight, against a real redis-server. natter runs as
its three processes (broker, bob listening beside Redis, alice forwarding); ssh -L is
OpenSSH with its own sshd on a loopback port.

    .venv/bin/python bench/redis_latency.py [--requests 50000] [--clients 50] [--engine qh3 ...]
        [--before REV]

With ``--before REV`` that revision's natter (a worktree with its own virtualenv, as
bench/before_after.py makes) runs beside this tree's, engine by engine, in the same run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from before_after import ROOT, prepare
from tunnel_bench import Natter, ssh_tunnel

import procs
from procs import free_port

TESTS = "get,set,ping"


def benchmark(port: int, requests: int, clients: int) -> dict[str, tuple[float, float]]:
    """redis-benchmark's figures: {test: (requests/s, p50 ms)}."""
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-q", "-n", str(requests), "-c", str(clients), "-t", TESTS],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    figures = {}
    for line in out.replace("\r", "\n").splitlines():
        match = re.match(r"(\S+): ([\d.]+) requests per second, p50=([\d.]+) msec", line.strip())
        if match:
            figures[match.group(1).lower()] = (float(match.group(2)), float(match.group(3)))
    return figures


def show(what: str, figures: dict[str, tuple[float, float]]) -> None:
    cells = "  ".join(
        f"{name} {rate:>9,.0f}/s p50 {p50:5.3f} ms" for name, (rate, p50) in sorted(figures.items())
    )
    print(f"  {what:<30} {cells}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--engine", action="append", choices=("qh3", "aioquic"))
    parser.add_argument("--before", metavar="REV", help="also run this revision's natter, side by side")
    args = parser.parse_args()
    if shutil.which("redis-benchmark") is None or shutil.which("redis-server") is None:
        print("redis-benchmark and redis-server are needed (Debian: redis-tools, redis-server)")
        return 1
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    old: Path | None = None
    print(f"redis-benchmark -q -n {args.requests} -c {args.clients} -t {TESTS}")
    try:
        show("direct", benchmark(port, args.requests, args.clients))
        with tempfile.TemporaryDirectory() as work:
            tunnel = ssh_tunnel(port, Path(work))
            if tunnel is None:
                print("  ssh -L: n/a (openssh-server not installed)")
            else:
                ssh_procs, local = tunnel
                try:
                    show("ssh -L", benchmark(local, args.requests, args.clients))
                finally:
                    for proc in ssh_procs:
                        proc.terminate()
                        proc.wait()
        commands = [("", procs.NATTER)]
        if args.before:
            old = Path(tempfile.mkdtemp(prefix="natter-before-")) / "tree"
            commands.insert(0, (f" at {args.before}", str(prepare(args.before, old).parent / "natter")))
        for engine in args.engine or ["qh3", "aioquic"]:
            for label, command in commands:
                procs.NATTER = command  # the natter processes below run this tree's command
                natter = Natter(port, engine)
                try:
                    benchmark(natter.local, 2000, args.clients)  # the tunnel and its streams warm up
                    show(f"natter ({engine}){label}", benchmark(natter.local, args.requests, args.clients))
                finally:
                    natter.stop()
    finally:
        redis.terminate()
        redis.wait()
        if old is not None:  # the earlier revision's worktree goes, as bench/before_after.py's does
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                capture_output=True,
                check=False,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
