"""dbgen.console: the driver's lines come from rank 0's metrics.jsonl, each record once, none of an earlier run.

The whole driver console (a real 2-worker Ray job) is checked in tests/test_train_cluster.py.
"""

import io
import json
import logging
import os

import pytest

from dbgen.console import MetricsFollower, format_record

TRAIN = {
    "kind": "train",
    "step": 20,
    "bpd": 5.4321,
    "images_per_s": 123.4,
    "grad_norm": 1.5,
    "lr": 0.002,
    "skipped": 0,
    "eta_s": 3725.0,
}


def test_format_record_words_each_kind():
    assert format_record(TRAIN, 3000) == (
        "step   20/3000 | bpd 5.4321 | 123 img/s | grad norm 1.5 | lr 0.002 | skipped 0 | eta 1:02:05"
    )
    assert (
        format_record({"kind": "eval", "step": 20, "eval_bpd": 5.1, "rows": 64, "seconds": 1.25}, 40)
        == "step 20 | eval bpd 5.1000 on 64 rows (1.2s)"
    )
    assert (
        format_record({"kind": "checkpoint", "step": 30, "seconds": 0.5, "bytes": 2_500_000}, 40)
        == "step 30 | checkpoint 2.5 MB in 0.5s"
    )
    assert format_record({"kind": "resume", "step": 10, "submission": "x", "restart": True}, 40).startswith(
        "resumed at step 10 after a worker failure"
    )
    assert format_record({"kind": "something-new", "step": 1}, 40) is None


@pytest.fixture
def captured():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("dbgen")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _append(path, rec, partial=False):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + ("" if partial else "\n"))


def test_follower_prints_new_records_once_and_survives_a_resume_rewrite(tmp_path, captured):
    path = tmp_path / "metrics.jsonl"
    _append(path, {**TRAIN, "step": 10, "time": 1.0})  # an earlier submission's record: not printed again
    follower = MetricsFollower(tmp_path, 40, progress=False)
    _append(path, {**TRAIN, "step": 20, "time": 2.0})
    _append(path, {**TRAIN, "step": 30, "time": 3.0}, partial=True)  # being written right now
    follower.poll()
    assert captured.getvalue().splitlines() == [format_record(TRAIN, 40)]
    with open(path, "a") as f:
        f.write("\n")
    follower.poll()
    follower.poll()
    assert [line.split(" |")[0] for line in captured.getvalue().splitlines()] == ["step 20/40", "step 30/40"]

    # A worker-group restart from step 20 rewrites the file without the records after it, then appends.
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= 20]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    _append(path, {"kind": "resume", "step": 20, "submission": "s", "restart": True, "time": 4.0})
    _append(path, {**TRAIN, "step": 30, "time": 5.0})  # step 30 again, after the restart
    follower.poll()
    lines = captured.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == [
        "step 20/40",
        "step 30/40",
        "resumed at step 20 after a worker failure (worker group restarted)",
        "step 30/40",
    ]


def test_follower_with_a_progress_bar_still_prints_every_line(tmp_path, captured, monkeypatch):
    import sys

    bar_out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", bar_out)  # where the bar draws
    path = tmp_path / "metrics.jsonl"
    with MetricsFollower(tmp_path, 40, progress=True, poll_s=0.05):
        _append(path, {**TRAIN, "step": 20, "time": 2.0})
        _append(path, {"kind": "eval", "step": 20, "eval_bpd": 5.0, "rows": 8, "seconds": 0.1, "time": 2.1})
    assert [line.split(" |")[0] for line in captured.getvalue().splitlines()] == ["step 20/40", "step 20"]
    assert "20/40" in bar_out.getvalue()  # the bar advanced to the last train record
