"""benchmarks/gpu_kernels_check.sh end to end on the CPU (DRY_RUN=1, SANITIZE=1): every step runs and passes,
each step's timeout is cut to the one global deadline, and at most 8 files land in OUT (what the device tool
returns)."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAN_EMULATE = shutil.which("g++") is not None and Path("/usr/local/cuda/include/cuda_bf16.h").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not CAN_EMULATE, reason="needs g++ and CUDA headers (the DRY_RUN build is the host emulation)")
def test_gpu_kernels_check_dry_run(tmp_path):
    out = tmp_path / "out"
    budget = 540
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "SANITIZE": "1",
        "OUT": str(out),
        "PY": sys.executable,
        "TMPDIR": str(tmp_path),
        "BUDGET_S": str(budget),
    }
    t0 = time.monotonic()
    p = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_kernels_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=budget + 60,
    )
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stdout[-4000:]
    assert elapsed < budget
    files = {f.name for f in out.iterdir()}
    assert {"gpu_kernels_check.log", "summary.txt", "gpu_tests.xml", "bench_kernels.json", "sanitize.log"} <= files
    assert len(files) <= 8 and all(f.is_file() for f in out.iterdir())
    summary = (out / "summary.txt").read_text()
    for name in ("env", "build", "tests", "bench", "sanitize"):
        assert re.search(rf"^  {name} +ok ", summary, re.M), summary
    # Each step's timeout is at most what the deadline left when it started (minus the summary's reserve).
    starts = re.findall(r"^== \S+ (\w+) \(timeout (\d+)s, (\d+)s left\)", p.stdout, re.M)
    assert [s[0] for s in starts] == ["env", "build", "tests", "bench", "sanitize"]
    assert all(int(t) <= int(left) - 15 for _, t, left in starts), starts
    assert "sanitize script done on cpu" in (out / "sanitize.log").read_text()
