"""The CUDA kernels compile for Hopper (sm_90) wherever nvcc exists, GPU or not, and the ctypes bindings
match the C entry points. Running them needs a GPU: tests/test_kernels_gpu.py."""

import ctypes
import re
import subprocess

import pytest

from dbgen.kernels import cuda

try:
    NVCC, REASON = cuda.find_nvcc(), ""
except cuda.KernelUnavailable as e:
    NVCC, REASON = None, str(e)

pytestmark = pytest.mark.skipif(NVCC is None, reason=REASON)

_CTYPE = {"int": ctypes.c_int, "long long": ctypes.c_longlong}


def _c_signatures(source: str) -> dict[str, list]:
    """``DBGEN_API <ret> name(<params>)`` -> ctypes types of the params (pointers -> c_void_p)."""
    sigs = {}
    for name, params in re.findall(r"DBGEN_API\s+[\w\s\*]+?\b(\w+)\(([^)]*)\)", source):
        types = []
        for param in filter(None, (q.strip() for q in params.split(","))):
            ctype = param.rsplit(None, 1)[0].replace("const ", "").strip()
            types.append(ctypes.c_void_p if "*" in param else _CTYPE[ctype])
        sigs[name] = types
    return sigs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    path = cuda.build_library("90", out_dir=out, nvcc=NVCC)
    return path, out / "ptxas.log"


def test_kernels_compile_for_sm90_without_spills(built):
    path, ptxas_log = built
    assert path.is_file() and path.stat().st_size > 0
    log = ptxas_log.read_text()
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", log)
    for name in ("bconv_kernel", "pwconv_kernel", "pack_signs_kernel", "pack_act_kernel", "pack_act_nhwc_kernel"):
        assert any(name in k for k in kernels), f"{name} missing from the build"
    # Register arrays indexed at run time or too many live values would show as stack frames / spills.
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert frames and all(f == ("0", "0", "0") for f in frames), frames
    # The weight-stationary binary tiles (template flag STATIONARY = true) with KSTEPS = 0 run 2 blocks per SM of
    # 256 threads: at most 128 registers each. KSTEPS = 9 (tile 4, A fragments in registers) runs 1 per SM.
    regs = dict(re.findall(r"Compiling entry function '(\w+)' for 'sm_90'.*?Used (\d+) registers", log, re.S))
    stationary = {}
    for name, used in regs.items():
        m = re.search(r"bconv_kernelI(?:Li\d+E){4}Lb[01]ELb1ELi(\d+)E", name)
        if m:
            stationary.setdefault(int(m[1]), []).append(int(used))
    assert len(stationary[0]) == 4 and max(stationary[0]) <= 128, stationary
    assert len(stationary[9]) == 2, stationary


def test_binary_conv_ptx_uses_the_cp_async_ring_and_128_bit_fragment_loads(tmp_path):
    """Every binary conv tile stages its K steps with cp.async (16-byte .cg copies when Cw % 8 == 0, else 4-byte
    .ca) and waits with wait_group 2 (a 4-stage ring: 2 groups may stay in flight); the weight-stationary tiles
    (2 m-tiles per warp) read each A fragment, stored in fragment order, with one 128-bit shared load."""
    ptx = tmp_path / "kernels.ptx"
    cmd = [NVCC, "-O3", "-std=c++17", "-ptx", "-arch=sm_90", "-o", str(ptx), str(cuda.kernel_source())]
    subprocess.run(cmd, check=True, capture_output=True)
    entries = re.findall(
        r"\.entry (\w*bconv_kernelILi\d+ELi\d+ELi\d+ELi\d+ELb(\d)ELb(\d)E\w*)(.*?)\n}", ptx.read_text(), re.S
    )
    assert len(entries) == 10, [e[0] for e in entries]  # tiles 0-3 and 4 (KSTEPS = 9) x (aligned, not)
    for name, aligned, stationary, body in entries:
        assert "cp.async.commit_group;" in body and "cp.async.wait_group 2;" in body, name
        assert ("cp.async.cg.shared.global" if aligned == "1" else "cp.async.ca.shared.global") in body, name
        if stationary == "1":
            assert body.count("ld.shared.v4.u32") >= 2, name


def test_bindings_match_c_entry_points(built):
    path, _ = built
    lib = cuda.load_library(path)  # dlopen works without a driver: nothing runs
    assert lib.dbgen_abi_version() == cuda.ABI_VERSION
    sigs = _c_signatures(cuda.kernel_source().read_text())
    assert {"dbgen_pack_signs", "dbgen_pack_activations", "dbgen_bconv", "dbgen_pwconv"} <= set(sigs)
    for name, types in sigs.items():
        declared = getattr(lib, name).argtypes or []
        assert list(declared) == types, f"{name}: ctypes {declared} != C {types}"
    assert lib.dbgen_error_string(0).decode() == "no error"
