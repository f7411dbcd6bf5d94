"""What the relay costs: throughput of one connection through the NAT lab, direct versus
relayed through one broker versus relayed across two replicas over Redis (needs root).

    sudo .venv/bin/python bench/relay_bench.py [--size-mb 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from natlab import INET_IP, NatLab, unavailable_reason  # noqa: E402
from procs import Proc, natter, server, tool  # noqa: E402
from redis_server import RedisProcess  # noqa: E402

SECRET = "bench-fleet-secret-0123456789"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(label: str, size: int, symmetric: bool, replicas: int, mesh: bool = False) -> float:
    procs: list[Proc] = []
    kind = "symmetric" if symmetric else "restricted"
    with NatLab(kind_a=kind, kind_b=kind) as lab:
        redis = RedisProcess(prefix=lab.prefix("inet"), port=6379) if replicas > 1 else None
        try:
            brokers = []
            if redis is not None:
                redis.start()
            for i in range(replicas):
                args = ["broker", "--listen", f"{INET_IP}:{10000 + i}", "--log-level", "warning"]
                if redis is not None:
                    args += ["--redis", redis.url, "--broker-id", f"r{i + 1}"]
                if mesh:  # replicas relay to each other straight over UDP
                    args += ["--mesh-listen", f"{INET_IP}:{11000 + i}"]
                broker = natter(*args, prefix=[*lab.prefix("inet"), "env", f"NATTER_FLEET_SECRET={SECRET}"])
                procs.append(broker)
                brokers.append(broker)
            time.sleep(1)
            sink, port = server("count", "0", prefix=lab.prefix("bob"))
            procs.append(sink)
            bob_broker = f"{INET_IP}:{10000 + replicas - 1}"
            bob = natter("-name", "bob", "-broker", bob_broker, "-listen", prefix=lab.prefix("bob"))
            procs.append(bob)
            bob.wait_event("registered as bob")
            alice = natter(
                "-name",
                "alice",
                "-broker",
                f"{INET_IP}:10000",
                f"9000:bob:{port}",
                prefix=lab.prefix("alice"),
            )
            procs.append(alice)
            alice.wait_log(lambda e: "path up with bob" in str(e.get("event")), timeout=40)
            before = sum(cpu_seconds(b.pid) for b in brokers)
            start = time.perf_counter()
            tool("blast", "127.0.0.1", "9000", str(size), prefix=lab.prefix("alice"), timeout=600)
            elapsed = time.perf_counter() - start
            broker_cpu = sum(cpu_seconds(b.pid) for b in brokers) - before
            rate, per_gb = size / elapsed / 1e6, broker_cpu / (size / 1e9)
            print(f"  {label:<44} {rate:7.1f} MB/s   brokers {per_gb:6.1f} CPU s/GB", flush=True)
            return rate
        finally:
            for proc in reversed(procs):
                proc.stop()
            if redis is not None:
                redis.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=20)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"relay bench: {reason}")
        return 1
    size = args.size_mb << 20
    print(f"relay bench: one connection, {args.size_mb} MB, NAT lab on {os.cpu_count()} cores")
    run("direct (port-restricted cone NATs)", size, symmetric=False, replicas=1)
    one = run("relayed, one broker (two symmetric NATs)", size, symmetric=True, replicas=1)
    run("relayed across two replicas over Redis", size, symmetric=True, replicas=2)
    mesh = run("relayed across two replicas over the mesh", size, symmetric=True, replicas=2, mesh=True)
    print(f"  cross-replica relay over the mesh: {mesh / one:.0%} of one broker's (target 80 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
