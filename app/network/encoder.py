"""A BERT encoder in plain PyTorch, driven one stage at a time.

The parameter names match the Hugging Face `BertModel` checkpoint layout, so the
pretrained MiniLM weights load with a plain `load_state_dict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Attention kernels for CUDA. cuDNN attention (preferred on Hopper by recent torch) builds
# a graph for every new (batch, length) shape, tens to hundreds of milliseconds each;
# early exit compacts batches to ever new shapes, and serving stalled on those builds.
# Memory-efficient attention takes any shape and an additive mask at no build cost.
CUDA_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # The checkpoint family it was read from (app.network.checkpoint.FAMILIES); every
    # family is run as this one encoder, so it is a name, not a switch.
    architecture: str = "bert"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(0.1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)  # (B, T, H)
            + self.position_embeddings(positions)[None]  # (1, T, H)
            + self.token_type_embeddings.weight[0]  # single-segment inputs: type 0
        )
        return self.dropout(self.LayerNorm(x))

    def packed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Tokens without padding: ids and positions (N,) -> (N, H), each token exactly
        what `forward` gives it in a padded batch (the same sums in the same order)."""
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings.weight[0]
        )
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.qkv: nn.Linear | None = None  # set by `fuse` for serving
        self.dropout_p = 0.1

    @torch.no_grad()
    def fuse(self) -> None:
        """Replace query/key/value by one linear: one matmul (and, in int8, one activation
        quantization) instead of three. For serving; training keeps them separate."""
        H = self.query.in_features
        qkv = nn.Linear(H, 3 * H).to(self.query.weight.device, self.query.weight.dtype)
        qkv.weight.copy_(torch.cat([self.query.weight, self.key.weight, self.value.weight]))
        qkv.bias.copy_(torch.cat([self.query.bias, self.key.bias, self.value.bias]))
        self.qkv = qkv
        del self.query, self.key, self.value

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values side by side: (..., H) -> (..., 3H)."""
        if self.qkv is not None:
            return self.qkv(x)
        return torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.attend(self.project(x), bias)

    def attend(self, qkv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Scaled dot-product attention over (B, T, 3H) projections -> (B, T, H).

        `bias` None: every position is a real token (no mask at all)."""
        B, T, H3 = qkv.shape
        H = H3 // 3
        d = H // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, T, self.num_heads, d).transpose(1, 2)  # (B, nh, T, d)

        q, k, v = (heads(t) for t in qkv.split(H, dim=-1))
        p = self.dropout_p if self.training else 0.0
        if bias is None:
            # Inference on the CPU, a stretch of rows of one length: one call per row, the
            # very call the row makes alone. Over several rows torch's CPU kernels split
            # the work by the number of rows and threads, which moved a row's bits
            # (docs/decisions.md); attention costs rows times one row's anyway.
            y = joined(
                [
                    F.scaled_dot_product_attention(q[one], k[one], v[one], dropout_p=p)
                    for one in (slice(b, b + 1) for b in range(B))
                ]
            )
        elif q.is_cuda:
            with sdpa_kernel(CUDA_ATTENTION):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        # y: (B, nh, T, d)
        return y.transpose(1, 2).reshape(B, T, H)


