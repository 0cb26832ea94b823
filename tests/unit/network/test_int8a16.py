"""int8a16: int8 weights and int8 products with 16-bit activations carried as two int8
halves: exact, closer to fp32 than 8-bit activations, batch-invariant, and the same
rounding in the eager kernel and the ONNX Runtime graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from app.network import artifact
from app.network.invariant import Q16, Int8Linear, quantize_per_token16
from app.network.quantize import batch_invariant, int8_kernel, resolve, scheme
from tests.tiny import random_texts
from tests.unit.network.helpers import both_kernels_serve_rows_alone_as_in_a_batch

needs_ort = pytest.mark.skipif(
    int8_kernel() != "onnxruntime", reason="onnx and onnxruntime are not installed"
)


def test_the_halves_carry_every_16_bit_value_exactly() -> None:
    torch.manual_seed(0)
    x = torch.randn(2000, 48) * torch.logspace(-3, 3, 2000)[:, None]
    x[0, :2] = torch.tensor([1.0, -1.0])  # +-amax: the ends of the range
    hi, lo, scale = quantize_per_token16(x.clone())
    q = torch.div(x, scale).round()
    assert torch.equal(hi * 256 + lo, q)
    assert int(q.abs().max()) == Q16
    assert int(hi.min()) >= -128 and int(hi.max()) <= 127  # int8
    assert int(lo.min()) >= 0 and int(lo.max()) <= 255  # a byte: shifted by 128 into int8
    assert torch.equal(hi, hi.round()) and torch.equal(lo, lo.round())


def test_16_bit_activations_round_less_and_stay_batch_invariant() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(64, 96)
    x = torch.randn(33, 64) * 3
    with torch.inference_mode():
        exact = lin(x)
        err8 = (Int8Linear(lin, "int_mm")(x) - exact).abs().mean()
        a16 = Int8Linear(lin, "auto", activation_bits=16)
        y = a16(x)
        alone = torch.cat([a16(x[i : i + 1]) for i in range(len(x))])
    assert a16.kernel == "int_mm"  # the join of the halves needs the int32 sums
    assert float((y - exact).abs().mean()) < 0.7 * float(err8)
    assert torch.equal(alone, y)
    with pytest.raises(ValueError, match="activation_bits 4"):
        Int8Linear(lin, activation_bits=4)


def test_the_halves_join_past_the_int32_range() -> None:
    """|256 * sum(hi)| exceeds 2^31 for wide inputs at full scale: the join is in float."""
    k = 1536
    lin = nn.Linear(k, 2, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    x = torch.ones(1, k)  # every activation at +amax: q = Q16 everywhere
    with torch.inference_mode():
        y = Int8Linear(lin, activation_bits=16)(x)
    assert 256 * 127 * 127 * k > 2**31
    assert torch.allclose(y, torch.full((1, 2), float(k)), rtol=1e-6)


def test_the_mode_is_cpu_only_batch_invariant_and_named() -> None:
    assert resolve("cpu", "int8a16") == ("cpu", "int8a16")
    assert batch_invariant("cpu", "int8a16")
    assert "16-bit activations" in scheme("int8a16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            resolve("cuda", "int8a16")


@needs_ort
def test_both_kernels_serve_it_and_a_row_gets_its_bits_alone_or_in_a_batch(
    tiny_model_dir: Path, tiny_loaded: artifact.LoadedModel
) -> None:
    ids = tiny_loaded.tokenizer.encode(random_texts(24, seed=5))
    net = artifact.load(tiny_model_dir).network
    both_kernels_serve_rows_alone_as_in_a_batch(net, "int8a16", ids)


@needs_ort
def test_the_graphs_split_activations_exactly_as_quantize_per_token16() -> None:
    import onnxruntime
    from onnx import TensorProto, helper

    from app.network.ort_layers import _Builder
    from app.network.ort_session import OPSET

    torch.manual_seed(4)
    k = 32
    x = torch.randn(5000, k) * torch.logspace(-3, 3, 5000)[:, None]
    g = _Builder()
    hi, lo, scale = g.quantize16("x", k)
    out = [helper.make_tensor_value_info(n, t, None)
           for n, t in ((hi, TensorProto.UINT8), (lo, TensorProto.UINT8),
                        (scale, TensorProto.FLOAT))]  # fmt: skip
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])
    graph = helper.make_graph(g.nodes, "q16", [x_in], out, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    session = onnxruntime.InferenceSession(model.SerializeToString())
    got_hi, got_lo, got_scale = session.run(None, {"x": x.numpy()})
    want_hi, want_lo, want_scale = quantize_per_token16(x.clone())
    assert np.array_equal(got_hi.astype(np.int32) - 128, want_hi.to(torch.int32).numpy())
    assert np.array_equal(got_lo.astype(np.int32), want_lo.to(torch.int32).numpy())
    assert np.array_equal(got_scale, want_scale.numpy())
