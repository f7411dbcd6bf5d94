#!/usr/bin/env bash
# Set everything up, then run the whole test suite: lint, types, unit, integration, NAT lab.
# The NAT lab needs root; it skips elsewhere with the reason, and fails in CI (CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== lint and types"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
echo "== tests"
exec .venv/bin/pytest -p no:cacheprovider -ra "$@"
