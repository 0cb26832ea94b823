"""The backend interface: what runs a batch of rows through the layers, one at a time.

The engine drives every backend the same way: `begin` embeds rows of token ids, `step`
runs one layer (and, when any row may leave there, its exit head), `keep` drops the rows
that left, `join` merges two batches at the same depth, and `run_alone` takes a single
row through every layer it needs in one call where the backend can. `all_exits` gives
every exit's logits for a padded batch, computed exactly as serving computes them, for
calibration and evaluation. Implementations: `packed.PackedTorch` (the CPU in torch,
fp32 or eager int8), `onnx.PackedOnnx` (the CPU's int8 layers as ONNX Runtime graphs)
and `padded.Padded` (a GPU); `make_backend` (this package) picks one from the settings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.network.multi_exit import MultiExitNetwork


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Logits (..., C) -> scores: a softmax, or for a multi-label model a sigmoid per label.

    The sigmoid is taken as a two-way softmax of (z, 0) per label: the same bits for a
    row alone and in any batch. torch's elementwise sigmoid takes a vector path over
    most of a tensor and a scalar one for its tail, so a row's probability moved by one
    ulp with the size of its batch (measured)."""
    z = logits.float()
    if multi_label:
        return torch.softmax(torch.stack([z, torch.zeros_like(z)], dim=-1), dim=-1)[..., 0]
    return torch.softmax(z, dim=-1)


@dataclass(frozen=True)
class RunningBatch:
    """The states of a batch of rows between two layers, in one of two layouts.

    packed (the CPU): `x` (N, H) holds the real tokens of every row, row after row, and
      `runs` the (length, rows) stretches attention runs on; nothing is padded.
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


class Backend(ABC):
    """Runs a prepared `MultiExitNetwork` (`model`) for serving; see the module docstring."""

    name: str  # what /info and the start-up log call it

    def __init__(self, model: MultiExitNetwork) -> None:
        self.model = model

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def labels(self) -> tuple[str, ...]:
        return self.model.cfg.labels

    @property
    def graphs_captured(self) -> int:
        """CUDA graphs this backend has captured (none but on a GPU)."""
        return 0

    @property
    def multi_label(self) -> bool:
        return self.model.cfg.multi_label

    @property
    def confidence(self) -> str:
        """The model's confidence measure (`exit_rule.MEASURES`)."""
        return self.model.cfg.confidence

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (..., C) -> the model's scores (`probabilities`)."""
        return probabilities(logits, self.multi_label)

    @abstractmethod
    def begin(self, token_ids: Sequence[Sequence[int]]) -> RunningBatch:
        """Embed rows of token ids, in their order (rows of one length side by side make
        fewer attention calls when packed)."""

    @abstractmethod
    def step(self, i: int, batch: RunningBatch, exit: bool = False) -> RunningBatch:
        """Run layer i (0-based) on every row of `batch`, and its exit head if `exit`."""

    @abstractmethod
    def keep(self, batch: RunningBatch, rows: Sequence[int]) -> RunningBatch:
        """The rows at positions `rows` (increasing) of `batch`, in that order."""

    @abstractmethod
    def join(self, a: RunningBatch, b: RunningBatch) -> RunningBatch:
        """`a`'s rows, then `b`'s, at the same depth."""

    def run_alone(
        self,
        token_ids: Sequence[int],
        thresholds: Sequence[float],
        max_layers: int,
        wide: bool = False,
    ) -> torch.Tensor | None:
        """One row through the layers it needs in one call, leaving at the first exit the
        rule lets it (`exit_rule`): the logits of every exit it ran (e, C), e being its
        exit layer, or None where the backend has no such path (then run it with
        `begin` and `step`). `wide`: on more threads, where the backend has them."""
        return None

    def all_exits(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Every exit's logits (L, B, C) for rows of token ids, run as serving runs them
        (longest rows first, each layer with its exit head), in the rows' order."""
        order = sorted(range(len(token_ids)), key=lambda b: -len(token_ids[b]))
        batch, logits = self.begin([token_ids[b] for b in order]), []
        for i in range(self.num_layers):
            batch = self.step(i, batch, exit=True)
            assert batch.logits is not None
            logits.append(batch.logits)
        out = torch.stack(logits)  # (L, B, C), rows in `order`
        return out.index_select(1, torch.tensor(order, device=out.device).argsort())
