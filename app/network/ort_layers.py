"""Encoder layers and exit heads as ONNX Runtime graphs: the same int8 scheme in a few
calls per layer.

In eager PyTorch a layer is some forty small ops (an int8 linear with per-token scales
alone is about ten: two reductions, the scale, the rounding, the cast, the GEMM, the
epilogue). Each pays dispatch overhead and takes the GIL, and in the server two engine
workers, the event loop and the clients contend for it: measured over HTTP on 2 cores,
this path served 1.3x (1 client), 1.8x (4) and 1.5x (16) the requests of the eager one,
at two thirds of its CPU per request. Each layer is built at start-up, from the
quantized weights already in memory, into four graphs over (B, T, .) tensors of real
tokens:

  project  x -> queries, keys and values        (B, T, H) -> (B, T, 3H)
  attend   qkv -> attention output               (k, n, 3H) -> (k, n, H), one length
  finish   a, x -> the layer's output            out-projection, residual, LayerNorm,
                                                 FFN with exact GELU, residual, LayerNorm
  whole    x -> the layer's output               the three in one call, one length

A batch of one length (every batch of one) takes one `whole` call per layer; a mixed
batch projects and finishes all its real tokens together and attends once per length,
without padding (`encoder.Layer`). Each exit head is one more graph (`OrtHead`): pooled
rows to logits; the pooling stays in torch.

Same scheme, same contract. Activations are quantized per token by `QuantizeLinear` with
one block per token, the very rounding of `invariant.quantize_per_token` (x over amax /
127, half to even; one op where the elementwise form took seven, 15% of a layer at 27
tokens), weights are the int8 per-channel values `Int8Linear` holds, and `MatMulInteger`
sums the products in int32 (uint8 activations with zero point 128 against int8 weights:
exactly the signed sums). Every other op works per token, per row or per (row, head),
and graph fusions are off so that `whole` and the three graphs apart run the very same
kernels: a row gets the same bits alone or in any batch (tested). The float epilogue
rounds in another order than oneDNN's, so scores differ from the eager int8 path by up
to a few hundredths after six layers, where a rounding step flips (labels agreed on
every sentence measured); `EXITSERVE_INT8_KERNEL=torch` keeps the eager path.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from app.network.encoder import Layer
from app.network.heads import ExitHead
from app.network.invariant import SCALE_FLOOR, Int8Linear

OPSET = 21  # Gelu is an ONNX op from opset 20, per-token (blocked) QuantizeLinear from 21


@functools.cache
def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


class _Builder:
    """A small ONNX graph builder: named constants, ops, int8 linears, LayerNorms."""

    def __init__(self) -> None:
        from onnx import numpy_helper

        self._nh = numpy_helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        self._n += 1
        name = f"c{self._n}"
        self.inits.append(self._nh.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, kind: str, *inputs: str, **attrs: Any) -> str:
        from onnx import helper

        self._n += 1
        out = f"t{self._n}"
        self.nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def linear(self, x: str, lin: Int8Linear) -> str:
        """`Int8Linear` on (..., K) -> (..., N_out), per-token int8 activations."""
        from onnx import TensorProto

        xq, scale = self.quantize(x, lin.in_features)
        weight = lin.weight_int8.t().contiguous().numpy()  # (K, N_out)
        acc = self.op("MatMulInteger", xq, self.const(weight, np.int8), self.const(128, np.uint8))
        y = self.op("Mul", self.op("Cast", acc, to=TensorProto.FLOAT), self.const(lin.weight_scale))
        return self.op("Add", self.op("Mul", y, scale), self.const(lin.bias))

    def quantize(self, x: str, k: int) -> tuple[str, str]:
        """`quantize_per_token` on (..., k): uint8 values (int8 + 128), scales (..., 1)."""
        amax = self.op("ReduceMax", self.op("Abs", x), self.const([-1], np.int64), keepdims=1)
        scale = self.op("Div", self.op("Max", amax, self.const([SCALE_FLOOR])), self.const([127.0]))
        # One block of k values per token: QuantizeLinear rounds x / scale half to even,
        # as `quantize_per_token` does; zero point 128 makes the int8 values uint8.
        zero = self.op("Expand", self.const(128, np.uint8), self.op("Shape", scale))
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

    def session(
        self,
        inputs: list[str],
        width: dict[str, int],
        output: str,
        threads: int,
        leading: tuple[str, ...] = ("B", "T"),
    ) -> Any:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        def value(name: str, w: int) -> Any:
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, [*leading, w])

        graph = helper.make_graph(
            self.nodes,
            "layer",
            [value(n, width[n]) for n in inputs],
            [value(output, width[output])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 10
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No fusions: `whole` and the three graphs apart must run the very same kernels.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )


class OrtLayer:
    """One quantized encoder layer's four graphs (see the module docstring)."""

    def __init__(self, layer: Layer, threads: int = 1) -> None:
        attn, out = layer.attention.self, layer.attention.output
        linears = (attn.qkv, out.dense, layer.intermediate.dense, layer.output.dense)
        if not all(isinstance(m, Int8Linear) for m in linears):
            raise TypeError("OrtLayer needs a fused, int8-quantized layer")
        qkv_lin, out_lin, inter, down = (cast(Int8Linear, m) for m in linears)
        H, nh = out_lin.out_features, attn.num_heads

        def project(g: _Builder, x: str) -> str:
            return g.linear(x, qkv_lin)

        def attend(g: _Builder, qkv: str) -> str:
            d = H // nh
            heads = g.op(
                "Transpose",
                g.op("Reshape", qkv, g.const([0, 0, 3 * nh, d], np.int64)),
                perm=[0, 2, 1, 3],
            )  # (k, 3nh, n, d)
            q, k, v = (g.op("Slice", heads, g.const([i * nh], np.int64),
                            g.const([(i + 1) * nh], np.int64), g.const([1], np.int64))
                       for i in range(3))  # fmt: skip
            scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))  # (k, nh, n, n)
            p = g.op("Softmax", g.op("Mul", scores, g.const([1.0 / math.sqrt(d)])), axis=-1)
            y = g.op("Transpose", g.op("MatMul", p, v), perm=[0, 2, 1, 3])  # (k, n, nh, d)
            return g.op("Reshape", y, g.const([0, 0, H], np.int64))

        def finish(g: _Builder, a: str, x: str) -> str:
            h1 = g.layer_norm(g.op("Add", x, g.linear(a, out_lin)), out.LayerNorm)
            hidden = g.op("Gelu", g.linear(h1, inter), approximate="none")
            y = g.op("Add", h1, g.linear(hidden, down))
            return g.layer_norm(y, layer.output.LayerNorm)

        def build(inputs: dict[str, int], body: Any) -> tuple[Any, str]:
            g = _Builder()
            y: str = body(g, *inputs)
            width = dict(inputs)
            width[y] = 3 * H if body is project else H
            return g.session(list(inputs), width, y, threads), y

        self._graphs = {
            "project": build({"x": H}, project),
            "attend": build({"qkv": 3 * H}, attend),
            "finish": build({"a": H, "x": H}, finish),
            "whole": build({"x": H}, lambda g, x: finish(g, attend(g, project(g, x)), x)),
        }

    def _run(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        session, out = self._graphs[name]
        (y,) = session.run([out], {k: _np(v) for k, v in inputs.items()})
        return torch.from_numpy(y)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self._run("project", x=x)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        return self._run("attend", qkv=qkv)

    def finish(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._run("finish", a=a, x=x)

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        return self._run("whole", x=x)


class OrtHead:
    """An int8 exit head's classifier as one graph: pooled rows (B, H) -> logits (B, C).

    The dense layer, tanh and the classifier with the scheme's per-row rounding; the
    pooling stays in torch (`ExitHead.pool`), the same for every batch.
    """

    def __init__(self, head: ExitHead, threads: int = 1) -> None:
        dense, classifier = head.dense, head.classifier
        if not (isinstance(dense, Int8Linear) and isinstance(classifier, Int8Linear)):
            raise TypeError("OrtHead needs an int8-quantized exit head")
        g = _Builder()
        y: str = g.linear(g.op("Tanh", g.linear("pooled", dense)), classifier)
        width = {"pooled": dense.in_features, y: classifier.out_features}
        self._session: Any = g.session(["pooled"], width, y, threads, leading=("B",))
        self._out: str = y

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        (y,) = self._session.run([self._out], {"pooled": _np(pooled)})
        return torch.from_numpy(y)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()
