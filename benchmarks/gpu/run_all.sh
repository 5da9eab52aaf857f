#!/usr/bin/env bash
# GPU evidence in one call (see README.md): stages + e2e -> OUT/results.json, results.md, progress.log.
#   bash benchmarks/gpu/run_all.sh --out "$OUT"                  # real run (CUDA)
#   bash benchmarks/gpu/run_all.sh --dry-run --out /tmp/gpu-dry  # tiny shapes on CPU
# PYTHONPATH is kept when set (e.g. PYTHONPATH=.before:. for the old package), else the repository root.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export PYTHONPATH="${PYTHONPATH:-$root}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python}" "$here/run_all.py" "$@"
