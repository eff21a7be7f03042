"""``python -m dbgen.evaluate --run DIR [--data DIR] [--samples K] [--json]``: bits/dim of a run's checkpoint.

Single process, no Ray and no DeepSpeed needed: the run directory's checkpoint that a resume would take (the
newest intact one from finite weights, :func:`dbgen.rundir.choose_checkpoint`) is read with
``torch.load(weights_only=True)``, the model is
rebuilt from the config stored in that checkpoint, and every row of the held-out split (``--data``, default the
run's ``data.eval``) is evaluated once with the importance-weighted bound of ``--samples`` posterior samples
(K=1 is the ELBO / the flow's dequantized bound). EMA weights are used when the run kept an EMA.
``--packed FILE`` evaluates an exported artifact (``python -m dbgen.export``) instead of a run; ``--workers N``
spreads the split over N Ray actors that receive the weights as packed bytes through the object store.
``--engine`` picks how the model runs (default: ``packed``, the bitwise kernels, on CUDA and on CPUs with AVX2
or AVX-512, falling back to ``float`` with a warning where they cannot be built; ``float`` elsewhere; an
explicit ``--engine packed`` that cannot run exits 2 saying what is missing; see :mod:`dbgen.eval_loop` for
what differs between them). The actors of ``--workers`` ask Ray for a share of a GPU when the cluster has
GPUs, and run on it.

The loop is :func:`dbgen.eval_loop.bpd_sum`, the one the trainer and the actors run; reading the run is
:func:`dbgen.rundir.load_run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from .data import DataError, EvalLoader, resolve_split
from .eval_loop import ENGINES, EngineUnavailable, evaluate_bpd, resolve_engine, use_engine
from .export import ArtifactError, actor_placement, evaluate_with_actors, load_artifact, pack_model
from .ray_local import connect_ray
from .rundir import RunError, load_run

__all__ = ["main"]

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dbgen.evaluate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run",
        help="run directory (<storage>/<name>): its newest intact finite checkpoint, as a resume takes; or one "
        "checkpoint directory (<run>/checkpoint_<step>)",
    )
    src.add_argument("--packed", help="a packed artifact (python -m dbgen.export) instead of a run")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="evaluate with N Ray actors that get the weights as "
        "packed bytes through the object store (shard i seeded with dbgen.rundir.derive_seed; --max-batches "
        "then bounds each shard)",
    )
    p.add_argument(
        "--data", default=None, help="held-out split (directory or builtin:NAME); default: the run's data.eval"
    )
    p.add_argument("--samples", type=int, default=1, help="importance samples per example (1 = ELBO)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the run kept an EMA")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="packed: binary layers on the bitwise "
        "kernels; float: the training-time layers (default: packed on CUDA and on CPUs with AVX2 or AVX-512, "
        "else float)",
    )
    args = p.parse_args(argv)
    if args.samples < 1 or args.batch_size < 1:
        p.error("--samples and --batch-size must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    artifact = None
    try:
        # before any loading, so that a missing kernel fails fast; with --workers each actor resolves the engine
        # on its own device
        engine = resolve_engine(args.engine, device) if args.workers == 0 else args.engine
        if args.packed:
            try:
                model, info, artifact = load_artifact(args.packed, device=device)
            except ArtifactError as e:
                raise RunError(str(e)) from None
        else:
            model, info = load_run(args.run, ema=not args.no_ema, device=device)
        spec = args.data or info["config"].data.eval
        if spec is None:
            raise RunError("the run has no data.eval; pass --data")
        split = resolve_split(spec, "test")
        loader = EvalLoader(split, batch_size=args.batch_size, rank=0, world_size=1, backend="arrow")
    except (RunError, DataError, EngineUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.workers > 0:
        import ray  # here: only --workers needs Ray (seconds to import)

        log.info(connect_ray())
        artifact = artifact or pack_model(
            model, info["config"], {"checkpoint": info["checkpoint"], "step": info["step"], "ema": info["ema"]}
        )
        try:
            res = evaluate_with_actors(
                artifact,
                split,
                args.workers,
                batch_size=args.batch_size,
                samples=args.samples,
                seed=args.seed,
                max_batches=args.max_batches,
                engine=args.engine,
                **actor_placement(ray.cluster_resources(), args.workers),
            )
        except EngineUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        bpd, rows = res["bpd"], res["rows"]
        engine = res["engine"]
    else:
        bpd, rows = evaluate_bpd(use_engine(model, engine), loader, samples=args.samples, max_batches=args.max_batches)
    result = {
        "run": str(Path(args.run or args.packed)),
        "checkpoint": info["checkpoint"],
        "step": info["step"],
        "data": str(split),
        "rows": rows,
        "samples": args.samples,
        "ema": info["ema"],
        "bpd": bpd,
        "engine": engine,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        bound = "ELBO" if args.samples == 1 else f"IW bound, K={args.samples}"
        print(
            f"{bpd:.4f} bits/dim ({bound}) on {rows} rows of {split}, step {info['step']}, "
            f"{'EMA' if info['ema'] else 'raw'} weights, {engine} engine"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
