"""Quantization: device/mode resolution, int8 serving, and int8-aware training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from app.network import artifact
from app.network.multi_exit import pad_batch
from app.network.quantize import _FakeQuantLinear, fake_int8, prepare, resolve
from tests.tiny import random_texts

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@no_cuda
def test_auto_on_cpu_only_machine_is_cpu_int8() -> None:
    assert resolve("auto", "auto") == ("cpu", "int8")


@pytest.mark.parametrize("mode", ["int8", "fp16", "bf16", "none"])
def test_explicit_cpu_modes_pass_through(mode: str) -> None:
    assert resolve("cpu", mode) == ("cpu", mode)


def test_unknown_device_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown device 'tpu'"):
        resolve("tpu", "auto")


def test_unknown_quantization_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown quantization 'int4'"):
        resolve("cpu", "int4")


@no_cuda
def test_cuda_without_gpu_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"no CUDA GPU is visible"):
        resolve("cuda", "fp16")


def test_int8_replaces_encoder_linears_with_dynamic_quantized(tiny_model_dir: Path) -> None:
    net = prepare(artifact.load(tiny_model_dir).network, "cpu", "int8")
    layer = net.encoder.encoder.layer[0]
    linears = {
        "qkv": layer.attention.self.qkv,
        "attention.output": layer.attention.output.dense,
        "intermediate": layer.intermediate.dense,
        "output": layer.output.dense,
    }
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for name, module in linears.items():
        assert isinstance(module, DynamicLinear), name
        assert module.weight().dtype == torch.qint8, name
    plain = [n for n, m in net.encoder.encoder.named_modules() if type(m) is nn.Linear]
    assert plain == []
    # The exit heads stay fp32.
    assert all(type(h.classifier) is nn.Linear for h in net.heads)
    assert not net.training


def test_int8_final_exit_agrees_with_fp32(
    tiny_model_dir: Path, tiny_loaded: artifact.LoadedModel
) -> None:
    ids, mask = pad_batch(tiny_loaded.tokenizer.encode(random_texts(64, seed=5)))
    int8 = prepare(artifact.load(tiny_model_dir).network, "cpu", "int8")
    with torch.inference_mode():
        ref = tiny_loaded.network(ids, mask).logits[-1].argmax(-1)  # (B,)
        got = int8(ids, mask).logits[-1].argmax(-1)
    assert float((ref == got).float().mean()) >= 0.9


def test_fake_int8_wraps_every_encoder_linear(tiny_model_dir: Path) -> None:
    net = artifact.load(tiny_model_dir).network
    with fake_int8(net):
        layer = net.encoder.encoder.layer[0]
        for module in (
            layer.attention.self.query,
            layer.attention.self.key,
            layer.attention.self.value,
            layer.attention.output.dense,
            layer.intermediate.dense,
            layer.output.dense,
        ):
            assert isinstance(module, _FakeQuantLinear)
        # No linear is left directly under a layer; each sits inside its wrapper.
        parents = {
            type(parent)
            for parent in net.encoder.encoder.modules()
            for child in parent.children()
            if isinstance(child, nn.Linear)
        }
        assert parents == {_FakeQuantLinear}
        assert type(net.heads[0].classifier) is nn.Linear  # heads untouched


def test_fake_int8_changes_outputs_slightly(tiny_model_dir: Path) -> None:
    net = artifact.load(tiny_model_dir).network
    ids, mask = pad_batch([[2, 10, 20, 30, 3], [2, 40, 3]])
    with torch.no_grad():
        ref = net(ids, mask).logits
        with fake_int8(net):
            fq = net(ids, mask).logits
    assert not torch.equal(fq, ref)
    torch.testing.assert_close(fq, ref, rtol=0, atol=0.5)


def test_fake_int8_passes_gradients_to_the_original_weights(tiny_model_dir: Path) -> None:
    net = artifact.load(tiny_model_dir).network.train()
    ids, mask = pad_batch([[2, 10, 20, 30, 3], [2, 40, 3]])
    with fake_int8(net):
        loss = net(ids, mask).logits.float().logsumexp(-1).sum()
        loss.backward()
    for name, p in net.encoder.encoder.named_parameters():
        if name.endswith(".weight") and "LayerNorm" not in name:
            assert p.grad is not None, name
            assert float(p.grad.abs().sum()) > 0, name


def test_fake_int8_restores_the_module_tree(tiny_model_dir: Path) -> None:
    net = artifact.load(tiny_model_dir).network
    before = dict(net.named_modules())
    params_before = {n: p for n, p in net.named_parameters()}
    with fake_int8(net):
        pass
    after = dict(net.named_modules())
    assert list(after) == list(before)
    assert all(after[n] is m for n, m in before.items())
    assert all(p is params_before[n] for n, p in net.named_parameters())


def test_fake_int8_restores_the_module_tree_after_an_error(tiny_model_dir: Path) -> None:
    net = artifact.load(tiny_model_dir).network
    query = net.encoder.encoder.layer[0].attention.self.query
    with pytest.raises(RuntimeError, match="boom"), fake_int8(net):
        raise RuntimeError("boom")
    assert net.encoder.encoder.layer[0].attention.self.query is query


def test_serving_preparation_keeps_fp32_answers(tiny_model_dir: Path) -> None:
    # prepare() fuses query/key/value into one linear; in fp32 that must not change logits.
    from app.network.multi_exit import pad_batch
    from tests.tiny import random_texts

    ref = artifact.load(tiny_model_dir)
    fused = prepare(artifact.load(tiny_model_dir).network, "cpu", "none")
    assert fused.encoder.encoder.layer[0].attention.self.qkv is not None
    ids, mask = pad_batch(ref.tokenizer.encode(random_texts(16, seed=3)))
    with torch.inference_mode():
        torch.testing.assert_close(
            fused(ids, mask).logits, ref.network(ids, mask).logits, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_half_precision_path_runs_the_executor(tiny_model_dir: Path, mode: str) -> None:
    # The CUDA path uses the same code in fp16/bf16; on the CPU it must run and agree.
    from app.engine.executor import Row, run_batch
    from tests.tiny import random_texts

    ref = artifact.load(tiny_model_dir)
    half = prepare(artifact.load(tiny_model_dir).network, "cpu", mode)
    assert half.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    ids = ref.tokenizer.encode(random_texts(32, seed=5))
    L = ref.network.num_layers
    rows = [Row(r, [1.0] * L, L) for r in ids]
    got = run_batch(half, rows).predictions
    want = run_batch(ref.network, rows).predictions
    same = sum(g.label_index == w.label_index for g, w in zip(got, want, strict=True))
    assert same >= 28
    assert all(g.exit_layer == L for g in got)
