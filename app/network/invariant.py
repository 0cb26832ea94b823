"""Batch-invariant CPU kernels: a row's result never depends on the other rows it runs with.

Dynamic int8 as fbgemm and ONNX Runtime do it scales activations per tensor, so every
token's rounding depends on the largest activation anywhere in the batch; fp32 GEMMs pick
kernels by the number of rows (a matrix-vector kernel for one row sums in another order
than a blocked GEMM). Either way the same text can get another answer in another batch.

Here every quantity a row's result depends on comes from that row alone:
- `Int8Linear`: int8 weights per output channel, int8 activations scaled per token
  (symmetric, amax / 127), products summed in int32. Integer sums are exact, so the
  kernel's blocking and the batch size cannot change them; the scaling after the sum is
  elementwise. Per-token scales also round less than one scale over the whole batch.
  The exit heads use it too: an fp32 GEMM sums in an order that depends on the number
  of rows and of threads (measured: a one-row product over a batch of one-row products
  differs in the last bit between one and two threads), an int32 sum cannot.
Attention runs per length group without padding (see `encoder.Layer`); LayerNorm, GELU,
softmax and the residual adds are per-token or per-row already.

`quantize_per_token` and `quantize_weight` are the one definition of the rounding: the
served kernels and the training-time simulation (`quantize.fake_int8`) both call them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
from torch import nn

# A row of zeros (padding) would divide by zero; any positive floor maps it to zeros.
SCALE_FLOOR = 1e-6


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: w (N, K) -> int8 values (N, K), scales (N,)."""
    scale = w.abs().amax(dim=1).clamp(min=SCALE_FLOOR) / 127.0  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127)  # (N, K)
    return q, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dimension: values (..., K) as floats, scales (..., 1).

    The values are round(x / scale) with scale = amax / 127, half to even: exactly what
    ONNX Runtime's per-token `QuantizeLinear` computes (the graphs in `ort_layers`), bit
    for bit (checked on millions of values; multiplying by 127 / amax instead differs
    in a few). |x| <= amax keeps them in [-127, 127], so no clamp is needed.
    """
    # max(amax, -amin) is |x|'s max without writing |x| out: two reads instead of a copy.
    amax = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    scale = amax.clamp_(min=SCALE_FLOOR).div_(127.0)  # (..., 1)
    return torch.div(x, scale).round_(), scale


# 16-bit activations: per-token values in [-Q16, Q16], carried as two bytes.
Q16 = 32767


def quantize_per_token16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric 16-bit per row of the last dimension, as two bytes: (hi, lo, scale) with
    q = round(x / scale) = 256 * hi + lo exactly, hi = floor(q / 256) in [-128, 127], lo
    in [0, 255], scale = amax / Q16; hi and lo as floats, scales (..., 1). (q + 32768 as
    uint16 is what ONNX Runtime's QuantizeLinear gives: its high byte is hi + 128, its
    low byte lo.)

    Each byte multiplies the int8 weights in an int8 product with exact int32 sums (lo
    shifted by 128 into int8, the shift's sum added back per output), and 256 * sum(hi)
    + sum(lo) is the sum of q, joined per element: a row's result still depends on that
    row alone, while each activation is rounded 258 times finer than in 8 bits."""
    amax = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    scale = amax.clamp_(min=SCALE_FLOOR).div_(float(Q16))
    q = torch.div(x, scale).round_()
    hi = q.div(256.0).floor_()
    return hi, q.sub_(hi * 256.0), scale


