"""The kernel sources ship inside the installed package: a wheel built from this checkout holds them, and an
install of that wheel (the checkout not importable, cwd elsewhere) finds them through the package and builds
them: the CPU kernels, and the CUDA kernels' host emulation of the same source (nvcc would take the same path
on a GPU machine)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_INCLUDE = Path("/usr/local/cuda/include")

# Run from the installed copy: the source it found, the emulator built from it, one kernel against the reference.
PROBE = """
import sys, tempfile
from pathlib import Path
import torch
import dbgen
from dbgen.kernels import cuda
from dbgen.kernels.packing import PackedWeight
from dbgen.kernels.reference import binary_conv2d_ref, pack_activations_ref
target = Path(sys.argv[1]).resolve()
src = cuda.kernel_source()
assert Path(dbgen.__file__).resolve().is_relative_to(target), dbgen.__file__
assert src.resolve().is_relative_to(target) and src.parent.name == "_kernels_src", src
cuda.set_emulator(cuda.load_library(cuda.build_emulator(Path(tempfile.mkdtemp()))))
g = torch.Generator().manual_seed(0)
x, w = torch.randn(1, 40, 4, 3, generator=g), torch.randn(24, 40, 3, 3, generator=g)
pa, pw = pack_activations_ref(x, 1), PackedWeight.from_signs(w)
got = cuda.bconv_cuda(pa.words, 40, pw, None, None, (1, 1), (1, 1), tile=0, ksplit=1)
assert torch.equal(got, binary_conv2d_ref(pa, pw, None, None, (1, 1), (1, 1)))
from dbgen.kernels import cpu
cpu.build_library(Path(tempfile.mkdtemp()))  # from the installed source
assert cpu.sources.kernel_source(cpu.SOURCE_NAME).resolve().is_relative_to(target)
a, b = torch.randint(-9, 9, (5, 7), dtype=torch.int32), torch.randint(-9, 9, (3, 7), dtype=torch.int32)
from dbgen.kernels.reference import and_popcount_matmul
assert torch.equal(cpu.and_popcount_matmul(a, b), and_popcount_matmul(a, b))
print("installed kernels ok:", src)
"""


def _run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert p.returncode == 0, f"{cmd}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.skipif(
    shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_bf16.h").is_file(),
    reason="needs g++ and CUDA headers (the host emulation build)",
)
def test_wheel_ships_and_builds_the_kernels(tmp_path):
    # Build from a copy of what the build reads, so that no build/ or egg-info lands in the checkout.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dbgen", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("dbgen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in sorted((ROOT / "kernels").iterdir()):
        if f.suffix in (".cu", ".h", ".cpp"):
            assert f"dbgen/_kernels_src/{f.name}" in names, f"{f.name} missing from {wheel.name}"
    # Every module of the package is in the wheel (pyproject lists the packages explicitly).
    for f in (ROOT / "dbgen").rglob("*.py"):
        assert f.relative_to(ROOT).as_posix() in names, f"{f.relative_to(ROOT)} missing from {wheel.name}"

    target = tmp_path / "site"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-compile",
            "--target",
            str(target),
            str(wheel),
        ],
        cwd=tmp_path,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # PYTHONPATH puts the installed copy before site-packages (where an editable install may point at ROOT).
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path), "PYTHONNOUSERSITE": "1"}
    p = _run([sys.executable, "-c", PROBE, str(target)], cwd=elsewhere, env=env)
    assert "installed kernels ok" in p.stdout
