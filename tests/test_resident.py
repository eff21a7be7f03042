"""``comm.resident_bits``: in the packed modes every binary layer keeps 1 bit per weight (dbgen/nn/resident.py),
expands its +-1 operand only while it computes and again in backward, and the binary gradients go bucket by
bucket without a whole flat gradient (dbgen/sync/packed.py).

* One layer of each kind, resident (its bits at an unaligned offset of a shared buffer) against the same layer
  holding +-1 floats: output, input/weight/gain/bias gradients and state dict equal bit for bit; loading a state
  dict writes the bits; the weight parameter holds no values.
* Real DeepSpeed engines in a 2-rank gloo group (tests/gloo_group.py), ``packed`` and ``packed_onebit``
  (gradient accumulation 2, clipping, 1-bit after 5 steps), 20 steps with checkpoints at 10 and 20. The
  reference holds +-1 floats and exchanges the whole flat gradient in one bucket after backward; the runs with
  overlapped buckets (each built from its latents' gradients and pieces earlier buckets left) holding floats,
  resident, and resident with activation checkpointing give its loss and gradient norm at every step and write
  the same checkpoint tensors (latent slices and Adam moments included, which the loss alone would not show);
  a resident run resumed from the reference's checkpoint (the format is unchanged) continues with its losses and
  ends in its checkpoint.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from gloo_group import spawn

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "rvae_binary_tiny.yaml"
COMMON = [
    "train.grad_accum=2",
    "train.grad_clip=0.5",
    "comm.onebit_warmup_steps=5",
    "comm.overlap=true",
    "comm.bucket_mb=0.02",
    "train.max_steps=20",
    "train.checkpoint_every=10",
    "train.log_every=1",
    "train.eval_every=0",
    "train.sample_every=0",
    "train.num_samples=0",
]
MODES = {
    "packed": ["comm.binary_weights=packed"],
    "packed_onebit": ["comm.binary_weights=packed", "comm.binary_grads=onebit"],
}
VARIANTS = {  # "serial" is the reference: one bucket, the whole flat gradient, +-1 floats (the packed mode as it was)
    "serial": ["comm.resident_bits=false", "comm.overlap=false"],
    "floats": ["comm.resident_bits=false"],
    "resident": ["comm.resident_bits=true"],
    "resident_ac": ["comm.resident_bits=true", "train.activation_checkpointing=true"],
}


# ------------------------------------------------------------------------------------------------ one layer
def _layers():
    from dbgen.nn import BinaryConv2d, BinaryConvTranspose2d, BinaryLinear

    return [
        (BinaryConv2d(16, 24, 3, padding=1), (4, 16, 8, 8)),
        (BinaryConv2d(16, 24, 3, stride=2, padding=1, bias=False), (4, 16, 9, 9)),
        (BinaryConvTranspose2d(16, 24, 4, stride=2, padding=1), (4, 16, 8, 8)),
        (BinaryLinear(37, 19), (3, 5, 37)),
    ]


@pytest.mark.parametrize("index", range(4))
def test_resident_layer_equals_the_layer_holding_signs_bit_for_bit(index):
    from dbgen.nn import pack_signs

    torch.manual_seed(index)
    plain, shape = _layers()[index]
    with torch.no_grad():
        plain.gain.uniform_(-1.0, 2.0)  # negative gains too: a flipped channel
        if plain.bias is not None:
            plain.bias.normal_()
        plain.weight.copy_(torch.where(plain.weight >= 0, 1.0, -1.0))  # what a packed mode's layer holds
    resident = copy.deepcopy(plain)
    offset, n = 13, plain.weight.numel()  # not byte-aligned, neighbours on both sides
    flat = torch.cat([torch.randn(offset), plain.weight.detach().reshape(-1), torch.randn(27)])
    words = pack_signs(flat)
    resident.keep_signs_resident(words, offset)
    assert resident.weight.untyped_storage().nbytes() == 4, "the placeholder holds one float"
    assert resident.weight.shape == plain.weight.shape

    x = torch.randn(shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), resident(xb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    for name, p in plain.named_parameters():
        assert torch.equal(p.grad, dict(resident.named_parameters())[name].grad), f"gradient of {name}"
    sa, sb = plain.state_dict(), resident.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)

    # loading a state dict writes the bits (and leaves the neighbours' bits alone)
    flipped = {k: (-v if k == "weight" else v) for k, v in sa.items()}
    resident.load_state_dict(flipped)
    assert torch.equal(resident.signs(), -plain.weight.detach())
    assert torch.equal(pack_signs(torch.cat([flat[:offset], -flat[offset : offset + n], flat[offset + n :]])), words)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        resident.load_state_dict({**sa, "weight": torch.ones(3)})


# --------------------------------------------------------------------------------------------- 2-rank runs
def _fit(overrides, run_dir: Path, train_dir: str, rank: int, world: int, checkpoint_dir=None):
    from dbgen.config import load_config
    from dbgen.trainer import Trainer

    cfg = load_config(CONFIG, [*COMMON, *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    tr = Trainer(cfg, run_dir, train_dir, None, rank=rank, world_size=world, checkpoint_dir=checkpoint_dir)
    if cfg.comm.resident_bits:
        from dbgen.nn import binary_layers

        held = [m.weight.untyped_storage().nbytes() for _, m in binary_layers(tr.model)]
        assert held and set(held) == {4}, "resident layers hold no float weights"
    tr.fit()


def _runs_worker(rank: int, world: int, out_dir: str, train_dir: str):
    torch.set_num_threads(1)
    out = Path(out_dir)
    for mode, mode_overrides in MODES.items():
        for variant, overrides in VARIANTS.items():
            _fit([*mode_overrides, *overrides], out / f"{mode}_{variant}", train_dir, rank, world)
        # resume the float run's checkpoint (the format every earlier packed run wrote) in resident mode
        ckpt = out / f"{mode}_serial" / "checkpoint_0000010"
        _fit([*mode_overrides, *VARIANTS["resident"]], out / f"{mode}_resumed", train_dir, rank, world, ckpt)


def _losses(run_dir: Path) -> dict[int, tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["bpd"], r["grad_norm"], r["skipped"]) for r in rows if r.get("kind") == "train"}


def _checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint that depends on the training math: the module, DeepSpeed's optimizer and the
    packed partitions (latent slices, Adam moments, 1-bit errors)."""
    out = {}
    ds = torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    out.update({f"module/{k}": v for k, v in ds["module"].items()})

    def walk(prefix, value):
        if torch.is_tensor(value):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    walk("optimizer", ds["optimizer"])
    for f in sorted((ckpt / "packed").glob("*.pt")):
        walk(f"packed/{f.name}", torch.load(f, map_location="cpu", weights_only=True))
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resident_runs_train_and_checkpoint_bit_identically(tmp_path):
    from dbgen.data import resolve_split

    spawn(_runs_worker, 2, str(tmp_path), str(resolve_split("builtin:photos32", "train")))
    for mode in MODES:
        floats = _losses(tmp_path / f"{mode}_serial")
        assert sorted(floats) == list(range(1, 21))
        assert sum(norm > 0.5 for _, norm, _ in floats.values()) >= 5, "clipping should be active on several steps"
        for variant in ("floats", "resident", "resident_ac"):
            run = _losses(tmp_path / f"{mode}_{variant}")
            for step, row in floats.items():
                assert run[step] == row, f"{mode} {variant}: step {step} differs from the reference"
            for step in (10, 20):
                name = f"checkpoint_{step:07d}"
                a = _checkpoint_tensors(tmp_path / f"{mode}_serial" / name)
                b = _checkpoint_tensors(tmp_path / f"{mode}_{variant}" / name)
                assert sorted(a) == sorted(b), f"{mode} {variant}: {name} holds other tensors"
                for k in a:
                    assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{mode} {variant}: {name} {k}"
        resumed = _losses(tmp_path / f"{mode}_resumed")
        assert sorted(resumed) == list(range(11, 21))
        for step in range(11, 21):
            assert resumed[step] == floats[step], f"{mode}: resumed step {step} differs"
        a = _checkpoint_tensors(tmp_path / f"{mode}_serial" / "checkpoint_0000020")
        b = _checkpoint_tensors(tmp_path / f"{mode}_resumed" / "checkpoint_0000020")
        assert all(torch.equal(a[k], b[k]) for k in a), f"{mode}: the resumed run ends in another checkpoint"
    onebit, plain = _losses(tmp_path / "packed_onebit_serial"), _losses(tmp_path / "packed_serial")
    assert [onebit[s] for s in range(1, 6)] == [plain[s] for s in range(1, 6)], "uncompressed warm-up"
    assert [onebit[s] for s in range(6, 21)] != [plain[s] for s in range(6, 21)], "1-bit gradients from step 6 on"
