#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow multi-process tests included, on 2 pytest-xdist
# workers: the slow tests spend much of their time waiting on other processes (Ray, DeepSpeed workers, servers),
# so two files at a time keep both cores busy. Whole files go to one worker (--dist loadfile): a module's Ray
# cluster and its tests stay together, in order. DBGEN_TEST_WORKERS=0 runs it in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers="${DBGEN_TEST_WORKERS:-2}"
parallel=()
# --no-loadscope-reorder: keep the conftest's longest-first file order (xdist would sort files by test count)
if [ "$workers" != 0 ]; then parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder); fi
exec .venv/bin/python -m pytest -q --durations=15 "${parallel[@]}" "$@"
