"""The packed inference engine on the user's path, on CPU: trained, checkpointed and exported tiny 1/1 and 1/32
RVAE and Flow++ models sample and evaluate through ``--engine packed`` (the bitwise CPU kernels) with bits/dim
within dbgen.eval_loop.PACKED_BPD_TOLERANCE of ``--engine float``; the 1/1 models declare their binary inputs
(and the RVAE's packed-bits chains fire); the RVAE 1/1 gives bit-identical samples and bits/dim on the
reference and on the host emulation of the CUDA source.

One module-scoped fixture trains each model for 3 real optimizer steps in-process (dbgen.step, no DeepSpeed)
on the built-in data, writes the checkpoint with dbgen.rundir's writers and exports it with the export CLI.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dbgen.kernels as K
from dbgen import evaluate, export, sample
from dbgen.config import load_config
from dbgen.data import EvalLoader, resolve_split
from dbgen.eval_loop import PACKED_BPD_TOLERANCE, EngineUnavailable, default_engine, resolve_engine, use_engine
from dbgen.export import load_packed
from dbgen.kernels.sources import KernelUnavailable
from dbgen.nn import binary_layers
from dbgen.rundir import (
    DS_MODEL_FILE,
    DS_TAG,
    checkpoint_meta,
    commit_checkpoint,
    file_records,
    list_files,
    partial_dir,
)
from dbgen.step import PhaseClock, lr_at, run_step, single_device_setup

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    "rvae_binary_act_tiny.yaml",
    "rvae_binary_tiny.yaml",
    "flowpp_binary_act_tiny.yaml",
    "flowpp_binary_tiny.yaml",
]
STEPS, BATCH = 3, 8
EVAL = ["--max-batches", "1", "--batch-size", "16", "--json"]


def _train_and_export(config_name: str, root: Path, split: str) -> tuple[Path, Path]:
    """A run directory with one checkpoint after STEPS real optimizer steps, and its exported artifact."""
    cfg = load_config(ROOT / "configs" / config_name, [f"train.batch_size={BATCH}", "scale.num_workers=1"])
    device = torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    x = next(iter(EvalLoader(split, batch_size=BATCH, rank=0, world_size=1, backend="arrow")))
    model, sync, ema = single_device_setup(cfg, x, device)
    for step in range(STEPS):
        run_step(model, sync, [x], cfg.train, lr_at(cfg, step), None, PhaseClock(device), model, ema)
    run = root / config_name.removesuffix(".yaml")
    partial = partial_dir(run, STEPS)
    (partial / DS_TAG).mkdir(parents=True)
    state = {"module": model.state_dict(), "ema": ema.state_dict() if ema is not None else None}
    torch.save(state, partial / DS_TAG / DS_MODEL_FILE)
    files = file_records(partial, list_files(partial))
    commit_checkpoint(partial, checkpoint_meta(cfg, STEPS, 1, ema is not None, STEPS * BATCH, True, files))
    artifact = root / f"{run.name}.dbgen"
    assert export.main(["--run", str(run), "--out", str(artifact)]) == 0
    return run, artifact


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    split = str(resolve_split("builtin:photos32", "test"))
    root = tmp_path_factory.mktemp("engine")
    return split, {name: _train_and_export(name, root, split) for name in CONFIGS}


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine whose CUDA kernels cannot run")
def test_the_default_engine_falls_back_where_the_kernels_cannot_run(monkeypatch, caplog):
    """On CUDA the default is packed, but where its kernels cannot be had (here: no CUDA device; on a GPU
    machine: no nvcc, or older than sm_80) a default falls back to float with one warning saying why, and an
    explicit ``--engine packed`` is refused with what is missing."""
    monkeypatch.delenv("DBGEN_KERNELS", raising=False)
    monkeypatch.delenv("DBGEN_CPU_ISA", raising=False)
    assert default_engine("cuda") == "packed"
    with caplog.at_level("WARNING"):
        assert resolve_engine(None, "cuda") == "float"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "packed engine cannot run on cuda (no CUDA device" in warnings[0], warnings
    with pytest.raises(EngineUnavailable, match="cannot run on cuda: no CUDA device.*use --engine float"):
        resolve_engine("packed", "cuda")
    assert resolve_engine("packed", "cpu") == "packed"
    assert resolve_engine("float", "cuda") == "float"
    monkeypatch.setenv("DBGEN_KERNELS", "reference")  # the pure-PyTorch path needs no kernel library
    assert resolve_engine(None, "cuda") == "packed"


def test_the_cpu_default_is_packed_where_the_kernels_run_a_vector_path(monkeypatch):
    """On a CPU the packed engine is the default where the bitwise kernels run AVX2 or AVX-512 (measured faster
    than the float engine, benchmarks/RESULTS.md); with the scalar path or the reference it is float."""
    from dbgen.kernels import cpu

    monkeypatch.delenv("DBGEN_KERNELS", raising=False)
    monkeypatch.delenv("DBGEN_CPU_ISA", raising=False)
    vector = [family for family in ("avx2", "avx512") if _cpu_runs(cpu, family)]
    assert default_engine("cpu") == ("packed" if vector else "float")
    assert resolve_engine(None, "cpu") == default_engine("cpu")
    for family in vector:
        monkeypatch.setenv("DBGEN_CPU_ISA", family)
        assert default_engine("cpu") == "packed"
    monkeypatch.setenv("DBGEN_CPU_ISA", "scalar")
    assert default_engine("cpu") == "float" and resolve_engine(None, "cpu") == "float"
    monkeypatch.delenv("DBGEN_CPU_ISA")
    monkeypatch.setenv("DBGEN_KERNELS", "reference")
    assert default_engine("cpu") == "float" and resolve_engine("packed", "cpu") == "packed"


def _cpu_runs(cpu, family: str) -> bool:
    try:
        cpu.isa(family)
        return True
    except KernelUnavailable:
        return False


@pytest.mark.parametrize("config_name", CONFIGS)
def test_sample_and_evaluate_through_the_packed_engine(trained, config_name, tmp_path, capsys):
    split, runs = trained
    run, artifact = runs[config_name]
    bpd = {}
    for source in (["--run", str(run)], ["--packed", str(artifact)]):
        for engine in ("packed", "float"):
            assert evaluate.main([*source, "--data", split, *EVAL, "--engine", engine]) == 0
            result = _json(capsys)
            assert result["engine"] == engine and result["rows"] == 16 and result["step"] == STEPS
            bpd[source[0], engine] = result["bpd"]
        # The stated bound between the engines (same rows, same seed: the same posterior/dequantization noise).
        assert abs(bpd[source[0], "packed"] - bpd[source[0], "float"]) <= PACKED_BPD_TOLERANCE, bpd
    assert 0 < bpd["--run", "float"] < 16
    # The CPU default (packed where the CPU kernels run a vector path), reported as such.
    assert evaluate.main(["--packed", str(artifact), "--data", split, *EVAL]) == 0
    assert _json(capsys)["engine"] == default_engine("cpu")

    grids = {}
    for engine in ("packed", "float"):
        grids[engine] = tmp_path / f"{engine}.png"
        assert (
            sample.main(["--run", str(run), "--n", "4", "--seed", "3", "--engine", engine, "--out", str(grids[engine])])
            == 0
        )
        assert f"{engine} engine on cpu" in capsys.readouterr().out
    # The packed engine is deterministic for a seed (same command, same pixels); from the artifact too.
    assert (
        sample.main(
            ["--run", str(run), "--n", "4", "--seed", "3", "--engine", "packed", "--out", str(tmp_path / "again.png")]
        )
        == 0
    )
    assert np.array_equal(_pixels(grids["packed"]), _pixels(tmp_path / "again.png"))
    assert (
        sample.main(
            [
                "--packed",
                str(artifact),
                "--n",
                "4",
                "--seed",
                "3",
                "--engine",
                "packed",
                "--out",
                str(tmp_path / "artifact.png"),
            ]
        )
        == 0
    )
    assert _pixels(tmp_path / "artifact.png").shape == _pixels(grids["packed"]).shape
    # Between the engines samples differ only where a rounding difference crosses a sign or pixel boundary.
    assert (_pixels(grids["packed"]) == _pixels(grids["float"])).mean() > 0.95


def test_one_one_models_declare_binary_inputs_and_chain_packed_bits(trained):
    _, runs = trained
    for name in CONFIGS:
        model = load_packed(runs[name][1])
        n_binary = len(binary_layers(model))
        use_engine(model, "packed")
        packed = [m for m in model.modules() if isinstance(m, K.PackedBinaryConv2d | K.PackedBinaryLinear)]
        assert len(packed) == n_binary > 0 and not binary_layers(model)
        one_one = "binary_act" in name
        # Declared by the model, not inspected from data: every binary layer of a 1/1 model reads signs.
        assert all(m.binary_input == one_one for m in packed), name
        if name.startswith("rvae"):
            # conv1 -> sign -> conv2 of every residual layer hands packed bits over (1/1 only).
            res_layers = sum(type(m).__name__ == "ResidualLayer" for m in model.modules())
            assert K.chained_layers(model) == (res_layers if one_one else 0) and res_layers > 0
        else:
            assert K.chained_layers(model) == 0  # concat_sign's two thresholds: no epilogue chain (docs)


CUDA_HOME = Path("/usr/local/cuda")
CAN_EMULATE = shutil.which("g++") is not None and (CUDA_HOME / "include" / "cuda_bf16.h").is_file()


@pytest.mark.skipif(not CAN_EMULATE, reason="needs g++ and CUDA headers for the host emulation")
def test_rvae_one_one_reference_and_emulated_kernels_are_bit_identical(trained, tmp_path, monkeypatch):
    from dbgen.kernels import cuda
    from dbgen.kernels import ops as kops

    split, runs = trained
    artifact = runs["rvae_binary_act_tiny.yaml"][1]
    x = next(iter(EvalLoader(split, batch_size=1, rank=0, world_size=1, backend="arrow")))
    chained_outputs = []

    def run():
        model = use_engine(load_packed(artifact), "packed")
        for m in model.modules():
            if isinstance(m, K.PackedBinaryConv2d) and m.pack_output:
                m.register_forward_hook(lambda mod, i, o: chained_outputs.append(o))
        with torch.no_grad():
            torch.manual_seed(7)
            bpd = model.log_likelihood_bpd(x)
            torch.manual_seed(8)
            return bpd, model.sample(1)

    bpd_ref, samples_ref = run()
    assert chained_outputs and all(isinstance(o, K.PackedActivation) for o in chained_outputs)
    chained_outputs.clear()
    cuda.set_emulator(cuda.load_library(cuda.build_emulator(tmp_path)))
    monkeypatch.setattr(kops, "backend", lambda device: "cuda")  # CPU tensors -> the emulated CUDA source
    try:
        bpd_emu, samples_emu = run()
    finally:
        cuda.set_emulator(None)
    assert chained_outputs and all(isinstance(o, K.PackedActivation) for o in chained_outputs)
    # Every binary layer of the 1/1 RVAE is fully binary: exact integer dots and the same fp32 epilogue.
    assert torch.equal(bpd_emu, bpd_ref) and torch.equal(samples_emu, samples_ref)
