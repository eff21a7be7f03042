"""A real Prometheus server scrapes a real 2-worker training job through the project's scrape config.

``prometheus`` (Debian's package; .ci/run installs it) runs on 127.0.0.1 with its own port and data dir and a
1 s scrape interval; its config is cluster/prometheus.yml with the service-discovery path pointed at this test's
Ray head. The Ray head (tests/ray_cluster.py, loopback, every port explicit) reports application metrics every
second. After a short ``python -m dbgen.train`` run against the head, the test asks Prometheus' HTTP API that
job throughput was > 0 and that the step counter increased. Everything started is stopped by PID.
"""

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from ray_cluster import RayHead, free_port  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus not installed (Debian package 'prometheus'; .ci/run installs it)",
    ),
]

ROOT = Path(__file__).resolve().parents[1]


def query(port: int, promql: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("prometheus not ready")


def test_prometheus_sees_job_throughput_and_steps(tmp_path):
    run = f"prom-{uuid.uuid4().hex[:6]}"
    env = {"RAY_metrics_report_interval_ms": "1000"}
    with RayHead(num_cpus=2, env=env) as head:
        # The project's scrape config, pointed at this head's service-discovery file, scraping every second.
        cfg = yaml.safe_load((ROOT / "cluster/prometheus.yml").read_text())
        cfg["global"]["scrape_interval"] = "1s"
        ray_job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ray")
        sd_file = head.temp_dir / "prom_metrics_service_discovery.json"
        ray_job["file_sd_configs"][0]["files"] = [str(sd_file)]
        ray_job["file_sd_configs"][0]["refresh_interval"] = "1s"
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(cfg))
        # Every target Ray lists is on loopback (tests/conftest.py keeps Ray there).
        for group in json.loads(sd_file.read_text()):
            assert all(t.startswith("127.0.0.1:") for t in group["targets"]), group

        port = free_port()
        prom = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=open(tmp_path / "prometheus.log", "w"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ready(port, prom)
            driver_env = head.client_env()
            driver_env["RAY_ADDRESS"] = head.address
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dbgen.train",
                    "--config",
                    "configs/rvae_binary_tiny.yaml",
                    "--name",
                    run,
                    "--storage",
                    str(tmp_path / "runs"),
                    "train.max_steps=150",
                    "train.log_every=10",
                    "train.eval_every=0",
                    "train.sample_every=0",
                    "train.checkpoint_every=0",
                    "train.eval_batches=1",
                    "train.num_samples=4",
                    "scale.num_workers=2",
                    "data.loader=arrow",  # metrics are under test, not the loader (Ray Data adds ~7 CPU-s a run)
                ],
                cwd=ROOT,
                env=driver_env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            sel = f'{{run="{run}"}}'
            deadline = time.monotonic() + 120  # the last reports and scrapes land within seconds on an idle host
            while True:
                rate = query(port, f"max_over_time(ray_dbgen_job_images_per_second{sel}[10m])")
                hi = query(port, f"max(max_over_time(ray_dbgen_steps_total{sel}[10m]))")
                lo = query(port, f"min(min_over_time(ray_dbgen_steps_total{sel}[10m]))")
                workers = query(port, f"count(count by (worker) (ray_dbgen_steps_total{sel}))")
                seen = rate and hi and lo and workers and float(workers[0]["value"][1]) == 2
                if (seen and float(hi[0]["value"][1]) > float(lo[0]["value"][1])) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert rate and float(rate[0]["value"][1]) > 0, rate
            assert float(hi[0]["value"][1]) > float(lo[0]["value"][1]), (lo, hi)
            assert float(hi[0]["value"][1]) <= 150
            assert float(workers[0]["value"][1]) == 2
            info = query(port, f"max_over_time(ray_dbgen_run_info{sel}[10m])")
            assert info and info[0]["metric"]["model"] == "rvae"
        finally:
            prom.terminate()
            try:
                prom.wait(timeout=30)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
    assert prom.returncode is not None
