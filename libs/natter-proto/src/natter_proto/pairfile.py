"""The operator's two-column files (tokens, names): ``KEY VALUE`` per line, ``#`` comments,
bounded in size, every mistake reported with its line number."""

from __future__ import annotations

from collections.abc import Iterator

MAX_FILE = 1 << 20
MAX_LINE = 512


def pairs(text: str, what: str, form: str) -> Iterator[tuple[int, str, str]]:
    """(line number, first, second) for each line that is not blank or a comment; raises
    ValueError naming the line for anything else."""
    if len(text) > MAX_FILE:
        raise ValueError(f"{what} larger than {MAX_FILE} bytes")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if len(line) > MAX_LINE:
            raise ValueError(f"line {number}: longer than {MAX_LINE} characters")
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"line {number}: expected '{form}'")
        yield number, parts[0], parts[1]