class AttentionOutput(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(0.1)


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        # Attribute names follow the checkpoint: attention.self.*, attention.output.*
        self.self = SelfAttention(cfg)
        self.output = AttentionOutput(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.output.dropout(self.output.dense(self.self(x, bias)))
        return self.output.LayerNorm(x + y)


class Intermediate(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class Output(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(0.1)


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # On the CPU, inference never lets padding touch a real row: per-token ops run on
        # the real tokens only and attention runs per length group without a mask, so a
        # row computes exactly what it computes alone (and padding costs no FLOPs). On a
        # GPU small batches are bound by kernel launches, not FLOPs, and `nonzero()` would
        # force a host sync at every layer.
        if not self.training and x.device.type == "cpu":
            B, T = x.shape[:2]
            lengths = (bias.reshape(B, T) == 0).sum(1).tolist()  # right padding
            if min(lengths) == T:
                return self.packed(x.reshape(B * T, -1), [(T, B)]).view(x.shape)
            return self._unpadded(x, lengths)
        x = self.attention(x, bias)  # (B, T, H)
        return self._feed_forward(x)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.intermediate.dense(x))  # (..., 4H)
        y = self.output.dropout(self.output.dense(h))  # (..., H)
        return self.output.LayerNorm(x + y)

    def packed(self, x: torch.Tensor, runs: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Inference on packed rows: x (N, H) holds the real tokens of every row, row
        after row, and `runs` (length, rows) describes them as stretches of rows of one
        length. Every per-token op (the linears, GELU, residuals, LayerNorms) runs on all
        N tokens at once and attention per row, on exactly its tokens. No padding
        anywhere, and a row computes exactly what it computes alone.
        """
        H = x.shape[-1]
        if len(runs) == 1:  # one length (every batch of one)
            n, k = runs[0]
            return self._feed_forward(self.attention(x.view(k, n, H), None)).view(k * n, H)
        attn, out = self.attention.self, self.attention.output
        qkv = attn.project(x)  # (N, 3H): the linears see every token at once
        y = joined([attn.attend(rows, None).view(-1, H) for rows in stretches(qkv, runs)])
        return self._feed_forward(out.LayerNorm(x + out.dropout(out.dense(y))))

    def _unpadded(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """A padded batch run packed: its real tokens gathered longest row first (so rows
        of one length sit together), `packed`, and scattered back. Padded positions
        come out as zeros, which the exit heads' pooling ignores."""
        B, T, H = x.shape
        order = sorted(range(B), key=lambda b: -lengths[b])
        idx = torch.cat([torch.arange(b * T, b * T + lengths[b]) for b in order])
        tokens = x.reshape(B * T, H).index_select(0, idx)  # (N, H)
        y = self.packed(tokens, runs_of([lengths[b] for b in order]))
        return x.new_zeros(B * T, H).index_copy_(0, idx, y).view(B, T, H)


def stretches(x: torch.Tensor, runs: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Packed tokens (N, D) as one (k, n, D) view per stretch of k rows of length n.

    The ONNX Runtime backend runs a layer per stretch, one graph call each."""
    views, start = [], 0
    for n, k in runs:
        views.append(x[start : start + n * k].view(k, n, -1))
        start += n * k
    return views


def joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-stretch results back in one tensor, row after row (no copy for one)."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


def runs_of(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """(length, rows) of each stretch of consecutive rows with one length."""
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


class LayerStack(nn.Module):
    """Holds the layers under the checkpoint's `encoder.layer.N` names."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))


class Encoder(nn.Module):
    """BERT encoder with a stage interface: `embed`, then `layer(i)` for i in 0..N-1."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = LayerStack(cfg)

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)  # (B, T, H)

    def layer(self, i: int, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.encoder.layer[i](x, bias)  # (B, T, H)

    def embed_packed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embeddings.packed(input_ids, positions)  # (N, H)

    def layer_packed(
        self, i: int, x: torch.Tensor, runs: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        layer: Layer = self.encoder.layer[i]  # type: ignore[assignment]
        return layer.packed(x, runs)  # (N, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states after the embeddings and after every layer: N + 1 tensors (B, T, H)."""
        bias = attention_bias(attention_mask, self.embeddings.LayerNorm.weight.dtype)
        states = [self.embed(input_ids)]
        for i in range(self.num_layers):
            states.append(self.layer(i, states[-1], bias))
        return states


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (B, 1, 1, T): 0 for real tokens, a large negative for padding."""
    # finfo.min rather than -inf: stays finite in fp16/bf16 and never yields NaN rows.
    neg = torch.finfo(dtype).min
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias = bias.masked_fill(attention_mask == 0, neg)
    return bias[:, None, None, :]
