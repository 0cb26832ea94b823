"""Encoder layers as ONNX Runtime graphs: the same scheme as the eager int8 layers, the
same bits whichever way a row goes through them, and the kernel setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from app.network import artifact
from app.network.backends import Backend, PackedOnnx, PackedTorch, make_backend
from app.network.encoder import Layer
from app.network.invariant import quantize_per_token
from app.network.ort_layers import OrtLayer
from app.network.quantize import int8_kernel
from tests.tiny import random_texts

pytestmark = pytest.mark.skipif(
    int8_kernel() != "onnxruntime", reason="onnx and onnxruntime are not installed"
)


@pytest.fixture(scope="module")
def eager(tiny_model_dir: Path) -> Backend:
    return make_backend(artifact.load(tiny_model_dir).network, "cpu", "int8", "torch")


@pytest.fixture(scope="module")
def fast(tiny_model_dir: Path) -> Backend:
    return make_backend(artifact.load(tiny_model_dir).network, "cpu", "int8", "onnxruntime")


def test_the_kernel_setting(tiny_model_dir: Path) -> None:
    def backend(quantization: str, kernel: str = "auto") -> Backend:
        return make_backend(artifact.load(tiny_model_dir).network, "cpu", quantization, kernel)

    assert type(backend("int8")) is PackedOnnx  # auto: ONNX Runtime
    assert type(backend("int8", "torch")) is PackedTorch
    assert type(backend("none")) is PackedTorch
    assert [backend("int8").name, backend("none").name] == ["onnxruntime", "torch"]
    with pytest.raises(ValueError, match=r"unknown int8 kernel 'tvm'"):
        int8_kernel("tvm")


def test_a_layer_computes_what_the_eager_int8_layer_computes(eager: Backend) -> None:
    layer = cast(Layer, eager.model.encoder.encoder.layer[0])
    ort = OrtLayer(layer)
    torch.manual_seed(0)
    x = torch.randn(3, 9, 32) * 2
    with torch.inference_mode():
        want = layer._feed_forward(layer.attention(x, None))
        got = ort.layer(x)
    # Same roundings; the float epilogues multiply in another order, so a value can land
    # on the other side of a rounding step now and then. Measured 1e-6 on the MiniLM
    # layers (real activations), 2e-2 here at most where a step flips.
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)
    assert float((got - want).abs().median()) < 1e-5


def test_the_graphs_round_activations_exactly_as_quantize_per_token() -> None:
    """The graphs' per-token QuantizeLinear against the torch definition that training
    simulates and the eager kernel runs, on values chosen where the rounding's form
    shows: x * (127 / amax) rounds differently from x / (amax / 127) about once in a
    million values, and exact halves must go to even."""
    import numpy as np
    from onnx import TensorProto, helper

    from app.network.ort_layers import _Builder
    from app.network.ort_session import OPSET

    torch.manual_seed(3)
    k = 64
    x = torch.randn(40_000, k) * torch.logspace(-3, 3, 40_000)[:, None]
    amax = x.abs().amax(-1, keepdim=True)
    other = torch.mul(x, 127.0 / amax).round()
    differs = (other != quantize_per_token(x)[0]).any(-1)
    ties = torch.cat([torch.tensor([127.0]), torch.arange(1 - k, k - 1, 2) / 2])  # scale 1.0
    x = torch.cat([x[differs], ties[None]])
    assert int(differs.sum()) >= 3  # the data tells the two forms apart (4 rows here)

    g = _Builder()
    xq, scale = g.quantize("x", k)
    out = [helper.make_tensor_value_info(xq, TensorProto.UINT8, ["N", k]),
           helper.make_tensor_value_info(scale, TensorProto.FLOAT, ["N", 1])]  # fmt: skip
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])
    graph = helper.make_graph(g.nodes, "q", [x_in], out, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString())
    got_q, got_scale = session.run(None, {"x": x.numpy()})
    want_q, want_scale = quantize_per_token(x)
    assert np.array_equal(got_q.astype(np.int32) - 128, want_q.to(torch.int32).numpy())
    assert np.array_equal(got_scale, want_scale.numpy())
    assert want_q[-1, 0] == 127 and bool((want_q[-1, 1:] % 2 == 0).all())  # halves to even


def test_a_row_gets_the_same_bits_alone_or_among_rows_of_its_length(
    eager: Backend,
) -> None:
    ort = OrtLayer(cast(Layer, eager.model.encoder.encoder.layer[1]))
    torch.manual_seed(1)
    x = torch.randn(4, 7, 32)
    whole = ort.layer(x)
    for b in range(4):
        assert torch.equal(ort.layer(x[b : b + 1]), whole[b : b + 1])


def test_a_mixed_batch_runs_a_call_per_length_and_gets_the_bits_of_each_row_alone(
    fast: Backend, tiny_loaded: artifact.LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.network.encoder import runs_of

    ids = tiny_loaded.tokenizer.encode(random_texts(9, seed=13, min_words=1, max_words=30))
    ids.sort(key=len, reverse=True)
    lengths = [len(r) for r in ids]
    runs = runs_of(lengths)
    assert len(runs) > 3  # the data holds several lengths
    calls: list[tuple[int, ...]] = []
    whole = OrtLayer.layer

    def counted(self: OrtLayer, x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape[:2]))
        return whole(self, x)

    monkeypatch.setattr(OrtLayer, "layer", counted)
    with torch.inference_mode():
        batch = fast.begin(ids)
        packed = fast.step(0, batch).x
        alone = [fast.step(0, fast.begin([r])).x for r in ids]
    assert calls[: len(runs)] == [(k, n) for n, k in runs]  # one call per stretch
    assert torch.equal(packed, torch.cat(alone))


def test_served_answers_agree_with_the_eager_kernel(
    eager: Backend, fast: Backend, tiny_loaded: artifact.LoadedModel
) -> None:
    ids = tiny_loaded.tokenizer.encode(random_texts(64, seed=21))
    with torch.inference_mode():
        a = torch.softmax(eager.all_exits(ids), -1)
        b = torch.softmax(fast.all_exits(ids), -1)
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.95  # measured 1.0
    assert float((a - b).abs().median()) < 1e-4


def test_a_layer_and_its_exit_in_one_call(eager: Backend) -> None:
    """`layer_and_exit`: the layer's states are `layer`'s bits, the logits the eager head's
    on them (to the rounding of the epilogues), and a row alone gets its bits."""
    layer, head = cast(Layer, eager.model.encoder.encoder.layer[2]), eager.model.head(2)
    ort = OrtLayer(layer, head=head)
    torch.manual_seed(4)
    x = torch.randn(3, 11, 32)
    y, logits = ort.layer_and_exit(x)
    assert torch.equal(y, ort.layer(x))
    with torch.inference_mode():
        want = head.classify(y.mean(1))
    torch.testing.assert_close(logits, want, atol=0.05, rtol=0)
    assert torch.equal(ort.layer_and_exit(x[1:2])[1], logits[1:2])
    assert not OrtLayer(layer).has_exit


def test_the_embeddings_graph_sums_and_normalizes_per_token(eager: Backend) -> None:
    from app.network.ort_layers import OrtEmbeddings

    embeddings = eager.model.encoder.embeddings
    graph = OrtEmbeddings(embeddings)
    ids = torch.tensor([5, 17, 3, 99, 5, 17])
    positions = torch.tensor([0, 1, 2, 0, 1, 0])
    got = graph(ids, positions)
    with torch.inference_mode():
        want = embeddings.forward(ids[None, :3])[0]  # a padded-layout row: positions 0, 1, 2
    # The same sums in the same order; LayerNorm rounds its own way in ONNX Runtime.
    torch.testing.assert_close(got[:3], want, rtol=0, atol=1e-5)
    # Per token: a token's row is the same alone, anywhere in the pack.
    assert torch.equal(graph(ids[3:4], positions[3:4]), got[3:4])
    assert torch.equal(got[0], graph(ids[4:5], positions[:1])[0])


@pytest.mark.parametrize("signed", [True, False])
def test_an_int8_linear_sums_exactly_where_a_kernel_could_saturate(
    signed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Activations at the int8 extremes against weights at theirs: a CPU without VNNI adds
    uint8 x int8 pairs in int16 with saturation (2 x 255 x 127 > 32,767), where the
    graphs take uint8 weights instead. Whichever encoding this CPU gets, the graph's
    output must be the exact int32 sums through the same float epilogue, bit for bit."""
    import numpy as np

    from app.network import ort_layers, ort_session
    from app.network.invariant import Int8Linear

    if signed and not ort_session.signed_weights_exact():
        pytest.skip("this CPU's uint8 x int8 kernel saturates: the graphs never use it here")
    monkeypatch.setattr(ort_layers, "signed_weights_exact", lambda: signed)
    torch.manual_seed(4)
    lin = Int8Linear(torch.nn.Linear(64, 24))
    lin.weight_int8[:, ::2] = 127  # extremes: the products that saturate in int16
    lin.weight_int8[::3] = -127
    x = torch.randn(5, 64)
    x[:2] = torch.sign(x[:2])  # every value at +-amax: int8 values of +-127 (uint8 255, 1)
    g = ort_layers._Builder()
    y = g.linear("x", lin)
    session = ort_session.open_session(g.model({"x": ["M", 64]}, {y: ["M", 24]}), threads=1)
    got = session.run(None, {"x": x.numpy()})[0]
    values, scale = quantize_per_token(x)
    acc = values.to(torch.int64) @ lin.weight_int8.to(torch.int64).t()  # exact sums
    want = (acc.numpy().astype(np.float32) * lin.weight_scale.numpy()) * scale.numpy()
    want = want + lin.bias.numpy()
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


