#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow multi-process tests included, on 3 pytest-xdist
# workers: the slow tests spend much of their time waiting on other processes (Ray, DeepSpeed workers, servers),
# so three files at a time keep 2 cores busy (measured on 2 cores, 2026-12-07: pytest 14:30 with 3 workers,
# 19:28-19:42 with 2). Whole files go to one worker (--dist loadfile): a module's Ray
# cluster and its tests stay together, in order. DBGEN_TEST_WORKERS=0 runs it in one process.
#
# --under-load (first argument): the same suite beside one busy-loop process per core (stopped by PID when the
# suite ends), to show that no test depends on an idle machine: waits are on events with generous deadlines,
# not on fixed sleeps or wall-clock thresholds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
hogs=()
if [ "${1:-}" = "--under-load" ]; then
  shift
  for _ in $(seq "$(nproc)"); do
    .venv/bin/python -c "while True: pass" &
    hogs+=("$!")
  done
  trap 'kill "${hogs[@]}" 2>/dev/null || true' EXIT
  export DBGEN_TEST_TIMEOUT_SCALE="${DBGEN_TEST_TIMEOUT_SCALE:-5}"  # hang ceilings (tests/conftest.py) x5
  echo "under load: ${#hogs[@]} busy-loop processes (PIDs ${hogs[*]})" >&2
fi
workers="${DBGEN_TEST_WORKERS:-3}"
parallel=()
# --no-loadscope-reorder: keep the conftest's longest-first file order (xdist would sort files by test count)
if [ "$workers" != 0 ]; then parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder); fi
.venv/bin/python -m pytest -q --durations=15 "${parallel[@]}" "$@"
