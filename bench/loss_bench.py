"""Throughput of each QUIC engine through the NAT lab with random loss on alice's NAT.

    sudo .venv/bin/python bench/loss_bench.py [--size-mb 20]

Two port-restricted cone NATs, a direct path, one TCP connection of SIZE into a sink on
bob's side; iptables drops the given share of forwarded packets at alice's NAT, both ways.
Prints a table; asserts nothing. Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from labscene import Scene  # noqa: E402
from natlab import NatLab, unavailable_reason  # noqa: E402

LOSSES = (0.0, 0.005, 0.02)


def run(engine: str, loss: float, size: int) -> str:
    with NatLab() as lab:
        rule = ["FORWARD", "-m", "statistic", "--mode", "random", "--probability", str(loss), "-j", "DROP"]
        if loss:
            lab.sh("natA", "iptables", "-I", *rule)
        with Scene(lab, engine) as scene:
            scene.broker(10000)
            sink_port = scene.service("sink")
            scene.listener(10000, timeout=30)
            alice = scene.agent("alice", "alice", 10000, f"8000:bob:{sink_port}")
            alice.wait_event("direct path up with bob", timeout=40)
            start = time.perf_counter()
            try:
                scene.send_checked(8000, size, timeout=300)
            except Exception as exc:  # a figure, not a test: report and go on
                return f"failed ({type(exc).__name__})"
            return f"{size / (time.perf_counter() - start) / 1e6:.1f} MB/s"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=20)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"NAT lab unavailable: {reason}")
        return 1
    print(
        f"{'loss at alice NAT':<20}" + "".join(f"{engine:>16}" for engine in ("aioquic", "qh3")), flush=True
    )
    for loss in LOSSES:
        cells = [run(engine, loss, args.size_mb << 20) for engine in ("aioquic", "qh3")]
        print(f"{loss:<20.1%}" + "".join(f"{cell:>16}" for cell in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
