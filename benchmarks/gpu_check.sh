#!/usr/bin/env bash
# The one prepared GPU check of training throughput with the same math (the step's fast paths), for a session
# with a lent H100/H200. Nothing to install: it needs torch, numpy, pyyaml, pytest (the device image has them)
# and uses dbgen from this checkout through PYTHONPATH.
#
#   bash benchmarks/gpu_check.sh                   # from anywhere; ~5-9 min on one H100, never over BUDGET_S
#   DRY_RUN=1 bash benchmarks/gpu_check.sh         # the same script on a CPU: tiny configs and batches
#
# Stages, each under its own timeout and all under one deadline (BUDGET_S, default 560 s, so the whole call
# fits the device tool's 10-minute limit; a stage that would start with under 20 s left is skipped):
#   env       versions, device, and that the bench imports (no DeepSpeed/Ray there)
#   variants  every config x variant below loads (a typo fails here, in seconds, not after a compile)
#   tests     pytest -m "gpu and not slow" tests/test_step.py: the same-math checks on CUDA (skipped if the file is
#             absent; the slow one, compiled vs eager paper RVAE, runs with: pytest -m gpu tests/test_step.py)
#   ladder_*  the paper binary RVAE (batch 128) and Flow++ (batch 64), eager: plain fp32 NCHW, bf16 NCHW,
#             bf16 NHWC; each with a torch.profiler table of its top kernels
#   twins_*   the full-precision twin and the 1/1 config of each model with that model's fastest eager variant
#   compile_* the fastest eager variant + train.compile with compile_mode=reduce-overhead (inductor + CUDA
#             graphs), then with the default mode (inductor only); last, because a cold compile of a paper model
#             takes minutes: a whole-model compile took 123 s (RVAE) and 488 s (Flow++) on this project's 2-core
#             CPU machine, so compile_flowpp may find too little of the budget left
#   summary   one table of every run (also $OUT/summary.txt)
# Files in $OUT (default benchmarks/out; the device tool returns at most 8): gpu_check.log (everything printed),
# summary.txt, train_results.json (every run's result dict), profiles.txt (the top-kernel tables), gpu_tests.log,
# details.tar.gz (every stage's stdout/stderr/JSON).
# Knobs: BUDGET_S, TEST_TIMEOUT (150), PER_TEST_TIMEOUT (150), LADDER_TIMEOUT (150), TWINS_TIMEOUT (90),
# COMPILE_TIMEOUT (240 per model), STEPS/REPEATS/WARMUP/COMPILE_WARMUP (10/3/3/6), PROFILE (3 steps),
# COMPILE_MODES ("reduce-overhead default"; empty: no compile stage), PY (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dbgen_gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT  # its files go to $OUT/details.tar.gz first
[ "${DEVICE:-cuda}" = cpu ] && DRY_RUN=1
DRY_RUN="${DRY_RUN:-0}"
START=$SECONDS
BUDGET_S="${BUDGET_S:-560}"
RESERVE_S=20  # kept for the summary
status=0
exec > >(tee "$OUT/gpu_check.log") 2>&1

V_PLAIN="plain:train.precision=fp32,train.channels_last=false"
V_BF16="bf16:train.precision=bf16,train.channels_last=false"
V_NHWC="bf16_nhwc:train.precision=bf16,train.channels_last=true"
if [ "$DRY_RUN" = 1 ]; then
  # The whole script on a CPU in ~2-3 minutes: tiny configs and batches, one thread (2 OpenMP threads on a
  # shared CPU run up to 100x slower). A cold inductor compile of the tiny Flow++ takes ~4-5 min on 2 cores:
  # its compile stage runs only with DRY_RUN_COMPILE_FLOWPP=1.
  DEV=cpu; RVAE=rvae_binary_tiny; FLOW=flowpp_binary_tiny
  RVAE_TWINS="rvae_fp_tiny rvae_binary_act_tiny"; FLOW_TWINS="flowpp_fp_tiny flowpp_binary_act_tiny"
  RVAE_BATCH=4; FLOW_BATCH=4
  COMMON="--device cpu --threads 1 --steps ${STEPS:-2} --repeats ${REPEATS:-2}"
  WARMUP="${WARMUP:-1}"; COMPILE_WARMUP="${COMPILE_WARMUP:-1}"; PROFILE="${PROFILE:-1}"
  COMPILE_MODES="${COMPILE_MODES-default}"
  TEST_TIMEOUT="${TEST_TIMEOUT:-120}"; LADDER_TIMEOUT="${LADDER_TIMEOUT:-120}"; TWINS_TIMEOUT="${TWINS_TIMEOUT:-120}"
  COMPILE_TIMEOUT_RVAE="${COMPILE_TIMEOUT:-180}"; COMPILE_TIMEOUT_FLOW="${COMPILE_TIMEOUT:-420}"
  export OMP_NUM_THREADS=1
