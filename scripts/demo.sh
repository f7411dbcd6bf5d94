#!/usr/bin/env bash
# Set everything up, then run the demo: broker, bob and alice on localhost, a real forward.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python examples/demo.py
