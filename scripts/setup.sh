#!/usr/bin/env bash
# Install everything nbindustria needs on a fresh Debian machine (idempotent: fast when done).
# System packages: OpenMPI (MPI engines) and Chromium (the dashboard's browser tests).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v mpiexec >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq openmpi-bin libopenmpi-dev chromium fonts-dejavu-core valgrind >/dev/null
fi

PIP="python3 -m pip install -q --disable-pip-version-check"
if ! python3 -c "import nbindustria, ipyparallel, mpi4py, nbclient, playwright, plotly, anywidget, joblib, distributed" 2>/dev/null; then
  $PIP -e '.[test,mpi,dashboard,bench]' 2>&1 | grep -vE "^WARNING: (Location|Running pip)" || true
fi
python3 -c "import nbindustria" # fail loudly if the install did not work
