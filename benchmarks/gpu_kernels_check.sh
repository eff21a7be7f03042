#!/usr/bin/env bash
# The one prepared GPU check of dbgen.kernels (correctness and speed of the bitwise kernels), for a session
# with a lent H100/H200. Nothing to install: it needs torch, numpy, pyyaml, pytest (the device image has them)
# and uses dbgen from this checkout through PYTHONPATH.
#
#   bash benchmarks/gpu_kernels_check.sh             # from anywhere; never over BUDGET_S (540 s, build included)
#   SANITIZE=1 bash benchmarks/gpu_kernels_check.sh  # also compute-sanitizer memcheck + racecheck, last
#   DRY_RUN=1 bash benchmarks/gpu_kernels_check.sh   # the same steps on a CPU, in well under a minute
#
# Steps, all under one deadline (BUDGET_S from the start, so one device call of at most 600 s holds the whole
# script): each step's timeout is its own maximum cut to what the deadline leaves (minus RESERVE_S for the
# summary), and a step that would start with under 20 s is skipped.
#   env       versions, device, imports
#   build     nvcc for the device's arch (the ptxas report: registers, spills) and the tensor-core instructions in
#             the SASS (expect BMMA.168256.AND.POPC and HMMA.16816.F32.BF16); DRY_RUN: the host emulation (g++)
#   tests     pytest -m gpu tests/test_kernels_device.py (DRY_RUN: the same command; every test skips on a CPU)
#   bench     benchmarks/bench_kernels.py, the table against cuDNN bf16 (DRY_RUN: the CPU reference, one case)
#   sanitize  SANITIZE=1: compute-sanitizer memcheck and racecheck on small launches of every kernel config
#             (DRY_RUN: the same launches on the host emulation, without the sanitizer)
# Files in $OUT (default benchmarks/out; the device tool returns at most 8, this writes at most 6):
#   gpu_kernels_check.log (everything printed), summary.txt, ptxas.log, gpu_tests.xml, bench_kernels.json,
#   sanitize.log (SANITIZE=1).
# Knobs: BUDGET_S (540), RESERVE_S (15), BUILD_TIMEOUT (240), TEST_TIMEOUT (240), BENCH_TIMEOUT (300),
# SANITIZE_TIMEOUT (120 per tool), PY (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DBGEN_KERNEL_CACHE="${DBGEN_KERNEL_CACHE:-/tmp/dbgen_kernel_cache}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
START=$SECONDS
BUDGET_S="${BUDGET_S:-540}"
RESERVE_S="${RESERVE_S:-15}"
DRY_RUN="${DRY_RUN:-0}"
SANITIZE="${SANITIZE:-0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dbgen_kernels_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
status=0
exec > >(tee "$OUT/gpu_kernels_check.log") 2>&1
[ "$DRY_RUN" = 1 ] && export OMP_NUM_THREADS=1  # a shared CPU: more threads only contend
echo "gpu_kernels_check: $(date -u +%FT%TZ) DRY_RUN=$DRY_RUN SANITIZE=$SANITIZE budget=${BUDGET_S}s out=$OUT"

# step NAME MAX_S CMD...: run CMD under min(MAX_S, what the deadline leaves); the outcome goes to steps.tsv.
step() {
  local name=$1 max=$2 left t rc t0 outcome=ok
  shift 2
  left=$((BUDGET_S - (SECONDS - START)))
  t=$((left - RESERVE_S))
  [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt 20 ]; then
    echo; echo "== $(date +%T) $name: SKIPPED (deadline: ${left}s left)"
    printf '%s\tskipped (deadline)\t0\n' "$name" >> "$WORK/steps.tsv"
    status=1
    return 0
  fi
  echo; echo "== $(date +%T) $name (timeout ${t}s, ${left}s left)"
  t0=$SECONDS
  timeout --kill-after=5 "$t" "$@"
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then outcome="TIMEOUT after ${t}s"; elif [ "$rc" -ne 0 ]; then outcome="FAILED rc=$rc"; fi
  [ "$outcome" = ok ] || status=1
  printf '%s\t%s\t%s\n' "$name" "$outcome" "$((SECONDS - t0))" >> "$WORK/steps.tsv"
  return 0
}
outcome() { awk -F'\t' -v n="$1" '$1 == n {print $2}' "$WORK/steps.tsv"; }

