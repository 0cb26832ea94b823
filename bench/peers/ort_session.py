"""ONNX Runtime sessions for the exported peer: open one, run right-padded rows through it.
Shared by the export's own check (`onnx_export.compare`), the peer server and the
quantization benchmark, so that none of them imports another's module for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def open_session(path: Path | str, threads: int, spin: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ONNX Runtime's pool threads busy-wait for work by default. With as many threads as
    # CPUs they take the cores the event loop needs between batches: in a short run at
    # concurrency 16 on 2 shared cores, spinning served about half the requests per second.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_padded(session: ort.InferenceSession, rows: list[list[int]], pad_id: int) -> np.ndarray:
    """Softmax of the logits of token id rows, right-padded to the longest: (B, C)."""
    ids = np.full((len(rows), max(map(len, rows))), pad_id, dtype=np.int64)  # (B, T)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})  # (B, C)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs: np.ndarray = e / e.sum(-1, keepdims=True)
    return probs
