from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from natlab import NatLab, remove_stale_namespaces, require_lab


@pytest.fixture(scope="module")
def lab() -> Iterator[NatLab]:
    """One NAT lab (two home routers) per test module; skipped without root, never in CI."""
    require_lab()
    remove_stale_namespaces()
    with NatLab() as built:
        yield built
