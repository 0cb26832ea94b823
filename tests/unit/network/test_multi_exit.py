"""The multi-exit network: stage interface, batches in flight (packed), padding invariance,
config checks, pad_batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.network import artifact
from app.network.backends import Backend, as_is, make_backend
from app.network.encoder import EncoderConfig
from app.network.invariant import Int8Linear
from app.network.multi_exit import MultiExitConfig, MultiExitNetwork, pad_batch
from app.network.quantize import int8_kernel
from tests.tiny import random_texts

SMALL = EncoderConfig(
    vocab_size=50,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


def test_stage_interface_equals_forward(tiny_loaded: artifact.LoadedModel) -> None:
    net = tiny_loaded.network
    rows = tiny_loaded.tokenizer.encode(random_texts(8, seed=1))
    ids, mask = pad_batch(rows)
    with torch.inference_mode():
        expected = net(ids, mask, keep_hidden=True).logits  # (L, B, C), padded throughout
        packed = as_is(net).all_exits(rows)  # inference on the CPU runs packed, as served
        bias = net.attention_bias(mask)
        x = net.embed(ids)
        staged = []
        for i in range(net.num_layers):
            x = net.layer(i, x, bias)
            staged.append(net.exit_logits(i, x, mask))
    assert expected.shape == (4, 8, 2)
    torch.testing.assert_close(torch.stack(staged), expected, rtol=0, atol=0)
    # fp32 GEMMs sum in an order that depends on the number of rows (see `invariant`).
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module", params=["none/torch", "int8/torch", "int8/onnxruntime"])
def served(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Backend:
    """The tiny model as served on the CPU: fp32, and int8 on both kernels."""
    quantization, kernel = request.param.split("/")
    if kernel == "onnxruntime" and int8_kernel() != "onnxruntime":
        pytest.skip("onnx and onnxruntime are not installed")
    return make_backend(artifact.load(tiny_model_dir).network, "cpu", quantization, kernel)


def assert_same_bits_in_int8(net: Backend, got: torch.Tensor, want: torch.Tensor) -> None:
    """int8 sums are exact, so a row gets the same bits in any company; an fp32 GEMM picks
    its kernel by the number of rows, which moves the last bits (1e-6 measured)."""
    if isinstance(net.model.head(0).dense, Int8Linear):
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_packed_batches_compute_what_all_exits_computes(
    served: Backend, tiny_loaded: artifact.LoadedModel
) -> None:
    """In flight on the CPU a batch is packed (no padding; attention per row; pooling per
    stretch). Every exit's logits are the bits `all_exits` (evaluation's path) gives the
    rows in one batch, whatever the order of lengths."""
    ids = tiny_loaded.tokenizer.encode(random_texts(24, seed=5, min_words=1, max_words=40))
    ids += [ids[3], ids[3], ids[0]]  # stretches of equal lengths, in the middle and at the end
    with torch.inference_mode():
        want = served.all_exits(ids)  # (L, B, C)
        for order in (list(range(len(ids))), sorted(range(len(ids)), key=lambda b: -len(ids[b]))):
            batch = served.begin([ids[b] for b in order])
            assert batch.packed and batch.tokens == sum(len(r) for r in ids)
            for i in range(served.num_layers):
                batch = served.step(i, batch, exit=True)
                assert batch.logits is not None
                assert_same_bits_in_int8(served, batch.logits, want[i, order])


def test_rows_kept_and_joined_in_flight_compute_what_they_compute_alone(
    served: Backend, tiny_loaded: artifact.LoadedModel
) -> None:
    ids = tiny_loaded.tokenizer.encode(random_texts(12, seed=6, min_words=1, max_words=40))
    with torch.inference_mode():
        want = served.all_exits(ids)  # (L, B, C)
        a = served.step(0, served.begin(ids[:8]))
        b = served.step(0, served.begin(ids[8:]))
        joined = served.join(served.keep(a, [1, 4, 5]), b)
        assert joined.lengths == tuple(len(ids[j]) for j in (1, 4, 5, 8, 9, 10, 11))
        joined = served.step(1, joined, exit=True)
        assert joined.logits is not None
        assert_same_bits_in_int8(served, joined.logits, want[1, [1, 4, 5, 8, 9, 10, 11]])


def test_forward_keep_hidden_returns_every_layer(tiny_loaded: artifact.LoadedModel) -> None:
    ids, mask = pad_batch(tiny_loaded.tokenizer.encode(["good movie", "bad"]))
    with torch.inference_mode():
        out = tiny_loaded.network(ids, mask, keep_hidden=True)
    assert len(out.hidden) == 4
    assert all(h.shape == (2, ids.shape[1], 32) for h in out.hidden)


def test_right_padding_does_not_change_a_rows_logits(tiny_loaded: artifact.LoadedModel) -> None:
    net = tiny_loaded.network
    rows = tiny_loaded.tokenizer.encode(["a good film", "this was a long and very boring movie"])
    short = rows[0]
    with torch.inference_mode():
        alone = net(*pad_batch([short])).logits[:, 0]  # (L, C)
        padded = net(*pad_batch(rows)).logits[:, 0]
        extra_pad = torch.tensor([short + [0] * 20])
        extra_mask = torch.tensor([[1] * len(short) + [0] * 20])
        far = net(extra_pad, extra_mask).logits[:, 0]
    assert len(rows[1]) > len(short)
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(far, alone, rtol=0, atol=1e-5)


def test_different_inputs_get_different_confidences(tiny_loaded: artifact.LoadedModel) -> None:
    # Guards the tiny model itself: the executor tests need spread-out confidences.
    ids, mask = pad_batch(tiny_loaded.tokenizer.encode(random_texts(64, seed=2)))
    with torch.inference_mode():
        conf, pred = torch.softmax(tiny_loaded.network(ids, mask).logits, -1).max(-1)  # (L, B)
    assert float(conf.min()) < 0.7 and float(conf.max()) > 0.9
    assert 0.2 < float(pred[-1].float().mean()) < 0.8


def test_encoder_config_rejects_heads_not_dividing_hidden() -> None:
    with pytest.raises(ValueError, match=r"hidden_size 30 is not divisible by num_heads 4"):
        EncoderConfig(hidden_size=30, num_heads=4)


def test_encoder_config_rejects_zero_layers() -> None:
    with pytest.raises(ValueError, match=r"num_layers must be >= 1, got 0"):
        EncoderConfig(num_layers=0)


def test_config_rejects_fewer_than_two_labels() -> None:
    with pytest.raises(ValueError, match=r"need at least 2 labels, got 1"):
        MultiExitConfig(encoder=SMALL, labels=("only",))


def test_config_rejects_duplicate_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must be unique, got \['a', 'b', 'a'\]"):
        MultiExitConfig(encoder=SMALL, labels=("a", "b", "a"))


@pytest.mark.parametrize("max_seq_len", [1, 65])
def test_config_rejects_max_seq_len_out_of_range(max_seq_len: int) -> None:
    with pytest.raises(ValueError, match=rf"max_seq_len must be in 2\.\.64, got {max_seq_len}"):
        MultiExitConfig(encoder=SMALL, labels=("a", "b"), max_seq_len=max_seq_len)


def test_config_dict_round_trip() -> None:
    cfg = MultiExitConfig(encoder=SMALL, labels=("x", "y", "z"), max_seq_len=64, head_dropout=0.2)
    assert MultiExitConfig.from_dict(cfg.to_dict()) == cfg


def test_network_has_one_head_per_layer() -> None:
    net = MultiExitNetwork(MultiExitConfig(encoder=SMALL, labels=("a", "b", "c"), max_seq_len=64))
    assert net.num_layers == len(net.heads) == 2
    assert all(h.classifier.out_features == 3 for h in net.heads)


def test_pad_batch_right_pads_to_longest() -> None:
    ids, mask = pad_batch([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_pad_batch_uses_the_given_pad_id() -> None:
    ids, _ = pad_batch([[1], [2, 3]], pad_id=99)
    assert ids.tolist() == [[1, 99], [2, 3]]


@pytest.mark.parametrize("rows", [[], [[1, 2], []]])
def test_pad_batch_rejects_empty_rows(rows: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        pad_batch(rows)
