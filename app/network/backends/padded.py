"""A GPU (fp16, bf16 or fp32): batches run right-padded, stage by stage.

On a GPU small batches are bound by kernel launches, not FLOPs, and finding the real
tokens (`nonzero()`) would force a host sync at every layer, so rows keep their padding;
`keep` trims it to the longest row still running. A whole pass (`all_exits`, what
per-batch dispatch uses where one pass is cheaper) replays a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from app.network.backends.base import Backend, RunningBatch
from app.network.backends.graphs import WholeGraphs
from app.network.multi_exit import MultiExitNetwork, pad_batch


class Padded(Backend):
    name = "torch"

    def __init__(self, model: MultiExitNetwork, graphs: bool | None = None) -> None:
        """`graphs`: whole passes (`all_exits`) replay CUDA graphs captured per shape
        bucket (default: on CUDA); otherwise the same buckets run eagerly."""
        super().__init__(model)
        self.graphs = WholeGraphs(model, capture=graphs)

    @property
    def graphs_captured(self) -> int:
        return self.graphs.captured

    def all_exits(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Every exit's logits (L, B, C) in one pass of the whole network, as one graph
        replay per shape bucket (`graphs.WholeGraphs`)."""
        ids, mask = pad_batch([list(r) for r in token_ids], device=self.model.device)
        return self.graphs(ids, mask)

    def begin(self, token_ids: Sequence[Sequence[int]]) -> RunningBatch:
        lengths = tuple(len(r) for r in token_ids)
        if not lengths or min(lengths) < 1:
            raise ValueError("every row needs at least one token")
        m = self.model
        ids, mask = pad_batch([list(r) for r in token_ids], device=m.device)
        return RunningBatch(m.embed(ids), lengths, mask=mask, bias=m.attention_bias(mask))

    def step(self, i: int, batch: RunningBatch, exit: bool = False) -> RunningBatch:
        assert batch.bias is not None and batch.mask is not None
        x = self.model.layer(i, batch.x, batch.bias)
        logits = self.model.exit_logits(i, x, batch.mask) if exit else None
        return RunningBatch(x, batch.lengths, mask=batch.mask, bias=batch.bias, logits=logits)

    def keep(self, batch: RunningBatch, rows: Sequence[int]) -> RunningBatch:
        assert batch.mask is not None
        lengths = tuple(batch.lengths[j] for j in rows)
        idx = torch.tensor(list(rows), device=batch.x.device)
        T = max(lengths)  # right padding: trim to the longest remaining row
        mask = batch.mask.index_select(0, idx)[:, :T]
        x = batch.x.index_select(0, idx)[:, :T]
        return RunningBatch(x, lengths, mask=mask, bias=self.model.attention_bias(mask))

    def join(self, a: RunningBatch, b: RunningBatch) -> RunningBatch:
        assert a.mask is not None and b.mask is not None
        T = max(a.x.shape[1], b.x.shape[1])

        def pad(t: torch.Tensor) -> torch.Tensor:  # right-pad the T axis to length T
            extra = T - t.shape[1]
            return F.pad(t, (0, 0, 0, extra)) if t.dim() == 3 else F.pad(t, (0, extra))

        mask = torch.cat([pad(a.mask), pad(b.mask)])
        x = torch.cat([pad(a.x), pad(b.x)])
        return RunningBatch(
            x, a.lengths + b.lengths, mask=mask, bias=self.model.attention_bias(mask)
        )
