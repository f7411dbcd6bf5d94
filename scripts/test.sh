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
if command -v cargo >/dev/null 2>&1; then
  echo "== the native engine: clippy and its own tests"
  (cd libs/natter-quic && cargo clippy -q --release --all-targets -- -D warnings && cargo test -q --release --no-default-features)
fi
echo "== lint Dockerfiles and manifests"
.venv/bin/hadolint docker/*.Dockerfile
echo "== container images"
if ./scripts/images.sh; then
  export NATTER_REDIS_IMAGE=natter-redis:local  # the fleet's Redis fixture uses testcontainers with it
elif [[ -n ${CI:-} ]]; then
  echo "test: container images are required in CI" >&2
  exit 1
else
  echo "test: no container images; the container tests will skip" >&2
fi
echo "== tests"
.venv/bin/pytest -p no:cacheprovider -ra --durations=20 "$@"
# The library-level suites run on every engine by parameter; the suites that start natter
# processes (the command line, the C library, the NAT lab's reach and NAT matrix) run on
# the default engine above and once more here on the native engine, where it is built.
if [[ $# -eq 0 ]] && .venv/bin/python -c "from natter_agent.engines.native import available; raise SystemExit(not available())"; then
  echo "== the process-level suites again, on the native engine"
  NATTER_QUIC_ENGINE=native exec .venv/bin/pytest -p no:cacheprovider -ra \
    tests/integration/test_cli_processes.py tests/integration/test_c_library.py \
    tests/integration/test_natlab_reach.py tests/integration/test_nat_matrix.py
fi
