"""Evaluate a model as served: same quantization, same thresholds, same batched executor.

Prints one JSON line; `--write` also stores the figures in model.json and writes
report.json and report.png beside the weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.engine.executor import Row, run_batch
from app.network import artifact, exit_rule
from app.network.backends import Backend, as_is, make_backend
from app.network.multi_exit import MultiExitNetwork
from app.network.quantize import resolve, scheme
from app.training.data import MULTI_LABEL_SEPARATOR, load_splits
from app.training.stats import adaptive_outcome, binomial_upper_bound


@dataclass
class ServedModel:
    loaded: artifact.LoadedModel
    backend: Backend
    device: str
    quantization: str


def load_served(
    model_dir: Path, device: str = "cpu", quantization: str = "auto", int8_kernel: str = "auto"
) -> ServedModel:
    loaded = artifact.load(model_dir)
    device, quantization = resolve(device, quantization, loaded.spec.serving)
    backend = make_backend(loaded.network, device, quantization, int8_kernel)
    return ServedModel(loaded, backend, device, quantization)


def all_exit_probs(
    backend: Backend | MultiExitNetwork, token_ids: list[list[int]], batch_size: int = 32
) -> np.ndarray:
    """Every exit's probabilities (softmax, or a sigmoid per label) for every row, full
    depth: (L, N, C), computed as the backend serves (a bare network: `backends.as_is`)."""
    if isinstance(backend, MultiExitNetwork):
        backend = as_is(backend)
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))  # less padding
    out = np.zeros((backend.num_layers, len(token_ids), len(backend.labels)), np.float32)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            logits = backend.all_exits([token_ids[i] for i in idx]).float()  # (L, B, C)
            out[:, idx] = backend.probabilities(logits).cpu().numpy()
    return out


def batch_invariance(
    net: Backend, ids: list[list[int]], thresholds: list[float], batch_size: int = 32
) -> dict[str, float | int]:
    """Every input answered alone and inside a random batch of `batch_size`: how many labels
    and exit layers differ, and the largest score difference (all 0 when invariant)."""
    L = net.num_layers
    alone = [run_batch(net, [Row(r, thresholds, L)]).predictions[0] for r in ids]
    order = np.random.default_rng(0).permutation(len(ids)).tolist()
    labels = exits = 0
    score = 0.0
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        res = run_batch(net, [Row(ids[i], thresholds, L) for i in idx])
        for i, p in zip(idx, res.predictions, strict=True):
            labels += p.label_index != alone[i].label_index
            exits += p.exit_layer != alone[i].exit_layer
            score = max(score, abs(p.score - alone[i].score))
    return {
        "batch_size": batch_size,
        "label_changes": labels,
        "exit_changes": exits,
        "max_score_difference": score,
    }


def split_data(spec: artifact.ModelSpec, split: str) -> tuple[list[str], np.ndarray]:
    data = spec.training.get("data", {})
    source, seed = data.get("source"), spec.training.get("config", {}).get("seed", 0)
    if not source:
        raise ValueError("model.json records no training data source; cannot rebuild splits")
    labels = tuple(spec.labels)
    multi = spec.config.multi_label
    examples = load_splits(source, seed=seed, labels=labels, require_labels=multi).get(split)
    label_index = {name: i for i, name in enumerate(labels)}
    if multi:  # the on-labels as bits, as `exit_rule.answers` gives them
        return [e.text for e in examples], np.array(
            [
                sum(1 << label_index[n] for n in e.label.split(MULTI_LABEL_SEPARATOR) if n)
                for e in examples
            ]
        )
    return [e.text for e in examples], np.array([label_index.get(e.label, -1) for e in examples])


def judged(y: np.ndarray, final: np.ndarray) -> np.ndarray:
    """Labels to score against: an unlabelled row (-1) is judged against the last exit's
    answer, so its accuracy is agreement with the full model."""
    return np.where(y < 0, final, y)


def evaluate(
    model_dir: Path,
    split: str = "test",
    device: str = "cpu",
    quantization: str = "auto",
    batch_size: int = 32,
) -> dict[str, Any]:
    served = load_served(model_dir, device, quantization)
    spec, tok, net = served.loaded.spec, served.loaded.tokenizer, served.backend
    texts, y = split_data(spec, split)
    ids = tok.encode(texts)
    L, N = net.num_layers, len(texts)

    probs = all_exit_probs(net, ids, batch_size)  # (L, N, C)
    multi = net.multi_label
    pred = exit_rule.answers(probs, multi)  # (L, N)
    unlabelled = int((y < 0).sum())
    y = judged(y, pred[-1])
    correct = pred == y[None]  # (L, N)

    # The adaptive answers come from the serving executor, batched, with compaction.
    thresholds = list(spec.thresholds)
    order = sorted(range(N), key=lambda i: len(ids[i]))
    adaptive_pred = np.zeros(N, int)
    adaptive_exit = np.zeros(N, int)
    started = time.perf_counter()
    for s in range(0, N, batch_size):
        idx = order[s : s + batch_size]
        res = run_batch(net, [Row(ids[i], thresholds, L) for i in idx])
        for i, p in zip(idx, res.predictions, strict=True):
            adaptive_pred[i] = exit_rule.answers(np.array(p.probs), multi)
            adaptive_exit[i] = p.exit_layer
    adaptive_seconds = time.perf_counter() - started

    final_pred = pred[-1]
    breaks = int(((adaptive_pred != y) & (final_pred == y)).sum())
    report: dict[str, Any] = {
        "model": spec.name,
        "split": split,
        "n": N,
        "unlabelled": unlabelled,  # judged against the last exit's answer
        "num_layers": L,
        "quantization": served.quantization,
        "scheme": scheme(served.quantization, bool(served.loaded.network.int8_smoothing)),
        "device": served.device,
        "per_exit_accuracy": [round(float(a), 4) for a in correct.mean(1)],
        "final_accuracy": round(float(correct[-1].mean()), 4),
        "adaptive_accuracy": round(float((adaptive_pred == y).mean()), 4),
        "mean_layers": round(float(adaptive_exit.mean()), 3),
        "agreement_with_final": round(float((adaptive_pred == final_pred).mean()), 4),
        "exit_histogram": [int((adaptive_exit == k).sum()) for k in range(1, L + 1)],
        "thresholds": thresholds,
        # Distribution-free: the test split took no part in choosing the thresholds, so
        # this one-sided 95% Clopper-Pearson bound on "adaptive wrong where the last exit
        # was right" bounds the accuracy lost to early exit on new data like it.
        "accuracy_drops": breaks,
        "accuracy_drop_upper_95": round(binomial_upper_bound(breaks, N, 0.05), 4),
        "adaptive_seconds": round(adaptive_seconds, 2),
        # Per row, what the figures above are computed from (report.json only): the label
        # judged against, the last exit's answer, the served answer and its exit layer.
        "rows": {
            "label": y.tolist(),
            "final": final_pred.tolist(),
            "adaptive": adaptive_pred.tolist(),
            "exit_layer": adaptive_exit.tolist(),
        },
    }
    report["batch_invariance"] = batch_invariance(net, ids, thresholds, batch_size)
    # Consistency: the executor's answers must match the full-depth exits they chose.
    chosen = pred[adaptive_exit - 1, np.arange(N)]
    report["executor_consistency"] = round(float((chosen == adaptive_pred).mean()), 4)

    if served.quantization != "none":
        ref = make_backend(artifact.load(model_dir).network, "cpu", "none")  # fp32
        fp32 = all_exit_probs(ref, ids, batch_size)
        fp32_pred = exit_rule.answers(fp32[-1], multi)
        report["fp32_final_accuracy"] = round(float((fp32_pred == y).mean()), 4)
        report["fp32_agreement"] = round(float((fp32_pred == final_pred).mean()), 4)
    else:
        report["fp32_final_accuracy"] = report["final_accuracy"]
        report["fp32_agreement"] = 1.0

    # Accuracy against mean depth for one global threshold, for the report's curve.
    conf = exit_rule.confidences(probs, spec.confidence)  # (L, N)
    curve = []
    for t in np.linspace(0.5, 1.0, 26):
        th = np.full(L, t)
        th[-1] = 0.0
        acc, depth = adaptive_outcome(conf, correct, th)
        curve.append(
            {
                "threshold": round(float(t), 3),
                "accuracy": round(acc, 4),
                "mean_layers": round(depth, 3),
            }
        )
    report["global_threshold_curve"] = curve
    report["operating_ladder"] = ladder_on_split(spec.calibration, conf, correct)
    return report


def ladder_on_split(
    calibration: dict[str, Any], conf: np.ndarray, correct: np.ndarray
) -> list[dict[str, Any]]:
    """Each operating point of the calibrated ladder measured on this split, beside its
    calibration-split figures (empty for a model calibrated without a ladder)."""
    stored = calibration.get("ladder", {}).get("points", [])
    out = []
    for k, p in enumerate(stored):
        acc, depth = adaptive_outcome(conf, correct, np.array(p["thresholds"]))
        out.append(
            {
                "point": k,
                "accuracy": round(acc, 4),
                "mean_layers": round(depth, 3),
                "calibration_accuracy": p["accuracy"],
                "calibration_mean_layers": p["mean_layers"],
                "relative_cost": p["relative_cost"],
            }
        )
    return out
