"""The multi-exit network: an encoder with an exit head after every layer.

The engine drives a batch through it one layer at a time (`begin`, `step` with or
without the exit head, `keep`, `join` on a `RunningBatch`) and drops rows as they leave.
`forward` gives all exits at once for a padded batch: in training (and on a GPU) stage
by stage (`embed`, `layer`, `exit_logits`); in inference on the CPU through the served
packed path, so that evaluation computes exactly what serving does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from app.network.encoder import (
    Encoder,
    EncoderConfig,
    Layer,
    attention_bias,
    joined,
    runs_of,
    stretches,
)
from app.network.heads import ExitHead


@dataclass(frozen=True)
class MultiExitConfig:
    encoder: EncoderConfig
    labels: tuple[str, ...]
    max_seq_len: int = 128
    head_dropout: float = 0.1
    # The last exit's pooling: "mean" for exitserve's own heads, "cls" for a fine-tuned
    # classifier's pooler + classifier kept as the last exit (`add-exits`).
    final_pooling: str = "mean"

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ValueError(f"need at least 2 labels, got {len(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {list(self.labels)}")
        if not 2 <= self.max_seq_len <= self.encoder.max_position_embeddings:
            raise ValueError(
                f"max_seq_len must be in 2..{self.encoder.max_position_embeddings},"
                f" got {self.max_seq_len}"
            )

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder.to_dict(),
            "labels": list(self.labels),
            "max_seq_len": self.max_seq_len,
            "head_dropout": self.head_dropout,
            "final_pooling": self.final_pooling,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultiExitConfig:
        return cls(
            encoder=EncoderConfig(**d["encoder"]),
            labels=tuple(d["labels"]),
            max_seq_len=int(d["max_seq_len"]),
            head_dropout=float(d.get("head_dropout", 0.1)),
            final_pooling=str(d.get("final_pooling", "mean")),
        )


@dataclass
class MultiExitOutput:
    """Logits of every exit for every row."""

    logits: torch.Tensor  # (L, B, C)
    hidden: list[torch.Tensor] = field(default_factory=list)  # L x (B, T, H) when asked for


@dataclass(frozen=True)
class RunningBatch:
    """The states of a batch of rows between two layers, in one of two layouts.

    packed (CPU inference): `x` (N, H) holds the real tokens of every row, row after
      row, and `runs` the (length, rows) stretches attention runs on; nothing is padded.
    padded (a GPU, where launches cost more than padding): `x` (B, T, H) right-padded,
      with its `mask` (B, T) and additive attention `bias` (B, 1, 1, T).
    """

    x: torch.Tensor
    lengths: tuple[int, ...]  # real tokens of each row
    runs: tuple[tuple[int, int], ...] = ()  # packed
    mask: torch.Tensor | None = None  # padded
    bias: torch.Tensor | None = None  # padded
    logits: torch.Tensor | None = None  # (B, C): the exit after the last layer run, if asked

    @property
    def packed(self) -> bool:
        return self.mask is None

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        """Token positions a layer runs on: real tokens packed, padded ones padded."""
        return int(self.x.shape[0]) if self.packed else int(self.x.shape[0] * self.x.shape[1])


class MultiExitNetwork(nn.Module):
    def __init__(self, cfg: MultiExitConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder)
        self._positions = torch.arange(cfg.encoder.max_position_embeddings)
        # int8 serving on ONNX Runtime: a row alone in one call (`run_alone`), and the
        # same graph on more threads, for when no other row is running.
        self.alone: Callable[..., torch.Tensor] | None = None
        self.alone_wide: Callable[..., torch.Tensor] | None = None
        L = cfg.num_layers
        self.heads = nn.ModuleList(
            ExitHead(
                cfg.encoder.hidden_size,
                len(cfg.labels),
                cfg.head_dropout,
                cfg.final_pooling if i == L - 1 else "mean",
            )
            for i in range(L)
        )

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.embeddings.LayerNorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.embeddings.LayerNorm.weight.device

    # -- stage interface ---------------------------------------------------------------
    def attention_bias(self, mask: torch.Tensor) -> torch.Tensor:
        return attention_bias(mask, self.dtype)  # (B, 1, 1, T)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(input_ids)  # (B, T, H)

    def layer(self, i: int, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.encoder.layer(i, x, bias)  # (B, T, H)

    def exit_logits(self, i: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.heads[i](x, mask)  # (B, C)

    def head(self, i: int) -> ExitHead:
        return cast(ExitHead, self.heads[i])

    # -- a batch in flight (serving) -----------------------------------------------------
    @property
    def packs(self) -> bool:
        """Whether batches in flight run packed: inference on the CPU."""
        return self.device.type == "cpu" and not self.training

    def begin(self, token_ids: Sequence[Sequence[int]]) -> RunningBatch:
        """Embed rows of token ids (their order is kept; rows of one length side by side
        make fewer attention calls when packed)."""
        lengths = tuple(len(r) for r in token_ids)
        if not lengths or min(lengths) < 1:
            raise ValueError("every row needs at least one token")
        if not self.packs:
            ids, mask = pad_batch([list(r) for r in token_ids], device=self.device)
            return RunningBatch(self.embed(ids), lengths, mask=mask, bias=self.attention_bias(mask))
        runs = tuple(runs_of(lengths))
        ids = torch.tensor(list(itertools.chain.from_iterable(token_ids)), dtype=torch.long)
        count = self._positions  # 0, 1, 2, ...
        if len(lengths) == 1:
            positions = count[: lengths[0]]  # a row alone: no new tensor
        else:
            positions = torch.cat([count[:n].repeat(k) for n, k in runs])
        return RunningBatch(self.encoder.embed_packed(ids, positions), lengths, runs)

    def run_alone(
        self,
        token_ids: Sequence[int],
        thresholds: Sequence[float],
        max_layers: int,
        wide: bool = False,
    ) -> torch.Tensor | None:
        """One row through the layers it needs in one call, leaving at the first exit
        whose confidence reaches its threshold (below 1) or at `max_layers`: the logits
        of every exit it ran (e, C), e being its exit layer. None where the network has
        no such graph (then run it with `begin` and `step`). `wide`: on the graph with
        more threads, where there is one (the same bits: integer sums, and every other
        op splits its work by rows, never inside a sum)."""
        graph = self.alone_wide if wide and self.alone_wide is not None else self.alone
        if graph is None or not self.packs:
            return None
        n = len(token_ids)
        if not 1 <= n <= len(self._positions):
            raise ValueError(f"a row needs 1..{len(self._positions)} tokens, got {n}")
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        t = torch.tensor(list(thresholds), dtype=torch.float32)
        return graph(ids, self._positions[:n], t, max_layers)

    def step(self, i: int, batch: RunningBatch, exit: bool = False) -> RunningBatch:
        """Run layer i (0-based) on every row of `batch`, and its exit head if `exit`."""
        if not batch.packed:
            assert batch.bias is not None and batch.mask is not None
            x = self.layer(i, batch.x, batch.bias)
            logits = self.exit_logits(i, x, batch.mask) if exit else None
            return RunningBatch(x, batch.lengths, mask=batch.mask, bias=batch.bias, logits=logits)
        fast = cast(Layer, self.encoder.encoder.layer[i]).fast
        if exit and fast is not None and fast.has_exit:
            # The layer and its exit in one call per stretch of rows of one length.
            out = [fast.whole_exit(rows) for rows in stretches(batch.x, batch.runs)]
            H = batch.x.shape[-1]
            x, logits = joined([y.view(-1, H) for y, _ in out]), joined([lg for _, lg in out])
            return RunningBatch(x, batch.lengths, batch.runs, logits=logits)
        x = self.encoder.layer_packed(i, batch.x, batch.runs)
        logits = self.head(i).packed_logits(x, batch.runs) if exit else None
        return RunningBatch(x, batch.lengths, batch.runs, logits=logits)

    def keep(self, batch: RunningBatch, rows: Sequence[int]) -> RunningBatch:
        """The rows at positions `rows` (increasing) of `batch`, in that order."""
        lengths = tuple(batch.lengths[j] for j in rows)
        if batch.packed:  # the kept rows' tokens: one slice per span of consecutive rows
            starts = list(itertools.accumulate(batch.lengths, initial=0))
            spans: list[list[int]] = []
            for j in rows:
                if spans and spans[-1][1] == starts[j]:
                    spans[-1][1] = starts[j + 1]
                else:
                    spans.append([starts[j], starts[j + 1]])
            x = joined([batch.x[a:b] for a, b in spans])
            return RunningBatch(x, lengths, tuple(runs_of(lengths)))
        assert batch.mask is not None
        idx = torch.tensor(list(rows), device=batch.x.device)
        T = max(lengths)  # right padding: trim to the longest remaining row
        mask = batch.mask.index_select(0, idx)[:, :T]
        x = batch.x.index_select(0, idx)[:, :T]
        return RunningBatch(x, lengths, mask=mask, bias=self.attention_bias(mask))

    def join(self, a: RunningBatch, b: RunningBatch) -> RunningBatch:
        """`a`'s rows, then `b`'s, at the same depth."""
        lengths = a.lengths + b.lengths
        if a.packed and b.packed:
            return RunningBatch(torch.cat([a.x, b.x]), lengths, tuple(runs_of(lengths)))
        assert a.mask is not None and b.mask is not None
        T = max(a.x.shape[1], b.x.shape[1])

        def pad(t: torch.Tensor) -> torch.Tensor:  # right-pad the T axis to length T
            extra = T - t.shape[1]
            return F.pad(t, (0, 0, 0, extra)) if t.dim() == 3 else F.pad(t, (0, extra))

        mask = torch.cat([pad(a.mask), pad(b.mask)])
        x = torch.cat([pad(a.x), pad(b.x)])
        return RunningBatch(x, lengths, mask=mask, bias=self.attention_bias(mask))

    # -- all exits at once (training, evaluation) --------------------------------------
    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, keep_hidden: bool = False
    ) -> MultiExitOutput:
        if self.packs and not keep_hidden:  # CPU inference: exactly what serving computes
            return MultiExitOutput(self._packed_forward(input_ids, mask))
        bias = self.attention_bias(mask)
        x = self.embed(input_ids)
        logits, hidden = [], []
        for i in range(self.num_layers):
            x = self.layer(i, x, bias)
            logits.append(self.exit_logits(i, x, mask))
            if keep_hidden:
                hidden.append(x)
        return MultiExitOutput(torch.stack(logits), hidden)

    def _packed_forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every exit's logits (L, B, C) for a right-padded batch, run packed (longest
        rows first, as the executor runs them) with each layer and its exit together."""
        lengths = mask.sum(1).tolist()
        order = sorted(range(len(lengths)), key=lambda b: -lengths[b])
        rows = [input_ids[b, : lengths[b]].tolist() for b in order]
        batch, logits = self.begin(rows), []
        for i in range(self.num_layers):
            batch = self.step(i, batch, exit=True)
            assert batch.logits is not None
            logits.append(batch.logits)
        out = torch.stack(logits)  # (L, B, C), rows in `order`
        return out.index_select(1, torch.tensor(order).argsort())


def pad_batch(
    rows: list[list[int]], pad_id: int = 0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest: ids (B, T) int64, mask (B, T) int64."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every row needs at least one token")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask
