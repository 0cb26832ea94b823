"""The multi-exit network: an encoder with an exit head after every layer.

The model: its weights, the stages (`embed`, `layer`, `exit_logits`) and `forward`,
every exit at once for a padded batch, for training and reference. Serving runs it
through a backend (`app.network.backends`), which drives a batch one layer at a time
and drops rows as they leave; evaluation goes through the same backend, so what is
measured offline is what is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from app.network.encoder import (
    Encoder,
    EncoderConfig,
    attention_bias,
)
from app.network.heads import ExitHead

OUTPUTS = ("softmax", "sigmoid")
# The confidence measures each output may use (`app.network.exit_rule`), the default
# first: a multi-label model made before `label_set_probability` keeps its
# `min_label_margin`, which its thresholds were calibrated on.
CONFIDENCE = {
    "softmax": ("max_softmax",),
    "sigmoid": ("label_set_probability", "min_label_margin"),
}


@dataclass(frozen=True)
class MultiExitConfig:
    encoder: EncoderConfig
    labels: tuple[str, ...]
    max_seq_len: int = 128
    head_dropout: float = 0.1
    # The last exit's pooling: "mean" for exitserve's own heads, "cls" for a fine-tuned
    # classifier's pooler + classifier kept as the last exit (`add-exits`).
    final_pooling: str = "mean"
    final_activation: str = "tanh"  # the kept classifier's: "relu" for DistilBERT's
    # How logits become scores: "softmax" (one label per input) or "sigmoid" (a
    # multi-label model: each label on or off by itself).
    output: str = "softmax"
    # An exit's confidence (`exit_rule.MEASURES`); empty: the output's default.
    confidence: str = ""

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if not self.confidence:
            object.__setattr__(self, "confidence", CONFIDENCE[self.output][0])
        if self.confidence not in CONFIDENCE[self.output]:
            raise ValueError(
                f"confidence measure {self.confidence!r} does not fit a {self.output} output;"
                f" expected one of {CONFIDENCE[self.output]}"
            )
        if len(self.labels) < (1 if self.multi_label else 2):
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

    @property
    def multi_label(self) -> bool:
        return self.output == "sigmoid"

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder.to_dict(),
            "labels": list(self.labels),
            "max_seq_len": self.max_seq_len,
            "head_dropout": self.head_dropout,
            "final_pooling": self.final_pooling,
            "final_activation": self.final_activation,
            "output": self.output,
            "confidence": self.confidence,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultiExitConfig:
        return cls(
            encoder=EncoderConfig(**d["encoder"]),
            labels=tuple(d["labels"]),
            max_seq_len=int(d["max_seq_len"]),
            head_dropout=float(d.get("head_dropout", 0.1)),
            final_pooling=str(d.get("final_pooling", "mean")),
            final_activation=str(d.get("final_activation", "tanh")),
            output=str(d.get("output", "softmax")),
            confidence=str(d.get("confidence", "")),
        )


@dataclass
class MultiExitOutput:
    """Logits of every exit for every row."""

    logits: torch.Tensor  # (L, B, C)
    hidden: list[torch.Tensor] = field(default_factory=list)  # L x (B, T, H) when asked for


class MultiExitNetwork(nn.Module):
    def __init__(self, cfg: MultiExitConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder)
        L = cfg.num_layers
        self.heads = nn.ModuleList(
            ExitHead(
                cfg.encoder.hidden_size,
                len(cfg.labels),
                cfg.head_dropout,
                cfg.final_pooling if i == L - 1 else "mean",
                cfg.final_activation if i == L - 1 else "tanh",
            )
            for i in range(L)
        )
        # int8's channel smoothing, per served linear (`app.network.smoothing`); the
        # artifact's, empty where it has none.
        self.int8_smoothing: dict[str, torch.Tensor] = {}

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

    # -- all exits at once (training, evaluation) --------------------------------------
    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, keep_hidden: bool = False
    ) -> MultiExitOutput:
        bias = self.attention_bias(mask)
        x = self.embed(input_ids)
        logits, hidden = [], []
        for i in range(self.num_layers):
            x = self.layer(i, x, bias)
            logits.append(self.exit_logits(i, x, mask))
            if keep_hidden:
                hidden.append(x)
        return MultiExitOutput(torch.stack(logits), hidden)


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
