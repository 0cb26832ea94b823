"""The CPU in torch (fp32, or int8 with eager `Int8Linear`s): batches run packed.

Packed: the real tokens of every row side by side, no padding anywhere. Per-token ops
run on all tokens at once and attention once per stretch of rows of one length
(`encoder.Layer.packed`), so a row computes what it computes alone, and padding costs
no FLOPs. The ONNX Runtime backend (`onnx.PackedOnnx`) keeps this layout and replaces
the per-stretch work with graphs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from app.network.backends.base import Backend, RunningBatch
from app.network.encoder import joined, runs_of
from app.network.multi_exit import MultiExitNetwork

Runs = Sequence[tuple[int, int]]


class PackedTorch(Backend):
    name = "torch"

    def __init__(self, model: MultiExitNetwork) -> None:
        super().__init__(model)
        self._positions = torch.arange(model.cfg.encoder.max_position_embeddings)

    # -- the work of one step, per kind of backend ---------------------------------------
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Packed token ids and positions (N,) -> states (N, H)."""
        return self.model.encoder.embed_packed(ids, positions)

    def layer(self, i: int, x: torch.Tensor, runs: Runs) -> torch.Tensor:
        """Layer i on packed states (N, H) -> (N, H)."""
        return self.model.encoder.layer_packed(i, x, runs)

    def layer_and_exit(
        self, i: int, x: torch.Tensor, runs: Runs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i and its exit head: states (N, H) and logits (B, C)."""
        y = self.layer(i, x, runs)
        return y, self.model.head(i).packed_logits(y, runs)

    # -- the interface -------------------------------------------------------------------
    def begin(self, token_ids: Sequence[Sequence[int]]) -> RunningBatch:
        lengths = tuple(len(r) for r in token_ids)
        if not lengths or min(lengths) < 1:
            raise ValueError("every row needs at least one token")
        runs = tuple(runs_of(lengths))
        ids = torch.tensor(list(itertools.chain.from_iterable(token_ids)), dtype=torch.long)
        count = self._positions  # 0, 1, 2, ...
        if len(lengths) == 1:
            positions = count[: lengths[0]]  # a row alone: no new tensor
        else:
            positions = torch.cat([count[:n].repeat(k) for n, k in runs])
        return RunningBatch(self.embed(ids, positions), lengths, runs)

    def step(self, i: int, batch: RunningBatch, exit: bool = False) -> RunningBatch:
        if exit:
            x, logits = self.layer_and_exit(i, batch.x, batch.runs)
            return RunningBatch(x, batch.lengths, batch.runs, logits=logits)
        return RunningBatch(self.layer(i, batch.x, batch.runs), batch.lengths, batch.runs)

    def keep(self, batch: RunningBatch, rows: Sequence[int]) -> RunningBatch:
        lengths = tuple(batch.lengths[j] for j in rows)
        # The kept rows' tokens: one slice per span of consecutive rows.
        starts = list(itertools.accumulate(batch.lengths, initial=0))
        spans: list[list[int]] = []
        for j in rows:
            if spans and spans[-1][1] == starts[j]:
                spans[-1][1] = starts[j + 1]
            else:
                spans.append([starts[j], starts[j + 1]])
        x = joined([batch.x[a:b] for a, b in spans])
        return RunningBatch(x, lengths, tuple(runs_of(lengths)))

    def join(self, a: RunningBatch, b: RunningBatch) -> RunningBatch:
        lengths = a.lengths + b.lengths
        return RunningBatch(torch.cat([a.x, b.x]), lengths, tuple(runs_of(lengths)))

    def positions(self, n: int) -> torch.Tensor:
        """0..n-1 for a row of n tokens, refused past the model's positions."""
        if not 1 <= n <= len(self._positions):
            raise ValueError(f"a row needs 1..{len(self._positions)} tokens, got {n}")
        return self._positions[:n]
