"""bf16 vs fp32 training curve ("same math"): does bf16 autocast train like fp32?

::

    python benchmarks/precision_curve.py --config configs/rvae_binary_tiny.yaml --steps 500 --device cpu \\
        [--seeds 0 1] [--bf16-seeds 0] [--data PATH|builtin:photos32] [--tf32 off|default] [--json-out FILE]
        [key=value ...]

Trains the same config several times on one device with the trainer's own step (:func:`dbgen.step.run_step`
with :class:`dbgen.sync.LocalSync`, :func:`dbgen.step.build_optimizer`, :func:`dbgen.step.lr_at`): fp32 runs
for every ``--seeds`` and bf16-autocast runs (``train.precision=bf16``, fp32 master weights) for every
``--bf16-seeds``. All runs see the same batches in the same order (the loader's seed is the config's
``train.seed``); ``--seed`` sets the model initialization and the latent / dequantization noise. It records the
training loss (bits/dim) of every step and the bits/dim of a fixed held-out set (``--eval-rows`` rows, one
sample, the same noise seed in every run) at step 0 and every ``--eval-every`` steps, under the run's autocast
as the trainer evaluates. On CUDA the fp32 reference is true fp32 (``--tf32 off``: cuDNN and matmul TF32
disabled for every run); ``--tf32 default`` keeps PyTorch's defaults, i.e. what ``dbgen.train`` runs.

Data: the CIFAR-10 JPEG tar (``../shared/data/cifar10-jpeg/train.tar`` from the repository root, training
images only) is converted once with dbgen's converter (``image-tar``) and split by row: every 10th image of
the archive (5,000, all classes) is held out, the other 45,000 are the training split. Both are cached under
``$DBGEN_CACHE`` (or ``~/.cache/dbgen``) as ``cifar10-jpeg-holdout-<sha256 of the tar>/{train,test}``.
Without the tar it falls back to ``builtin:photos32`` and says so.

Verdict (the rule is fixed here, before any run): the curves are averaged over ``--window`` steps. The fp32
noise of a window is the range (max - min) of the fp32 runs' window means (|fp32 s0 - fp32 s1| for two seeds);
the bf16 deviation of a window is |bf16 s - fp32 s| for the same seed s. bf16 is within fp32 noise iff, for
every bf16 seed, both the largest and the mean bf16 deviation over the windows are <= the largest and the mean
fp32 noise over the windows. Separately, the loss at initialization (step 0, same model, same batch / the same
held-out rows and noise) must differ by <= 1e-3 bits/dim (the issue's bound), reported for the step-0
training batch and for the held-out set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from dbgen.atomic import sha256_file
from dbgen.config import load_config, micro_batch_size
from dbgen.data import TrainLoader, convert, open_split, read_rows, resolve_split
from dbgen.data.builtin import cache_root
from dbgen.data.split import MANIFEST
from dbgen.data.writer import ROW_GROUP_ROWS, Chunk, Source, write_split
from dbgen.step import (
    PhaseClock,
    autocast_context,
    autocast_dtype,
    batch_to_device,
    eval_mode,
    lr_at,
    resolve_stats,
    run_step,
    single_device_setup,
    use_channels_last,
)

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "train.tar"
HOLDOUT_EVERY = 10  # every 10th image of the tar (archive order: class by class) is held out
EVAL_SEED = 12345  # the held-out set's latent / dequantization noise: the same in every run and eval
INIT_BOUND_BPD = 1e-3  # the requirement: at initialization the bf16 loss is within 1e-3 bits/dim of fp32


# ------------------------------------------------------------------------------------------------------ data
def cifar_splits(tar: Path, cache: Path) -> tuple[Path, Path]:
    """The tar converted by ``dbgen.data.convert`` (image-tar), split into train / held-out; built once."""
    root = cache / f"cifar10-jpeg-holdout-{sha256_file(tar)[:12]}"
    if (root / "train" / MANIFEST).exists() and (root / "test" / MANIFEST).exists():
        return root / "train", root / "test"
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=cache))
    try:
        full = open_split(convert("image-tar", tar, tmp / "all"))
        rows = read_rows(full)  # image (50000, 32, 32, 3) uint8, label, source; ~150 MB
        held = np.arange(full.num_rows) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        for name, mask in (("train", ~held), ("test", held)):
            idx = np.flatnonzero(mask)

            def chunks(idx=idx):  # row-group sized chunks: the writer copies its pending rows per group
                for lo in range(0, len(idx), ROW_GROUP_ROWS):
                    i = idx[lo : lo + ROW_GROUP_ROWS]
                    yield Chunk(rows["image"][i], rows["label"][i], [rows["source"][k] for k in i])

            what = "held out" if name == "test" else "kept"
            desc = {
                "format": "image-tar",
                "path": str(tar),
                "split": name,
                "rows": f"archive rows i with i % {HOLDOUT_EVERY} == {HOLDOUT_EVERY - 1} {what}",
            }
            write_split(Source(desc, full.num_classes, list(full.class_names or ()), records=chunks()), tmp / name)
        shutil.rmtree(tmp / "all")
        try:
            os.rename(tmp, root)  # atomic; fails if another process built it first (then use theirs)
        except OSError:
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root / "train", root / "test"


def resolve_data(spec: str | None, cache: Path) -> tuple[Path, Path, str]:
    """(train split, held-out split, description). ``spec``: None (the CIFAR tar, else photos32), a tar, a
    directory with train/ and test/ splits, or builtin:NAME."""
    if spec is None:
        if CIFAR_TAR.is_file():
            spec = str(CIFAR_TAR)
        else:
            print(
                f"NOTE: {CIFAR_TAR} is absent: falling back to builtin:photos32 (real photographs, but not CIFAR-10)",
                flush=True,
            )
            spec = "builtin:photos32"
    if spec.endswith(".tar") and Path(spec).is_file():
        train, test = cifar_splits(Path(spec), cache)
        return train, test, f"{spec} (image-tar; every {HOLDOUT_EVERY}th image held out)"
    return resolve_split(spec, "train"), resolve_split(spec, "test"), spec


def eval_set(test_dir: Path, n: int) -> torch.Tensor:
    """``n`` held-out rows spread evenly over the split (its storage order is by class / photograph)."""
    rows = read_rows(test_dir)["image"]  # (N, H, W, C) uint8
    idx = np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(np.int64)
    return torch.from_numpy(rows[idx]).permute(0, 3, 1, 2).contiguous()  # (n, C, H, W)


# ------------------------------------------------------------------------------------------------- one run
def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@torch.no_grad()
def eval_bpd(model, x: torch.Tensor, batch: int, device, channels_last: bool, amp_dtype, ema) -> float:
    """Mean bits/dim of ``x`` (one sample), eval mode, EMA weights if kept, under the run's autocast; the noise
    comes from a forked RNG seeded with EVAL_SEED, so training randomness is untouched."""
    total = 0.0
    with eval_mode(model, ema, EVAL_SEED, device):
        for lo in range(0, len(x), batch):
            xb = batch_to_device(x[lo : lo + batch], device, channels_last)
            with autocast_context(device, amp_dtype):
                total += model.log_likelihood_bpd(xb, samples=1).double().sum().item()
    return total / len(x)


def train_run(
    cfg,
    seed: int,
    train_dir: Path,
    x_eval: torch.Tensor,
    steps: int,
    device: torch.device,
    eval_every: int,
    resolve_every: int,
) -> dict:
    """One run of ``steps`` optimizer steps; returns the per-step curve and the held-out evaluations."""
    t = cfg.train
    amp_dtype = autocast_dtype(cfg, device)
    # Same batches for every run: the loader's order depends on train.seed only, not on the run's seed.
    init_x = next(
        iter(
            TrainLoader(
                train_dir,
                batch_size=t.init_batch_size,
                seed=t.seed,
                rank=0,
                world_size=1,
                shuffle_buffer=cfg.data.shuffle_buffer,
                backend="arrow",
            )
        )
    )
    seed_all(seed)  # model initialization and, continuing, the training noise
    model, sync, ema = single_device_setup(cfg, init_x, device)
    channels_last = use_channels_last(cfg, device)
    loader = TrainLoader(
        train_dir,
        batch_size=micro_batch_size(cfg, 1),
        seed=t.seed,
        rank=0,
        world_size=1,
        shuffle_buffer=cfg.data.shuffle_buffer,
        drop_last=cfg.data.drop_last,
        backend="arrow",
    )
    data = iter(loader)

    def evaluate():
        return eval_bpd(model, x_eval, t.eval_batch_size, device, channels_last, amp_dtype, ema)

    evals = [{"step": 0, "bpd": evaluate()}]
    curve, pending, train_s = [], [], 0.0
    for step in range(steps):
        start = time.perf_counter()
        batches = [batch_to_device(next(data), device, channels_last) for _ in range(t.grad_accum)]
        clock = PhaseClock(device)
        pending.append(run_step(model, sync, batches, t, lr_at(cfg, step), amp_dtype, clock, model, ema))
        done = step + 1
        if done % resolve_every == 0 or done == steps or (eval_every and done % eval_every == 0):
            curve += resolve_stats(pending)  # one host read per chunk, not per step
            pending = []
        train_s += time.perf_counter() - start
        if eval_every and done % eval_every == 0 or done == steps:
            if evals[-1]["step"] != done:
                evals.append({"step": done, "bpd": evaluate()})
                print(
                    f"  step {done}: train {curve[-1]['loss']:.4f}, held-out {evals[-1]['bpd']:.4f} "
                    f"({train_s:.0f} s training)",
                    flush=True,
                )
    return {
        "precision": "bf16" if amp_dtype == torch.bfloat16 else "fp32",
        "seed": seed,
        "loss": [s["loss"] for s in curve],
        "grad_norm": [s["grad_norm"] for s in curve],
        "skipped": sum(s["skipped"] for s in curve),
        "eval": evals,
        "train_s": round(train_s, 2),
    }


# ----------------------------------------------------------------------------------------------- comparison
def window_means(curve: list[float], window: int) -> list[float]:
    return [float(np.mean(curve[lo : lo + window])) for lo in range(0, len(curve), window)]


def compare(runs: list[dict], window: int) -> dict:
    """Windowed curves, fp32 noise (range over fp32 seeds), bf16 deviation (same seed), init check, verdict."""
    fp32 = {r["seed"]: r for r in runs if r["precision"] == "fp32"}
    bf16 = {r["seed"]: r for r in runs if r["precision"] == "bf16"}
    if len(fp32) < 2 or not bf16 or not set(bf16) <= set(fp32):
        raise ValueError(
            f"need >= 2 fp32 seeds and bf16 seeds among them; got fp32 {sorted(fp32)}, bf16 {sorted(bf16)}"
        )
    steps = len(next(iter(fp32.values()))["loss"])
    means = {f"{r['precision']}_s{r['seed']}": window_means(r["loss"], window) for r in runs}
    fp32_means = np.array([means[f"fp32_s{s}"] for s in fp32])  # (seeds, windows)
    noise = fp32_means.max(0) - fp32_means.min(0)  # (windows,)
    out = {
        "window": window,
        "windows": [[lo, min(lo + window, steps)] for lo in range(0, steps, window)],
        "means": means,
        "fp32_noise": {"per_window": noise.tolist(), "max": float(noise.max()), "mean": float(noise.mean())},
        "bf16_deviation": {},
        "init": {},
        "eval": {},
        "pairs": {},
    }
    ok = True
    for s, b in bf16.items():
        dev = np.abs(np.array(means[f"bf16_s{s}"]) - np.array(means[f"fp32_s{s}"]))
        out["bf16_deviation"][f"s{s}"] = {
            "per_window": dev.tolist(),
            "max": float(dev.max()),
            "mean": float(dev.mean()),
        }
        ok &= bool(dev.max() <= noise.max() and dev.mean() <= noise.mean())
        f = fp32[s]
        train0 = abs(b["loss"][0] - f["loss"][0])
        eval0 = abs(b["eval"][0]["bpd"] - f["eval"][0]["bpd"])
        out["init"][f"s{s}"] = {
            "fp32_train_bpd": f["loss"][0],
            "bf16_train_bpd": b["loss"][0],
            "train_diff": train0,
            "fp32_eval_bpd": f["eval"][0]["bpd"],
            "bf16_eval_bpd": b["eval"][0]["bpd"],
            "eval_diff": eval0,
            "within_1e-3": bool(train0 <= INIT_BOUND_BPD and eval0 <= INIT_BOUND_BPD),
        }
    eval_steps = [e["step"] for e in next(iter(fp32.values()))["eval"]]
    for i, step in enumerate(eval_steps):
        vals = {f"{r['precision']}_s{r['seed']}": r["eval"][i]["bpd"] for r in runs}
        f = [vals[f"fp32_s{s}"] for s in fp32]
        out["eval"][str(step)] = {
            **vals,
            "fp32_noise": max(f) - min(f),
            **{f"bf16_dev_s{s}": abs(vals[f"bf16_s{s}"] - vals[f"fp32_s{s}"]) for s in bf16},
        }
    # Context, not part of the verdict: every pair of runs, same seed (shared init and noise) or not.
    keys = list(means)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            d = np.abs(np.array(means[a]) - np.array(means[b]))
            same = a.split("_")[1] == b.split("_")[1]
            out["pairs"][f"{a} vs {b}"] = {"same_seed": same, "max": float(d.max()), "mean": float(d.mean())}
    out["rule"] = (
        f"{window}-step window means of the training loss (bits/dim); fp32 noise per window = range "
        f"over fp32 seeds {sorted(fp32)}; bf16 deviation per window = |bf16 s - fp32 s| (same seed); "
        f"within noise iff for every bf16 seed max(deviation) <= max(noise) and "
        f"mean(deviation) <= mean(noise)"
    )
    out["within_noise"] = ok
    out["init_within_1e-3"] = all(v["within_1e-3"] for v in out["init"].values())
    return out


def print_report(result: dict) -> None:
    c = result["comparison"]
    names = list(c["means"])
    bf16 = list(c["bf16_deviation"])
    head = ["steps", *names, "fp32 noise", *[f"bf16 dev {s}" for s in bf16]]
    print("\ntraining loss (bits/dim), window means")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for w, (lo, hi) in enumerate(c["windows"]):
        row = [
            f"{lo}-{hi}",
            *[f"{c['means'][n][w]:.4f}" for n in names],
            f"{c['fp32_noise']['per_window'][w]:.4f}",
            *[f"{c['bf16_deviation'][s]['per_window'][w]:.4f}" for s in bf16],
        ]
        print("| " + " | ".join(row) + " |")
    print(f"\nfp32 noise: max {c['fp32_noise']['max']:.4f}, mean {c['fp32_noise']['mean']:.4f} bits/dim")
    for s, d in c["bf16_deviation"].items():
        print(f"bf16 deviation {s}: max {d['max']:.4f}, mean {d['mean']:.4f} bits/dim")
    print("all pairs of runs (window |difference|, context for the noise; not part of the verdict):")
    for k, d in c["pairs"].items():
        print(f"  {k:<22} {'same seed ' if d['same_seed'] else 'cross-seed'}  max {d['max']:.4f}  mean {d['mean']:.4f}")
    print("\nheld-out bits/dim")
    ehead = ["step", *names, "fp32 noise", *[f"bf16 dev {s}" for s in bf16]]
    print("| " + " | ".join(ehead) + " |")
    print("|" + "---|" * len(ehead))
    for step, v in c["eval"].items():
        row = [
            step,
            *[f"{v[n]:.4f}" for n in names],
            f"{v['fp32_noise']:.4f}",
            *[f"{v[f'bf16_dev_{s}']:.4f}" for s in bf16],
        ]
        print("| " + " | ".join(row) + " |")
    print()
    for s, v in c["init"].items():
        print(
            f"init {s}: train step-0 loss fp32 {v['fp32_train_bpd']:.6f} bf16 {v['bf16_train_bpd']:.6f} "
            f"(|diff| {v['train_diff']:.2e}); held-out fp32 {v['fp32_eval_bpd']:.6f} bf16 "
            f"{v['bf16_eval_bpd']:.6f} (|diff| {v['eval_diff']:.2e}); within 1e-3: "
            f"{'yes' if v['within_1e-3'] else 'no'}"
        )
    print(f"rule: {c['rule']}")
    print(f"bf16 within fp32 noise: {'yes' if c['within_noise'] else 'no'}")
    print(f"init loss within 1e-3 bits/dim: {'yes' if c['init_within_1e-3'] else 'no'}")


# ------------------------------------------------------------------------------------------------------ CLI
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {os.cpu_count()} x {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"cpu: {os.cpu_count()} x {platform.machine()}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fp32 runs (>= 2: the noise)")
    p.add_argument("--bf16-seeds", type=int, nargs="+", default=[0], help="bf16 runs (each also in --seeds)")
    p.add_argument("--batch", type=int, help="train.batch_size (default: the config's)")
    p.add_argument(
        "--data",
        default=None,
        help="a CIFAR-style image tar, a directory with train/ and test/ "
        "splits, or builtin:NAME (default: ../shared/data/cifar10-jpeg/train.tar, else photos32)",
    )
    p.add_argument("--cache", type=Path, default=None, help="where the converted tar goes (default: the dbgen cache)")
    p.add_argument("--window", type=int, default=50, help="steps per curve window")
    p.add_argument("--eval-every", type=int, default=100, help="held-out eval every N steps (and at 0 and the end)")
    p.add_argument("--eval-rows", type=int, default=1024, help="held-out rows per eval")
    p.add_argument("--resolve-every", type=int, default=50, help="read the step results every N steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument(
        "--tf32",
        choices=["off", "default"],
        default="off",
        help="CUDA: off = fp32 convolutions and matmuls in true fp32 (the reference); default = "
        "PyTorch's defaults (cuDNN convolutions in TF32), as dbgen.train runs",
    )
    p.add_argument("--json-out", type=Path, help="write the result (curves, comparison, verdict) here")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = p.parse_args(argv)
    if len(set(args.seeds)) < 2:
        p.error("--seeds: need at least two distinct fp32 seeds (their spread is the noise)")
    if not set(args.bf16_seeds) <= set(args.seeds):
        p.error(f"--bf16-seeds {args.bf16_seeds}: every bf16 seed needs an fp32 run of the same seed in --seeds")
    if min(args.steps, args.window, args.resolve_every, args.eval_rows) < 1 or args.eval_every < 0:
        p.error("--steps, --window, --resolve-every, --eval-rows must be >= 1 and --eval-every >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and args.tf32 == "off":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    overrides = list(args.overrides) + ([f"train.batch_size={args.batch}"] if args.batch else [])
    base = load_config(args.config, overrides)
    train_dir, test_dir, data_desc = resolve_data(args.data, args.cache or cache_root())
    x_eval = eval_set(test_dir, args.eval_rows)
    print(
        f"config {args.config} {' '.join(overrides)}; data {data_desc}: train {open_split(train_dir).num_rows} "
        f"rows, eval {len(x_eval)} held-out rows; batch {base.train.batch_size}, {args.steps} steps on "
        f"{device}",
        flush=True,
    )

    runs = []
    for precision, seeds in (("fp32", args.seeds), ("bf16", args.bf16_seeds)):
        for seed in seeds:
            cfg = load_config(base, [f"train.precision={precision}"])
            r = train_run(cfg, seed, train_dir, x_eval, args.steps, device, args.eval_every, args.resolve_every)
            print(
                f"{precision} seed {seed}: {r['train_s']:.0f} s, loss {r['loss'][0]:.4f} -> {r['loss'][-1]:.4f}, "
                f"held-out {r['eval'][0]['bpd']:.4f} -> {r['eval'][-1]['bpd']:.4f}, skipped {r['skipped']}",
                flush=True,
            )
            runs.append(r)

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": args.config,
        "overrides": overrides,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "torch": torch.__version__,
        "data": data_desc,
        "eval_rows": len(x_eval),
        "batch_size": base.train.batch_size,
        "steps": args.steps,
        "runs": runs,
        "comparison": compare(runs, args.window),
    }
    print_report(result)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json_out.with_name(args.json_out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.json_out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
