"""Exit heads: one small classifier after every encoder layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from app.network.encoder import joined, stretches


def mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the real (unpadded) token states: (B, T, H), (B, T) -> (B, H)."""
    m = mask.to(x.dtype)[:, :, None]  # (B, T, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


POOLINGS = ("mean", "cls")
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}  # gelu: exact (erf)


class ExitHead(nn.Module):
    """Pooling, then a one-hidden-layer classifier.

    `mean` (exitserve's own heads) averages the real tokens' states; `cls` takes the
    first token's state: with the dense layer as BERT's pooler, a `cls` head is exactly a
    `BertForSequenceClassification` classifier, which is how `add-exits` keeps a
    fine-tuned model's own classifier as its last exit (with `relu`, DistilBERT's; with
    `tanh`, RoBERTa's head too; with `gelu`, ELECTRA's).

    Mean pooling beat the [CLS] state at every layer on the frozen encoder, and the hidden
    layer is kept for fine-tuned exits, where shallow layers must re-map features the
    deeper ones would have produced (docs/decisions.md, "Exit heads").
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        dropout: float = 0.1,
        pooling: str = "mean",
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected {list(ACTIVATIONS)}")
        self.pooling = pooling
        self.activation = activation
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(x, mask))

    def pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) token states -> (B, H)."""
        return mean_pool(x, mask) if self.pooling == "mean" else x[:, 0]

    def packed_logits(self, x: torch.Tensor, runs: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Packed rows (N, H), stretches of (length, rows) -> logits (B, C): pooled per
        stretch, where a row's pooled state has the same bits as `pool` gives it in any
        padded batch (the sum over its real tokens, then one division; padding adds
        exact zeros), and classified at once."""
        pooled = [
            rows.sum(1) / rows.shape[1] if self.pooling == "mean" else rows[:, 0]
            for rows in stretches(x, runs)
        ]
        return self.classify(joined(pooled))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, H) pooled states -> (B, C) logits."""
        hidden = ACTIVATIONS[self.activation](self.dense(pooled))
        return self.classifier(self.dropout(hidden))
