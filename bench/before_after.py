"""One connection and 100 connections through the tunnel, an earlier revision beside this
tree, in one run: rounds alternate between the two, so both see the same machine.

    .venv/bin/python bench/before_after.py REV [--rounds 3] [--size-mb 200] [--engine qh3]

REV is checked out into a temporary git worktree with a virtualenv of its own (pip from
PyPI, as scripts/setup.sh does); each round runs that tree's ``bench/tunnel_bench.py
--only parallel`` (its own natter command, the same independent load: bench/README.md)
and then this tree's. Prints the medians side by side; asserts nothing.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"one connection (the same tunnel)": "one connection", "100 connections, total": "100 connections"}
PACKAGES = ("libs/natter-proto", "services/broker", "services/client-agent", ".")


def prepare(rev: str, where: Path) -> Path:
    """A worktree of rev with its own virtualenv; returns its python."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev],
        check=True,
        capture_output=True,
    )
    subprocess.run([sys.executable, "-m", "venv", str(where / ".venv")], check=True)
    python = where / ".venv" / "bin" / "python"
    editable = [arg for package in PACKAGES for arg in ("-e", str(where / package))]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *editable], check=True)
    return python


def one_round(python: Path, tree: Path, size_mb: int, engine: str) -> dict[str, float]:
    out = subprocess.run(
        [
            str(python),
            str(tree / "bench" / "tunnel_bench.py"),
            "--only",
            "parallel",
            "--engine",
            engine,
            "--size-mb",
            str(size_mb),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    ).stdout
    found = {}
    for line in out.splitlines():
        for label, name in LABELS.items():
            if line.strip().startswith(label):
                match = re.search(r"([\d.]+) MB/s", line)
                if match:
                    found[name] = float(match.group(1))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rev")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--engine", default="qh3", choices=("aioquic", "qh3"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="natter-before-") as tmp:
        old_tree = Path(tmp) / "tree"
        try:
            old_python = prepare(args.rev, old_tree)
            results: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
            for _ in range(args.rounds):
                for side, python, tree in (
                    ("before", old_python, old_tree),
                    ("after", Path(sys.executable), ROOT),
                ):
                    for name, value in one_round(python, tree, args.size_mb, args.engine).items():
                        results[side].setdefault(name, []).append(value)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)],
                capture_output=True,
                check=False,
            )
    print(f"tunnel throughput on loopback, engine {args.engine}, medians of {args.rounds} alternating rounds")
    print(f"  {'':<18} {'before ' + args.rev[:12]:>22} {'after (this tree)':>20}")
    for name in LABELS.values():
        before, after = results["before"].get(name, []), results["after"].get(name, [])
        cells = [f"{statistics.median(v):.1f} MB/s" if v else "n/a" for v in (before, after)]
        print(f"  {name:<18} {cells[0]:>22} {cells[1]:>20}   (all: {before} / {after})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
