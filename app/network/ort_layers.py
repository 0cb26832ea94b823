"""Encoder layers, exit heads and embeddings as ONNX Runtime graphs: the same int8
scheme in one call per layer.

In eager PyTorch a layer is some forty small ops, each paying dispatch overhead and the
GIL that the server's workers and event loop contend for; a graph call per layer serves
more requests for less CPU (docs/decisions.md). At start-up, from the quantized weights
already in memory, each layer is built into two graphs over rows of one length (k, n, H):

  layer           x -> the layer's output: QKV projection, attention, out-projection,
                  residual, LayerNorm, FFN with exact GELU, residual, LayerNorm
  layer_and_exit  x -> the layer's output and the logits of the exit head after it

Batches run packed (`backends.RunningBatch`, `backends.PackedOnnx`): one call per
stretch of rows of one length (`encoder.stretches`), so a batch of one takes one call
per layer, its exit included; the embeddings of packed tokens are one more
(`OrtEmbeddings`), and a row alone takes one call for the whole network (`OrtRow`).

Same scheme, same contract. Activations are quantized per token by `QuantizeLinear` with
one block per token, the very rounding of `invariant.quantize_per_token` (x over amax /
127, half to even), weights are the int8 per-channel values `Int8Linear` holds, and `MatMulInteger`
sums the products in int32 (uint8 activations with zero point 128 against int8 weights:
exactly the signed sums; on a CPU whose kernel for that saturates, uint8 weights with
zero point 128 as well, the same sums: `signed_weights_exact`). Every other op works
per token, per row or per (row, head), and graph fusions are off so that a subgraph
runs the very same kernels in every graph holding it: a row gets the same bits alone or
in any batch (tested). The float epilogue rounds in another order than oneDNN's, so
scores differ from the eager int8 path by up to a few hundredths after six layers,
where a rounding step flips (labels agreed on every sentence measured);
`EXITSERVE_INT8_KERNEL=torch` keeps the eager path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from app.network import exit_rule
from app.network.encoder import Embeddings, Layer
from app.network.heads import ExitHead
from app.network.invariant import Q16, SCALE_FLOOR, Int8Linear
from app.network.ort_session import (
    OPSET,
    Graph,
    open_session,
    signed_weights_exact,
)


class _Builder:
    """A small ONNX graph builder: named constants, ops, int8 linears, LayerNorms."""

    def __init__(self) -> None:
        from onnx import numpy_helper

        self._nh = numpy_helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0
        # Zero points (all 128) shaped like the per-token scales, one per set of tokens:
        # every linear of a layer quantizes the same tokens, so one serves them all.
        self._zeros: dict[str, str] = {}
        # Large constants fed to every call rather than copied into the graph (`shared`).
        self.feeds: dict[str, np.ndarray] = {}

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        self._n += 1
        name = f"c{self._n}"
        self.inits.append(self._nh.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def shared(self, name: str, value: torch.Tensor) -> str:
        """A constant the graph takes as an input that every call feeds: `value`'s own
        memory (a numpy view, no copy), where an initializer would put one copy in the
        serialized model and another in the session. For the word embeddings (30522 x
        384 fp32, 47 MB), which three sessions would otherwise each hold twice; feeding
        them costs a call well under a microsecond (measured)."""
        array = value.detach().numpy()
        if not array.flags.c_contiguous or array.dtype != np.float32:
            raise ValueError(f"{name}: a shared constant must be contiguous float32")
        self.feeds[name] = array
        return name

    def op(self, kind: str, *inputs: str, **attrs: Any) -> str:
        return self.ops(kind, *inputs, **attrs)[0]

    def ops(
        self, kind: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs: Any
    ) -> list[str]:
        from onnx import helper

        names = [f"t{self._n + 1 + i}" for i in range(outputs)]
        self._n += outputs
        self.nodes.append(helper.make_node(kind, list(inputs), names, domain=domain, **attrs))
        return names

    def linear(self, x: str, lin: Int8Linear, tokens: str = "tokens") -> str:
        """`Int8Linear` on (..., K) -> (..., N_out), per-token int8 activations; linears
        given the same `tokens` quantize the same set of tokens (one shape of scales)."""
        from onnx import TensorProto

        weight = lin.weight_int8.t().contiguous().numpy()  # (K, N_out)
        zero = self.const(128, np.uint8)
        if signed_weights_exact():
            w, w_zero = self.const(weight, np.int8), []
        else:  # the weights as uint8 with zero point 128 too: the same exact sums
            w = self.const((weight.astype(np.int16) + 128).astype(np.uint8), np.uint8)
            w_zero = [zero]
        if lin.inv_smooth is not None:  # as `Int8Linear` divides by its smoothing
            x = self.op("Mul", x, self.const(lin.inv_smooth))
        if lin.activation_bits == 16:
            hi, lo, scale = self.quantize16(x, lin.in_features, tokens)
            both = self.op("Concat", hi, lo, axis=0)  # one product over both bytes
            acc = self.op("MatMulInteger", both, w, zero, *w_zero)
            high, low = self.ops("Split", self.op("Cast", acc, to=TensorProto.FLOAT), outputs=2,
                                 axis=0, num_outputs=2)  # fmt: skip
            low = self.op("Add", low, self.const(lin._lo_shift))  # as `Int8Linear` joins
            sums = self.op("Add", self.op("Mul", high, self.const(256.0)), low)
        else:
            xq, scale = self.quantize(x, lin.in_features, tokens)
            acc = self.op("MatMulInteger", xq, w, zero, *w_zero)
            sums = self.op("Cast", acc, to=TensorProto.FLOAT)
        y = self.op("Mul", sums, self.const(lin.weight_scale))
        return self.op("Add", self.op("Mul", y, scale), self.const(lin.bias))

    def quantize16(self, x: str, k: int, tokens: str = "tokens") -> tuple[str, str, str]:
        """`quantize_per_token16` on (..., k): QuantizeLinear to uint16 (q + 32768), whose
        high byte is hi + 128 and low byte lo, each as uint8; scales (..., 1)."""
        from onnx import TensorProto, helper

        amax = self.op("ReduceMax", self.op("Abs", x), self.const([-1], np.int64), keepdims=1)
        scale = self.op("Div", self.op("Max", amax, self.const([SCALE_FLOOR])), self.const([Q16]))
        key = f"{tokens}/16"
        if key not in self._zeros:
            value = helper.make_tensor("z", TensorProto.UINT16, [1], [32768])
            self._zeros[key] = self.op("ConstantOfShape", self.op("Shape", scale), value=value)
        u = self.op("QuantizeLinear", x, scale, self._zeros[key], axis=-1, block_size=k)
        low = self.op("Cast", u, to=TensorProto.UINT8)  # u mod 256
        wide = self.op("Cast", u, to=TensorProto.INT32)
        high = self.op(
            "Cast", self.op("Div", wide, self.const(256, np.int32)), to=TensorProto.UINT8
        )
        return high, low, scale

    def quantize(self, x: str, k: int, tokens: str = "tokens") -> tuple[str, str]:
        """`quantize_per_token` on (..., k): uint8 values (int8 + 128), scales (..., 1)."""
        amax = self.op("ReduceMax", self.op("Abs", x), self.const([-1], np.int64), keepdims=1)
        scale = self.op("Div", self.op("Max", amax, self.const([SCALE_FLOOR])), self.const([127.0]))
        # One block of k values per token: QuantizeLinear rounds x / scale half to even,
        # as `quantize_per_token` does; zero point 128 makes the int8 values uint8.
        if tokens not in self._zeros:
            shape = self.op("Shape", scale)
            self._zeros[tokens] = self.op("Expand", self.const(128, np.uint8), shape)
        zero = self._zeros[tokens]
        return self.op("QuantizeLinear", x, scale, zero, axis=-1, block_size=k), scale

    def layer_norm(self, x: str, ln: nn.LayerNorm) -> str:
        return self.op(
            "LayerNormalization",
            x,
            self.const(ln.weight.detach()),
            self.const(ln.bias.detach()),
            axis=-1,
            epsilon=float(ln.eps),
        )

    def exit_head(self, states: str, head: ExitHead) -> str:
        """An int8 exit head on one stretch of rows of one length: (k, n, H) -> (k, C).

        Mean pooling is a product with a row of ones, then one division: each row is its
        own (1, n) x (n, H) product, which sums the n states in the same order for any
        k and any thread count (a ReduceSum takes another path for k = 1 than for k > 1
        and rounds differently: measured)."""
        dense, classifier = head.dense, head.classifier
        if not (isinstance(dense, Int8Linear) and isinstance(classifier, Int8Linear)):
            raise TypeError("an ONNX Runtime exit head needs an int8-quantized exit head")
        H = dense.in_features
        if head.pooling == "cls":
            pooled = self.op("Gather", states, self.const(0, np.int64), axis=1)  # (k, H)
        else:
            shape = self.op("Shape", states)
            k, n = (self.op("Slice", shape, self.const([i], np.int64),
                            self.const([i + 1], np.int64)) for i in (0, 1))  # fmt: skip
            from onnx import TensorProto, helper

            ones = self.op(
                "ConstantOfShape",
                self.op("Concat", k, self.const([1], np.int64), n, axis=0),
                value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
            )  # (k, 1, n)
            total = self.op("Reshape", self.op("MatMul", ones, states),
                            self.const([-1, H], np.int64))  # fmt: skip
            pooled = self.op("Div", total, self.op("Cast", n, to=TensorProto.FLOAT))
        pre = self.linear(pooled, dense, "pooled")
        if head.activation == "gelu":  # exact, as torch's default
            hidden = self.op("Gelu", pre, approximate="none")
        else:
            hidden = self.op({"tanh": "Tanh", "relu": "Relu"}[head.activation], pre)
        return self.linear(hidden, classifier, "pooled")

    def subgraph(self, name: str, build: Callable[[], list[str]], kinds: list[Any]) -> Any:
        """A graph (an `If` branch) of what `build` adds, with outputs of the element
        `kinds` given; its constants are its own (ONNX Runtime prepacks the weights of a
        subgraph's own initializers only), and what it made stays inside it."""
        from onnx import helper

        outer = self.nodes, self.inits, dict(self._zeros)
        self.nodes, self.inits = [], []
        outs = build()
        values = [
            helper.make_tensor_value_info(o, k, None) for o, k in zip(outs, kinds, strict=True)
        ]
        graph = helper.make_graph(self.nodes, name, [], values, self.inits)
        self.nodes, self.inits, self._zeros = outer
        return graph

    def model(
        self,
        inputs: dict[str, list[Any]],
        outputs: dict[str, list[Any]],
        int64: tuple[str, ...] = (),
    ) -> bytes:
        """The graph built so far as a serialized model: inputs and outputs by name and
        shape (symbolic dimensions by name), float but for the `int64` inputs; the
        `shared` constants are inputs too, after those."""
        from onnx import TensorProto, helper

        def values(named: dict[str, list[Any]]) -> list[Any]:
            return [
                helper.make_tensor_value_info(
                    n, TensorProto.INT64 if n in int64 else TensorProto.FLOAT, d
                )
                for n, d in named.items()
            ]

        shared = {n: list(a.shape) for n, a in self.feeds.items()}
        graph = helper.make_graph(
            self.nodes, "exitserve", values(inputs | shared), values(outputs), self.inits
        )
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 10
        return bytes(model.SerializeToString())

    def graph(
        self,
        inputs: dict[str, list[Any]],
        outputs: dict[str, list[Any]],
        threads: int,
        int64: tuple[str, ...] = (),
    ) -> Graph:
        """The graph built so far (`model`), ready to call on `threads` threads."""
        session = open_session(self.model(inputs, outputs, int64), threads)
        return Graph(session, list(outputs), self.feeds)


def layer_ops(g: _Builder, layer: Layer, x: str) -> str:
    """An int8 encoder layer's ops on `x` (k, n, H), rows of one length: QKV projection,
    attention, out-projection, residual, LayerNorm, FFN with exact GELU, residual,
    LayerNorm. The name of its output (k, n, H)."""
    attn, out = layer.attention.self, layer.attention.output
    linears = (attn.qkv, out.dense, layer.intermediate.dense, layer.output.dense)
    if not all(isinstance(m, Int8Linear) for m in linears):
        raise TypeError("OrtLayer needs a fused, int8-quantized layer")
    qkv_lin, out_lin, inter, down = (cast(Int8Linear, m) for m in linears)
    H, nh = out_lin.out_features, attn.num_heads
    d = H // nh
    heads = g.op(
        "Transpose",
        g.op("Reshape", g.linear(x, qkv_lin), g.const([0, 0, 3 * nh, d], np.int64)),
        perm=[0, 2, 1, 3],
    )  # (k, 3nh, n, d)
    q, k, v = g.ops("Split", heads, axis=1, num_outputs=3, outputs=3)  # (k, nh, n, d)
    # q k^T / sqrt(d) in one op (ONNX Runtime's FusedMatMul: transB and alpha).
    scores = g.op("FusedMatMul", q, k, domain="com.microsoft", transB=1,
                  alpha=1.0 / math.sqrt(d))  # fmt: skip
    p = g.op("Softmax", scores, axis=-1)  # (k, nh, n, n)
    y = g.op("Transpose", g.op("MatMul", p, v), perm=[0, 2, 1, 3])  # (k, n, nh, d)
    a = g.op("Reshape", y, g.const([0, 0, H], np.int64))
    h1 = g.layer_norm(g.op("Add", x, g.linear(a, out_lin)), out.LayerNorm)
    hidden = g.op("Gelu", g.linear(h1, inter), approximate="none")
    return g.layer_norm(g.op("Add", h1, g.linear(hidden, down)), layer.output.LayerNorm)


def embedding_ops(g: _Builder, embeddings: Embeddings, ids: str, positions: str) -> str:
    """The word and position rows summed in the order `encoder.Embeddings` sums them,
    plus the segment-0 row, then LayerNorm: packed tokens (N,) -> (N, H). The word
    embeddings are the module's own tensor, fed to each call (`_Builder.shared`)."""
    table = g.shared("word_embeddings", embeddings.word_embeddings.weight)
    word = g.op("Gather", table, ids, axis=0)
    position = g.op(
        "Gather", g.const(embeddings.position_embeddings.weight.detach()), positions, axis=0
    )
    segment = g.const(embeddings.token_type_embeddings.weight.detach()[0])
    return g.layer_norm(g.op("Add", g.op("Add", word, position), segment), embeddings.LayerNorm)


class OrtLayer:
    """One quantized encoder layer's graphs (see the module docstring); given the exit
    head after the layer, also `layer_and_exit`: the layer and that head in one call."""

    def __init__(self, layer: Layer, threads: int = 1, head: ExitHead | None = None) -> None:
        g = _Builder()
        y = layer_ops(g, layer, "x")
        H = layer.attention.output.dense.out_features
        self._layer = g.graph({"x": ["B", "T", H]}, {y: ["B", "T", H]}, threads)
        self._layer_and_exit: Graph | None = None
        if head is not None:  # the same layer, then the head on its output
            logits = g.exit_head(y, head)
            C = cast(Int8Linear, head.classifier).out_features
            self._layer_and_exit = g.graph(
                {"x": ["B", "T", H]}, {y: ["B", "T", H], logits: ["B", C]}, threads
            )

    @property
    def has_exit(self) -> bool:
        return self._layer_and_exit is not None

    def layer(self, x: torch.Tensor) -> torch.Tensor:
        return self._layer(x=x)[0]

    def layer_and_exit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, n, H), rows of one length -> the layer's states and its exit's logits (k, C)."""
        if self._layer_and_exit is None:
            raise RuntimeError("this layer's graphs were built without its exit head")
        y, logits = self._layer_and_exit(x=x)
        return y, logits


class OrtRow:
    """A row alone through the whole network in one call, its early exit included.

    The embeddings, then each layer and its exit head (the very ops of `OrtLayer` and
    `layer_and_exit`), then the exit rule on that head's answer: an ONNX `If` returns there when
    the row's confidence reaches its threshold for this exit (below 1) or the layer is
    its depth cap, and runs the next layer otherwise. An exit the row cannot leave at
    (threshold 1, not its cap) runs no head, as in the layer loop: full depth runs one.
    No return to Python between layers: for one row, one call instead of one per layer
    plus the executor's work between them. In: the row's token ids and positions (n,),
    its thresholds (L,) and depth cap; out: the logits of every exit it ran (e, C), e
    being its exit layer (NaN for an exit whose head did not run).

    The graph's softmax (sigmoids for a multi-label model) is ONNX Runtime's and the
    executor's is torch's, which may round
    a confidence differently in the last bit: the executor decides again on these logits
    (`executor.run_alone`), so the graph only saves time, never changes an answer.

    `wide_threads` above `threads`: the same model also on that many threads, for a row
    alone while the other workers idle (`scheduler.borrows_idle_threads`; `wide=True`).
    Its threads spin between the graph's parallel ops instead of sleeping and being
    woken for each: faster for a row alone, with the same answers (docs/decisions.md).
    """

    def __init__(
        self,
        embeddings: Embeddings,
        layers: list[Layer],
        heads: list[ExitHead],
        threads: int = 1,
        wide_threads: int = 0,
        measure: str = "max_softmax",
    ) -> None:
        from onnx import TensorProto

        g, L = _Builder(), len(layers)
        one, axis0 = g.const(1.0), g.const([0], np.int64)
        C = cast(Int8Linear, heads[-1].classifier).out_features
        unscored = g.const(np.full((1, C), np.nan)), g.const(False, np.bool_)

        def level(i: int, x: str) -> str:
            """Layer i (0-based) and its exit on x (1, n, H): the logits from exit i on
            (a row of NaN for an exit the row may not leave at: its head is not run)."""
            y = layer_ops(g, layers[i], x)
            if i == L - 1:
                return g.exit_head(y, heads[i])
            t = g.op("Gather", "thresholds", g.const(i, np.int64), axis=0)
            capped = g.op("LessOrEqual", "max_layers", g.const(i + 1, np.int64))
            uses = exit_rule.onnx_in_use(g.op, t, one)

            def score() -> list[str]:
                logits = g.exit_head(y, heads[i])  # (1, C)
                confidence = exit_rule.onnx_confidence(g.op, logits, one, measure, C)
                leave = exit_rule.onnx_leaves(g.op, confidence, t, uses, capped)
                return [g.op("Identity", logits), leave]

            kinds = [TensorProto.FLOAT, TensorProto.BOOL]
            logits, leave = g.ops(
                "If",
                g.op("Or", uses, capped),  # as `exit_rule.may_leave`: else no head
                then_branch=g.subgraph(f"score{i + 1}", score, kinds),
                else_branch=g.subgraph(
                    f"skip{i + 1}", lambda: [g.op("Identity", v) for v in unscored], kinds
                ),
                outputs=2,
            )
            floats = [TensorProto.FLOAT]
            here = g.subgraph(f"exit{i + 1}", lambda: [g.op("Identity", logits)], floats)
            on = g.subgraph(
                f"after{i + 1}", lambda: [g.op("Concat", logits, level(i + 1, y), axis=0)], floats
            )
            return g.op("If", leave, then_branch=here, else_branch=on)

        x = g.op("Unsqueeze", embedding_ops(g, embeddings, "ids", "positions"), axis0)
        out = level(0, x)
        inputs: dict[str, list[Any]] = {"ids": ["N"], "positions": ["N"], "thresholds": [L]}
        inputs["max_layers"] = []
        model = g.model(inputs, {out: ["E", C]}, ("ids", "positions", "max_layers"))
        self._graph = Graph(open_session(model, threads), [out], g.feeds)
        self._wide: Graph | None = None
        if wide_threads > threads:
            self._wide = Graph(open_session(model, wide_threads, spin=True), [out], g.feeds)

    @property
    def has_wide(self) -> bool:
        return self._wide is not None

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        thresholds: torch.Tensor,
        max_layers: int,
        wide: bool = False,
    ) -> torch.Tensor:
        graph = self._wide if wide and self._wide is not None else self._graph
        cap = torch.tensor(max_layers, dtype=torch.long)
        return graph(ids=ids, positions=positions, thresholds=thresholds, max_layers=cap)[0]


def linear_graph(lin: Int8Linear, threads: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """One `Int8Linear` as a graph on rows (M, K) -> (M, N): what the kernels' speed
    probe (`quantize.torch_kernel_slowdown`) holds the eager kernel against."""
    g = _Builder()
    y = g.linear("x", lin)
    graph = g.graph({"x": ["M", lin.in_features]}, {y: ["M", lin.out_features]}, threads)
    return lambda x: graph(x=x)[0]


class OrtEmbeddings:
    """The embeddings of packed tokens as one graph: ids and positions (N,) -> (N, H),
    per token, one call where torch took five ops (`embedding_ops`)."""

    def __init__(self, embeddings: Embeddings, threads: int = 1) -> None:
        g = _Builder()
        x = embedding_ops(g, embeddings, "ids", "positions")
        H = embeddings.LayerNorm.weight.shape[0]
        inputs = {"ids": ["N"], "positions": ["N"]}
        self._graph = g.graph(inputs, {x: ["N", H]}, threads, int64=("ids", "positions"))

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._graph(ids=ids, positions=positions)[0]
