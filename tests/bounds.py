"""Tolerances from rounding-error bounds, for comparing a float result with a reference.

A fixed ``atol`` passes or fails with the CPU's vector width and summation order: an fp32 sum of 2,304
products lands ~1e-4 from the exact sum on one machine and further on another. These are the standard
deterministic bounds instead (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1
and (3.5)). A sum of n products evaluated in float arithmetic in *any* order, with any blocking, with or
without FMA, satisfies

    |fl(sum_i a_i b_i) - sum_i a_i b_i| <= gamma_n * sum_i |a_i b_i|,    gamma_n = n u / (1 - n u),

and each further rounding a term goes through (a scale multiply, a bias add, a rounded factor) adds one to
n. The bound depends only on n, u and the operands' magnitudes, so it holds on every machine, yet it stays
proportional to the operands, so a real error (one flipped weight sign moves an output by 2 |x w|) lands far
outside it. (No underflow or overflow assumed: the tests' values are O(1).)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "assert_within",
    "conv2d_bound",
    "gamma",
    "linear_bound",
    "magnitude",
    "mean_bound",
    "rounding_bound",
    "stack_bound",
    "std_rel_bound",
    "unit_roundoff",
]

_UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = half the spacing of floats at 1: the relative error of one round-to-nearest operation."""
    return _UNIT_ROUNDOFF[dtype]


def gamma(n: int, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u): bounds |theta| for a product of n factors (1 + delta_i)^{+-1}, |delta_i| <= u."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma({n}, {dtype}): n u = {nu} >= 1, no bound")
    return nu / (1 - nu)