else
  DEV=cuda; RVAE=rvae_cifar10_binary; FLOW=flowpp_cifar10_binary
  RVAE_TWINS="rvae_cifar10_fp rvae_cifar10_binary_act"; FLOW_TWINS="flowpp_cifar10_fp flowpp_cifar10_binary_act"
  RVAE_BATCH=128; FLOW_BATCH=64
  COMMON="--device cuda --steps ${STEPS:-10} --repeats ${REPEATS:-3}"
  WARMUP="${WARMUP:-3}"; COMPILE_WARMUP="${COMPILE_WARMUP:-6}"; PROFILE="${PROFILE:-3}"
  COMPILE_MODES="${COMPILE_MODES-reduce-overhead default}"
  TEST_TIMEOUT="${TEST_TIMEOUT:-150}"; LADDER_TIMEOUT="${LADDER_TIMEOUT:-150}"; TWINS_TIMEOUT="${TWINS_TIMEOUT:-90}"
  COMPILE_TIMEOUT_RVAE="${COMPILE_TIMEOUT:-240}"; COMPILE_TIMEOUT_FLOW="${COMPILE_TIMEOUT:-240}"
fi
echo "gpu_check: $(date -u +%FT%TZ) DRY_RUN=$DRY_RUN device=$DEV budget=${BUDGET_S}s work=$WORK out=$OUT"

# stage NAME MAX_S CMD...: run CMD under min(MAX_S, what the deadline leaves); stdout to the console and
# $WORK/NAME.log, stderr to $WORK/NAME.err (its tail shown on failure); the outcome goes to stages.tsv.
stage() {
  local name=$1 max=$2 t rc t0
  shift 2
  t=$((BUDGET_S - (SECONDS - START) - RESERVE_S))
  [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt 20 ]; then
    echo; echo "== $(date +%T) $name: SKIPPED (deadline: $((BUDGET_S - (SECONDS - START)))s left)"
    printf '%s\tskipped\t0\tno time left\n' "$name" >> "$WORK/stages.tsv"
    status=1
    return 0
  fi
  echo; echo "== $(date +%T) $name (timeout ${t}s)"
  t0=$SECONDS
  timeout --kill-after=10 "$t" "$@" > >(tee "$WORK/$name.log") 2> "$WORK/$name.err"
  rc=$?
  sleep 0.2  # let tee flush
  local outcome=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then outcome="TIMEOUT after ${t}s"; elif [ "$rc" -ne 0 ]; then outcome="FAILED rc=$rc"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$outcome" "$((SECONDS - t0))" "$*" >> "$WORK/stages.tsv"
  if [ "$outcome" != ok ]; then
    status=1
    echo "-- $name: $outcome; last lines of its stderr:"
    grep -v "^USDT" "$WORK/$name.err" | tail -15
  fi
  return 0
}

# bench NAME MAX_S BATCH CONFIGS VARIANT... [-- extra bench args]
bench() {
  local name=$1 max=$2 batch=$3 configs=$4 c args=()
  shift 4
  for c in $configs; do args+=(--config "configs/$c.yaml"); done
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=(--variant "$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  # shellcheck disable=SC2086
  stage "$name" "$max" $PY -m dbgen.bench train "${args[@]}" --batch "$batch" $COMMON "$@" \
    --json-out "$WORK/$name/results.json"
}

# best NAME: the fastest variant of a ladder's results as NAME:overrides (bf16_nhwc if the ladder gave none).
best() {
  $PY - "$WORK/$1/results.json" "$V_NHWC" <<'EOF'
import json, sys
try:
    rows = [r for r in json.load(open(sys.argv[1])) if "images_per_s" in r]
except (OSError, ValueError):
    rows = []
if rows:
    r = max(rows, key=lambda r: r["images_per_s"])
    print(f"{r['variant']}:{','.join(r['overrides'])}")
else:
    print(sys.argv[2])
EOF
}

# ---------------------------------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi \
  --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
stage env 60 $PY - "$DEV" <<'EOF'
import importlib, os, sys
import torch
cuda = torch.cuda.is_available()
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "device", torch.cuda.get_device_name() if cuda else "cpu",
      "cc", torch.cuda.get_device_capability() if cuda else "-", "cpus", os.cpu_count())
