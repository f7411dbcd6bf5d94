"""The NAT matrix as a table: for alice and bob each behind {no NAT, full cone,
port-restricted cone, symmetric}, the path chosen and the time from alice's start to a
tunnel that is up (needs root: the NAT lab). The relay's throughput beside the direct
path's is bench/relay_bench.py.

    sudo .venv/bin/python bench/nat_matrix.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from natlab import unavailable_reason
from natmatrix import KINDS, expected_path, run_cell


def main() -> int:
    reason = unavailable_reason()
    if reason:
        print(f"nat matrix: {reason}")
        return 1
    print("alice \\ bob   " + "".join(f"{k:>22}" for k in KINDS))
    for kind_a in KINDS:
        cells = []
        for kind_b in KINDS:
            result = run_cell(kind_a, kind_b)
            mark = "" if result.path == expected_path(kind_a, kind_b) and result.bytes_ok else " (!)"
            cells.append(f"{result.path} {result.setup_s * 1000:6.0f} ms{mark}")
        print(f"{kind_a:<14}" + "".join(f"{c:>22}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