def rounding_bound(
    mag,
    n: int,
    dtype: torch.dtype = torch.float32,
    *,
    ref_dtype: torch.dtype | None = torch.float64,
    ref_n: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Elementwise bound on |got - ref| for results that are sums of terms with absolute sum ``mag``: ``got``
    computed in ``dtype`` with at most ``n`` roundings per term (then, with ``out_dtype``, rounded once more to
    it: u_out |got|), ``ref`` in ``ref_dtype`` with at most ``ref_n`` (default n) roundings per term (None:
    ``ref`` is exact). ``mag`` is evaluated in float64, relatively off by at most gamma_n in float64: the
    (1 + gamma) factor covers it.
    """
    ref_n = n if ref_n is None else ref_n
    m = torch.as_tensor(mag, dtype=torch.float64) * (1 + gamma(max(n, ref_n, 1), torch.float64))
    err = gamma(n, dtype) * m
    if out_dtype is not None:
        err = err + unit_roundoff(out_dtype) * (m + err)  # |got| <= |exact| + err <= m + err
    if ref_dtype is not None:
        err = err + gamma(ref_n, ref_dtype) * m
    return err


def magnitude(op, x, weight, scale=None, bias=None, channel_dim: int = 1) -> torch.Tensor:
    """sum_i |terms| of ``op(x, w) * scale + bias`` (per output channel along ``channel_dim``): the same op on
    absolute values, ``op(|x|, |w|) * |scale| + |bias|``, in float64."""
    mag = op(x.detach().double().abs(), weight.detach().double().abs())
    shape = [1] * mag.dim()
    shape[channel_dim] = -1
    if scale is not None:
        mag = mag * scale.detach().double().abs().view(shape)
    if bias is not None:
        mag = mag + bias.detach().double().abs().view(shape)
    return mag


def conv2d_bound(
    x,
    weight,
    scale=None,
    bias=None,
    stride=1,
    padding=0,
    groups=1,
    *,
    roundings: int = 2,
    exact_sum: bool = False,
    **kw,
) -> torch.Tensor:
    """Bound on |got - ref| for ``conv2d(x, weight) * scale + bias`` (scale, bias per output channel or None).

    n = K + roundings, K = the reduction length (C_in/groups * kh * kw); ``roundings`` counts the epilogue
    (scale multiply, bias add) and any rounded weight factor. ``exact_sum``: the dot product itself is exact
    (the integer popcount path), only the epilogue rounds; the reference (``F.conv2d`` in ``ref_dtype``) always
    has the K-term sum. ``kw``: ``dtype``, ``ref_dtype``, ``out_dtype`` of :func:`rounding_bound`.
    """
    mag = magnitude(lambda a, w: F.conv2d(a, w, None, stride, padding, 1, groups), x, weight, scale, bias)
    k = weight[0].numel()
    return rounding_bound(mag, (0 if exact_sum else k) + roundings, ref_n=k + roundings, **kw)


def linear_bound(
    x, weight, scale=None, bias=None, *, roundings: int = 2, exact_sum: bool = False, **kw
) -> torch.Tensor:
    """:func:`conv2d_bound` for ``linear(x, weight) * scale + bias`` (K = in_features)."""
    mag = magnitude(F.linear, x, weight, scale, bias, channel_dim=-1)
    k = weight.shape[-1]
    return rounding_bound(mag, (0 if exact_sum else k) + roundings, ref_n=k + roundings, **kw)


def mean_bound(x, dim, dtype: torch.dtype | None = None) -> torch.Tensor:
    """|computed mean - exact mean| of the M values of ``x`` over ``dim``: a sum of M terms (any order) and one
    division, so gamma_{M+1} * mean|x|."""
    dims = [dim] if isinstance(dim, int) else list(dim)
    m = 1
    for d in dims:
        m *= x.shape[d]
    return gamma(m + 1, dtype or x.dtype) * x.detach().double().abs().mean(dims)


def std_rel_bound(x, dim, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Relative error bound of a computed population std of the M values of ``x`` over ``dim``.

    The computed sum of squared deviations S has relative error at most ~M u kappa^2 whether it is formed in two
    passes or by Welford/pairwise updating (Chan, Golub & LeVeque 1983; Higham sec. 1.9), kappa^2 = 1 +
    mean^2/var; the division by M and the square root add u each (the root halves S's error). gamma_{2M+8}
    kappa^2 covers all of it.
    """
    dims = [dim] if isinstance(dim, int) else list(dim)
    xd = x.detach().double()
    m = 1
    for d in dims:
        m *= x.shape[d]
    kappa2 = 1 + xd.mean(dims).square() / xd.var(dims, unbiased=False)
    return gamma(2 * m + 8, dtype or x.dtype) * kappa2


@torch.no_grad()
def stack_bound(model: torch.nn.Sequential, x: torch.Tensor, same_float_layers: bool = True, other_n=None):
    """Bound on |another evaluation - model(x)| of a Sequential of weight-norm/binary layers, sign activations
    and ELU/Tanh, both evaluations in fp32 in any summation order (e.g. the packed model of dbgen.kernels),
    given that their sign activations agree. Returns ``(bound, signs)``, ``signs`` the +-1 outputs of the sign
    activations here, for the caller to compare exactly with the other evaluation's.

    A running forward error bound, layer by layer: a layer ``op(v, W) + b`` given inputs at most ``e`` apart
    gives outputs at most ``op(e, |W|)`` apart plus each evaluation's rounding, gamma_{K+2} (K-term sum, scale,
    bias) times ``op(|v| + e, |W|) + |b|``; ELU and Tanh are 1-Lipschitz (plus 4 ulps per evaluation); equal
    signs reset the bound to 0. ``same_float_layers``: full-precision layers are the same modules on the same
    device in both evaluations (to_packed keeps them), so identical inputs give identical outputs. ``other_n(K)``:
    roundings per term of the other evaluation of a K-term layer, if not K + 2.
    """
    from dbgen.nn import BinaryActivation, WeightNormLayer

    v, e, signs = x, torch.zeros(x.shape, dtype=torch.float64), []
    for m in model:
        out = m(v)
        if isinstance(m, WeightNormLayer) and same_float_layers and not m.binary and not e.any():
            e = torch.zeros(out.shape, dtype=torch.float64)
        elif isinstance(m, WeightNormLayer):
            op, w = (lambda a, ww, m=m: m._op(a, ww, None)), m.effective_weight()
            mag = magnitude(op, v.abs().double() + e, w, None, m.bias, m._output_dim)
            n = m.fan_in + 2
            e = magnitude(op, e, w) + rounding_bound(
                mag, other_n(m.fan_in) if other_n else n, v.dtype, ref_dtype=v.dtype, ref_n=n
            )
        elif isinstance(m, BinaryActivation):
            e = torch.zeros(out.shape, dtype=torch.float64)
            signs.append(out)
        elif isinstance(m, torch.nn.ELU | torch.nn.Tanh):
            e = e + 2 * gamma(4, v.dtype) * (out.abs().double() + e)
        else:
            raise TypeError(f"stack_bound: no bound for {type(m).__name__}")
        v = out
    return e, signs


def assert_within(got, ref, bound, what: str = "") -> None:
    """Assert |got - ref| <= bound elementwise (NaN fails); on failure report the violations, the worst element
    (largest err/bound) and the largest ratio err/bound."""
    # Python numbers as float64 (torch.as_tensor would round them to the default float32).
    got, ref = (t.detach() if torch.is_tensor(t) else torch.tensor(t, dtype=torch.float64) for t in (got, ref))
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs reference {tuple(ref.shape)}"
    got, ref = got.double().cpu(), ref.double().cpu()
    bound = torch.as_tensor(bound, dtype=torch.float64).cpu().expand_as(ref)
    err = (got - ref).abs()
    bad = ~(err <= bound)
    if bad.any():
        ratio = torch.where(bad & ~(err <= 0), err / bound, torch.zeros_like(err)).nan_to_num(nan=float("inf"))
        i = int(ratio.flatten().argmax())
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), ref.shape)) if ref.dim() else ()
        g, r, d, b = (t.flatten()[i].item() for t in (got, ref, err, bound))
        raise AssertionError(
            f"{what + ': ' if what else ''}{int(bad.sum())} of {ref.numel()} elements off by more than the "
            f"rounding-error bound; worst at {idx}: got {g:.9g}, ref {r:.9g}, |diff| {d:.3g} > bound {b:.3g} "
            f"(err/bound {ratio.flatten()[i].item():.3g}); max |diff| {err.nan_to_num(nan=float('inf')).max():.3g}"
        )
