"""Quantization: batch-invariant int8 on CPU, fp16/bf16 on CUDA, and int8-aware training.

int8 (`invariant.Int8Linear`): weights int8 per output channel, activations int8 per
token, int32 sums. A row's answer is the same alone or in any batch (bit for bit), and
per-token scales lose less than the per-tensor dynamic scheme this replaced (fbgemm via
the deprecated `torch.ao`, whose scale spanned the whole batch). The exit heads are int8
too: not for speed (they are 0.3% of the FLOPs) but because fp32 GEMMs split their sums
differently by batch size and thread count, and exact integer sums do not.

`fake_int8` simulates exactly the served rounding during training: the same two
functions compute the scales and the rounded values.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from app.network import ort_layers, ort_session
from app.network.encoder import SelfAttention
from app.network.invariant import Int8Linear, best_time, quantize_per_token, quantize_weight
from app.network.multi_exit import MultiExitNetwork
from app.network.smoothing import served_sites as smoothing_sites

# What /info and the README call the CPU int8 scheme.
INT8_SCHEME = "int8 weights per channel, int8 activations per token, int32 accumulation"

INT8A16_SCHEME = (
    "int8 weights per channel, 16-bit activations per token as two int8 halves, int32 accumulation"
)

# int8a16: int8 weights and int8 products, activations carried in 16 bits (two halves):
# for classifiers whose answers 8-bit activations change too often (`add_exits.serving`).
MODES = ("int8", "int8a16", "fp16", "bf16", "none")
INT8_MODES = ("int8", "int8a16")
INT8_KERNELS = ("auto", "onnxruntime", "torch")
# The eager kernel is refused where it runs more than this many times slower than ONNX
# Runtime's (`torch_kernel_slowdown`): served so, it is not a choice but a fault.
TORCH_KERNEL_MAX_SLOWDOWN = 3.0


def resolve(
    device: str, quantization: str, preferred: dict[str, str] | None = None
) -> tuple[str, str]:
    """Turn `auto` settings into a concrete (device, quantization) pair.

    `preferred`: the model's measured choice per device (model.json `serving`), e.g.
    {"cpu": "none"} for a classifier whose int8 answers differ from its own."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is visible")
    if quantization == "auto":
        if device == "cuda":
            quantization = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            quantization = (preferred or {}).get("cpu", "int8")
    if quantization not in MODES:
        raise ValueError(f"unknown quantization {quantization!r}; expected auto or one of {MODES}")
    if device == "cuda" and quantization in INT8_MODES:
        raise ValueError(f"{quantization} runs on the CPU only; use fp16 or bf16 on CUDA")
    return device, quantization


def _linears(network: MultiExitNetwork) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every linear int8 serving replaces: the encoder's
    and the exit heads'."""
    return [
        (module, name, child)
        for part in (network.encoder.encoder, network.heads)
        for module in part.modules()
        for name, child in module.named_children()
        if isinstance(child, nn.Linear)
    ]


def quantize_int8(
    network: MultiExitNetwork, kernel: str = "auto", activation_bits: int = 8
) -> None:
    """Swap every linear of the encoder and the exit heads for an `Int8Linear`, in place.

    `auto` gives the exit heads `_int_mm` whatever the encoder gets: a head multiplies one
    pooled row per input by a narrow matrix, where oneDNN's int8 linear pays a large fixed
    cost (docs/decisions.md). The two kernels give the same bits (tested).
    """
    heads = {id(m) for m in network.heads.modules()}
    # The model's channel smoothing, for 8-bit activations only: 16 bits have the
    # headroom, and moving width into the weights would cost their rounding.
    smoothing = network.int8_smoothing if activation_bits == 8 else {}
    site_of = {id(lin): name for name, lin in smoothing_sites(network).items()}
    for module, name, child in _linears(network):
        head_kernel = "int_mm" if kernel == "auto" and id(module) in heads else kernel
        smooth = smoothing.get(site_of.get(id(child), ""))
        setattr(module, name, Int8Linear(child, head_kernel, activation_bits, smooth))


def scheme(quantization: str, smoothed: bool = False) -> str:
    """What /info, calibration and evaluation records call a quantization mode's numerics;
    `smoothed`: the model has a channel smoothing (used by int8 alone)."""
    if quantization == "int8" and smoothed:
        return INT8_SCHEME + ", channel smoothing"
    return {
        "int8": INT8_SCHEME,
        "int8a16": INT8A16_SCHEME,
        "fp16": "fp16 weights and activations",
        "bf16": "bf16 weights and activations",
        "none": "fp32",
    }[quantization]


