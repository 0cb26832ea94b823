"""Small statistics shared by calibration and evaluation (numpy only)."""

from __future__ import annotations

import numpy as np

from app.network.exit_rule import exit_layers
from app.stats import binomial_upper_bound

__all__ = ["adaptive_outcome", "binomial_upper_bound", "exit_layers"]


def adaptive_outcome(
    conf: np.ndarray, correct: np.ndarray, thresholds: np.ndarray
) -> tuple[float, float]:
    """(accuracy, mean depth in layers) when every row leaves at its first confident exit."""
    e = exit_layers(conf, thresholds)
    acc = float(correct[e, np.arange(conf.shape[1])].mean())
    return acc, float(e.mean() + 1)
