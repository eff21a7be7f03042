"""``python -m dbgen.sample --run DIR --n 64 --out grid.png``: a PNG grid of samples from a run's checkpoint.

Loads the checkpoint a resume would take (EMA weights when the run kept an EMA, unless ``--no-ema``), draws
``n`` images from the model's prior at ``--temperature`` with the global torch RNG seeded by ``--seed``, and
writes them as one PNG grid (``ceil(sqrt(n))`` columns, 2-pixel gaps; :func:`dbgen.images.save_grid`).
``--packed FILE`` samples from an exported artifact (``python -m dbgen.export``) instead of a run.
The model runs on CUDA when available, through ``--engine`` (default: ``packed``, the bitwise kernels, on
CUDA and on CPUs with AVX2 or AVX-512, falling back to ``float`` with a warning where they cannot be built;
``float`` elsewhere; an explicit ``--engine packed`` that cannot run exits 2 saying what is missing; see
:mod:`dbgen.eval_loop`).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from .eval_loop import ENGINES, EngineUnavailable, resolve_engine, use_engine
from .export import ArtifactError, load_artifact
from .images import save_grid
from .rundir import RunError, load_run

__all__ = ["main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dbgen.sample", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run",
        help="run directory (<storage>/<name>): its newest intact finite checkpoint, as a resume takes; or one "
        "checkpoint directory (<run>/checkpoint_<step>)",
    )
    src.add_argument("--packed", help="a packed artifact (python -m dbgen.export) instead of a run")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", default="samples.png", help="output PNG")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the run kept an EMA")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="packed: binary layers on the bitwise "
        "kernels; float: the training-time layers (default: packed on CUDA and on CPUs with AVX2 or AVX-512, "
        "else float)",
    )
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        engine = resolve_engine(args.engine, device)  # before any loading: a missing kernel fails fast
        if args.packed:
            try:
                model, info, _ = load_artifact(args.packed, device=device)
            except ArtifactError as e:
                raise RunError(str(e)) from None
        else:
            model, info = load_run(args.run, ema=not args.no_ema, device=device)
    except (RunError, EngineUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_engine(model, engine)
    torch.manual_seed(args.seed)
    images = model.sample(args.n, temperature=args.temperature)
    out = save_grid(images, args.out)
    print(
        f"{out}: {args.n} samples from {info['checkpoint']} (step {info['step']}, "
        f"{'EMA' if info['ema'] else 'raw'} weights, temperature {args.temperature}, {engine} engine on {device})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
