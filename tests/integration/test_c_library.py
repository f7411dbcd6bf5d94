"""libnatter: built, the C and C++ examples compiled with -Wall -Werror against the
installed header and run (bytes through a real forward), and the C error-path program run
under AddressSanitizer. Uses the Makefile targets a user would."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def make(target: str) -> str:
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.fail("make and gcc are needed (scripts/setup.sh installs them)")
    result = subprocess.run(
        ["make", "-s", target], cwd=ROOT, capture_output=True, text=True, timeout=280, check=False
    )
    assert result.returncode == 0, f"make {target}:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result.stdout


def test_c_and_cpp_examples_carry_bytes() -> None:
    make("lib")
    assert (ROOT / "build" / "lib" / "libnatter.so").exists()
    assert (ROOT / "build" / "include" / "natter.h").exists()
    for target in ("example-c", "example-cpp"):
        out = make(target)
        assert "ok: 1048576 bytes through" in out, out


def test_python_example_carries_bytes() -> None:
    assert "ok: 1048576 bytes through" in make("example-python")


def test_c_error_paths_under_address_sanitizer() -> None:
    out = make("test-c")
    assert out.strip().endswith("passed, 0 failed"), out
