#!/usr/bin/env bash
# Create .venv and install dbgen with its test extra. torch==2.13.0 is installed first, so that the torch range
# in pyproject pulls nothing else. From PyPI on Linux x86-64 that is the multi-GB CUDA build (where pip is
# configured with a local CPU wheel, as on dbgen's CI machines, that one); DBGEN_TORCH_INDEX=URL takes torch
# from another index, e.g. PyTorch's CPU wheels: DBGEN_TORCH_INDEX=https://download.pytorch.org/whl/cpu.
# Idempotent and quiet: skipped when .venv already holds an install of this pyproject.toml; pip's output goes
# to .venv/setup.log and is shown only when an install fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
stamp=.venv/.dbgen-installed
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
log=.venv/setup.log
quiet() { "$@" >>"$log" 2>&1 || { cat "$log" >&2; echo "setup failed: $*" >&2; exit 1; }; }
: >"$log"
echo "setting up .venv (torch ${DBGEN_TORCH_VERSION:-2.13.0}${DBGEN_TORCH_INDEX:+ from $DBGEN_TORCH_INDEX}, dbgen[test]; log: $log)" >&2
quiet .venv/bin/pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  index=()
  if [ -n "${DBGEN_TORCH_INDEX:-}" ]; then index=(--index-url "$DBGEN_TORCH_INDEX"); fi
  quiet .venv/bin/pip install -q "${index[@]}" "torch==${DBGEN_TORCH_VERSION:-2.13.0}"
fi
quiet .venv/bin/pip install -q -e ".[test]"
echo "$want" >"$stamp"
