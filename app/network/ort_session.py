"""ONNX Runtime sessions as the graphs of `ort_layers` use them: opened alike (no
fusions, one process-wide arena, no kept model bytes), called with torch tensors, and
the probe of the CPU's int8 product kernel.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import numpy as np
import torch

OPSET = 21  # Gelu is an ONNX op from opset 20, per-token (blocked) QuantizeLinear from 21


@functools.cache
def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


@functools.cache
def signed_weights_exact() -> bool:
    """Whether ONNX Runtime's uint8 x int8 `MatMulInteger` sums exactly on this CPU.

    With VNNI (or AMX, or on Arm) the products go straight into int32. On x86 CPUs with
    AVX2 but no VNNI (many AMD EPYC and older Xeon), MLAS adds each pair of uint8 x int8
    products in int16 with saturation (vpmaddubsw): with per-token int8 activations,
    whose uint8 form spans 1..255, measured on an AMD EPYC, 99.9% of a layer's int32
    sums came out wrong (by up to 96,000), and its answers disagreed with the other CPUs'.
    uint8 x uint8 widens to 16 bits first and sums exactly there (1.1-1.4x the time of
    the saturating kernel), so the graphs fall back to uint8 weights with zero point 128:
    the same exact sums, the same bits on every CPU. Probed once, on the kernel itself,
    at shapes taking its GEMV (one row) and GEMM paths.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n = 64, 32
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    w[:, 0] = 127  # with activations at 255 (127): 2 x 255 x 127 > int16's 32,767
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "z"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["M", n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(128, np.uint8), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    session = open_session(model.SerializeToString(), 1)  # as the served graphs' sessions
    for rows in (1, 5):
        a = rng.integers(0, 256, (rows, k)).astype(np.uint8)
        a[0] = 255
        exact = (a.astype(np.int64) - 128) @ w.astype(np.int64)
        if not np.array_equal(session.run(None, {"a": a})[0], exact):
            return False
    return True


def open_session(model: bytes, threads: int, spin: bool = False) -> Any:
    """An ONNX Runtime session over a serialized model, on `threads` intra-op threads.
    `spin`: they wait for work by spinning rather than sleeping (see `OrtRow`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    # No fusions: a subgraph must run the very same kernels in every graph holding it.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # One memory arena for every session of the process (`shared_arena`), not one each.
    shared_arena()
    opts.add_session_config_entry("session.use_env_allocators", "1")
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    # The Python wrapper keeps the serialized model, weights and all, for as long as the
    # session lives, to open the session again should its provider fail (onnxruntime
    # marks this a TODO itself). The CPU provider has nothing to fall back to: drop it.
    session.disable_fallback()
    if getattr(session, "_model_bytes", None) is model:
        session._model_bytes = None
    return session


@functools.cache
def shared_arena() -> None:
    """Register one CPU memory arena with ONNX Runtime's process-wide environment, for
    every session opened with `session.use_env_allocators` (`open_session`).

    A session's own arena keeps the most its activations ever took and never gives it
    back, and a model has fifteen sessions: measured on MiniLM, 440 MB more after
    batches of 32 x 128 tokens through each kind of graph, 50 MB with the one arena.
    Without any arena (malloc) it took as little but batches ran 4-8% slower; the one
    arena runs as fast as fifteen (measured, two workers at once)."""
    import onnxruntime as ort

    cpu = ort.OrtMemoryInfo(
        "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
    )
    ort.create_and_register_allocator(cpu, ort.OrtArenaCfg({}))


class Graph:
    """A session and its output names: tensors in, tensors out; `feeds`: the constants
    every call passes (`_Builder.shared`)."""

    def __init__(
        self, session: Any, outputs: list[str], feeds: dict[str, np.ndarray] | None = None
    ) -> None:
        self.session = session
        self.outputs = outputs
        self.feeds = dict(feeds or {})

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        ys = self.session.run(
            self.outputs, {**self.feeds, **{k: _np(v) for k, v in inputs.items()}}
        )
        return [torch.from_numpy(y) for y in ys]


def _np(t: torch.Tensor) -> np.ndarray:
    # Served tensors are activations made under inference mode (no grad) and mostly
    # contiguous already: skip the calls that would return them unchanged.
    if t.requires_grad:
        t = t.detach()
    return (t if t.is_contiguous() else t.contiguous()).numpy()
