#!/usr/bin/env bash
# The one prepared GPU check of dbgen.kernels (correctness and speed of the bitwise kernels), for a session
# with a lent H100/H200.
#
#   bash benchmarks/gpu_kernels_check.sh            # from the repo root; ~3-5 minutes
#   SANITIZE=1 bash benchmarks/gpu_kernels_check.sh # also compute-sanitizer memcheck + racecheck (~+3 min)
#
# Steps (each under its own timeout, so one hang cannot eat the lease): environment and imports (the device
# image has torch, numpy, pyyaml, pytest; nothing else is needed and nothing can be fetched there), nvcc build
# for the device's arch with the ptxas report and the tensor-core instructions found in the SASS, the GPU
# tests (pytest -m gpu tests/test_kernels_device.py), the benchmark (benchmarks/bench_kernels.py). Logs and
# JSON go to $OUT (the device tool's return folder) or benchmarks/out; the summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DBGEN_KERNEL_CACHE="${DBGEN_KERNEL_CACHE:-/tmp/dbgen_kernel_cache}"
export PYTHONDONTWRITEBYTECODE=1
status=0
step() { echo; echo "== $(date +%T) $*"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || status=1
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
nvcc --version | tail -2
$PY - <<'EOF' || { echo "missing Python packages: carry them as wheels (see the device README)"; exit 2; }
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(), "cc", torch.cuda.get_device_capability())
missing = [m for m in ("numpy", "yaml", "pytest") if importlib.util.find_spec(m) is None]
assert not missing, missing
import dbgen.kernels  # noqa: F401  (torch-only imports)
EOF

step "build (nvcc, device arch) + ptxas report + SASS tensor-core instructions"
timeout 240 $PY - <<'EOF' 2>&1 | tee "$OUT/build.log"
import os, re, shutil, subprocess, time, torch
from dbgen.kernels import cuda
t0 = time.time()
major, minor = torch.cuda.get_device_capability()
path = cuda.build_library(f"{major}{minor}")
cuda.library(torch.device("cuda"))  # loads the same cached build; checks the ABI
print(f"built {path} in {time.time() - t0:.1f}s")
shutil.copy(path.parent / "ptxas.log", os.path.join(os.environ["OUT"], "ptxas.log"))
log = (path.parent / "ptxas.log").read_text()
regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
spills = sorted(set(re.findall(r"(\d+) bytes spill stores", log)))
print(f"kernels: {len(regs)}, max registers: {max(regs)}, spill stores (bytes): {spills}")
if shutil.which("cuobjdump"):
    sass = subprocess.run(["cuobjdump", "--dump-sass", str(path)], capture_output=True, text=True).stdout
    ops = {}
    for op in re.findall(r"\b([BH]MMA\.[0-9A-Z.]+)", sass):
        ops[op] = ops.get(op, 0) + 1
    print("tensor-core SASS:", ops or "NONE FOUND")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "GPU tests (pytest -m gpu)"
timeout 360 $PY -m pytest -q -m gpu tests/test_kernels_device.py -p no:cacheprovider \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "benchmark"
timeout 300 $PY benchmarks/bench_kernels.py --json "$OUT/bench_kernels.json" 2>"$OUT/bench_kernels.err" \
  | tee "$OUT/bench_kernels.log" || { status=1; tail -20 "$OUT/bench_kernels.err"; }

if [ "${SANITIZE:-0}" = "1" ] && command -v compute-sanitizer >/dev/null; then
  step "compute-sanitizer (memcheck, racecheck) on small launches of every kernel"
  cat > /tmp/dbgen_sanitize.py <<'EOF'
import torch
from dbgen.kernels import cuda
from dbgen.kernels.packing import PackedWeight
dev = torch.device("cuda")
x = torch.randn(2, 37, 7, 6, device=dev)
pw = PackedWeight.from_signs(torch.randn(45, 37, 3, 3)).to(dev)
s, b = torch.rand(45, device=dev), torch.randn(45, device=dev)
cuda.pack_signs_cuda(x)
words = cuda.pack_activations_cuda(x, 1)
for tile, ks in ((0, 1), (0, 2), (1, 1), (1, 3), (2, 1), (3, 1)):
    cuda.bconv_cuda(words, 37, pw, s, b, (1, 1), (1, 1), tile=tile, ksplit=ks)
    cuda.bconv_cuda(words, 37, pw, s, b, (2, 2), (1, 1), tile=tile, ksplit=ks, pack_output=True)
    if tile < 2:
        for dt in (torch.float32, torch.bfloat16):
            cuda.pwconv_cuda(x.to(dt), pw, s, b, (1, 1), (1, 1), tile=tile, ksplit=ks)
torch.cuda.synchronize()
print("sanitize script done")
EOF
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 3 $PY /tmp/dbgen_sanitize.py 2>&1 \
      | tail -6 | tee "$OUT/sanitize_$tool.log" || status=1
  done
fi

step "summary (status $status)"
grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
grep -E "^(case|---|rvae|flowpp|goal|#)" "$OUT/bench_kernels.log" || echo "no benchmark table"
exit $status
