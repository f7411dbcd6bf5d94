"""Networks where a punch cannot work, or works late, through real NATs: two homes behind
one carrier-grade NAT (relay first: the first byte does not wait for the punch).
Needs root (see test_natlab.py)."""

from __future__ import annotations

import pytest

from natlab import remove_stale_namespaces, require_lab
from natmatrix import run_cell

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(120)]


def test_shared_cgnat_first_byte_within_half_a_second() -> None:
    """Seen: two home NATs behind one CGNAT (one public address, no hairpinning) gave the
    first byte after 5.5 s, the relay being used only once the punch had timed out."""
    require_lab()
    remove_stale_namespaces()
    result = run_cell("restricted", "restricted", size=2 << 20, cgnat=True)
    assert result.bytes_ok
    assert result.path == "relayed" and result.first_path == "relayed", result
    assert result.first_byte_s < 0.5, result
