"""Proof for "serve your own classifier": a classifier fine-tuned the standard way, then
given exits by `exitserve add-exits`.

  finetune  full fine-tune of MiniLM-L6 as a `BertForSequenceClassification` (pooler on
            the [CLS] state, then a linear classifier) on the rotten-tomatoes training
            split, saved in the standard layout (config.json, model.safetensors,
            tokenizer.json): what a team brings. No exitserve head or exit is involved.
  compare   the original classifier's answers on the whole test split (computed here by
            the plain encoder and its pooler/classifier, in fp32, one text at a time)
            against the served multi-exit model at full depth and calibrated; writes
            bench/results/byo-classifier-<date>-<host>.json.

  python bench/byo_classifier.py finetune --out build/byo/rt-classifier-minilm
  exitserve add-exits build/byo/rt-classifier-minilm --data rotten-tomatoes \\
      --out build/byo/rt-classifier-exits
  python bench/byo_classifier.py compare build/byo/rt-classifier-minilm \\
      build/byo/rt-classifier-exits --out bench/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from app.engine.executor import Row, run_batch
from app.network import artifact, checkpoint
from app.network.encoder import Encoder
from app.network.heads import ExitHead
from app.network.multi_exit import pad_batch
from app.network.tokenizer import TextTokenizer
from app.training.data import load_splits
from app.training.evaluate import load_served
from app.training.train import length_batches

DATA = "rotten-tomatoes"


class Classifier(torch.nn.Module):
    """BertForSequenceClassification: the encoder, its pooler on [CLS], a linear layer."""

    def __init__(self, ckpt: checkpoint.Checkpoint, labels: tuple[str, ...]) -> None:
        super().__init__()
        self.encoder = Encoder(ckpt.config)
        enc = {k.removeprefix("encoder."): v for k, v in ckpt.encoder_state().items()}
        self.encoder.load_state_dict(enc)
        self.head = ExitHead(ckpt.config.hidden_size, len(labels), 0.1, pooling="cls")

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(ids, mask)[-1], mask)  # (B, C)


def finetune(out: Path, epochs: int, seed: int, limit: int | None) -> dict[str, Any]:
    torch.manual_seed(seed)
    base = checkpoint.open_checkpoint(artifact.minilm_base().directory())
    splits = load_splits(DATA, seed=seed)
    model = Classifier(base, splits.labels)
    with torch.no_grad():  # the pretrained pooler; a fresh classifier, as transformers does
        pooler = base.pooler_state()
        model.head.dense.weight.copy_(pooler["pooler.dense.weight"])
        model.head.dense.bias.copy_(pooler["pooler.dense.bias"])
        model.head.classifier.weight.normal_(0.0, 0.02)
        model.head.classifier.bias.zero_()
    tok = TextTokenizer(base.path(checkpoint.TOKENIZER_FILE), 128)
    train = splits.train[:limit] if limit else splits.train
    ids = tok.encode([e.text for e in train])
    index = {name: i for i, name in enumerate(splits.labels)}
    y = torch.tensor([index[e.label] for e in train])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    rng = random.Random(seed)
    total = math.ceil(len(ids) / 32) * epochs
    warm = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    model.train()
    started = time.perf_counter()
    for epoch in range(epochs):
        for step, batch in enumerate(length_batches([len(r) for r in ids], 32, rng)):
            x, mask = pad_batch([ids[i] for i in batch])
            loss = F.cross_entropy(model(x, mask), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 50 == 0:
                print(f"epoch {epoch + 1} step {step} loss {loss.item():.3f}", flush=True)
    model.eval()
    state = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    head = model.head
    checkpoint.save_classifier(
        out,
        base.config,
        state,
        {
            "pooler.dense.weight": head.dense.weight,
            "pooler.dense.bias": head.dense.bias,
            "classifier.weight": head.classifier.weight,
            "classifier.bias": head.classifier.bias,
        },
        splits.labels,
        base.path(checkpoint.TOKENIZER_FILE),
    )
    record = {"out": str(out), "epochs": epochs, "seconds": round(time.perf_counter() - started)}
    print(json.dumps(record))
    return record


def original_answers(ckpt_dir: Path, texts: list[str]) -> np.ndarray:
    """The classifier's own probabilities, fp32, one text at a time: (N, C)."""
    ckpt = checkpoint.open_checkpoint(ckpt_dir)
    assert ckpt.labels is not None
    model = Classifier(ckpt, ckpt.labels)
    cls = ckpt.classifier_state()
    model.head.load_state_dict({k.removeprefix("pooler."): v for k, v in cls.items()})
    model.eval()
    tok = TextTokenizer(ckpt.path(checkpoint.TOKENIZER_FILE), 128)
    out = []
    with torch.inference_mode():
        for row in tok.encode(texts):
            x, mask = pad_batch([row])
            out.append(torch.softmax(model(x, mask), -1)[0].numpy())
    return np.stack(out)


def served_answers(model_dir: Path, texts: list[str], quantization: str, full: bool) -> dict:
    served = load_served(model_dir, "cpu", quantization)
    spec, net = served.loaded.spec, served.backend
    L = net.num_layers
    th = [1.0] * (L - 1) + [0.0] if full else list(spec.thresholds)
    ids = served.loaded.tokenizer.encode(texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    label = np.zeros(len(ids), int)
    depth = np.zeros(len(ids), int)
    for s in range(0, len(ids), 32):
        idx = order[s : s + 32]
        res = run_batch(net, [Row(ids[i], th, L) for i in idx])
        for i, p in zip(idx, res.predictions, strict=True):
            label[i], depth[i] = p.label_index, p.exit_layer
    return {"quantization": served.quantization, "label": label, "depth": depth}


def compare(ckpt_dir: Path, model_dir: Path, out: Path) -> dict[str, Any]:
    splits = load_splits(DATA)
    texts = [e.text for e in splits.test]
    index = {name: i for i, name in enumerate(splits.labels)}
    y = np.array([index[e.label] for e in splits.test])
    original = original_answers(ckpt_dir, texts).argmax(-1)
    rows = {}
    for quantization in ("none", "int8"):
        for full in (True, False):
            a = served_answers(model_dir, texts, quantization, full)
            rows[f"{quantization} {'full depth' if full else 'calibrated'}"] = {
                "quantization": a["quantization"],
                "accuracy": round(float((a["label"] == y).mean()), 4),
                "answers_differing_from_original": int((a["label"] != original).sum()),
                "agreement_with_original": round(float((a["label"] == original).mean()), 4),
                "mean_layers": round(float(a["depth"].mean()), 3),
            }
    spec = artifact.read_spec(model_dir)
    result = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "split": "test",
        "n": len(texts),
        "original_accuracy": round(float((original == y).mean()), 4),
        "served": rows,
        "model_quantization_default": spec.serving.get("cpu"),
        "calibration": {k: spec.calibration.get(k) for k in ("max_drop", "mean_layers")},
        "command": f"python bench/byo_classifier.py compare {ckpt_dir} {model_dir} --out {out}",
    }
    out.mkdir(parents=True, exist_ok=True)
    name = f"byo-classifier-{result['date']}-{result['host']}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("finetune")
    f.add_argument("--out", type=Path, default=Path("build/byo/rt-classifier-minilm"))
    f.add_argument("--epochs", type=int, default=2)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--limit", type=int)
    c = sub.add_parser("compare")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("model_dir", type=Path)
    c.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args()
    if a.cmd == "finetune":
        finetune(a.out, a.epochs, a.seed, a.limit)
    else:
        compare(a.checkpoint, a.model_dir, a.out)


if __name__ == "__main__":
    main()
