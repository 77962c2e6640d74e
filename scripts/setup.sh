#!/usr/bin/env bash
# Creates .venv and installs ptqd with its dependencies. Idempotent: a second run is quick.
# torch is pinned first so pip takes the local CPU build instead of several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,openvino,cluster,peers]'
