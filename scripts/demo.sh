#!/usr/bin/env bash
# The main job: a real pipeline, end to end, on the embedded default (local ipyparallel engines,
# a cache directory in ./.nbindustria). Run twice: the second run is all cache hits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NBINDUSTRIA_CACHE_DIR="${NBINDUSTRIA_CACHE_DIR:-$PWD/.nbindustria/cache}"
echo "=== first run ==="
python3 examples/analysis.py
echo
echo "=== second run: nothing changed, so everything is a cache hit ==="
python3 examples/analysis.py
