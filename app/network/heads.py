"""Exit heads: one small classifier after every encoder layer."""

from __future__ import annotations

import torch
from torch import nn


def mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the real (unpadded) token states: (B, T, H), (B, T) -> (B, H)."""
    m = mask.to(x.dtype)[:, :, None]  # (B, T, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class ExitHead(nn.Module):
    """Mean pooling, then a one-hidden-layer classifier.

    Mean pooling beat the [CLS] state by 3-5 points at every exit of the frozen
    encoder; the hidden layer lets shallow exits re-map features the final layers
    would otherwise have produced.
    """

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.dense(mean_pool(x, mask)))  # (B, H)
        return self.classifier(self.dropout(h))  # (B, C)
