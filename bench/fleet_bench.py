"""The fleet at scale on this machine: 20,000 simulated agents (natter_proto's own
Registration machine each, a real UDP socket and a signed registration each, keepalives at
the real 20 s interval) on three broker replicas over a six-node Redis Cluster; a
registration storm, a steady state with connects between random pairs, then one replica
SIGKILLed and one Redis master killed.

    .venv/bin/python bench/fleet_bench.py [--agents 20000] [--interval 20] [--connect-rate 20]

Prints the table bench/README.md holds; asserts nothing (tests/integration/
test_fleet_load.py runs a bounded version with assertions).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

import fleetload


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=20000)
    parser.add_argument("--interval", type=float, default=20.0)
    parser.add_argument("--connect-rate", type=float, default=20.0)
    args = parser.parse_args()
    print(
        f"fleet bench: {args.agents} agents, keepalive every {args.interval:g} s, {args.connect_rate:g}"
        f" connects/s, 3 replicas, Redis Cluster of 6, {os.cpu_count()} cores",
        flush=True,
    )
    report = fleetload.run(args.agents, args.interval, args.connect_rate)
    if report.failed_errors:
        print("  failed connects, last errors:", report.failed_errors[:5])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