@functools.cache
def onednn_available() -> bool:
    """True when oneDNN's int8 linear runs here (x86 builds of torch) and sums exactly;
    probed once.

    On x86 CPUs with AVX2 but no VNNI (many AMD EPYC and older Xeon), oneDNN adds pairs
    of uint8 x int8 products in int16 with saturation (it shifts int8 activations to
    uint8 for vpmaddubsw): measured on an AMD EPYC, a 27 x 384 x 1536 product was off
    by up to 93,000. The probe's values sit where that saturates (2 x 255 x 127 >
    32,767), so such a CPU takes the exact `_int_mm` kernel instead.
    """
    try:
        w = torch.full((8, 64), 127, dtype=torch.int8)
        w[::2] = -127
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        x = torch.full((2, 64), 127, dtype=torch.int8)
        zeros, ones = torch.zeros(8, dtype=torch.long), torch.ones(8)
        y = torch.ops.onednn.qlinear_pointwise(
            x, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return torch.equal(y, (x.long() @ w.long().t()).float())


@functools.cache
def onednn_preferred() -> bool:
    """True when oneDNN's int8 linear sums exactly here and is not slower than
    `_int_mm` (both give the same bits, so speed alone decides); probed once.

    On some CPUs oneDNN takes a slow path, thousands of times slower (docs/decisions.md).
    The probe times a mid-sized product, best of three each.
    """
    if not onednn_available():
        return False
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(0)
        linear = nn.Linear(128, 256)
        x = torch.randn(16, 128)
    onednn, int_mm = (best_time(Int8Linear(linear, k), x) for k in ("onednn", "int_mm"))
    return onednn <= int_mm


def best_time(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int = 3) -> float:
    """The shortest of `n` timed calls `f(x)` after one untimed (packing, dispatch)."""
    f(x)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        f(x)
        times.append(time.perf_counter() - started)
    return min(times)


class Int8Linear(nn.Module):
    """y = x W^T + b with int8 weights (per channel) and int8 activations (per token).

    Two kernels give bit-identical results (tested): oneDNN's int8 linear, which scales the
    int32 sums by the weight scales in its epilogue, and `torch._int_mm` followed by the
    same multiplication; the per-token scale and the bias are applied afterwards in one
    `addcmul`. `auto`: oneDNN where the torch build has it (x86) and it is the faster
    here (`onednn_preferred`), `_int_mm` elsewhere.

    `activation_bits=16`: activations per token in 16 bits (`quantize_per_token16`), both
    bytes in one int8 product with `_int_mm` (exact int32 sums), joined per element in
    float32 as 256 * high + (low + the low bytes' shift).

    `smooth` (K,): channel smoothing (`app.network.smoothing`): the weights' columns are
    multiplied by it before rounding and the activations divided by it (multiplied by
    its float32 reciprocal, as the graphs do) before theirs.
    """

    def __init__(
        self,
        linear: nn.Linear,
        kernel: str = "auto",
        activation_bits: int = 8,
        smooth: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if activation_bits not in (8, 16):
            raise ValueError(f"activation_bits {activation_bits}: expected 8 or 16")
        if activation_bits == 16:
            kernel = "int_mm"  # oneDNN's epilogue scales each half: the join would round
        elif kernel == "auto":
            kernel = "onednn" if onednn_preferred() else "int_mm"
        if kernel not in ("onednn", "int_mm"):
            raise ValueError(f"unknown int8 kernel {kernel!r}; expected auto, onednn or int_mm")
        w = linear.weight.detach().float()
        if smooth is not None:
            if tuple(smooth.shape) != (linear.in_features,):
                shape, k = tuple(smooth.shape), linear.in_features
                raise ValueError(f"smooth has shape {shape}, expected ({k},)")
            w = w * smooth.float()[None]
        q, scale = quantize_weight(w)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = kernel
        self.activation_bits = activation_bits
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(len(w))
        q8 = q.to(torch.int8).contiguous()
        self.weight_int8: torch.Tensor  # (N, K), for inspection
        self.weight_scale: torch.Tensor  # (N,)
        self.bias: torch.Tensor  # (N,)
        self.register_buffer("weight_int8", q8)
        self.register_buffer("weight_scale", scale.contiguous())
        self.register_buffer("bias", bias.contiguous())
        self.inv_smooth: torch.Tensor | None  # (K,), or None: no smoothing
        inv = None if smooth is None else torch.reciprocal(smooth.float()).contiguous()
        self.register_buffer("inv_smooth", inv)
        self._wt = q8.t()  # (K, N) view, the layout `_int_mm` reads fastest
        self._packed = torch.ops.onednn.qlinear_prepack(q8, None) if kernel == "onednn" else None
        self._zeros = torch.zeros(self.out_features, dtype=torch.long)
        # 16-bit activations: 128 * each output's weight sum, what shifting the low bytes
        # into int8 took off.
        self._lo_shift = (
            (q8.sum(dim=1, dtype=torch.int64) * 128).float() if activation_bits == 16 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.inv_smooth is not None:
            x2 = x2 * self.inv_smooth
        y, scale = self._sums16(x2) if self.activation_bits == 16 else self._sums8(x2)
        out = torch.addcmul(self.bias, y, scale)  # (M, N)
        return out.reshape(*shape[:-1], self.out_features)

    def _sums8(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the int32 sums x weight scales (M, N), the per-token scales (M, 1))."""
        values, scale = quantize_per_token(x2)  # (M, K), (M, 1)
        xq = values.to(torch.int8)
        if self._packed is not None:
            y = torch.ops.onednn.qlinear_pointwise(
                xq,
                1.0,
                0,
                self._packed,
                self.weight_scale,
                self._zeros,
                None,
                1.0,
                0,
                torch.float32,
                "none",
                [],
                "",
            )  # (M, N): int32 sums x weight scales
        else:
            y = torch.mul(torch._int_mm(xq, self._wt), self.weight_scale)  # (M, N)
        return y, scale

    def _sums16(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sums x weight scales (M, N), the per-token scales (M, 1)) for 16-bit
        activations: both bytes in one product, joined per element."""
        hi, lo, scale = quantize_per_token16(x2)
        sums = torch._int_mm(torch.cat([hi, lo.sub_(128.0)]).to(torch.int8), self._wt)
        high, low = sums.float().split(len(x2))
        return torch.mul(high.mul(256.0).add_(low.add_(self._lo_shift)), self.weight_scale), scale

    def extra_repr(self) -> str:
        bits = f", activations={self.activation_bits} bits" if self.activation_bits != 8 else ""
        smooth = ", smoothed" if self.inv_smooth is not None else ""
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}{bits}{smooth}"
