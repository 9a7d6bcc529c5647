#!/usr/bin/env bash
# The whole test suite: unit, engines (local and MPI), notebooks (nbclient) and browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Open MPI refuses to run as root without these (shared/RECIPES.md); oversubscribe: 2 cores here.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
python3 -m ruff check nbindustria tests benchmarks examples
python3 -m mypy
# Tests that would skip on a machine without a part (Chromium, another Python) fail here instead.
export NBINDUSTRIA_FULL_SUITE=1
python3 -m pytest -p no:cacheprovider "$@"
