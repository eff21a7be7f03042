"""The run directory and its checkpoints (dbgen.rundir), atomic writes (dbgen.atomic) and the reporter's
end-of-run close (dbgen.reporter): fast, one process, no DeepSpeed."""

import json
import os
import random
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from ray_cluster import free_port

from dbgen.atomic import write_atomic, write_json_atomic
from dbgen.config import load_config
from dbgen.metrics import TrainMetrics
from dbgen.models import build
from dbgen.reporter import Reporter, restarts
from dbgen.rundir import (
    META_FILE,
    RunError,
    check_resume,
    checkpoint_dirs,
    checkpoint_meta,
    checkpoint_name,
    choose_checkpoint,
    commit_checkpoint,
    derive_seed,
    file_records,
    list_files,
    load_run,
    partial_dir,
    prune_checkpoints,
    resume_words,
    rng_state,
    set_rng_state,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "rvae_binary_tiny.yaml"


def cfg(*overrides):
    return load_config(TINY, list(overrides))


# ---------------------------------------------------------------------------------------------- atomic
def test_atomic_writes_replace_whole_files_and_leave_nothing_behind(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    write_json_atomic(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'  # the format meta.json and summary.json always had
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["summary.json"]
    with pytest.raises(TypeError):
        write_atomic(path, object())  # fails while writing: the old file stays, no temporary file is left
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["summary.json"]


# --------------------------------------------------------------------------------------------- reading
def _checkpoint(run: Path, step: int, config: dict, **meta) -> Path:
    ck = run / checkpoint_name(step)
    ck.mkdir(parents=True)
    (ck / META_FILE).write_text(json.dumps({"step": step, "world_size": 2, "zero_stage": 0, "config": config, **meta}))
    return ck


def test_the_newest_readable_checkpoint_is_chosen(tmp_path, caplog):
    with pytest.raises(RunError, match="run directory not found"):
        load_run(tmp_path / "nope")
    with pytest.raises(RunError, match="no checkpoint"):
        load_run(tmp_path)
    assert choose_checkpoint(tmp_path) is None  # no checkpoint directory: a new run
    c = cfg().to_dict()
    _checkpoint(tmp_path, 20, c)
    newest = _checkpoint(tmp_path, 100, c)  # written before checksums: used, with a warning
    (tmp_path / checkpoint_name(300)).mkdir()
    (tmp_path / checkpoint_name(300) / META_FILE).write_text("{not json")  # unreadable: passed over, named
    with caplog.at_level("WARNING"):
        path, meta = choose_checkpoint(tmp_path)
    assert path == newest and meta["step"] == 100
    assert "passing over checkpoint_0000300: " in caplog.text and "without checksums" in caplog.text


def test_meta_holds_what_evaluate_and_resume_read():
    c = cfg("scale.zero_stage=1")
    files = {"ds/x.pt": {"bytes": 3, "sha256": "ab"}}
    meta = checkpoint_meta(c, step=7, world_size=2, ema=False, images_seen=224, finite=True, files=files)
    assert meta == {
        "step": 7,
        "world_size": 2,
        "zero_stage": 1,
        "ema": False,
        "images_seen": 224,
        "finite": True,
        "config": c.to_dict(),
        "weights": "ds/mp_rank_00_model_states.pt",
        "files": files,
    }
    assert load_config(meta["config"]) == c


# ------------------------------------------------------------------------------------ integrity, rotation
def _committed(run: Path, step: int, finite: bool = True, payload: bytes = b"") -> Path:
    """A checkpoint written the way the trainer writes one: files into the partial directory, their records
    (here all hashed by one 'rank'), then meta.json and the rename. The weights are the tiny model's, seeded by
    the step (``payload``: raw bytes instead)."""
    partial = partial_dir(run, step)
    (partial / "ds").mkdir(parents=True)
    weights = partial / "ds" / "mp_rank_00_model_states.pt"
    if payload:
        weights.write_bytes(payload)
    else:
        torch.manual_seed(step)
        torch.save({"module": build(cfg().model).state_dict(), "ema": None}, weights)
    (partial / "rank_0.pt").write_bytes(b"rng" * 10)
    files = file_records(partial, list_files(partial))
    meta = checkpoint_meta(cfg(), step, world_size=1, ema=False, images_seen=step * 32, finite=finite, files=files)
    return commit_checkpoint(partial, meta)


def _flip(path: Path, at: int, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[at : at + n] = bytes(b ^ 0xFF for b in data[at : at + n])
    path.write_bytes(bytes(data))


def test_damaged_checkpoints_are_named_and_resume_falls_back(tmp_path, caplog):
    run = tmp_path / "run"
    good, newest = _committed(run, 5), _committed(run, 10)
    assert not partial_dir(run, 10).exists() and sorted(json.loads((newest / META_FILE).read_text())["files"]) == [
        "ds/mp_rank_00_model_states.pt",
        "rank_0.pt",
    ]
    assert choose_checkpoint(run)[0] == newest
    assert resume_words(run) == "the same command resumes run run from checkpoint_0000010 (step 10)"

    _flip(newest / "ds" / "mp_rank_00_model_states.pt", 500)  # same size, different bytes
    with pytest.raises(RunError, match=r"checkpoint_0000010/ds/mp_rank_00_model_states.pt: sha256 does not match"):
        load_run(newest)  # a checkpoint named by the user is used as it is or refused, naming the file
    with caplog.at_level("WARNING"):
        path, meta = choose_checkpoint(run)  # a resume falls back, and says so
    assert path == good and meta["step"] == 5
    assert "states.pt: sha256 does not match" in caplog.text and "checkpoint_0000005 (step 5)" in caplog.text
    # the interrupt and full-disk messages name the checkpoint a resume takes, not the damaged newest one
    assert resume_words(run).endswith("from checkpoint_0000005 (step 5)")
    assert choose_checkpoint(run, trusted=newest)[0] == newest  # the driver's verified choice is not hashed again
    assert choose_checkpoint(run, verified=False)[0] == newest  # a policy that does not hash

    (good / "rank_0.pt").write_bytes(b"rng")  # truncated
    (newest / "ds" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(RunError) as e:
        choose_checkpoint(run)
    assert "states.pt: missing" in str(e.value) and "rank_0.pt: 3 bytes, but" in str(e.value)
    assert "use another --name" in str(e.value)  # never silently a new run over them
    assert resume_words(run).startswith("no checkpoint of run run can be resumed: ")
    (good / META_FILE).unlink()  # a checkpoint directory without metadata is not a reason to start over
    with pytest.raises(RunError, match="cannot read checkpoint metadata"):
        choose_checkpoint(run)


def test_evaluate_takes_the_checkpoint_a_resume_takes(tmp_path, caplog):
    """A diverged run: evaluate/sample/export on the run directory load the newest finite checkpoint, as a
    resume does (they used to refuse the run); the non-finite one only when named and allowed."""
    run = tmp_path / "run"
    finite = _committed(run, 5)
    diverged = _committed(run, 10, finite=False)
    with caplog.at_level("WARNING"):
        model, info = load_run(run)
    assert info["checkpoint"] == str(finite) == str(choose_checkpoint(run)[0]) and info["step"] == 5
    assert "passing over checkpoint_0000010: " in caplog.text and "non-finite weights" in caplog.text
    expected = torch.load(finite / "ds" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(RunError, match=r"checkpoint_0000010: taken from non-finite weights"):
        load_run(diverged)
    assert load_run(diverged, allow_nonfinite=True)[1]["step"] == 10  # export --force
    assert load_run(run, allow_nonfinite=True)[1]["step"] == 10


def test_non_finite_checkpoints_are_marked_skipped_and_never_the_last_kept(tmp_path):
    run = tmp_path / "run"
    finite = _committed(run, 5)
    for step in (10, 15, 20):
        _committed(run, step, finite=False)
    assert choose_checkpoint(run)[0] == finite  # resume from the last good weights
    assert choose_checkpoint(run, finite=False)[0].name == checkpoint_name(20)
    deleted = prune_checkpoints(run, keep=2)
    assert [p.name for p in deleted] == [checkpoint_name(10)]
    assert [p.name for p in checkpoint_dirs(run)] == [checkpoint_name(s) for s in (20, 15, 5)]
    _committed(run, 25)
    prune_checkpoints(run, keep=2)  # a newer finite checkpoint: the old one may go
    assert [p.name for p in checkpoint_dirs(run)] == [checkpoint_name(s) for s in (25, 20)]


def test_rotation_keeps_the_intact_checkpoint_when_the_newest_is_damaged(tmp_path):
    """Rotation verifies what it keeps by checksum: a newest checkpoint damaged at the same size is not counted
    (the size check alone deleted the intact one before it), and is left for the user to inspect."""
    run = tmp_path / "run"
    for step in (5, 10, 15):
        _committed(run, step)
    _flip(run / checkpoint_name(15) / "rank_0.pt", 0, n=4)
    deleted = prune_checkpoints(run, keep=1)
    assert [p.name for p in deleted] == [checkpoint_name(5)]
    assert [p.name for p in checkpoint_dirs(run)] == [checkpoint_name(15), checkpoint_name(10)]
    assert choose_checkpoint(run)[0].name == checkpoint_name(10)  # what a resume takes survived


def test_commit_replaces_a_checkpoint_of_the_same_step_whole(tmp_path):
    run = tmp_path / "run"
    _committed(run, 5, payload=b"old" * 50)
    again = _committed(run, 5, payload=b"new" * 70)  # a resume from an older checkpoint reaches step 5 again
    weights = again / "ds" / "mp_rank_00_model_states.pt"
    assert weights.read_bytes() == b"new" * 70 and choose_checkpoint(run)[0] == again
    assert sorted(p.name for p in run.iterdir()) == [checkpoint_name(5)]


# ---------------------------------------------------------------------------------------------- resume
def test_resume_check_names_what_to_change(tmp_path):
    zero0 = {"world_size": 2, "zero_stage": 0, "config": cfg().to_dict()}
    zero1 = {"world_size": 2, "zero_stage": 1, "config": cfg("scale.zero_stage=1").to_dict()}
    ck = tmp_path / "run" / checkpoint_name(10)
    check_resume(ck, zero0, cfg(), world_size=2)
    check_resume(ck, zero0, cfg("scale.num_workers=1", "train.batch_size=32"), world_size=1)  # ZeRO 0: any count
    check_resume(ck, zero1, cfg("scale.zero_stage=1"), world_size=2)
    cases = [
        (zero0, cfg("model.width=8"), 2, r"another model \(checkpoint_0000010 vs this config: model.width: "),
        (
            zero1,
            cfg("scale.zero_stage=1", "scale.num_workers=1", "train.batch_size=32"),
            1,
            "scale.num_workers=2 scale.zero_stage=1",
        ),
        (zero1, cfg("scale.zero_stage=2"), 2, "scale.num_workers=2 scale.zero_stage=1"),
        (zero0, cfg("scale.zero_stage=1"), 2, "resume it with scale.zero_stage=0"),
        (zero0, cfg("comm.binary_weights=packed"), 2, "written with comm.binary_weights=dp"),
    ]
    for meta, new, world, message in cases:
        with pytest.raises(RunError, match=message):
            check_resume(ck, meta, new, world)


# ------------------------------------------------------------------------------------------------- RNG
def test_rng_state_round_trip_and_derived_seeds():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    state = rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(2)
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    seeds = {derive_seed(0, r) for r in range(8)} | {derive_seed(1, r) for r in range(8)}
    assert len(seeds) == 16 and derive_seed(3, 1) == derive_seed(3, 1)


# -------------------------------------------------------------------------------------------- reporter
def test_reporter_records_resumes_and_closes_the_exporter(tmp_path):
    port = free_port()
    metrics = TrainMetrics("r", 0, "rvae", "abc", backend="http", port=port)
    rep = Reporter(tmp_path, rank=0, max_steps=4, metrics=metrics)
    rep.on_eval(2, 5.0, 10, 0.1)
    rep.on_eval(4, 4.0, 10, 0.1)
    rep.on_resume(2, "sub", restart=True)  # drops the record of step 4 (after the checkpoint)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("eval", 2), ("resume", 2)]
    assert restarts(tmp_path, "sub") == [2] and restarts(tmp_path, "other") == []
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # served
    rep.close()  # the trainer's fit() ends with it
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