def test_a_row_alone_takes_one_call_and_gets_the_layer_loops_answer(
    fast: Backend, tiny_loaded: artifact.LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run_alone` (embeddings, layers, heads and the exit rule in one graph) against the
    layer loop on the same row: the same prediction, bit for bit, under random
    thresholds and depth caps, from one graph call that stopped at that very exit."""
    import random

    from app.engine.executor import Row, run_batch

    run_alone = fast.run_alone
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor | None:
        logits = run_alone(*args, **kwargs)
        assert logits is not None
        calls.append(len(logits))  # exits the graph ran
        return logits

    rng = random.Random(8)
    L = fast.num_layers
    rows = tiny_loaded.tokenizer.encode(random_texts(60, seed=13))
    for k, ids in enumerate(rows):
        thresholds = [rng.choice([0.0, 0.5, 0.6, 0.7, 0.9, 1.0]) for _ in range(L)]
        row = Row(ids, thresholds, rng.randint(1, L) if k % 3 == 0 else L)
        monkeypatch.setattr(fast, "run_alone", counted)
        alone = run_batch(fast, [row])
        monkeypatch.setattr(fast, "run_alone", lambda *args, **kwargs: None)
        loop = run_batch(fast, [row])
        assert alone.predictions == loop.predictions
        exit_layer = alone.predictions[0].exit_layer
        assert alone.rows_per_layer == loop.rows_per_layer == [1] * exit_layer
        assert alone.tokens_per_layer == [len(ids)] * exit_layer
        assert calls[-1] == exit_layer
    assert len(calls) == len(rows)


def test_the_executor_decides_again_on_what_the_graph_returns(
    fast: Backend, tiny_loaded: artifact.LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph's exit rule runs on ONNX Runtime's softmax, the executor's on torch's:
    where they part by a rounding step the executor's decision stands. A graph that ran
    on past the row's exit gives the earlier answer; one that stopped before it, the
    layer loop's."""
    from app.engine.executor import Row, run_batch

    L = fast.num_layers
    ids = tiny_loaded.tokenizer.encode(random_texts(1, seed=14))[0]
    below_one = float(torch.tensor(1.0).nextafter(torch.tensor(0.0)))  # every head, no exit
    everything = fast.run_alone(ids, [below_one] * L, L)
    assert everything is not None
    assert everything.shape[0] == L and not everything.isnan().any()
    skipped = fast.run_alone(ids, [1.0] * L, L)
    assert skipped is not None
    assert skipped[:-1].isnan().all() and torch.equal(skipped[-1], everything[-1])  # one head
    monkeypatch.setattr(fast, "run_alone", lambda *args, **kwargs: everything)  # ran on
    early = run_batch(fast, [Row(ids, [0.0] * L, L)]).predictions[0]
    monkeypatch.setattr(fast, "run_alone", lambda *args, **kwargs: everything[:2])  # stopped
    deep = run_batch(fast, [Row(ids, [1.0] * L, L)]).predictions[0]
    monkeypatch.setattr(fast, "run_alone", lambda *args, **kwargs: None)
    assert early == run_batch(fast, [Row(ids, [0.0] * L, L)]).predictions[0]
    assert early.exit_layer == 1
    assert deep == run_batch(fast, [Row(ids, [1.0] * L, L)]).predictions[0]
    assert deep.exit_layer == L


def test_a_row_alone_on_more_threads_gets_the_same_bits(
    tiny_model_dir: Path, tiny_loaded: artifact.LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wide session (a row alone while the other workers idle) against the one-thread
    one: the same logits, bit for bit, and the executor asks for it only when told."""
    from app.engine.executor import Row, run_batch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per worker; the wide session takes two
    try:
        net = make_backend(artifact.load(tiny_model_dir).network, "cpu", "int8", "onnxruntime", 2)
    finally:
        torch.set_num_threads(threads)
    assert isinstance(net, PackedOnnx) and net.has_wide
    L = net.num_layers
    below_one = [0.999] * L
    rows = tiny_loaded.tokenizer.encode(random_texts(40, seed=15))
    for ids in rows:
        narrow = net.run_alone(ids, below_one, L)
        wide = net.run_alone(ids, below_one, L, wide=True)
        assert narrow is not None and wide is not None and torch.equal(narrow, wide)
    widths: list[bool] = []
    run_alone = net.run_alone

    def spied(ids: Any, thresholds: Any, max_layers: int, wide: bool = False) -> Any:
        widths.append(wide)
        return run_alone(ids, thresholds, max_layers, wide)

    monkeypatch.setattr(net, "run_alone", spied)
    row = Row(rows[0], [0.5] * L, L)
    assert run_batch(net, [row], wide=True).predictions == run_batch(net, [row]).predictions
    assert widths == [True, False]
    narrow_only = make_backend(artifact.load(tiny_model_dir).network, "cpu", "int8", "onnxruntime")
    assert isinstance(narrow_only, PackedOnnx) and not narrow_only.has_wide


def test_only_the_wide_session_spins(tiny_model_dir: Path) -> None:
    """Its threads wait for work by spinning: it runs only while the other workers idle."""
    from app.network.ort_layers import OrtRow

    net = artifact.load(tiny_model_dir).network
    backend = make_backend(net, "cpu", "int8", "onnxruntime")
    model = backend.model
    layers = [cast(Layer, x) for x in model.encoder.encoder.layer]
    row = OrtRow(model.encoder.embeddings, layers, [model.head(i) for i in range(4)], 1, 2)

    def spins(graph: Any) -> str:
        opts = graph.session.get_session_options()
        return str(opts.get_session_config_entry("session.intra_op.allow_spinning"))

    assert (spins(row._wide), spins(row._graph)) == ("1", "0")


def test_the_word_embeddings_are_held_once(tiny_model_dir: Path) -> None:
    """Every graph that reads the word embeddings is fed the module's own tensor: none
    holds a copy (a table of 47 MB for MiniLM, once per session otherwise)."""
    backend = make_backend(artifact.load(tiny_model_dir).network, "cpu", "int8", "onnxruntime", 2)
    assert isinstance(backend, PackedOnnx)
    table = backend.model.encoder.embeddings.word_embeddings.weight.detach().numpy()
    graphs = [backend._embed._graph, backend._row._graph, backend._row._wide]
    for graph in graphs:
        assert graph is not None
        assert "word_embeddings" in [i.name for i in graph.session.get_inputs()]
        assert np.shares_memory(graph.feeds["word_embeddings"], table)


def test_every_session_allocates_from_the_one_shared_arena(fast: Backend) -> None:
    """A session's own arena would keep its largest activations for good, per session."""
    assert isinstance(fast, PackedOnnx)
    layers = [g for layer in fast._layers for g in (layer._layer, layer._layer_and_exit)]
    for graph in [fast._embed._graph, fast._row._graph, *layers]:
        assert graph is not None
        opts = graph.session.get_session_options()
        assert opts.get_session_config_entry("session.use_env_allocators") == "1"


def test_no_session_keeps_its_serialized_model(fast: Backend) -> None:
    """onnxruntime's Python wrapper would keep each model's bytes, weights and all, to
    open the session again on a provider's failure; the CPU has no other provider."""
    assert isinstance(fast, PackedOnnx)
    layers = [g for layer in fast._layers for g in (layer._layer, layer._layer_and_exit)]
    for graph in [fast._embed._graph, fast._row._graph, *layers]:
        assert graph is not None
        # The wrapper still has the attribute (a rename would keep the bytes silently).
        assert hasattr(graph.session, "_model_bytes")
        assert graph.session._model_bytes is None
