"""Bit packing, packed state dicts and size accounting."""

import numpy as np
import pytest
import torch
from torch import nn

import dbgen.nn as dnn


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000003])
def test_pack_round_trip_and_layout(n):
    t = torch.randn(n, generator=torch.Generator().manual_seed(n))
    packed = dnn.pack_signs(t)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,)
    # Documented layout = numpy's packbits with bitorder="little" on (t >= 0).
    expected = np.packbits((t >= 0).numpy(), bitorder="little")
    assert np.array_equal(packed.numpy(), expected)
    signs = dnn.unpack_signs(packed, t.shape)
    assert torch.equal(signs, torch.where(t >= 0, 1.0, -1.0))


def test_pack_zero_and_negative_zero_are_plus_one():
    t = torch.tensor([0.0, -0.0, -1e-30, 1e-30, -3.0])
    assert dnn.unpack_signs(dnn.pack_signs(t), t.shape).tolist() == [1, 1, -1, 1, -1]


def test_pack_multidim_row_major_and_dtype():
    t = torch.randn(3, 5, 2, 2)
    out = dnn.unpack_signs(dnn.pack_signs(t), t.shape, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == t.shape
    assert torch.equal(out.float(), torch.where(t >= 0, 1.0, -1.0))
    # element i of the flattened tensor sits in byte i // 8, bit i % 8
    flat = t.reshape(-1)
    packed = dnn.pack_signs(t)
    for i in (0, 7, 8, 29, 59):
        assert ((int(packed[i // 8]) >> (i % 8)) & 1) == int(flat[i] >= 0)


def test_unpack_bad_arguments_name_the_mismatch():
    with pytest.raises(ValueError, match="uint8"):
        dnn.unpack_signs(torch.zeros(2, dtype=torch.int32), (16,))
    with pytest.raises(ValueError, match=r"\(3, 5\).*2 bytes.*3 bytes"):
        dnn.unpack_signs(torch.zeros(3, dtype=torch.uint8), (3, 5))
    with pytest.raises(ValueError, match="torch.Tensor"):
        dnn.pack_signs([1.0, -1.0])


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        dnn.WNConv2d(3, 8, 3, padding=1),
        nn.ELU(),
        dnn.BinaryConv2d(8, 8, 3, padding=1),
        nn.ELU(),
        dnn.BinaryConvTranspose2d(8, 5, 4, stride=2, padding=1),
        nn.Flatten(),
        dnn.BinaryLinear(5 * 8 * 8, 10),
        nn.LayerNorm(10),
    )


def test_packed_state_round_trip_is_bit_identical():
    model = small_model()
    x = torch.randn(4, 3, 4, 4)
    dnn.data_dependent_init(model, x)
    y = model(x)
    state = dnn.packed_state_dict(model)
    assert {k for k in state if k.endswith(".packed_signs")} == {
        "2.weight.packed_signs",
        "4.weight.packed_signs",
        "6.weight.packed_signs",
    }
    assert state["2.weight.packed_signs"].numel() == (8 * 8 * 9 + 7) // 8
    fresh = small_model()
    torch.manual_seed(123)
    for p in fresh.parameters():
        nn.init.normal_(p)
    dnn.load_packed_state_dict(fresh, state)
    assert torch.equal(fresh(x), y)
    assert set(fresh[2].weight.unique().tolist()) <= {-1.0, 1.0}


def test_load_packed_state_rejects_mismatch():
    model = small_model()
    state = dnn.packed_state_dict(model)
    del state["2.weight.packed_signs"]
    with pytest.raises(ValueError, match="missing keys.*2.weight.packed_signs"):
        dnn.load_packed_state_dict(model, state)
    state = dnn.packed_state_dict(model)
    state["4.weight.packed_signs"] = state["4.weight.packed_signs"][:-1]
    with pytest.raises(ValueError, match="bytes"):
        dnn.load_packed_state_dict(model, state)


def test_size_report_counts():
    model = small_model()
    r = dnn.size_report(model)
    binary = 8 * 8 * 9 + 8 * 5 * 16 + 10 * 320
    total = sum(p.numel() for p in model.parameters())
    assert r["params"] == total and r["binary_params"] == binary
    assert r["binary_fraction"] == pytest.approx(binary / total)
    assert r["fp32_bytes"] == total * 4
    packed_binary = (8 * 8 * 9 + 7) // 8 + (8 * 5 * 16 + 7) // 8 + (10 * 320 + 7) // 8
    assert r["packed_bytes"] == packed_binary + (total - binary) * 4
    assert r["packed_fp16_bytes"] == packed_binary + (total - binary) * 2
