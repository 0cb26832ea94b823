"""int8's channel smoothing: exact in fp32, smaller int8 error where a channel is wide,
measured without padding, stored in and checked by the artifact, and the same rounding
in the eager kernel and the ONNX Runtime graphs."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.engine.runtime import load_runtime
from app.network import artifact, smoothing
from app.network.backends import make_backend
from app.network.invariant import Int8Linear
from app.network.multi_exit import MultiExitNetwork
from app.network.quantize import INT8_SCHEME, INT8A16_SCHEME, int8_kernel, prepare_model
from tests.tiny import random_texts
from tests.unit.network.helpers import both_kernels_serve_rows_alone_as_in_a_batch


def wide_channel(net: MultiExitNetwork, channel: int = 3, factor: float = 30.0) -> None:
    """Make one hidden channel of the residual stream `factor` times wider, as trained
    encoders have (every layer's output LayerNorm scales it)."""
    with torch.no_grad():
        for layer in net.encoder.encoder.layer:
            layer.output.LayerNorm.weight[channel] *= factor
            layer.output.LayerNorm.bias[channel] *= factor


def smoothed(net: MultiExitNetwork, ids: list[list[int]], alpha: float = 0.5) -> None:
    net.int8_smoothing = smoothing.factors(net, smoothing.channel_maxima(net, ids), alpha)


def test_a_linear_gives_the_same_answer_in_fp32_and_a_wide_channel_rounds_less() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(200, 64)
    x[:, 5] *= 60.0  # one wide channel
    s = (x.abs().amax(0) ** 0.5) / (lin.weight.abs().amax(0) ** 0.5)
    exact = F.linear(x, lin.weight, lin.bias)
    moved = F.linear(x / s, lin.weight * s, lin.bias)
    assert torch.allclose(moved, exact, rtol=1e-4, atol=1e-4)
    plain = (Int8Linear(lin, "int_mm")(x) - exact).abs().mean()
    smooth = (Int8Linear(lin, "int_mm", smooth=s)(x) - exact).abs().mean()
    assert smooth < 0.5 * plain


def test_the_model_served_in_int8_moves_less_from_fp32_with_its_smoothing(
    tiny_model_dir: Path, tiny_loaded: artifact.LoadedModel
) -> None:
    net = artifact.load(tiny_model_dir).network
    wide_channel(net)
    measured = tiny_loaded.tokenizer.encode(random_texts(64, seed=1))
    ids = tiny_loaded.tokenizer.encode(random_texts(64, seed=2))
    with torch.inference_mode():
        fp32 = make_backend(copy.deepcopy(net), "cpu", "none").all_exits(ids)[-1]
        plain = make_backend(copy.deepcopy(net), "cpu", "int8").all_exits(ids)[-1]
        smoothed(net, measured)
        smooth = make_backend(copy.deepcopy(net), "cpu", "int8").all_exits(ids)[-1]
    assert (smooth - fp32).abs().mean() < 0.5 * (plain - fp32).abs().mean()


def test_sites_are_named_as_served_fused_or_not(tiny_loaded: artifact.LoadedModel) -> None:
    unfused = copy.deepcopy(tiny_loaded.network)
    fused = prepare_model(copy.deepcopy(tiny_loaded.network), "cpu", "none")
    a, b = smoothing.served_sites(unfused), smoothing.served_sites(fused)
    assert list(a) == list(b)
    assert "encoder.encoder.layer.0.attention.self.qkv" in a
    assert not any(n.endswith((".query", ".key", ".value")) for n in a)
    assert any(n.startswith("heads.") for n in a)
    for name in a:  # the unfused query, key and value stack as the fused qkv holds them
        assert torch.equal(
            smoothing.weight_of(unfused, name, a[name]), smoothing.weight_of(fused, name, b[name])
        )


def test_maxima_leave_padding_out(tiny_loaded: artifact.LoadedModel) -> None:
    net = tiny_loaded.network
    short, long = tiny_loaded.tokenizer.encode(["good", "a long and rather dull film"])
    together = smoothing.channel_maxima(net, [short, long])
    alone = [smoothing.channel_maxima(net, [row]) for row in (short, long)]
    for name, m in together.items():
        if name.startswith("heads."):
            continue  # pooled rows: one per input, no padding to leave out
        assert torch.allclose(m, torch.maximum(alone[0][name], alone[1][name]), atol=1e-5)


def test_the_artifact_stores_the_factors_and_int8_alone_uses_them(
    tiny_model_dir: Path, tiny_loaded: artifact.LoadedModel, tmp_path: Path
) -> None:
    net = artifact.load(tiny_model_dir).network
    smoothed(net, tiny_loaded.tokenizer.encode(random_texts(32, seed=3)))
    out = tmp_path / "smoothed"
    spec = copy.deepcopy(tiny_loaded.spec)
    shutil.copy(tiny_model_dir / artifact.TOKENIZER_FILE, tmp_path / "tok.json")
    artifact.save(out, spec, net, tokenizer_file=tmp_path / "tok.json")
    back = artifact.load(out).network
    assert back.int8_smoothing.keys() == net.int8_smoothing.keys()
    for name, s in net.int8_smoothing.items():
        assert torch.equal(back.int8_smoothing[name], s)
    for mode, expect in (("int8", True), ("int8a16", False)):
        model = make_backend(artifact.load(out).network, "cpu", mode).model
        linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
        assert linears and all((m.inv_smooth is not None) is expect for m in linears)
    # /info and the calibration and evaluation records name it.
    assert load_runtime(out, "cpu", "int8").scheme == INT8_SCHEME + ", channel smoothing"
    assert load_runtime(tiny_model_dir, "cpu", "int8").scheme == INT8_SCHEME
    assert load_runtime(out, "cpu", "int8a16").scheme == INT8A16_SCHEME


@pytest.mark.parametrize(
    ("name", "factor", "says"),
    [
        ("heads.0.nowhere", torch.ones(32), "no served linear"),
        ("encoder.encoder.layer.0.attention.self.qkv", torch.ones(7), "has shape (7,)"),
        ("encoder.encoder.layer.0.output.dense", -torch.ones(64), "not finite and positive"),
    ],
)
def test_factors_that_do_not_fit_the_network_are_refused_naming_them(
    tiny_model_dir: Path,
    tiny_loaded: artifact.LoadedModel,
    tmp_path: Path,
    name: str,
    factor: torch.Tensor,
    says: str,
) -> None:
    net = artifact.load(tiny_model_dir).network
    net.int8_smoothing = {name: factor}
    shutil.copy(tiny_model_dir / artifact.TOKENIZER_FILE, tmp_path / "tok.json")
    artifact.save(tmp_path / "bad", copy.deepcopy(tiny_loaded.spec), net, tmp_path / "tok.json")
    with pytest.raises(artifact.ArtifactError, match=re.escape(says)) as refused:
        artifact.load(tmp_path / "bad")
    assert repr(name) in str(refused.value)


@pytest.mark.skipif(int8_kernel() != "onnxruntime", reason="onnxruntime is not installed")
def test_both_kernels_smooth_alike_and_a_row_gets_its_bits_alone_or_in_a_batch(
    tiny_model_dir: Path, tiny_loaded: artifact.LoadedModel
) -> None:
    ids = tiny_loaded.tokenizer.encode(random_texts(24, seed=5))
    net = artifact.load(tiny_model_dir).network
    wide_channel(net)
    smoothed(net, tiny_loaded.tokenizer.encode(random_texts(32, seed=6)))
    both_kernels_serve_rows_alone_as_in_a_batch(net, "int8", ids)
