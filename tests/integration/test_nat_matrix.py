"""The NAT matrix: alice and bob each behind {no NAT, full cone, port-restricted cone,
symmetric}. Every cell carries bytes verified by sha256 on the expected path (where it
settles: a slow punch starts on the relay and moves over): direct where
at least one side maps endpoint-independently (found by the birthday method, "predicted",
against one symmetric NAT), relayed only for symmetric-symmetric.
(Both behind the same NAT: test_natlab.py, over the LAN.) Needs root: skipped elsewhere,
never in CI."""

from __future__ import annotations

import pytest

from natlab import require_lab
from natmatrix import KINDS, expected_path, run_cell
from natter_proto.agent.settings import DEFAULTS

PUNCH_TIMEOUT = DEFAULTS.punch_timeout

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(120)]


@pytest.mark.parametrize("kind_b", KINDS)
@pytest.mark.parametrize("kind_a", KINDS)
def test_matrix_cell(kind_a: str, kind_b: str) -> None:
    require_lab()
    result = run_cell(kind_a, kind_b)
    assert result.bytes_ok
    assert result.path == expected_path(kind_a, kind_b), result
    # relay first: no cell's first byte waits for the punch to time out (5 s)
    assert result.first_byte_s < PUNCH_TIMEOUT, result
