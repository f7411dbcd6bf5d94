"""The NAT matrix as a table: for alice and bob each behind {no NAT, full cone,
port-restricted cone, symmetric}, and for other networks (a shared CGNAT, UDP blocked,
only an HTTP proxy out, IPv6-only, dual-stack),
the path chosen and the time from alice's start to the first byte echoed through her
forward (needs root: the NAT lab). The relay's throughput beside the direct
path's is bench/relay_bench.py.

    sudo .venv/bin/python bench/nat_matrix.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from natlab import unavailable_reason
from natmatrix import KINDS, NETWORKS, CellResult, expected_path, run_cell


def cell_text(result: CellResult, expected: str) -> str:
    mark = "" if result.path == expected and result.bytes_ok else " (!)"
    start = "relayed->" if result.first_path != result.path else ""
    return f"{start}{result.path} {result.first_byte_s * 1000:4.0f} ms{mark}"


def main() -> int:
    reason = unavailable_reason()
    if reason:
        print(f"nat matrix: {reason}")
        return 1
    print("where the tunnel settles, and the time from alice's start to a byte's echo through")
    print("her forward (relayed->: it started on the relay while the punch went on)\n")
    print("alice \\ bob   " + "".join(f"{k:>26}" for k in KINDS))
    for kind_a in KINDS:
        cells = [cell_text(run_cell(kind_a, kind_b), expected_path(kind_a, kind_b)) for kind_b in KINDS]
        print(f"{kind_a:<14}" + "".join(f"{c:>26}" for c in cells), flush=True)
    print("\nother networks (alice and bob each behind a port-restricted home router)")
    for network in NETWORKS:
        result = run_cell("restricted", "restricted", network=network)
        print(f"{network.name:<46}{cell_text(result, network.expected):>26}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
