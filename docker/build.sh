#!/usr/bin/env bash
# Build the minedraft-serve image (Dockerfile at the repository root).
#
#   docker/build.sh [-t TAG] [more `docker build` arguments, e.g. --build-arg TORCH_PIP_ARGS=...]
#
# Environment:
#   MINEDRAFT_IMAGE        tag (default minedraft-serve:latest; -t wins)
#   MINEDRAFT_BASE_IMAGE   base image (default: minedraft-base:local when that image exists, else python:3.11-slim)
#   MINEDRAFT_TORCH_WHEEL  a local torch wheel to install instead of downloading one (default: the CPU wheel of the
#                          pinned version in /opt/wheels, if there); served to the build over http on 127.0.0.1
#                          (port $MINEDRAFT_WHEEL_PORT, default 38765: a fixed port keeps the layer cache valid)
#
# The build runs with --network host (so pip reaches a local wheel server, and PyPI even where dockerd has no NAT).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${MINEDRAFT_IMAGE:-minedraft-serve:latest}
if [ "${1:-}" = -t ]; then tag=$2; shift 2; fi

base=${MINEDRAFT_BASE_IMAGE:-}
if [ -z "$base" ]; then
  if docker image inspect minedraft-base:local >/dev/null 2>&1; then base=minedraft-base:local; else base=python:3.11-slim; fi
fi

torch_version=$(python3 -c "import re; print(re.search(r'\"torch==([^\"]+)\"', open('pyproject.toml').read()).group(1))")
wheel=${MINEDRAFT_TORCH_WHEEL:-}
if [ -z "$wheel" ]; then
  wheel=$(ls /opt/wheels/torch-"$torch_version"+cpu-cp311-*.whl 2>/dev/null | head -n 1 || true)
fi

args=(--network host --build-arg "BASE_IMAGE=$base")
server_pid=""
cleanup() { if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi; rm -rf "${wheel_dir:-}"; }
trap cleanup EXIT
if [ -n "$wheel" ]; then
  wheel_dir=$(mktemp -d)
  ln -s "$(readlink -f "$wheel")" "$wheel_dir/$(basename "$wheel")"
  # A fixed port keeps the build arguments, and so Docker's layer cache, the same from one build to the next.
  port=${MINEDRAFT_WHEEL_PORT:-38765}
  if ! python3 -c "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$port" 2>/dev/null
  then
    port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  fi
  python3 -m http.server --bind 127.0.0.1 --directory "$wheel_dir" "$port" >/dev/null 2>&1 &
  server_pid=$!
  for _ in $(seq 1 50); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/', timeout=1)" 2>/dev/null && break
    sleep 0.1
  done
  local_version=$(basename "$wheel" | cut -d- -f2)
  echo "torch from local wheel $wheel"
  args+=(--build-arg "TORCH_SPEC=torch==$local_version" --build-arg "TORCH_PIP_ARGS="
         --build-arg "PIP_EXTRA_ARGS=--find-links http://127.0.0.1:$port/")
fi

echo "building $tag on $base"
start=$(date +%s)
DOCKER_BUILDKIT=0 docker build "${args[@]}" -t "$tag" "$@" .
echo "built $tag in $(( $(date +%s) - start )) s ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
