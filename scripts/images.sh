#!/usr/bin/env bash
# Build natter's container images without a registry: a Debian base made by debootstrap,
# wheels built on the host, then docker build (make images). Starts dockerd if needed.
# Usage: scripts/images.sh [BASE_IMAGE]   (default: natter-base:bookworm, built here)
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-natter-base:bookworm}

if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || { echo "images: docker.io is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
  echo "images: starting dockerd"
  (dockerd >/tmp/natter-dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "images: dockerd did not start (see /tmp/natter-dockerd.log)" >&2; exit 1; }
fi

if [[ $BASE == natter-base:bookworm ]] && ! docker image inspect "$BASE" >/dev/null 2>&1; then
  echo "images: building $BASE with debootstrap"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import - "$BASE" >/dev/null
fi

echo "images: building wheels"
rm -rf build/wheels
# async-timeout: redis needs it on Pythons before 3.11.3 (Debian bookworm has 3.11.2)
.venv/bin/pip wheel -q -w build/wheels ./libs/natter-proto ./services/broker ./services/client-agent . "async-timeout>=4.0.3" 2>&1 \
  | grep -v "^WARNING: Location" || true
if command -v cargo >/dev/null 2>&1; then  # the native engine, as setup.sh builds it
  (cd libs/natter-quic && ../../.venv/bin/maturin build --release -q -o ../../build/wheels) >/dev/null
fi

for image in broker agent redis; do
  echo "images: natter-$image:local"
  docker build -q --network host --build-arg BASE="$BASE" -f "docker/$image.Dockerfile" -t "natter-$image:local" . >/dev/null
done
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^natter-'
