"""``python -m dbgen.bench scale --small``: the scale check's own pipeline (two ``dbgen.train`` runs on Ray, dp and
packed, workers' peak memory from /proc and bytes per step from their Prometheus counters) on the tiny RVAE."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from limits import patience
from ray_cluster import free_port

from dbgen.sync.layout import slice_size

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scale_check_small_mode(tmp_path):
    out = tmp_path / "scale.json"
    cmd = [
        sys.executable,
        "-m",
        "dbgen.bench",
        "scale",
        "--small",
        "--modes",
        "dp,packed",
        "--steps",
        "20",
        "--batch",
        "8",
        "--port",
        str(free_port()),
        "--storage",
        str(tmp_path / "runs"),
        "--json-out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=patience(560), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    dp, packed = res["runs"]["small-dp"], res["runs"]["small-packed"]
    P, B = 4 * dp["params"], 4 * dp["binary_params"]
    S = 4 * slice_size(dp["binary_params"], 2)
    for run in (dp, packed):
        assert [w["rank"] for w in run["workers"]] == [0, 1]
        assert all(w["peak_rss"] > 100 * 2**20 for w in run["workers"])  # a Ray worker with torch loaded
    # Gradient and weight bytes per step from the workers' counters are the formulas of tests/test_comm.py (gloo,
    # 2 workers): dp all-reduces every gradient (2 (W-1)/W P = P); packed all-reduces F, reduce-scatters the
    # latents' gradient (its slice S leaves) and all-gathers 1/8 of its slice as signs. "other" is the
    # trainer's few small per-step agreements (the norm's max, stop flags): tens of bytes.
    for w in dp["workers"]:
        kinds = w["bytes_per_step_by_kind"]
        assert (kinds["grad"], kinds.get("weight", 0)) == (P, 0) and 0 < kinds["other"] < 64, kinds
    for w in packed["workers"]:
        kinds = w["bytes_per_step_by_kind"]
        assert (kinds["grad"], kinds["weight"]) == ((P - B) + S, S // 32) and 0 < kinds["other"] < 64, kinds
    # the planner: packed holds 1/W of the latents' Adam state and master copy
    assert packed["planned"]["optimizer"] < dp["planned"]["optimizer"]
