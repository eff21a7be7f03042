"""dbgen.export: packed inference artifacts.

Fast: the paper configs' artifacts meet the size targets (RVAE <= 10.5 MB, Flow++ <= 11 MB) and load back with
bit-exact binary layers; corrupted, truncated, foreign and mismatched artifacts are refused with a clear error.
Slow: a packed-mode training run (2 gloo ranks, DeepSpeed) exported with the CLI loads back with the checkpoint's
signs and reproduces the run's eval bits/dim within 1e-3; evaluate/sample read artifacts; Ray actors get the
weights from the object store as the artifact's bytes and evaluate/sample exactly like a local model.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from gloo_group import spawn

import dbgen
from dbgen.config import load_config
from dbgen.export import MAGIC, ArtifactError, export_model, load_packed, pack_model, read_packed
from dbgen.models import build
from dbgen.nn import binary_layers, pack_signs, size_report

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "rvae_binary_tiny.yaml"


def _signs(model) -> list[torch.Tensor]:
    return [pack_signs(m.weight) for _, m in binary_layers(model)]


def _check_round_trip(model, loaded):
    assert [n for n, _ in binary_layers(model)] == [n for n, _ in binary_layers(loaded)]
    for a, b in zip(_signs(model), _signs(loaded), strict=True):
        assert torch.equal(a, b)  # bit-exact binary layers
    for _, layer in binary_layers(loaded):
        assert set(layer.weight.detach().unique().tolist()) <= {-1.0, 1.0}
    binary = {f"{n}.weight" for n, _ in binary_layers(model)}
    own = dict(loaded.named_parameters())
    for n, p in model.named_parameters():
        if n not in binary:
            assert torch.equal(own[n].detach(), p.detach().half().float()), n  # fp16 storage, fp32 in the model


@pytest.mark.parametrize("config, limit_mb", [("rvae_cifar10_binary.yaml", 10.5), ("flowpp_cifar10_binary.yaml", 11.0)])
def test_paper_models_meet_size_targets_and_round_trip(tmp_path, config, limit_mb):
    cfg = load_config(ROOT / "configs" / config)
    torch.manual_seed(0)
    model = build(cfg.model)
    out = tmp_path / "model.dbgen"
    result = export_model(model, cfg, out, source={"note": "fresh paper-config model"})
    size = out.stat().st_size
    assert result["bytes"] == size <= limit_mb * 1e6, size
    # the size is the signs plus fp16 rest plus a header: no float copy of a binary weight hides in it
    assert size < size_report(model)["packed_fp16_bytes"] + 200_000
    loaded = dbgen.load_packed(out)
    assert not loaded.training
    _check_round_trip(model, loaded)
    assert read_packed(out).header["source"] == {"note": "fresh paper-config model"}


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = build(cfg.model)
    return cfg, model, pack_model(model, cfg, {"step": 3})


def test_tiny_round_trip_and_header(tiny):
    cfg, model, data = tiny
    assert data.startswith(MAGIC)
    art = read_packed(data)
    h = art.header
    assert h["format"] == "dbgen-packed" and h["version"] == 1 and h["dbgen_version"] == dbgen.__version__
    assert h["config"] == cfg.to_dict() and art.config == cfg and h["source"] == {"step": 3}
    packed = {k: e for k, e in h["tensors"].items() if k.endswith(".packed_signs")}
    assert len(packed) == len(binary_layers(model)) and all(e["dtype"] == "uint8" for e in packed.values())
    assert all(e["dtype"] == "float16" for k, e in h["tensors"].items() if k not in packed)
    assert all(len(e["sha256"]) == 64 for e in h["tensors"].values())
    _check_round_trip(model, load_packed(data))


def test_corrupted_truncated_and_foreign_artifacts_are_refused(tiny, tmp_path):
    _, _, data = tiny
    head_len = int.from_bytes(data[8:16], "little")
    cases = {
        "payload bit flip": (lambda d: d[:-100] + bytes([d[-100] ^ 0x01]) + d[-99:], "checksum mismatch"),
        "header byte changed": (lambda d: d[:20] + bytes([d[20] ^ 0x20]) + d[21:], "checksum mismatch"),
        "trailer changed": (lambda d: d[:-1] + bytes([d[-1] ^ 0xFF]), "checksum mismatch"),
        "truncated payload": (lambda d: d[:-1000], "truncated"),
        "truncated header": (lambda d: d[: 16 + head_len // 2], "truncated"),
        "only the magic": (lambda d: d[:8], "truncated"),
        "not an artifact": (lambda d: b"PK\x03\x04" + d[4:], "not a dbgen packed artifact"),
        "future version": (lambda d: d[:7] + b"\x02" + d[8:], "format version 2"),
        "empty": (lambda d: b"", "not a dbgen packed artifact"),
    }
    for name, (mutate, message) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.dbgen"
        bad.write_bytes(mutate(data))
        with pytest.raises(ArtifactError, match=message) as e:
            load_packed(bad)
        assert str(bad) in str(e.value), name  # the message names the file
    with pytest.raises(ArtifactError, match="cannot read"):
        load_packed(tmp_path / "missing.dbgen")


def test_artifact_of_another_shape_is_refused(tiny):
    cfg, model, _ = tiny
    wider = load_config(TINY, ["model.width=24"])
    with pytest.raises(ArtifactError, match="shape"):
        load_packed(pack_model(model, wider))  # header says width 24, tensors are width 16


def test_errors_name_the_artifact_file(tiny, tmp_path):
    # load_packed and load_artifact given a path: every error names that path, never <bytes>
    from dbgen.export import load_artifact

    cfg, model, data = tiny
    cases = {
        "truncated.dbgen": (data[: len(data) // 2], "truncated"),
        "flipped.dbgen": (data[:-200] + bytes([data[-200] ^ 0x10]) + data[-199:], "checksum mismatch"),
        "other_shape.dbgen": (pack_model(model, load_config(TINY, ["model.width=24"])), "shape"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        for load in (dbgen.load_packed, load_artifact, read_packed):
            if load is read_packed and name == "other_shape.dbgen":
                continue  # a valid file: the mismatch shows when the model is built
            with pytest.raises(ArtifactError, match=message) as e:
                load(path)
            assert str(e.value).startswith(f"{path}: ") and "<bytes>" not in str(e.value), (name, load)
            with pytest.raises(ArtifactError, match=message) as e:
                load(str(path))
            assert str(e.value).startswith(f"{path}: "), (name, load)


def test_export_cli_refuses_an_existing_file_unless_overwrite(tiny, tmp_path, monkeypatch, capsys):
    from dbgen import export

    cfg, model, data = tiny
    calls = []

    # the tiny model, as if it were the run's checkpoint
    def fake_export_run(run_dir, out, ema=True, allow_nonfinite=False):
        calls.append(run_dir)
        return {**export_model(model, cfg, out, {"step": 3}), "step": 3, "ema": False}

    monkeypatch.setattr(export, "export_run", fake_export_run)
    out = tmp_path / "model.dbgen"
    out.write_bytes(b"an artifact someone kept")
    assert export.main(["--run", "RUN", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"an artifact someone kept" and not calls  # untouched, nothing exported
    assert export.main(["--run", "RUN", "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() == data and calls == ["RUN"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.dbgen"]  # atomic write: no temporary file left
    fresh = tmp_path / "new.dbgen"  # a new file needs no --overwrite
    assert export.main(["--run", "RUN", "--out", str(fresh)]) == 0 and fresh.read_bytes() == data


# ----------------------------------------------------------------------------- a real run, exported (slow)
def _train_worker(rank: int, world: int, run_dir: str, train_dir: str):
    from dbgen.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(
        TINY,
        [
            "comm.binary_weights=packed",
            "train.max_steps=6",
            "train.checkpoint_every=0",
            "train.eval_every=0",
            "train.sample_every=0",
            "train.num_samples=0",
            "train.eval_batches=2",
        ],
    )
    Trainer(cfg, Path(run_dir), train_dir, train_dir, rank=rank, world_size=world).fit()


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    from dbgen.data import resolve_split

    run = tmp_path_factory.mktemp("export") / "run"
    run.mkdir()
    split = str(resolve_split("builtin:photos32", "test"))
    spawn(_train_worker, 2, str(run), split)
    return run, split


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_export_cli_round_trip_matches_the_run(packed_run, tmp_path, capsys):
    from dbgen import evaluate, export, sample
    from dbgen.data import EvalLoader
    from dbgen.eval_loop import evaluate_bpd
    from dbgen.rundir import derive_seed as _rank_seed  # the trainer's per-rank seeds

    run, split = packed_run
    out = tmp_path / "tiny.dbgen"
    assert export.main(["--run", str(run), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 6 and result["bytes"] == out.stat().st_size and not result["ema"]

    ckpt = torch.load(
        run / "checkpoint_0000006" / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
    )["module"]
    model = load_packed(out)
    for name, m in binary_layers(model):  # the packed run's module holds signs: the artifact has the same bits
        assert torch.equal(pack_signs(m.weight), pack_signs(ckpt[f"{name}.weight"])), name

    # the run's own final eval: rank r evaluated its shard of data.eval with seed _rank_seed(seed + 1, r)
    summary = json.loads((run / "summary.json").read_text())
    cfg = load_config(TINY)
    total, rows = 0.0, 0
    for r in range(2):
        torch.manual_seed(_rank_seed(cfg.train.seed + 1, r))
        loader = EvalLoader(split, batch_size=cfg.train.eval_batch_size, rank=r, world_size=2, backend="arrow")
        bpd, n = evaluate_bpd(model, loader, max_batches=cfg.train.eval_batches)
        total, rows = total + bpd * n, rows + n
    assert rows == summary["eval_rows"]
    assert abs(total / rows - summary["final_eval_bpd"]) < 1e-3, (total / rows, summary["final_eval_bpd"])

    # evaluate and sample read artifacts
    assert (
        evaluate.main(["--packed", str(out), "--data", split, "--max-batches", "1", "--batch-size", "32", "--json"])
        == 0
    )
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["rows"] == 32 and ev["step"] == 6 and 0 < ev["bpd"] < 12
    png = tmp_path / "s.png"
    assert sample.main(["--packed", str(out), "--n", "4", "--out", str(png)]) == 0 and png.stat().st_size > 0
    bad = tmp_path / "bad.dbgen"
    bad.write_bytes(out.read_bytes()[:-10])
    assert evaluate.main(["--packed", str(bad), "--data", split]) == 2
    assert "truncated" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_actors_receive_packed_bytes_through_the_object_store(packed_run, tmp_path):
    import ray

    sys.path.insert(0, str(Path(__file__).parent))
    from ray_cluster import RayHead

    from dbgen.data import EvalLoader
    from dbgen.eval_loop import EngineUnavailable, evaluate_bpd, use_engine
    from dbgen.export import PackedModelActor, actor_placement, evaluate_with_actors
    from dbgen.rundir import derive_seed as shard_seed  # the actors' per-shard seeds
    from dbgen.rundir import load_run

    run, split = packed_run
    raw, _ = load_run(run)
    data = pack_model(raw, load_config(TINY))
    fp32_bytes = sum(t.numel() * t.element_size() for t in raw.state_dict().values())
    model = load_packed(data)
    saved = os.environ.get("RAY_AUTH_MODE")
    with RayHead(num_cpus=2, auth="disabled") as head:
        os.environ["RAY_AUTH_MODE"] = "disabled"  # this private cluster goes without token auth
        try:
            ray.init(address=head.address, log_to_driver=False)
            # what the object store holds is the artifact itself: bytes, magic first, the file's size
            ref = ray.put(data)
            stored = ray.get(ref)
            assert isinstance(stored, bytes) and stored == data and stored.startswith(MAGIC)
            assert len(stored) < fp32_bytes / 1.5  # the tiny model is 80% binary; the paper RVAE is 22x smaller
            actor = ray.remote(num_cpus=0.5)(PackedModelActor).remote(ref)
            info = ray.get(actor.info.remote())
            assert info == {"type": "bytes", "bytes": len(data), "params": sum(p.numel() for p in raw.parameters())}
            # the actor samples like the local model on the same (default) engine with the same seed
            default = ray.get(actor.engine.remote())["engine"]
            torch.manual_seed(5)
            assert torch.equal(ray.get(actor.sample.remote(3, 1.0, 5)), use_engine(model, default).sample(3))
            ray.kill(actor)

            # every engine through the actors gives what the same engine gives locally, shard by shard
            placement = actor_placement(ray.cluster_resources(), 4)
            assert placement == {"device": "cpu", "options": {"num_cpus": 0.5}}  # 2 CPUs, no GPU: half a CPU each
            for engine in ("packed", "float"):
                res = evaluate_with_actors(
                    data, split, 2, batch_size=32, seed=3, max_batches=2, engine=engine, **placement
                )
                assert res["received"]["type"] == "bytes" and res["object_store_bytes"] == len(data)
                assert res["engine"] == engine and res["device"] == "cpu"
                local = use_engine(load_packed(data), engine)
                total, rows = 0.0, 0
                for i in range(2):  # the same shards and seeds, locally
                    torch.manual_seed(shard_seed(3, i))
                    loader = EvalLoader(split, batch_size=32, rank=i, world_size=2, backend="arrow")
                    bpd, n = evaluate_bpd(local, loader, max_batches=2)
                    total, rows = total + bpd * n, rows + n
                assert res["rows"] == rows == 128
                assert res["bpd"] == pytest.approx(total / rows, abs=1e-5)
            # the packed engine asked for on a device it cannot run on: a clear error, not a dead actor
            if not torch.cuda.is_available():
                with pytest.raises(EngineUnavailable, match="cannot run on cuda: no CUDA device"):
                    evaluate_with_actors(data, split, 1, engine="packed", device="cuda", options={"num_cpus": 0.5})
        finally:
            ray.shutdown()
            if saved is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = saved
