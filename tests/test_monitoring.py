"""Monitoring: metric definitions, the shipped Prometheus/Grafana files, the prometheus_client exporter."""

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from ray_cluster import free_port

from dbgen.metrics import METRICS, TrainMetrics, exported_name, metrics_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_dashboard_queries_name_only_exported_metrics():
    dash = json.loads((ROOT / "cluster/grafana/dbgen.json").read_text())
    exported = {exported_name(m) for m in METRICS}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    used = {name for e in exprs for name in re.findall(r"\bray_dbgen_\w+", e)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "bits/dim", "step time breakdown", "communication", "skipped"):
        assert topic in titles


def test_prometheus_config_discovers_ray_nodes():
    cfg = yaml.safe_load((ROOT / "cluster/prometheus.yml").read_text())
    ray_job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ray")
    assert ray_job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_prometheus_config():
    out = subprocess.run(
        ["promtool", "check", "config", str(ROOT / "cluster/prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_metric_reference_table_is_current():
    assert metrics_markdown() in (ROOT / "docs" / "monitoring.md").read_text()


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("ray_dbgen_"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def test_a_taken_metrics_port_is_a_fatal_error_naming_key_port_rank_and_host():
    """The exporter of rank 1 finds its port (metrics_port + 1) taken: one fatal error (not retried by Ray Train,
    dbgen.failures) that names the key, the port, the rank and the host, raised before any step."""
    import socket

    from dbgen.failures import FATAL_ERRORS
    from dbgen.resources import HostResourceError

    base = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + 1))
        holder.listen()
        with pytest.raises(HostResourceError) as info:
            TrainMetrics("r1", 1, "rvae", "abc123", backend="http", port=base)
    message = str(info.value)
    assert f"train.metrics_port={base}" in message and f"port {base + 1}" in message
    assert "rank 1" in message and socket.gethostname() in message
    assert isinstance(info.value, FATAL_ERRORS)
    m = TrainMetrics("r1", 1, "rvae", "abc123", backend="http", port=base)  # free again: served as before
    m.close()


def test_http_exporter_serves_recorded_values_on_loopback():
    port = free_port()
    m = TrainMetrics("r1", 0, "rvae", "abc123", backend="http", port=port)
    try:
        for _ in range(3):
            m.record_step(
                {
                    "grad_norm": 2.0,
                    "lr": 1e-3,
                    "skipped": False,
                    "t_forward": 0.25,
                    "t_backward": 0.5,
                    "comm_bytes": {"grad": 1000},
                },
                images=32,
            )
        m.record_step({"skipped": True, "comm_bytes": {"weight": 24}}, images=32)
        m.record_interval(train_bpd=5.0, step_s=0.8, images_per_s=40.0, job_images_per_s=80.0, peak_memory_bytes=1024)
        m.record_eval(4.75)
        m.record_checkpoint(1.5, 4096)
        with pytest.raises(ValueError, match="kind 'bogus'"):
            m.add_comm_bytes("bogus", 1)
        v = scrape(port)
    finally:
        m.close()
    w = 'run="r1",worker="0"'
    assert v[f"ray_dbgen_steps_total{{{w}}}"] == 4
    assert v[f"ray_dbgen_skipped_steps_total{{{w}}}"] == 1
    assert v[f"ray_dbgen_images_total{{{w}}}"] == 128
    assert v[f'ray_dbgen_step_phase_seconds_total{{kind="backward",{w}}}'] == 1.5
    assert v[f"ray_dbgen_train_bpd{{{w}}}"] == 5.0
    assert v['ray_dbgen_job_images_per_second{run="r1"}'] == 80.0
    assert v['ray_dbgen_eval_bpd{run="r1"}'] == 4.75
    assert v[f'ray_dbgen_comm_bytes_total{{kind="weight",{w}}}'] == 24
    assert v[f'ray_dbgen_comm_bytes_total{{kind="grad",{w}}}'] == 3000
    assert v[f"ray_dbgen_grad_norm{{{w}}}"] == 2.0
    assert v['ray_dbgen_run_info{config_hash="abc123",model="rvae",run="r1"}'] == 1
