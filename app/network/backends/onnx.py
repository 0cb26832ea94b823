"""The CPU's int8 layers as ONNX Runtime graphs (`ort_layers`): the default on the CPU.

The packed layout of `packed.PackedTorch`, with each stretch of rows of one length
running a layer and its exit head in one graph call, the embeddings in one more, and a
row alone through the whole network, its exit rule included, in one call (`OrtRow`).
Built at start-up from the int8 weights already in memory. The same bits alone and in
any batch: every op works per token, per row or per (row, head), and integer sums are
exact (`ort_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch

from app.network import exit_rule, ort_layers
from app.network.backends.packed import PackedTorch, Runs
from app.network.encoder import Layer, joined, stretches
from app.network.multi_exit import MultiExitNetwork


class PackedOnnx(PackedTorch):
    name = "onnxruntime"

    def __init__(self, model: MultiExitNetwork, threads: int = 1, wide_threads: int = 0) -> None:
        """`threads`: each graph's intra-op threads; `wide_threads` above that: a second
        session of the one-call graph on that many, for a row alone while the other
        engine workers idle (`run_alone(..., wide=True)`)."""
        super().__init__(model)
        embeddings = model.encoder.embeddings
        layers = [cast(Layer, layer) for layer in model.encoder.encoder.layer]
        heads = [model.head(i) for i in range(len(layers))]
        self._embed = ort_layers.OrtEmbeddings(embeddings, threads)
        self._layers = [
            ort_layers.OrtLayer(layer, threads, head)
            for layer, head in zip(layers, heads, strict=True)
        ]
        self._row = ort_layers.OrtRow(
            embeddings, layers, heads, threads, wide_threads, model.cfg.confidence
        )
        self._hidden = model.cfg.encoder.hidden_size

    @property
    def has_wide(self) -> bool:
        """Whether a row alone can run on more threads (`wide_threads` was above `threads`)."""
        return self._row.has_wide

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._embed(ids, positions)

    def layer(self, i: int, x: torch.Tensor, runs: Runs) -> torch.Tensor:
        H = self._hidden
        return joined([self._layers[i].layer(rows).view(-1, H) for rows in stretches(x, runs)])

    def layer_and_exit(
        self, i: int, x: torch.Tensor, runs: Runs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = [self._layers[i].layer_and_exit(rows) for rows in stretches(x, runs)]
        H = self._hidden
        return joined([y.view(-1, H) for y, _ in out]), joined([lg for _, lg in out])

    def run_alone(
        self,
        token_ids: Sequence[int],
        thresholds: Sequence[float],
        max_layers: int,
        wide: bool = False,
    ) -> torch.Tensor | None:
        """One graph call (`OrtRow`); `wide`: on the session with more threads, where there
        is one (the same bits: integer sums, and every other op splits its work by rows,
        never inside a sum)."""
        positions = self.positions(len(token_ids))
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        t = torch.from_numpy(exit_rule.float32_thresholds(thresholds))
        return self._row(ids, positions, t, max_layers, wide=wide)
