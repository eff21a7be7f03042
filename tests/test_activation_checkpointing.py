"""train.activation_checkpointing: a checkpointed step computes the same loss and gradients as the plain one.

Bitwise on CPU fp32: the recomputation replays the same ops on the same inputs with the RNG state restored
(the RVAE's latent noise, Flow++'s dequantization noise outside the checkpointed networks), and each gradient
is produced by the same kernels; only the moment the backward runs them changes. Checkpointing must also
actually apply: the tensors autograd keeps outside checkpointed blocks shrink.
"""

from pathlib import Path

import pytest
import torch

from dbgen.config import load_config
from dbgen.models import build, set_activation_checkpointing
from dbgen.nn import data_dependent_init

ROOT = Path(__file__).parents[1]
TINY = [f"{m}_{v}_tiny.yaml" for m in ("rvae", "flowpp") for v in ("fp", "binary", "binary_act")]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(n, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def saved_bytes_and_grads(model, x, seed):
    """Loss, gradients and the bytes of the tensors autograd saves outside checkpointed blocks (parameters
    excluded), for one forward/backward with the global RNG seeded to ``seed``."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("config", TINY)
def test_checkpointed_step_equals_plain_step_bitwise(config):
    cfg = load_config(ROOT / "configs" / config)
    torch.manual_seed(0)
    model = build(cfg.model)
    data_dependent_init(model, images(32, seed=1))
    model.train()
    x = images(8)
    loss, grads, plain_saved = saved_bytes_and_grads(model, x, seed=3)
    assert set_activation_checkpointing(model, True) >= 1
    loss_ckpt, grads_ckpt, ckpt_saved = saved_bytes_and_grads(model, x, seed=3)
    assert torch.equal(loss, loss_ckpt), (loss.item(), loss_ckpt.item())
    assert grads.keys() == grads_ckpt.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        assert torch.equal(g, grads_ckpt[name]), f"{config}: gradient of {name} differs"
    # Checkpointing keeps only the blocks' inputs and what lies between blocks (for the tiny Flow++, whose
    # 8-wide networks are small beside the mixture transforms outside them, about 2/3 of the plain bytes).
    assert ckpt_saved < 0.75 * plain_saved, (ckpt_saved, plain_saved)
    # A different noise seed gives a different loss: the equality above is not a constant.
    other, _, _ = saved_bytes_and_grads(model, x, seed=4)
    assert not torch.equal(other, loss_ckpt)


def test_no_grad_and_sampling_unchanged():
    """Under no_grad (eval, sampling) checkpointing is not used: same samples, same bound."""
    cfg = load_config(ROOT / "configs" / "rvae_binary_tiny.yaml")
    torch.manual_seed(0)
    model = build(cfg.model)
    data_dependent_init(model, images(32, seed=1))
    model.eval()
    torch.manual_seed(5)
    plain = model.sample(4), model.log_likelihood_bpd(images(4))
    set_activation_checkpointing(model, True)
    torch.manual_seed(5)
    ckpt = model.sample(4), model.log_likelihood_bpd(images(4))
    assert torch.equal(plain[0], ckpt[0]) and torch.equal(plain[1], ckpt[1])
