"""Test-wide settings. Imported before any test module, so child processes (ray start, Ray workers, ray job
submit, spawned process groups) inherit the environment set here.

Nothing left on the machine by an earlier run may help a test (a cache that happens to be warm, Ray's
``/tmp/ray``, a built extension): every cache and temp root a test can reach is pointed at a fresh folder made
for this pytest session and removed at its end:

* ``TORCH_EXTENSIONS_DIR``: DeepSpeed's JIT-compiled shared-memory comm op (built once per session, ~75 s);
* ``DBGEN_CACHE``: the built-in photos32 data set (built once per session from scikit-image's photographs);
* ``DBGEN_KERNEL_CACHE``: the nvcc-built CUDA kernels;
* ``RAY_TMPDIR``: Ray's default temp root (``ray.init()``'s session dirs, ``ray.cluster_utils``' address file).

The folder sits directly under ``/tmp`` with a short name: Ray puts unix sockets under its temp dir and their
paths must stay under 108 bytes. A developer iterating on one test file may set ``DBGEN_TEST_CACHE=DIR`` to
keep the two slow caches (extensions, photos32) in DIR between sessions; CI never sets it.
"""

import os
import shutil
import tempfile
from pathlib import Path

import limits
import pytest
import torch

# Ray resolves 127.0.0.1 to the host's primary interface address unless "cluster mode" is off; with it off,
# every Ray process of a test (GCS, raylet, workers, metrics agent, service-discovery file) stays on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Ray starts its worker processes at nice 15 so that the raylet and the driver stay responsive. Beside any
# CPU-heavy job at nice 0 (another CI job, scripts/test.sh --under-load's busy loops) that leaves the training
# workers ~3% of a core (CFS weight 36 against 1024), and a 20-step run takes longer than any sane deadline.
# The tests measure dbgen, not Ray's scheduling priority: they run Ray workers at the priority of the test.
os.environ.setdefault("RAY_worker_niceness", "0")

# With pytest-xdist (scripts/test.sh runs 3 workers) the controller makes the folder and its workers, which
# inherit the environment, share it: the DeepSpeed op and photos32 are built once per run (torch's build lock
# and photos32's atomic rename make a simultaneous first use safe), and only the controller removes it.
_SHARED = os.environ.get("DBGEN_TEST_SESSION_ROOT") if os.environ.get("PYTEST_XDIST_WORKER") else None
SESSION_ROOT = Path(_SHARED) if _SHARED else Path(tempfile.mkdtemp(prefix="dbt", dir="/tmp"))
os.environ["DBGEN_TEST_SESSION_ROOT"] = str(SESSION_ROOT)
_kept = Path(os.environ["DBGEN_TEST_CACHE"]).resolve() if os.environ.get("DBGEN_TEST_CACHE") else SESSION_ROOT
os.environ["TORCH_EXTENSIONS_DIR"] = str(_kept / "torch_extensions")
os.environ["DBGEN_CACHE"] = str(_kept / "dbgen")
os.environ["DBGEN_KERNEL_CACHE"] = str(SESSION_ROOT / "kernels")
os.environ["RAY_TMPDIR"] = str(SESSION_ROOT)


def pytest_sessionfinish(session, exitstatus):
    if not _SHARED:
        shutil.rmtree(SESSION_ROOT, ignore_errors=True)


# The longest files, longest first (measured in CI, 3 xdist workers, 2026-12-07): scheduled before the rest.
LONGEST_FILES = [
    "test_train_integrity.py",
    "test_train_cluster.py",
    "test_comm_train.py",
    "test_memory_planner.py",
    "test_scale_check.py",
    "test_readme.py",
    "test_kernels_device.py",
    "test_netns_cluster.py",
    "test_step.py",
    "test_data_ray.py",
    "test_monitoring_prometheus.py",
    "test_export.py",
]


# Per-test ceilings (``@pytest.mark.timeout(s)``) are written for an idle 2-core machine; they catch a hang,
# not a slow machine, so they are scaled: x2 by default (CI shares its host), more where the suite runs beside
# CPU hogs (``scripts/test.sh --under-load`` sets 5).
TIMEOUT_SCALE = limits.TIMEOUT_SCALE  # the waits inside the slow tests scale alike (tests/limits.py)


def pytest_collection_modifyitems(session, config, items):
    """The longest files first (:data:`LONGEST_FILES`), then the other files with slow tests, then the rest,
    each file's tests in their order. With xdist workers taking whole files, the long files then start at once
    and the many short ones fill the gaps, instead of a long file starting last. (Deterministic: every worker
    sorts alike.) Every timeout mark is scaled by :data:`TIMEOUT_SCALE`."""
    for item in items:
        mark = item.get_closest_marker("timeout")
        if mark is not None and mark.args:
            item.add_marker(pytest.mark.timeout(mark.args[0] * TIMEOUT_SCALE), append=False)
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    order = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}

    def rank(item):
        name = item.path.name
        first = LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
        return first, item.path not in slow_files, order[item.path]

    items.sort(key=rank)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Model tests run single-threaded: on 2 shared cores two OpenMP threads fighting other processes run up
    to 10x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
