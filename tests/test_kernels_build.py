"""The CUDA kernels compile for Hopper (sm_90) wherever nvcc exists, GPU or not, and the ctypes bindings
match the C entry points. Running them needs a GPU: tests/test_kernels_gpu.py."""

import ctypes
import re

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
    # The weight-stationary binary tiles (template flag STATIONARY = true, the last "Lb1E") run 2 blocks per SM
    # of 256 threads: at most 128 registers each.
    regs = dict(re.findall(r"Compiling entry function '(\w+)' for 'sm_90'.*?Used (\d+) registers", log, re.S))
    stationary = {k: int(v) for k, v in regs.items() if "bconv_kernel" in k and k.endswith("Lb1EEEvNS_11BconvParamsE")}
    assert len(stationary) == 4 and max(stationary.values()) <= 128, stationary


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