# ---------------------------------------------------------------------------------------------------------
if [ "$DRY_RUN" != 1 ]; then
  command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv,noheader
  nvcc --version | tail -2
fi
cat > "$WORK/env.py" <<'EOF'
import importlib.util, sys
import torch
cuda = torch.cuda.is_available()
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if cuda else "cpu", "cc", torch.cuda.get_device_capability() if cuda else "-")
missing = [m for m in ("numpy", "yaml", "pytest") if importlib.util.find_spec(m) is None]
assert not missing, f"missing Python packages {missing}: carry them as wheels (see the device README)"
from dbgen.kernels import cuda as kc
print("kernel source:", kc.kernel_source())
assert cuda or sys.argv[1] == "1", "no CUDA device (DRY_RUN=1 runs this script on a CPU)"
EOF
step env 60 $PY "$WORK/env.py" "$DRY_RUN"
if [ "$(outcome env)" != ok ]; then echo "environment check failed: nothing else can run"; exit 2; fi

cat > "$WORK/build.py" <<'EOF'
import os, re, shutil, subprocess, sys, time
from pathlib import Path
import torch
from dbgen.kernels import cuda
out, dry = Path(os.environ["OUT"]), sys.argv[1] == "1"
t0 = time.time()
if dry:  # the same source on the host emulation: what the CPU can check of this step
    path = cuda.build_emulator(Path(sys.argv[2]))
    cuda.load_library(path)
    print(f"built the host emulation {path} in {time.time() - t0:.1f}s (DRY_RUN: no nvcc, no SASS)")
    sys.exit(0)
major, minor = torch.cuda.get_device_capability()
path = cuda.build_library(f"{major}{minor}")
cuda.library(torch.device("cuda"))  # loads the same cached build; checks the ABI
print(f"built {path} in {time.time() - t0:.1f}s")
shutil.copy(path.parent / "ptxas.log", out / "ptxas.log")
log = (path.parent / "ptxas.log").read_text()
regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
spills = sorted(set(re.findall(r"(\d+) bytes spill stores", log)))
print(f"kernels: {len(regs)}, max registers: {max(regs)}, spill stores (bytes): {spills}")
if shutil.which("cuobjdump"):
    sass = subprocess.run(["cuobjdump", "--dump-sass", str(path)], capture_output=True, text=True).stdout
    ops = {}
    for op in re.findall(r"\b([BH]MMA\.[0-9A-Z.]+|LDGSTS[0-9A-Z.]*|LDS\.128)", sass):  # mma, cp.async, LDS.128
        ops[op] = ops.get(op, 0) + 1
    print("tensor-core / cp.async / 128-bit shared-load SASS:", ops or "NONE FOUND")
EOF
step build "${BUILD_TIMEOUT:-240}" $PY "$WORK/build.py" "$DRY_RUN" "$WORK/emu"

step tests "${TEST_TIMEOUT:-240}" $PY -m pytest -q -m gpu tests/test_kernels_device.py -p no:cacheprovider \
  --junitxml="$OUT/gpu_tests.xml"

if [ "$DRY_RUN" = 1 ]; then
  step bench "${BENCH_TIMEOUT:-300}" $PY benchmarks/bench_kernels.py --batches 1 --cases flowpp_gate1x1 \
    --json "$OUT/bench_kernels.json"
else
  step bench "${BENCH_TIMEOUT:-300}" $PY benchmarks/bench_kernels.py --json "$OUT/bench_kernels.json"
fi

