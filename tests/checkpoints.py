"""Tiny random checkpoints of each encoder family (BERT, DistilBERT, RoBERTa, XLM-R) in
the standard directory layout, and an independent reference forward pass of each
family's sequence classifier to check them against.

The layout is a hub export's: `config.json`, `model.safetensors` (a bare encoder's names,
or a sequence classifier's prefixed names plus its head), `tokenizer.json` (a real
`tokenizers` WordPiece over the tiny vocabulary). `reference_probs` is written from each
family's equations on the raw tensors under their own names, sharing no code with
`app.network`.
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


FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "electra")
DISTILBERT_NAMES = (
    ("attention.self.query.", "attention.q_lin."),
    ("attention.self.key.", "attention.k_lin."),
    ("attention.self.value.", "attention.v_lin."),
    ("attention.output.dense.", "attention.out_lin."),
    ("attention.output.LayerNorm.", "sa_layer_norm."),
    ("intermediate.dense.", "ffn.lin1."),
    ("output.dense.", "ffn.lin2."),
    ("output.LayerNorm.", "output_layer_norm."),
)


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
    family: str = "bert",
    multi_label: bool = False,
) -> Path:
    """A checkpoint directory of `family` in its hub layout: a bare encoder, or with
    `labels` a sequence classifier (`multi_label`: problem_type multi_label_classification).
    `config` overrides fields."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    tok.save(str(d / "tokenizer.json"))
    V = tok.get_vocab_size()
    gen = torch.Generator().manual_seed(seed)
    offset = 1 if family in ("roberta", "xlm-roberta") else 0  # pad id 0: positions from 1

    def randn(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + randn(hidden), f"{prefix}.bias": randn(hidden)}

    def linear(prefix: str, n_in: int, n_out: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": randn(n_out, n_in, std=1 / math.sqrt(n_in)),
                f"{prefix}.bias": randn(n_out)}  # fmt: skip

    t: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": randn(V, hidden, std=1.0),
        "embeddings.position_embeddings.weight": randn(max_positions + offset, hidden, std=0.5),
        **norm("embeddings.LayerNorm"),
    }
    if family != "distilbert":
        t["embeddings.token_type_embeddings.weight"] = randn(1 if offset else 2, hidden, std=0.5)
        t["embeddings.position_ids"] = torch.arange(max_positions + offset)[None]
    for i in range(num_layers):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            t |= linear(f"{p}.attention.self.{name}", hidden, hidden)
        t |= linear(f"{p}.attention.output.dense", hidden, hidden)
        t |= norm(f"{p}.attention.output.LayerNorm")
        t |= linear(f"{p}.intermediate.dense", hidden, intermediate)
        t |= linear(f"{p}.output.dense", intermediate, hidden)
        t |= norm(f"{p}.output.LayerNorm")
    sizes = {
        "vocab_size": V,
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_positions + offset,
    }
    cfg: dict[str, Any] = {"model_type": family, "pad_token_id": 0}
    if family == "distilbert":
        t = {_distilbert(k): v for k, v in t.items()}
        cfg |= {"dim": hidden, "n_layers": num_layers, "n_heads": heads,
                "hidden_dim": intermediate, "vocab_size": V, "activation": "gelu",
                "max_position_embeddings": max_positions}  # fmt: skip
    else:
        cfg |= sizes | {"hidden_act": "gelu", "position_embedding_type": "absolute",
                        "type_vocab_size": 1 if offset else 2,
                        "layer_norm_eps": 1e-5 if offset else 1e-12}  # fmt: skip
    dense, out = HEADS[family]
    cls_name = {"bert": "Bert", "distilbert": "DistilBert", "roberta": "Roberta",
                "xlm-roberta": "XLMRoberta", "electra": "Electra"}[family]  # fmt: skip
    if family == "electra":
        cfg["embedding_size"] = hidden
    cfg["architectures"] = [f"{cls_name}Model"]
    if labels is not None:
        t = {f"{PREFIX[family]}{k}": v for k, v in t.items()}
        t |= linear(dense, hidden, hidden)
        cfg["architectures"] = [f"{cls_name}ForSequenceClassification"]
        cfg["id2label"] = {str(i): name for i, name in enumerate(labels)}
        cfg["label2id"] = {name: i for i, name in enumerate(labels)}
        if multi_label:
            cfg["problem_type"] = "multi_label_classification"
    elif family == "bert":
        t |= linear("pooler.dense", hidden, hidden)
    cfg |= config or {}
    if labels is not None:
        # A random encoder maps every text to nearly the same pooled state: centre the
        # classifier on a sample of texts so that answers and confidences vary.
        pooled = _head_hidden(cfg, t, tok, random_texts(64, seed=seed + 99))
        scale = 2.0 / math.sqrt(hidden) / pooled.std(0).clamp(min=1e-3)  # (H,)
        t[f"{out}.weight"] = randn(len(labels), hidden, std=1.0) * scale
        t[f"{out}.bias"] = -t[f"{out}.weight"] @ pooled.mean(0)
    save_file({k: v.contiguous() for k, v in t.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


PREFIX = {"bert": "bert.", "distilbert": "distilbert.", "roberta": "roberta.",
          "xlm-roberta": "roberta.", "electra": "electra."}  # fmt: skip
HEADS = {  # a sequence classifier's head: its dense layer and its output layer
    "bert": ("bert.pooler.dense", "classifier"),
    "distilbert": ("pre_classifier", "classifier"),
    "roberta": ("classifier.dense", "classifier.out_proj"),
    "xlm-roberta": ("classifier.dense", "classifier.out_proj"),
    "electra": ("classifier.dense", "classifier.out_proj"),
}


def _distilbert(name: str) -> str:
    name = name.replace("encoder.layer.", "transformer.layer.")
    for bert, distil in DISTILBERT_NAMES:
        name = name.replace(bert, distil)
    return name


def reference_probs(path: Path | str, texts: Sequence[str]) -> torch.Tensor:
    """The family's `...ForSequenceClassification` in eval mode, one text at a time:
    (N, C), a softmax, or a sigmoid per label for a multi-label model."""
    d = Path(path)
    cfg = json.loads((d / "config.json").read_text())
    w = load_file(str(d / "model.safetensors"))
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    out = HEADS[cfg["model_type"]][1]
    logits = _head_hidden(cfg, w, tok, texts) @ w[f"{out}.weight"].T + w[f"{out}.bias"]
    if cfg.get("problem_type") == "multi_label_classification":
        return torch.sigmoid(logits)
    return torch.softmax(logits, -1)


def _head_hidden(
    cfg: dict[str, Any], w: dict[str, torch.Tensor], tok: Tokenizer, texts: Sequence[str]
) -> torch.Tensor:
    """The classification head's hidden state per text (N, H): its activation of a
    linear map of the first token's final state, written from each family's equations
    on its own tensor names."""
    family = cfg["model_type"]
    distil = family == "distilbert"
    nh = cfg["n_heads" if distil else "num_attention_heads"]
    layers = cfg["n_layers" if distil else "num_hidden_layers"]
    eps = 1e-12 if distil else cfg["layer_norm_eps"]
    pre = PREFIX[family]
    offset = cfg["pad_token_id"] + 1 if family in ("roberta", "xlm-roberta") else 0

    def name(bert_name: str) -> str:
        return pre + (_distilbert(bert_name + ".")[:-1] if distil else bert_name)

    def lin(x: torch.Tensor, p: str) -> torch.Tensor:
        return x @ w[f"{p}.weight"].T + w[f"{p}.bias"]

    def ln(x: torch.Tensor, p: str) -> torch.Tensor:
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w[f"{p}.weight"] + w[f"{p}.bias"]

    out = []
    for text in texts:
        ids = torch.tensor(tok.encode(text).ids)
        n = len(ids)
        x = (w[name("embeddings.word_embeddings.weight")][ids]
             + w[name("embeddings.position_embeddings.weight")][offset : offset + n])  # fmt: skip
        if not distil:
            x = x + w[name("embeddings.token_type_embeddings.weight")][0]
        x = ln(x, name("embeddings.LayerNorm"))
        for i in range(layers):
            p = f"encoder.layer.{i}"
            q, k, v = (lin(x, name(f"{p}.attention.self.{m}")).view(n, nh, -1).transpose(0, 1)
                       for m in ("query", "key", "value"))  # fmt: skip
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1) @ v
            att = att.transpose(0, 1).reshape(n, -1)
            x = ln(x + lin(att, name(f"{p}.attention.output.dense")),
                   name(f"{p}.attention.output.LayerNorm"))  # fmt: skip
            h = lin(x, name(f"{p}.intermediate.dense"))
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
            x = ln(x + lin(h, name(f"{p}.output.dense")), name(f"{p}.output.LayerNorm"))
        hidden = lin(x[0], HEADS[family][0])
        if family == "electra":
            out.append(0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))))
        else:
            out.append(torch.relu(hidden) if distil else torch.tanh(hidden))
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
