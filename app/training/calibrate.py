"""Choose per-exit confidence thresholds on the calibration split.

Method: the model as served (same quantization) scores every calibration input at
every exit. Starting from "never exit early", a greedy search repeatedly lowers the one
exit threshold that saves the most depth per point of accuracy lost, and stops when no
move keeps the calibration accuracy within `max_drop` of the last exit's accuracy.

What it guarantees: on the calibration split itself, adaptive accuracy >= final-exit
accuracy - max_drop, at the smallest mean depth the greedy path finds. On new data it is
an estimate (standard error about 1 point on ~1,300 inputs). A distribution-free bound
at this sample size would be loose (a Learn-then-Test certificate for a 1-point drop
needs the break rate below ~0.5%, which forces nearly full depth), so instead
`evaluate` reports a one-sided 95% Clopper-Pearson upper bound on the accuracy lost,
measured on the held-out test split, which took no part in this choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from app.network import artifact
from app.training.evaluate import all_exit_probs, load_served, split_data
from app.training.stats import adaptive_outcome


def greedy_thresholds(
    conf: np.ndarray, correct: np.ndarray, max_drop: float, grid: int = 100
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Per-exit thresholds (L,) and the path taken. conf, correct: (L, N)."""
    L = conf.shape[0]
    target = float(correct[-1].mean()) - max_drop
    th = np.ones(L)
    th[-1] = 0.0
    # Candidate thresholds per exit: quantiles of that exit's confidence.
    cands = [np.unique(np.quantile(conf[i], np.linspace(0, 1, grid + 1))) for i in range(L - 1)]
    acc, depth = adaptive_outcome(conf, correct, th)
    path = [{"accuracy": acc, "mean_layers": depth}]
    while True:
        best: tuple[float, int, float, float, float] | None = None
        for i in range(L - 1):
            for c in cands[i][cands[i] < th[i]]:
                trial = th.copy()
                trial[i] = c
                a, d = adaptive_outcome(conf, correct, trial)
                if a < target or d >= depth:
                    continue
                score = (depth - d) / max(acc - a, 0.0) if acc > a else float("inf")
                key = (score, depth - d)
                if best is None or key > (best[0], best[4]):
                    best = (score, i, float(c), a, depth - d)
        if best is None:
            break
        _, i, c, acc, _ = best
        th[i] = c
        acc, depth = adaptive_outcome(conf, correct, th)
        path.append({"accuracy": acc, "mean_layers": depth})
    return th, path


def calibrate(
    model_dir: Path, max_drop: float = 0.01, device: str = "cpu", quantization: str = "auto"
) -> dict[str, Any]:
    """Choose thresholds, write them into model.json, and return the calibration record."""
    if not 0.0 <= max_drop < 1.0:
        raise ValueError(f"max_drop must be in [0, 1), got {max_drop}")
    served = load_served(model_dir, device, quantization)
    spec = served.loaded.spec
    texts, y = split_data(spec, "calibration")
    probs = all_exit_probs(served.network, served.loaded.tokenizer.encode(texts))  # (L, N, C)
    conf, correct = probs.max(-1), probs.argmax(-1) == y[None]
    th, path = greedy_thresholds(conf, correct, max_drop)
    acc, depth = adaptive_outcome(conf, correct, th)
    L = conf.shape[0]
    # The single global threshold meeting the same bound, for comparison.
    glob = None
    for t in np.linspace(0.5, 1.0, 101):
        g = np.full(L, t)
        g[-1] = 0.0
        a, d = adaptive_outcome(conf, correct, g)
        if a >= correct[-1].mean() - max_drop:
            glob = {
                "threshold": round(float(t), 3),
                "accuracy": round(a, 4),
                "mean_layers": round(d, 3),
            }
            break
    record = {
        "method": "greedy per-exit max-softmax thresholds on the calibration split",
        "split": "calibration",
        "n": int(conf.shape[1]),
        "quantization": served.quantization,
        "max_drop": max_drop,
        "final_accuracy": round(float(correct[-1].mean()), 4),
        "adaptive_accuracy": round(acc, 4),
        "mean_layers": round(depth, 3),
        "per_exit_accuracy": [round(float(a), 4) for a in correct.mean(1)],
        "global_threshold_alternative": glob,
        "path": [{k: round(v, 4) for k, v in p.items()} for p in path],
        "guarantee": (
            "calibration-split accuracy within max_drop of the last exit; on new data an"
            " estimate, with a held-out 95% upper bound reported by `exitserve evaluate`"
        ),
    }
    spec.thresholds = [round(float(t), 6) for t in th]
    spec.thresholds[-1] = 0.0
    spec.calibration = record
    artifact.write_spec(model_dir, spec)
    return record
