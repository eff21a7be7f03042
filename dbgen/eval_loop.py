"""The one evaluation loop: bits/dim of a model over batches of a held-out split.

Every evaluation runs it: the trainer (each rank over its shard of ``data.eval``, then summed over ranks),
``python -m dbgen.evaluate`` and the Ray actors of :mod:`dbgen.export`. The caller sets the RNG (the bound's
posterior or dequantization noise), the weights and the mode; :func:`bpd_sum` only adds up. The sum stays on
the model's device in float64 (one host read at the end), added in batch order, so it is the same number
whichever caller computes it.

**Engines.** Inference (``dbgen.sample``, ``dbgen.evaluate``, the Ray actors of :mod:`dbgen.export`) runs a
model through one of :data:`ENGINES` (:func:`use_engine`): ``packed`` swaps the binary layers for the bitwise
kernels (:func:`dbgen.kernels.to_packed`; on CPU the bitwise CPU kernels, or the exact pure-PyTorch reference
where they cannot be built), ``float`` runs the training-time float layers. :func:`default_engine` picks packed
wherever it was measured faster (benchmarks/RESULTS.md): on CUDA, and on a CPU whose kernels run an AVX2 or
AVX-512 path; float on a CPU left with the scalar path or the reference, both slower than a float conv.
:func:`resolve_engine` checks that the packed engine can run on the device (the CUDA kernels need nvcc and
sm_80 or newer): a default falls back to float with one warning saying why, an explicit ``packed`` raises
:class:`EngineUnavailable` with what is missing.

The two engines compute the same function with different roundings: the packed fully binary layers sum the
+-1 products exactly and round once (``fl(fl(dot * scale) + bias)``), the float layers round their fp32 sums
(TF32 or bf16 on CUDA if enabled), and a packed-weight layer sums in another order (on CUDA from 3 bf16
planes of each fp32 activation, fp32 accumulation). Per layer that is a ``gamma_K`` relative difference (K the
fan-in); through dozens of layers, sign activations (a sign whose argument is within rounding of 0 flips) and
the likelihood there is no useful a-priori bound, so the stated bound is a product requirement:
:data:`PACKED_BPD_TOLERANCE` bits/dim between the engines' mean bits/dim over the same rows and noise (the
precision bits/dim are reported with; a wrong layer moves bits/dim by far more). Samples: the packed engine
is deterministic for a seed, and its fully binary layers give the same bits on the reference and on the CUDA
kernels, so a 1/1 RVAE draws bit-identical samples on both; between the engines (and wherever a packed-weight
layer runs on CUDA) samples agree except where a rounding difference crosses a sign or a pixel boundary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = [
    "ENGINES",
    "PACKED_BPD_TOLERANCE",
    "EngineUnavailable",
    "bpd_sum",
    "default_engine",
    "evaluate_bpd",
    "resolve_engine",
    "use_engine",
]

log = logging.getLogger(__name__)

ENGINES = ("packed", "float")

# Mean bits/dim of the packed and float engines on the same rows and noise differ by at most this (module
# docstring): the precision bits/dim are reported with.
PACKED_BPD_TOLERANCE = 1e-3


def default_engine(device: str | torch.device) -> str:
    """``"packed"`` on CUDA and where the bitwise CPU kernels run a vector path (AVX2 or AVX-512), ``"float"``
    elsewhere (the scalar path and the reference are exact but slower than a float conv)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "packed"
    if device.type != "cpu":
        return "float"
    from .kernels import backend, cpu  # here: float inference needs none of the kernels' modules
    from .kernels.sources import KernelUnavailable

    try:
        fast = backend(device) == "cpu" and cpu.isa() != "scalar"
    except KernelUnavailable:  # DBGEN_KERNELS=cpu without the kernels (or a forced path this CPU lacks)
        fast = False
    return "packed" if fast else "float"


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot run on the device; the message says what is missing."""


def resolve_engine(requested: str | None, device: str | torch.device) -> str:
    """The engine to run on ``device``: ``requested``, or :func:`default_engine` when None. The packed engine is
    checked first (:func:`dbgen.kernels.kernels_missing`): when it cannot run, a default falls back to
    ``float`` with one warning that says why, and an explicit ``packed`` raises :class:`EngineUnavailable`."""
    device = torch.device(device)
    engine = requested or default_engine(device)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "float":
        return engine
    from .kernels import kernels_missing  # here: float inference needs none of the kernels' modules

    missing = kernels_missing(device)
    if missing is None:
        return engine
    if requested == "packed":
        raise EngineUnavailable(f"the packed engine cannot run on {device}: {missing}; use --engine float")
    log.warning("the packed engine cannot run on %s (%s); using the float engine", device, missing)
    return "float"


def use_engine(model: nn.Module, engine: str) -> nn.Module:
    """``model`` (eval mode, on its device) switched to ``engine`` in place (see the module docstring)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "packed":
        from .kernels import to_packed  # here: float inference needs none of the kernels' modules

        to_packed(model)
    return model


@torch.no_grad()
def bpd_sum(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    samples: int = 1,
    max_batches: int | None = None,
    to_device: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """``(sum of per-row bits/dim as a float64 tensor on the model's device, rows)`` over the first
    ``max_batches`` (all if None) of ``batches`` (uint8 NCHW). Each row's bound uses ``samples`` importance
    samples (1: the ELBO / the flow's dequantized bound). ``to_device`` moves a batch (default: ``.to`` the
    model's device)."""
    device = next(model.parameters()).device
    move = to_device or (lambda x: x.to(device))
    total, rows = torch.zeros((), dtype=torch.float64, device=device), 0
    for i, x in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        total += model.log_likelihood_bpd(move(x), samples=samples).double().sum()  # (N,) -> ()
        rows += x.shape[0]
    return total, rows


def evaluate_bpd(
    model: nn.Module, batches: Iterable[torch.Tensor], samples: int = 1, max_batches: int | None = None
) -> tuple[float, int]:
    """Mean bits/dim over every row of ``batches`` (uint8 NCHW tensors) and the number of rows (nan for none)."""
    total, rows = bpd_sum(model, batches, samples=samples, max_batches=max_batches)
    return (total.item() / rows if rows else math.nan), rows
