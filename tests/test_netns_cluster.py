"""Two Ray nodes in two network namespaces joined by a rate-limited veth pair (benchmarks/netns_cluster.sh), one
training worker on each: what crosses the link is what dbgen's byte accounting says.

Also the link model (dbgen.linkmodel) behind ``python -m dbgen.inspect --link-gbps``: its per-mode bytes are the
accounting's (checked against a real 1-bit step here and in benchmarks/RESULTS.md's sweep), and the rate it
says a mode needs puts that mode exactly at the slowdown bound.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from dbgen.linkmodel import MODES, OVERLAPPED_MODES, overlapped_step_s, step_bytes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "netns_cluster.sh"
CONFIG = "configs/rvae_binary_tiny.yaml"


def _namespaces_unavailable() -> str | None:
    """Why this host cannot run the namespace cluster (None when it can): a namespace is created and removed."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "no iproute2 (ip, tc)"
    probe = f"dbncprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process that its new parent, init, has not reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_onebit_steps_across_a_rate_limited_link_send_what_dbgen_counts():
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    up = subprocess.run(["bash", str(SCRIPT), "up", "1gbit", "0"], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr[-4000:]
    cluster = up.stdout.strip().splitlines()[-1]
    ns_a = Path(cluster, "id").read_text().strip() + "a"
    pids = [int(p) for p in Path(cluster, "pids").read_text().split()]
    try:
        bench = subprocess.run(
            [
                "bash",
                str(SCRIPT),
                "exec",
                cluster,
                sys.executable,
                "-m",
                "dbgen.bench",
                "comm",
                "--config",
                CONFIG,
                "--workers",
                "2",
                "--steps",
                "3",
                "--modes",
                "packed_onebit",
                "--links",
                "1gbit/0",
                "--set-link",
                f"bash {SCRIPT} set {cluster}",
                "--json",
                "scale.placement_strategy=STRICT_SPREAD",
                # width 64: ~0.8 MB of 1-bit traffic per step, so Ray's own background traffic (a few KB per step,
                # estimated from an idle window) stays a few percent of it; at the default width 16 (50 KB per step)
                # its variation alone once put the wire count 30% over
                "model.width=64",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-6000:]
    finally:
        down = subprocess.run(["bash", str(SCRIPT), "down", cluster], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert ns_a not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for pid in pids:
        assert not _running(pid), f"ray start {pid} still runs after down"
    assert not Path(cluster).exists()

    (r,) = json.loads(bench.stdout.strip().splitlines()[-1])["modes"]
    assert r["link_rate"] == "1gbit" and r["final_loss"] < 12
    # the accounting's count is the link model's formula (compressed from the first timed step on) ...
    assert r["total_bytes_per_step"] == sum(step_bytes("packed_onebit", r["params"], r["binary_params"], 2).values())
    # ... and what rank 0's namespace put on the wire in those steps (its worker is alone there: with both
    # workers on one node nothing would cross), less Ray's own traffic (the bench measures its rate with rank 0
    # idle right after the steps); the rest is TCP/IP headers and acknowledgements, ~5-7% at the veth's MTU
    on_link = r["link_tx_bytes_per_step"] - r["link_idle_tx_bytes_per_s"] * r["step_s"]
    assert abs(on_link - r["total_bytes_per_step"]) <= 0.10 * r["total_bytes_per_step"], (on_link, r)


def test_inspect_link_rates_put_each_mode_at_the_bound(capsys):
    """``dbgen.inspect --link-gbps``: per mode the accounting's bytes (the 1-bit step's count above; the others'
    in test_comm.py's formulas), and at the rate it says a mode needs that mode's link time is 10% of the step."""
    from dbgen.inspect import main

    assert main(["--config", str(ROOT / CONFIG), "--link-gbps", "1", "--step-ms", "50", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    link = report["link"]
    assert [r["mode"] for r in link["modes"]] == list(MODES) and link["step_s"] == 0.05
    P, B = report["params"], report["binary_params"]
    for r in link["modes"]:
        assert r["bytes_per_step"] == sum(step_bytes(r["mode"], P, B, 2).values())
        assert r["comm_s"] == pytest.approx(8 * r["bytes_per_step"] / 1e9)
        assert 8 * r["bytes_per_step"] / (r["needed_gbps"] * 1e9) == pytest.approx(0.1 * 0.05)
        if r["mode"] not in OVERLAPPED_MODES:  # zero1 keeps DeepSpeed's serial schedule
            assert r["needed_gbps_overlapped"] == r["needed_gbps"]
            continue
        # overlapped: at the rate it names, the modelled step is 10% over compute, and at a tenth more it is under
        kinds = step_bytes(r["mode"], P, B, 2)
        assert overlapped_step_s(kinds, 0.05, r["needed_gbps_overlapped"]) == pytest.approx(1.1 * 0.05)
        assert overlapped_step_s(kinds, 0.05, 1.1 * r["needed_gbps_overlapped"]) < 1.1 * 0.05
        assert r["needed_gbps_overlapped"] < r["needed_gbps"]
    by = {r["mode"]: r["bytes_per_step"] for r in link["modes"]}
    assert by["packed_onebit"] < by["packed"] < by["dp"] < by["zero1"]
    assert main(["--config", str(ROOT / CONFIG), "--link-gbps", "0"]) == 2  # a bad rate is refused, not divided by
