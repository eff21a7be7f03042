"""Same math: every fast path of the training step computes what the plain fp32 step computes.

CPU tests: the fused BWN weight equals ``sign(v) * gain / sqrt(fan_in)`` (and its bf16 rounding) with the
same gradients; channels_last and ``torch.compile`` give the plain loss and gradients; bf16 autocast moves the
initial loss by less than 1e-3 bits/dim; the fused Adam's device-side clip/skip decision equals the host one;
``run_step`` reads no tensor value on the host (no ``.item()``/``bool()``: on a GPU each is a sync).
The ``gpu`` tests repeat the comparisons on CUDA with the GPU settings and fail on any host sync in a step.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bounds import assert_within, gamma, rounding_bound
from torch.utils._python_dispatch import TorchDispatchMode

from dbgen.config import load_config
from dbgen.models import build
from dbgen.nn import BinaryConv2d, BinaryConvTranspose2d, BinaryLinear, WeightNormLayer, data_dependent_init, sign_ste
from dbgen.step import (
    EMA,
    PhaseClock,
    batch_to_device,
    build_optimizer,
    clip_and_skip,
    prepare_model,
    resolve_stats,
    run_step,
)
from dbgen.sync import LocalSync

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "rvae_binary_tiny",
    "rvae_fp_tiny",
    "rvae_binary_act_tiny",
    "flowpp_binary_tiny",
    "flowpp_fp_tiny",
    "flowpp_binary_act_tiny",
]
HAS_CUDA = torch.cuda.is_available()


def _setup(name, *overrides, n=8, device="cpu", perturb=True):
    """A data-initialized model of config ``name`` and a batch. ``perturb``: random gains afterwards, because at
    initialization every residual branch of the RVAE is exactly zero (zero gain), which would make gradient
    comparisons of its binary layers vacuous."""
    cfg = load_config(CONFIGS / f"{name}.yaml", list(overrides))
    torch.manual_seed(0)
    model = build(cfg).to(device)
    m = cfg.model
    x = torch.randint(
        0,
        256,
        (n, m.channels, m.image_size, m.image_size),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(1),
    )
    data_dependent_init(model, x.to(device))
    if perturb:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, WeightNormLayer):
                    mod.gain.copy_(torch.rand(mod.gain.shape, generator=g) * 0.5 + 0.25)
    return cfg, model, x


def _loss_grads(model, x, amp=None, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast(x.device.type, dtype=amp) if amp else torch.autocast(x.device.type, enabled=False):
        loss = model(x)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got, ref, rtol):
    assert got.keys() == ref.keys()
    for n in ref:
        scale = ref[n].abs().max().item() + 1e-12
        err = (got[n] - ref[n]).abs().max().item()
        assert err <= rtol * scale, f"{n}: max |diff| {err:.3g} vs max |grad| {scale:.3g}"


# ------------------------------------------------------------------------------------------- fused BWN weight
@pytest.mark.parametrize(
    "layer",
    [BinaryConv2d(6, 5, 3), BinaryConvTranspose2d(6, 5, 3), BinaryLinear(7, 3)],
    ids=["conv", "convT", "linear"],
)
def test_fused_bwn_weight_is_the_formula_with_its_gradients(layer):
    torch.manual_seed(0)
    with torch.no_grad():
        layer.weight.normal_()
        layer.weight.view(-1)[:4] = 0.0  # sign(0) = +1
        layer.gain.uniform_(0.5, 2.0)
    c = [1] * layer.weight.dim()
    c[layer._channel_dim] = -1

    def reference():  # the unfused formula: sign(v) * (1 / sqrt(fan_in)), then * gain
        return sign_ste(layer.weight) * (1.0 / math.sqrt(layer.fan_in)) * layer.gain.view(c)

    w = layer.effective_weight()
    assert torch.equal(w, reference())  # bit-identical in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wb = layer.effective_weight()
    assert wb.dtype == torch.bfloat16 and torch.equal(wb, reference().to(torch.bfloat16))

    upstream = torch.randn_like(w)
    gv, gg = torch.autograd.grad((w * upstream).sum(), [layer.weight, layer.gain])
    rv, rg = torch.autograd.grad((reference() * upstream).sum(), [layer.weight, layer.gain])
    # dv: upstream * fl(gain * c) vs fl(upstream * gain) * c, c = 1/sqrt(fan_in) in fp32: each three fp32
    # roundings from the exact upstream * gain / sqrt(fan_in), so within gamma_6 (relative) of each other.
    exact_v = upstream.double() * layer.gain.detach().double().view(c) / math.sqrt(layer.fan_in)
    assert_within(gv, rv, gamma(7, torch.float32) * exact_v.abs(), "d weight")
    # d gain: sums of the fan_in terms +-upstream * c per channel in other orders (and c applied before or
    # after): gamma_{K+2} times sum |upstream| c on each side.
    dims = [d for d in range(w.dim()) if d != layer._channel_dim]
    mag = (upstream.double().abs() / math.sqrt(layer.fan_in)).sum(dims)
    assert_within(gg, rg, rounding_bound(mag, layer.fan_in + 2, torch.float32, ref_dtype=torch.float32), "d gain")


# ------------------------------------------------------------------------------- settings that keep the math
@pytest.mark.parametrize("name", TINY)
def test_channels_last_gives_the_plain_loss_and_gradients(name, one_torch_thread):
    cfg, model, x = _setup(name)
    ref_loss, ref_grads = _loss_grads(model, x)
    nhwc_cfg = load_config(CONFIGS / f"{name}.yaml", ["train.channels_last=true"])
    prepare_model(model, nhwc_cfg, torch.device("cpu"))
    assert any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
    )
    xl = batch_to_device(x, torch.device("cpu"), channels_last=True)
    assert xl.is_contiguous(memory_format=torch.channels_last)
    loss, grads = _loss_grads(model, xl)
    # Whole-model criteria, not a rounding bound: channels_last changes every conv's summation order, and the
    # loss and gradients pass through dozens of layers, sign activations (discontinuous) and log/exp, so no
    # a-priori bound propagates. Loss within 1e-5 relative (~170 fp32 ulps; the test_kernels/test_nn_layers
    # bounds check the convs themselves) and gradients within 1e-4 of each tensor's largest entry; a wrong
    # layout (e.g. a transposed kernel) moves both by O(1) relative.
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _assert_grads_close(grads, ref_grads, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_moves_the_initial_loss_by_under_1e3_bits_per_dim(name, one_torch_thread):
    _, model, x = _setup(name, n=16, perturb=False)
    fp32, _ = _loss_grads(model, x)
    bf16, grads = _loss_grads(model, x, amp=torch.bfloat16)
    # A product requirement, not a rounding bound: bf16 autocast may move the initial loss by less
    # than 1e-3 bits/dim (README: it moved the paper RVAE's by 8e-3 before the likelihoods stayed fp32).
    assert abs(bf16 - fp32) < 1e-3, (fp32, bf16)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())  # fp32 masters


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_model_gives_the_eager_loss_and_gradients(monkeypatch, one_torch_thread):
    """``train.compile``: the compiled forward/backward equals eager. Compiled code draws its random numbers in
    another order, so the latent noise is held fixed here (it is an input of the math, not part of it)."""
    import dbgen.models.likelihoods as likelihoods

    monkeypatch.setattr(likelihoods, "_logistic_noise", lambda like: torch.full_like(like, 0.3))
    cfg, model, x = _setup("rvae_binary_tiny", "train.compile=true")
    ref_loss, ref_grads = _loss_grads(model, x)
    prepare_model(model, cfg, torch.device("cpu"))
    loss, grads = _loss_grads(model, x)
    # Whole-model criteria as in the channels_last test (inductor fuses and reorders the element-wise work).
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    _assert_grads_close(grads, ref_grads, rtol=1e-4)
    assert list(model.state_dict()) == list(build(cfg).state_dict())  # checkpoints keep the eager names


# ------------------------------------------------------------------------------------- optimizer and the step
def _nan_grads(model):
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))


def test_device_side_clip_and_skip_equal_the_host_decision(one_torch_thread):
    """Three steps (clipped, NaN -> skipped, plain) decided on the device give the parameters and Adam state
    that host decisions give; the skipped step changes nothing at all."""
    cfg, model, x = _setup("rvae_binary_tiny", "train.grad_clip=0.01", "optimizer.lr=0.05")
    twin = copy.deepcopy(model)
    opt, twin_opt = build_optimizer(cfg, model), build_optimizer(cfg, twin)
    ema, twin_ema = EMA(model, 0.9), EMA(twin, 0.9)
    for i in range(3):
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(i)
            m(x).backward()
            if i == 1:
                _nan_grads(m)
        grads = [p.grad for p in model.parameters()]
        norm = torch.nan_to_num(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False), nan=math.inf)
        coef, skip = clip_and_skip(norm, cfg.train)  # device tensors
        host_norm = norm.item()
        host_skip = not math.isfinite(host_norm) or host_norm > cfg.train.skip_threshold
        assert bool(skip) == host_skip == (i == 1)
        if not host_skip:
            assert coef.item() < 1.0  # grad_clip 0.01: every real step is clipped
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        state_before = copy.deepcopy(opt.state_dict()["state"])
        opt.step(clip_coef=coef, skip=skip)
        twin_opt.step(clip_coef=min(1.0, cfg.train.grad_clip / (host_norm + 1e-6)), skip=host_skip)
        ema.update(model, skip)
        twin_ema.update(twin, host_skip)
        if i == 1:
            assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
            after = opt.state_dict()["state"]
            assert all(torch.equal(state_before[k][s], after[k][s]) for k in state_before for s in after[k])
        # Not bit-identical, and no a-priori bound: the device's fp32 clip coefficient and the host's float64
        # one differ by an ulp or two, so step 0 moves the twins ~1e-9 apart, and step 2's gradients come from
        # those slightly different models (a whole forward/backward). Adam normalizes the step, so the twins
        # (and their EMAs, convex combinations) stay a few ulps of the parameters apart (<= 4e-7 seen); 1e-5
        # relative + 1e-6 is ~100 ulps, and far below a wrong decision (a missed clip moves parameters by up
        # to lr = 0.05, a wrong skip by a whole step).
        for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=n, i=i: f"step {i} {n}: {m}")
        for n in ema.params:
            torch.testing.assert_close(ema.params[n], twin_ema.params[n], rtol=1e-5, atol=1e-6, msg=n)
    latents = [p for g in opt.param_groups if g["binary"] for p in g["params"]]
    assert max(p.abs().max().item() for p in latents) <= 1.0


def _caller() -> str:
    """The innermost dbgen frame of the current stack (where a host read came from)."""
    import traceback

    frames = [f for f in traceback.extract_stack() if "/dbgen/" in f.filename]
    return f"{frames[-1].filename.split('/dbgen/')[-1]}:{frames[-1].lineno}" if frames else "?"


class _HostReads(TorchDispatchMode):
    """Records every op that reads a tensor value on the host (``.item()``, ``bool(t)``, ``float(t)``,
    ``torch.equal``), with the dbgen line it came from: on a GPU each one waits for the device. (Device-to-host
    copies are not visible on a CPU; the ``gpu`` test below catches those with CUDA's sync debug mode.)"""

    READS = {"_local_scalar_dense", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            self.seen.append(f"{func.__name__} at {_caller()}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["rvae_binary_tiny", "flowpp_binary_tiny"])
def test_run_step_reads_nothing_on_the_host_and_still_skips(name, one_torch_thread):
    cfg, model, x = _setup(name, "train.grad_accum=2", "train.ema_decay=0.99")
    opt = build_optimizer(cfg, model)
    sync, ema = LocalSync(model, opt, grad_accum=2), EMA(model, 0.99)
    calls = {"n": 0}

    def poison(module, args, loss):  # NaN loss in the second micro-batch of the second step
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 4 else loss

    model.register_forward_hook(poison)
    steps, params = [], []
    for _ in range(3):
        reads = _HostReads()
        clock = PhaseClock(x.device)
        with reads:
            steps.append(
                dict(run_step(model, sync, [x[:4], x[4:]], cfg.train, 1e-3, None, clock, model, ema), clock=clock)
            )
        assert reads.seen == [], f"host reads inside run_step: {reads.seen}"
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    stats = resolve_stats(steps)
    assert [s["skipped"] for s in stats] == [False, True, False]
    assert math.isinf(stats[1]["grad_norm"]) and all(math.isfinite(stats[i]["loss"]) for i in (0, 2))
    assert all(torch.equal(params[0][n], params[1][n]) for n in params[0])  # the skipped step changed nothing
    assert any(not torch.equal(params[1][n], params[2][n]) for n in params[0])


def test_phase_clock_sums_phases_and_resolve_reads_steps():
    clock = PhaseClock(torch.device("cpu"))
    for phase in ("data", "forward", "backward", "forward", "backward", "optimizer"):
        clock.mark(phase)
    sec = clock.seconds()
    assert set(sec) == {"data", "forward", "backward", "optimizer", "step"}
    assert sec["step"] == pytest.approx(sum(v for k, v in sec.items() if k != "step"))  # Python floats, other order
    (r,) = resolve_stats(
        [
            {
                "loss": torch.tensor(2.5),
                "grad_norm": torch.tensor(0.5),
                "skipped": torch.tensor(False),
                "clock": clock,
                "lr": 0.1,
            }
        ]
    )
    assert r["loss"] == 2.5 and r["grad_norm"] == 0.5 and r["skipped"] is False and r["lr"] == 0.1
    assert r["t_step"] == sec["step"] and "clock" not in r


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.parametrize("name", ["rvae_cifar10_binary", "flowpp_cifar10_binary", "rvae_cifar10_binary_act"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_fast_step_matches_fp32_at_init(name):
    """The paper configs on CUDA: bf16 + channels_last vs the plain fp32 step at initialization, within 1e-3
    bits/dim (TF32 off for the reference)."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    cfg, model, x = _setup(name, "train.precision=bf16", "train.channels_last=true", n=32, device=dev, perturb=False)
    ref, _ = _loss_grads(model, x.to(dev))
    prepare_model(model, cfg, dev)
    fast, grads = _loss_grads(model, batch_to_device(x, dev, True), amp=torch.bfloat16)
    assert abs(fast - ref) < 1e-3, (ref, fast)  # the product requirement, not a rounding bound
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.timeout(300)
def test_gpu_compiled_rvae_matches_eager(monkeypatch):
    """The paper RVAE compiled (bf16, channels_last, the bench's batch 128, so inductor's cache serves the
    bench's compiled run afterwards) against the same settings eager, latent noise held fixed (compiled code
    draws its random numbers in another order)."""
    import dbgen.models.likelihoods as likelihoods

    monkeypatch.setattr(likelihoods, "_logistic_noise", lambda like: torch.full_like(like, 0.3))
    dev = torch.device("cuda")
    cfg, model, x = _setup(
        "rvae_cifar10_binary",
        "train.precision=bf16",
        "train.channels_last=true",
        "train.compile=true",
        n=128,
        device=dev,
    )
    xl = batch_to_device(x, dev, True)
    cfg_eager = load_config(CONFIGS / "rvae_cifar10_binary.yaml", ["train.channels_last=true"])
    prepare_model(model, cfg_eager, dev)
    ref_loss, ref_grads = _loss_grads(model, xl, amp=torch.bfloat16)
    prepare_model(model, cfg, dev)
    loss, grads = _loss_grads(model, xl, amp=torch.bfloat16)
    # Whole-model criteria in bf16 (fused kernels round differently; bf16's unit roundoff is 2^-8 = 3.9e-3):
    # the loss within the product's 1e-3 bits/dim, gradients within 2e-2 of each tensor's largest entry.
    assert loss == pytest.approx(ref_loss, abs=1e-3)
    _assert_grads_close(grads, ref_grads, rtol=2e-2)


@pytest.mark.parametrize("name", ["rvae_binary_tiny", "flowpp_binary_tiny"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_run_step_never_syncs(name):
    dev = torch.device("cuda")
    cfg, model, x = _setup(name, "train.ema_decay=0.99", device=dev)
    prepare_model(model, cfg, dev)
    opt = build_optimizer(cfg, model)
    sync, ema = LocalSync(model, opt), EMA(model, 0.99)
    xb = batch_to_device(x, dev, True)
    run_step(model, sync, [xb], cfg.train, 1e-3, torch.bfloat16, PhaseClock(dev), model, ema)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = [
            run_step(model, sync, [xb], cfg.train, 1e-3, torch.bfloat16, PhaseClock(dev), model, ema) for _ in range(3)
        ]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = resolve_stats([dict(o, clock=PhaseClock(dev)) for o in out])
    assert all(math.isfinite(s["loss"]) and not s["skipped"] for s in stats)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_fused_bwn_weight_matches_formula():
    layer = BinaryConv2d(256, 256, 3, padding=1).cuda()
    with torch.no_grad():
        layer.gain.uniform_(0.5, 2.0)
    ref = sign_ste(layer.weight) * (1.0 / math.sqrt(layer.fan_in)) * layer.gain.view(-1, 1, 1, 1)
    assert torch.equal(layer.effective_weight(), ref)
    x = torch.randn(4, 256, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = F.conv2d(x, ref.to(torch.bfloat16), layer.bias, padding=1)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # the same bf16 weight, one cuDNN call each: identical