def batch_invariant(device: str, quantization: str) -> bool:
    """Whether a row's label, score and exit are bit-identical alone and in any batch.

    int8 on the CPU: every op is per token or per row (see `invariant`). fp32 on the CPU
    uses GEMMs whose summation order depends on the number of rows and threads
    (differences of about 1e-7), and on a GPU cuBLAS picks kernels by shape, so neither is
    promised.
    """
    return device == "cpu" and quantization in INT8_MODES


def int8_kernel(kernel: str = "auto") -> str:
    """What runs the int8 encoder layers: `onnxruntime` (one graph call per layer, see
    `ort_layers`) where it is installed, else `torch` (eager `Int8Linear`s).

    `torch` where ONNX Runtime is installed too is refused when the eager kernel runs
    more than `TORCH_KERNEL_MAX_SLOWDOWN` times slower on this CPU, naming the choice
    that serves."""
    if kernel not in INT8_KERNELS:
        raise ValueError(f"unknown int8 kernel {kernel!r}; expected one of {INT8_KERNELS}")
    if kernel == "auto":
        return "onnxruntime" if ort_session.available() else "torch"
    if kernel == "onnxruntime" and not ort_session.available():
        raise ValueError("int8 kernel 'onnxruntime' needs the onnx and onnxruntime packages")
    if kernel == "torch" and ort_session.available():
        slowdown = torch_kernel_slowdown()
        if slowdown > TORCH_KERNEL_MAX_SLOWDOWN:
            raise ValueError(
                f"int8 kernel 'torch' runs {slowdown:.1f}x slower than 'onnxruntime' on this"
                f" CPU (more than {TORCH_KERNEL_MAX_SLOWDOWN:g}x); use int8 kernel"
                " 'onnxruntime' (EXITSERVE_INT8_KERNEL=onnxruntime, or auto)"
            )
    return kernel


@functools.cache
def torch_kernel_slowdown() -> float:
    """How many times longer the eager int8 linear (`Int8Linear`, its `auto` kernel)
    takes than the same product as an ONNX Runtime graph, on one thread at a layer's
    shape (32 tokens, 384 -> 384; best of five each)."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(0)
        eager = Int8Linear(nn.Linear(384, 384))
        x = torch.randn(32, 384)
    graph = ort_layers.linear_graph(eager)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return best_time(eager, x, 5) / best_time(graph, x, 5)
    finally:
        torch.set_num_threads(previous)


def prepare_model(network: MultiExitNetwork, device: str, quantization: str) -> MultiExitNetwork:
    """Move and quantize an fp32 network for serving, in place; returns it in eval mode
    with query, key and value fused into one linear. The backend that runs it is chosen
    in `backends.make_backend`."""
    network = network.eval()
    for module in list(network.modules()):
        if isinstance(module, SelfAttention) and module.qkv is None:
            module.fuse()
    if quantization in INT8_MODES:
        quantize_int8(network, activation_bits=16 if quantization == "int8a16" else 8)
        return network
    network = network.to(device)
    if quantization == "fp16":
        network = network.half()
    elif quantization == "bf16":
        network = network.to(torch.bfloat16)
    return network


# -- quantization-aware training ----------------------------------------------------------
def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """The served weight rounding (`quantize_weight`), with a straight-through gradient."""
    q, scale = quantize_weight(w.detach())
    return w + (q * scale[:, None] - w).detach()


def _fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """The served per-token rounding (`quantize_per_token`), with a straight-through gradient."""
    q, scale = quantize_per_token(x.detach())
    return x + (q * scale - x).detach()


class _FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(
            _fake_quant_activation(x), _fake_quant_weight(self.linear.weight), self.linear.bias
        )


@contextmanager
def fake_int8(network: MultiExitNetwork) -> Iterator[None]:
    """Within the block, the encoder's and heads' linears see the served int8 rounding.

    The parameters stay the same fp32 tensors, so the optimizer and the saved state
    are unchanged; gradients pass straight through the rounding.
    """
    swapped = _linears(network)
    for module, name, child in swapped:
        setattr(module, name, _FakeQuantLinear(child))
    try:
        yield
    finally:
        for module, name, child in swapped:
            setattr(module, name, child)