for m in ("triton", "numpy", "yaml", "pytest"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except ImportError:
        print(m, "MISSING")
import dbgen.bench.train  # noqa: F401  (the bench's whole import chain, dbgen.trainer included)
bad = [m for m in ("deepspeed", "ray") if m in sys.modules]
assert not bad, f"the bench imported {bad}"
assert cuda or sys.argv[1] == "cpu", "no CUDA device"
print("dbgen.bench.train imports without DeepSpeed and Ray: ok")
EOF
outcome() { awk -F'\t' -v n="$1" '$1 == n {print $2}' "$WORK/stages.tsv"; }
if [ "$(outcome env)" != ok ]; then echo "environment check failed: nothing else can run"; exit 2; fi

stage variants 60 $PY - "$RVAE $FLOW $RVAE_TWINS $FLOW_TWINS" "$V_PLAIN" "$V_BF16" "$V_NHWC" "$COMPILE_MODES reduce-overhead default" <<'EOF'
import sys
from dbgen.bench.train import parse_variant
from dbgen.config import load_config
configs, modes = sys.argv[1].split(), list(dict.fromkeys(sys.argv[-1].split()))
variants = [parse_variant(v) for v in sys.argv[2:-1]]
variants += [(f"compile_{m}", ["train.compile=true", f"train.compile_mode={m}"]) for m in modes]
for c in configs:
    for name, overrides in variants:
        load_config(f"configs/{c}.yaml", overrides)
print(f"{len(configs)} configs x {len(variants)} variants load")
EOF

if [ -f tests/test_step.py ]; then
  stage tests "$TEST_TIMEOUT" $PY -m pytest -q -m "gpu and not slow" tests/test_step.py -p no:cacheprovider \
    --junitxml="$WORK/gpu_tests.xml"
  cp "$WORK/tests.log" "$OUT/gpu_tests.log"
else
  echo; echo "== tests: tests/test_step.py is absent: no same-math GPU tests run"
  printf 'tests\tabsent\t0\ttests/test_step.py\n' >> "$WORK/stages.tsv"
fi
# pytest exits 5 when it collected nothing: not a failure of the code under test, but say it
[ "$(outcome tests)" = "FAILED rc=5" ] && echo "-- tests: pytest collected no test (rc 5)"

bench ladder_rvae "$LADDER_TIMEOUT" "$RVAE_BATCH" "$RVAE" "$V_PLAIN" "$V_BF16" "$V_NHWC" -- \
  --warmup "$WARMUP" --profile "$PROFILE"
bench ladder_flowpp "$LADDER_TIMEOUT" "$FLOW_BATCH" "$FLOW" "$V_PLAIN" "$V_BF16" "$V_NHWC" -- \
  --warmup "$WARMUP" --profile "$PROFILE"
BEST_RVAE=$(best ladder_rvae)
BEST_FLOW=$(best ladder_flowpp)
echo; echo "fastest eager variants: RVAE $BEST_RVAE; Flow++ $BEST_FLOW"

bench twins_rvae "$TWINS_TIMEOUT" "$RVAE_BATCH" "$RVAE_TWINS" "$BEST_RVAE" -- --warmup "$WARMUP"
bench twins_flowpp "$TWINS_TIMEOUT" "$FLOW_BATCH" "$FLOW_TWINS" "$BEST_FLOW" -- --warmup "$WARMUP"

compile_variants() {  # compile_variants BEST: the BEST variant + compile, once per mode in COMPILE_MODES
  local name=${1%%:*} ov=${1#*:} m suffix
  for m in $COMPILE_MODES; do
    case $m in default) suffix=compile ;; reduce-overhead) suffix=cudagraphs ;; *) suffix=$m ;; esac
    printf '%s\n' "${name}_${suffix}:${ov:+$ov,}train.compile=true,train.compile_mode=$m"
  done
}
mapfile -t CV_RVAE < <(compile_variants "$BEST_RVAE")
mapfile -t CV_FLOW < <(compile_variants "$BEST_FLOW")
# recompiles, graph breaks and skipped CUDA graphs are logged to the stage's stderr (counted in the summary)
export TORCH_LOGS="${TORCH_LOGS:-recompiles,graph_breaks,perf_hints}"
if [ -z "${COMPILE_MODES// /}" ]; then
  echo; echo "== compile stages: COMPILE_MODES is empty, none run"