if [ "$SANITIZE" = 1 ]; then
  cat > "$WORK/sanitize.py" <<'EOF'
import sys
from pathlib import Path
import torch
from dbgen.kernels import cuda
from dbgen.kernels.packing import PackedWeight
if torch.cuda.is_available():
    dev = torch.device("cuda")
else:  # DRY_RUN: the same launches on the host emulation
    dev = torch.device("cpu")
    built = Path(sys.argv[1]) / "libdbgen_kernels_emu.so"  # the build step's
    cuda.set_emulator(cuda.load_library(built if built.is_file() else cuda.build_emulator(Path(sys.argv[1]))))
x = torch.randn(2, 37, 7, 6, device=dev)
pw = PackedWeight.from_signs(torch.randn(45, 37, 3, 3)).to(dev)
s, b = torch.rand(45, device=dev), torch.randn(45, device=dev)
cuda.pack_signs_cuda(x)
words = cuda.pack_activations_cuda(x, 1)
cuda.pack_activations_cuda(x.contiguous(memory_format=torch.channels_last), 1)
for tile, ks in ((0, 1), (0, 2), (1, 1), (1, 3), (2, 1), (3, 1)):
    cuda.bconv_cuda(words, 37, pw, s, b, (1, 1), (1, 1), tile=tile, ksplit=ks)
    cuda.bconv_cuda(words, 37, pw, s, b, (2, 2), (1, 1), tile=tile, ksplit=ks, pack_output=True)
    if tile < 2:
        for dt in (torch.float32, torch.bfloat16):
            cuda.pwconv_cuda(x.to(dt), pw, s, b, (1, 1), (1, 1), tile=tile, ksplit=ks)
x9 = torch.randn(1, 256, 5, 4, device=dev)  # K = 9 steps of 16-byte copies: tile 4 (A in registers) runs
pw9 = PackedWeight.from_signs(torch.randn(40, 256, 3, 3)).to(dev)
for tile in (2, 3, 4):
    cuda.bconv_cuda(cuda.pack_activations_cuda(x9, 1), 256, pw9, None, None, (1, 1), (1, 1), tile=tile)
if dev.type == "cuda":
    torch.cuda.synchronize()
print("sanitize script done on", dev)
EOF
  if [ "$DRY_RUN" = 1 ]; then
    step sanitize "${SANITIZE_TIMEOUT:-120}" $PY "$WORK/sanitize.py" "$WORK/emu" > >(tee "$OUT/sanitize.log")
  elif command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
      echo "----- $tool" >> "$OUT/sanitize.log"
      step "sanitize_$tool" "${SANITIZE_TIMEOUT:-120}" compute-sanitizer --tool "$tool" --error-exitcode 3 \
        $PY "$WORK/sanitize.py" "$WORK/emu" > >(tee -a "$OUT/sanitize.log")
    done
  else
    echo; echo "== sanitize: compute-sanitizer not found"
    printf 'sanitize\tFAILED (no compute-sanitizer)\t0\n' >> "$WORK/steps.tsv"
    status=1
  fi
fi

# ---------------------------------------------------------------------------------------------------------
sleep 0.5  # let the tees flush
{
  echo "gpu_kernels_check summary: DRY_RUN=$DRY_RUN SANITIZE=$SANITIZE, $((SECONDS - START))s of ${BUDGET_S}s"
  echo "steps:"
  awk -F'\t' '{printf "  %-18s %-24s %5ss\n", $1, $2, $3}' "$WORK/steps.tsv"
  echo "tests: $(grep -E "[0-9]+ (passed|failed|skipped|deselected|errors?)\b.* in [0-9.]+s|no tests ran" \
    "$OUT/gpu_kernels_check.log" | tail -1)"
  grep -E "^(case|---|rvae|flowpp|goal|#)" "$OUT/gpu_kernels_check.log" || echo "no benchmark table"
  echo "status $status"
} > "$OUT/summary.txt"
echo; cat "$OUT/summary.txt"
exit $status
