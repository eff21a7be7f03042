"""``python -m dbgen.sample --run DIR --n 64 --out grid.png``: a PNG grid of samples from a run's checkpoint.

Loads the latest checkpoint of the run (EMA weights when the run kept an EMA, unless ``--no-ema``), draws
``n`` images from the model's prior at ``--temperature`` with the global torch RNG seeded by ``--seed``, and
writes them as one PNG grid (``ceil(sqrt(n))`` columns, 2-pixel gaps). ``--packed FILE`` samples from an
exported artifact (``python -m dbgen.export``) instead of a run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["image_grid", "save_grid", "main"]


def image_grid(images: torch.Tensor, pad: int = 2) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` -> one uint8 ``(rows*(H+pad)-pad, cols*(W+pad)-pad, C)`` array, row-major."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), 255, dtype=np.uint8)
    hwc = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[r * (h + pad):r * (h + pad) + h, k * (w + pad):k * (w + pad) + w] = hwc[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path) -> Path:
    """Write :func:`image_grid` of ``images`` as a PNG, atomically (temp file + rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def main(argv=None) -> int:
    from .evaluate import RunError, load_run

    p = argparse.ArgumentParser(prog="python -m dbgen.sample", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (<storage>/<name>)")
    src.add_argument("--packed", help="a packed artifact (python -m dbgen.export) instead of a run")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", default="samples.png", help="output PNG")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the run kept an EMA")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    try:
        if args.packed:
            from .export import ArtifactError, load_artifact

            try:
                model, info, _ = load_artifact(args.packed)
            except ArtifactError as e:
                raise RunError(str(e)) from None
        else:
            model, info = load_run(args.run, ema=not args.no_ema)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    images = model.sample(args.n, temperature=args.temperature)
    out = save_grid(images, args.out)
    print(f"{out}: {args.n} samples from {info['checkpoint']} (step {info['step']}, "
          f"{'EMA' if info['ema'] else 'raw'} weights, temperature {args.temperature})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
