#!/usr/bin/env bash
# Create .venv and install dbgen with its test extra. On a CPU-only machine torch==2.13.0 (a local CPU
# wheel on this machine kind) is installed first so the torch range in pyproject pulls nothing multi-GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==${DBGEN_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install -q -e ".[test]"
