"""The NAT matrix as a table: for alice and bob each behind {no NAT, full cone,
port-restricted cone, symmetric}, and for other networks (a shared CGNAT, UDP blocked,
only an HTTP proxy out, IPv6-only, dual-stack),
the path chosen and the time from alice's start to the first byte echoed through her
forward (needs root: the NAT lab). The relay's throughput beside the direct
path's is bench/relay_bench.py.

    sudo .venv/bin/python bench/nat_matrix.py
    sudo NATTER_BIN=/path/to/another/natter .venv/bin/python bench/nat_matrix.py   # another build
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from natlab import unavailable_reason
from natmatrix import KINDS, NETWORKS, CellResult, Network, expected_path, run_cell


def cell_text(result: CellResult, expected: str) -> str:
    mark = "" if result.path == expected and result.bytes_ok else " (!)"
    start = "relayed->" if result.first_path != result.path else ""
    return f"{start}{result.path} {result.first_byte_s * 1000:4.0f} ms{mark}"


def measured(kind_a: str, kind_b: str, expected: str, network: Network | None = None) -> str:
    try:
        return cell_text(run_cell(kind_a, kind_b, network=network), expected)
    except Exception as exc:  # a build that cannot do it (the one before, say): say so
        return f"fails ({type(exc).__name__})"


def main() -> int:
    reason = unavailable_reason()
    if reason:
        print(f"nat matrix: {reason}")
        return 1
    print("where the tunnel settles, and the time from alice's start to a byte's echo through")
    print("her forward (relayed->: it started on the relay while the punch went on)\n")
    print("alice \\ bob   " + "".join(f"{k:>28}" for k in KINDS))
    for kind_a in KINDS:
        cells = [measured(kind_a, kind_b, expected_path(kind_a, kind_b)) for kind_b in KINDS]
        print(f"{kind_a:<14}" + "".join(f"{c:>28}" for c in cells), flush=True)
    print("\nother networks (alice and bob each behind a port-restricted home router)")
    for network in NETWORKS:
        cell = measured("restricted", "restricted", network.expected, network)
        print(f"{network.name:<46}{cell:>28}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
