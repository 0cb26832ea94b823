"""Tiny random BERT checkpoints in the standard directory layout, and an independent
reference forward pass of `BertForSequenceClassification` to check them against.

The layout is a hub export's: `config.json`, `model.safetensors` (a bare encoder's names,
or a sequence classifier's `bert.*` names plus `classifier.*`), `tokenizer.json` (a real
`tokenizers` WordPiece over the tiny vocabulary). `reference_probs` is written from the
BERT equations on the raw tensors, sharing no code with `app.network`.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from tests.tiny import make_tokenizer, random_texts

GOOD = ("good", "great", "best", "fine", "nice", "love", "wonderful", "brilliant", "superb")
BAD = ("bad", "worst", "awful", "terrible", "boring", "dull", "poor", "weak", "hate")


def write_checkpoint(
    path: Path | str,
    *,
    num_layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    intermediate: int = 64,
    max_positions: int = 64,
    labels: Sequence[str] | None = None,
    seed: int = 0,
    config: dict[str, Any] | None = None,
) -> Path:
    """A BERT checkpoint directory: a bare encoder (`BertModel`), or with `labels` a
    sequence classifier (`BertForSequenceClassification`). `config` overrides fields."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    tok.save(str(d / "tokenizer.json"))
    V = tok.get_vocab_size()
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + randn(hidden), f"{prefix}.bias": randn(hidden)}

    def linear(prefix: str, n_in: int, n_out: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": randn(n_out, n_in, std=1 / math.sqrt(n_in)),
                f"{prefix}.bias": randn(n_out)}  # fmt: skip

    t: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": randn(V, hidden, std=1.0),
        "embeddings.position_embeddings.weight": randn(max_positions, hidden, std=0.5),
        "embeddings.token_type_embeddings.weight": randn(2, hidden, std=0.5),
        "embeddings.position_ids": torch.arange(max_positions)[None],
        **norm("embeddings.LayerNorm"),
        **linear("pooler.dense", hidden, hidden),
    }
    for i in range(num_layers):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            t |= linear(f"{p}.attention.self.{name}", hidden, hidden)
        t |= linear(f"{p}.attention.output.dense", hidden, hidden)
        t |= norm(f"{p}.attention.output.LayerNorm")
        t |= linear(f"{p}.intermediate.dense", hidden, intermediate)
        t |= linear(f"{p}.output.dense", intermediate, hidden)
        t |= norm(f"{p}.output.LayerNorm")
    cfg: dict[str, Any] = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "vocab_size": V,
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_positions,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }
    if labels is not None:
        t = {f"bert.{k}": v for k, v in t.items()}
        t["classifier.weight"] = randn(len(labels), hidden, std=2.0)
        t["classifier.bias"] = randn(len(labels))
        cfg["architectures"] = ["BertForSequenceClassification"]
        cfg["id2label"] = {str(i): name for i, name in enumerate(labels)}
        cfg["label2id"] = {name: i for i, name in enumerate(labels)}
    cfg |= config or {}
    if labels is not None:
        # A random encoder maps every text to nearly the same pooled state: centre the
        # classifier on a sample of texts so that answers and confidences vary.
        pooled = _pooled(cfg, t, tok, random_texts(64, seed=seed + 99))
        scale = 2.0 / math.sqrt(hidden) / pooled.std(0).clamp(min=1e-3)  # (H,)
        t["classifier.weight"] = randn(len(labels), hidden, std=1.0) * scale
        t["classifier.bias"] = -t["classifier.weight"] @ pooled.mean(0)
    save_file({k: v.contiguous() for k, v in t.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


def reference_probs(path: Path | str, texts: Sequence[str]) -> torch.Tensor:
    """`BertForSequenceClassification` in eval mode, one text at a time: (N, C)."""
    d = Path(path)
    cfg = json.loads((d / "config.json").read_text())
    w = load_file(str(d / "model.safetensors"))
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    pooled = _pooled(cfg, w, tok, texts)
    return torch.softmax(pooled @ w["classifier.weight"].T + w["classifier.bias"], -1)


def _pooled(
    cfg: dict[str, Any], w: dict[str, torch.Tensor], tok: Tokenizer, texts: Sequence[str]
) -> torch.Tensor:
    """The pooler's output (tanh of a linear map of the [CLS] state), per text: (N, H)."""
    nh, eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]

    def lin(x: torch.Tensor, p: str) -> torch.Tensor:
        return x @ w[f"{p}.weight"].T + w[f"{p}.bias"]

    def ln(x: torch.Tensor, p: str) -> torch.Tensor:
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w[f"{p}.weight"] + w[f"{p}.bias"]

    out = []
    for text in texts:
        ids = torch.tensor(tok.encode(text).ids)
        n = len(ids)
        x = (w["bert.embeddings.word_embeddings.weight"][ids]
             + w["bert.embeddings.position_embeddings.weight"][:n]
             + w["bert.embeddings.token_type_embeddings.weight"][0])  # fmt: skip
        x = ln(x, "bert.embeddings.LayerNorm")
        for i in range(cfg["num_hidden_layers"]):
            p = f"bert.encoder.layer.{i}"
            q, k, v = (lin(x, f"{p}.attention.self.{m}").view(n, nh, -1).transpose(0, 1)
                       for m in ("query", "key", "value"))  # fmt: skip
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1) @ v
            att = att.transpose(0, 1).reshape(n, -1)
            x = ln(x + lin(att, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            h = lin(x, f"{p}.intermediate.dense")
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
            x = ln(x + lin(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        out.append(torch.tanh(lin(x[0], "bert.pooler.dense")))
    return torch.stack(out)


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Random texts labelled by a word rule (more GOOD words than BAD: positive), so a
    model can learn them."""
    rng = random.Random(seed)
    rows = []
    for text in random_texts(n, seed=seed, min_words=3, max_words=12):
        words = text.split() + rng.choices(GOOD + BAD, k=rng.randint(1, 3))
        rng.shuffle(words)
        good = sum(w in GOOD for w in words) - sum(w in BAD for w in words)
        rows.append((" ".join(words), "positive" if good > 0 else "negative"))
    return rows


def write_data(path: Path | str, n: int = 300, seed: int = 0, labelled: bool = True) -> Path:
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"] if labelled else ["text"])
        for text, label in sentiment_rows(n, seed):
            out.writerow([text, label] if labelled else [text])
    return path
