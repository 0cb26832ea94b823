"""What runs the layers for serving, chosen in one place (`make_backend`).

device  quantization   backend
cpu     int8           onnx.PackedOnnx (int8 kernel `onnxruntime`, the default) or
                       packed.PackedTorch (int8 kernel `torch`: eager `Int8Linear`s)
cpu     none           packed.PackedTorch (fp32)
cuda    fp16/bf16/none padded.Padded
"""

from __future__ import annotations

import torch

from app.network.backends.base import Backend, RunningBatch
from app.network.backends.onnx import PackedOnnx
from app.network.backends.packed import PackedTorch
from app.network.backends.padded import Padded
from app.network.multi_exit import MultiExitNetwork
from app.network.quantize import INT8_MODES, int8_kernel, prepare_model

__all__ = [
    "Backend",
    "PackedOnnx",
    "PackedTorch",
    "Padded",
    "RunningBatch",
    "as_is",
    "make_backend",
]


def make_backend(
    network: MultiExitNetwork,
    device: str,
    quantization: str,
    kernel: str = "auto",
    wide_threads: int = 0,
) -> Backend:
    """Prepare an fp32 network for serving (`quantize.prepare_model`) and the backend
    that runs it. int8: `kernel` picks what runs the encoder layers (`int8_kernel`); the
    ONNX Runtime graphs take as many intra-op threads as torch has now (set before this
    is called), and `wide_threads` above that gives a row alone a second session on
    that many, for when the other engine workers idle."""
    model = prepare_model(network, device, quantization)
    if device == "cpu":
        if quantization in INT8_MODES and int8_kernel(kernel) == "onnxruntime":
            return PackedOnnx(model, torch.get_num_threads(), wide_threads)
        return PackedTorch(model)
    return Padded(model)


def as_is(network: MultiExitNetwork) -> Backend:
    """A backend over a model as it stands, neither moved nor quantized (training's
    checks of an fp32 model): packed on the CPU, padded elsewhere."""
    return PackedTorch(network) if network.device.type == "cpu" else Padded(network)