else
  bench compile_rvae "$COMPILE_TIMEOUT_RVAE" "$RVAE_BATCH" "$RVAE" "${CV_RVAE[@]}" -- --warmup "$COMPILE_WARMUP" \
    --profile "$PROFILE"
  if [ "$DRY_RUN" = 1 ] && [ "${DRY_RUN_COMPILE_FLOWPP:-0}" != 1 ]; then
    echo; echo "== compile_flowpp: not in a DRY_RUN (DRY_RUN_COMPILE_FLOWPP=1 runs it: a cold CPU compile takes minutes)"
  else
    bench compile_flowpp "$COMPILE_TIMEOUT_FLOW" "$FLOW_BATCH" "$FLOW" "${CV_FLOW[@]}" -- --warmup "$COMPILE_WARMUP" \
      --profile "$PROFILE"
  fi
fi
unset TORCH_LOGS

# ---------------------------------------------------------------------------------------------------------
echo; echo "== $(date +%T) summary ($((SECONDS - START))s so far)"
$PY - "$WORK" "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, re, sys
from pathlib import Path
from dbgen.bench.train import format_table
work, out = Path(sys.argv[1]), Path(sys.argv[2])
order = ["ladder_rvae", "ladder_flowpp", "twins_rvae", "twins_flowpp", "compile_rvae", "compile_flowpp"]
results = []
for name in order:
    f = work / name / "results.json"
    rows = json.loads(f.read_text()) if f.exists() else []
    results += [dict(r, stage=name) for r in rows]
(out / "train_results.json").write_text(json.dumps(results, indent=1))
print("stages:")
for line in (work / "stages.tsv").read_text().splitlines():
    name, outcome, secs, *_ = line.split("\t")
    print(f"  {name:<16} {outcome:<24} {secs:>4}s")
tests = work / "tests.log"
if tests.exists():
    last = [ln for ln in tests.read_text().splitlines() if re.search(r"passed|failed|error|skipped|no tests", ln)]
    print("same-math tests (pytest -m gpu tests/test_step.py):", last[-1] if last else "no summary line")
print()
print(format_table(results) if results else "no bench results")
ok = [r for r in results if "images_per_s" in r]
if ok:
    print()
    print(f"{'config':<28} {'variant':<34} {'setup s':>7} {'warmup s':>8} {'fwd ms':>7} {'bwd ms':>7} "
          f"{'sync ms':>7} {'opt ms':>7} {'windows ms':<22} {'kern/step':>9} {'busy %':>6}")
    for r in ok:
        p, prof = r["phase_ms"], r.get("profile") or {}
        busy = prof.get("device_busy_fraction")
        windows = "/".join(f"{w:.1f}" for w in r["step_ms_windows"])
        print(f"{r['config'][:28]:<28} {r['variant'][:34]:<34} {r['setup_s']:>7.1f} {r['warmup_s']:>8.1f} "
              f"{p['forward']:>7.1f} {p['backward']:>7.1f} {p['communication']:>7.1f} {p['optimizer']:>7.1f} "
              f"{windows:<22} {prof.get('kernels_per_step', float('nan')):>9.0f} "
              f"{100 * busy if busy is not None else float('nan'):>6.0f}")
    print("# phase ms: CUDA-event times per step (forward includes the autocast casts; sync = grad norm); "
          "kern/step, busy %: kernels per step and device-busy time over wall time in the profiled steps")
for name in ("compile_rvae", "compile_flowpp"):
    err = work / f"{name}.err"
    if err.exists():
        text = err.read_text()
        counts = {k: len(re.findall(p, text, re.I)) for k, p in
                  (("recompiles", r"recompil"), ("graph breaks", r"graph break"),
                   ("skipped cudagraphs", r"skipping cudagraphs"))}
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (log lines in {name}.err)")
profiles = [p for name in order for p in sorted((work / name).glob("profile_*.txt"))]
with open(out / "profiles.txt", "w") as f:
    for p in profiles:
        f.write(f"===== {p.parent.name}/{p.name}\n{p.read_text()}\n")
print(f"{len(profiles)} profiles in {out / 'profiles.txt'}; all results in {out / 'train_results.json'}")
EOF
tar -czf "$OUT/details.tar.gz" -C "$WORK" . 2>/dev/null
echo "gpu_check done in $((SECONDS - START))s, status $status (details: $OUT/details.tar.gz)"
sleep 0.5  # let the log's tee finish
exit $status
