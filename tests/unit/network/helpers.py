"""Checks the int8 modes' tests share."""

from __future__ import annotations

import copy

import torch

from app.network.backends import PackedOnnx, PackedTorch, make_backend
from app.network.multi_exit import MultiExitNetwork


def both_kernels_serve_rows_alone_as_in_a_batch(
    net: MultiExitNetwork, mode: str, ids: list[list[int]]
) -> None:
    """Served in `mode` on the ONNX Runtime graphs and on eager torch, a row's logits
    are the same bits alone as in a batch; the two kernels round every activation the
    same way, and their float epilogues may order a product differently, so their
    logits agree closely, not bit for bit."""
    out = {}
    for kernel, kind in (("onnxruntime", PackedOnnx), ("torch", PackedTorch)):
        backend = make_backend(copy.deepcopy(net), "cpu", mode, kernel)
        assert type(backend) is kind
        with torch.inference_mode():
            out[kernel] = backend.all_exits(ids)
            alone = torch.cat([backend.all_exits([r]) for r in ids[:8]], dim=1)
        assert torch.equal(alone, out[kernel][:, :8]), kernel
    assert float((out["onnxruntime"] - out["torch"]).abs().max()) < 1e-3
