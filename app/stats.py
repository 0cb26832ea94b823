"""Statistics the engine and training share (no numpy, no torch)."""

from __future__ import annotations

import math

__all__ = ["binomial_lower_bound", "binomial_upper_bound"]


def binomial_upper_bound(k: int, n: int, alpha: float = 0.05) -> float:
    """One-sided Clopper-Pearson upper bound on a rate, from k events in n trials."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if k >= n:
        return 1.0

    def cdf(p: float) -> float:  # P(X <= k) for X ~ Binomial(n, p)
        logs = [
            math.lgamma(n + 1)
            - math.lgamma(i + 1)
            - math.lgamma(n - i + 1)
            + (i * math.log(p) if i else 0.0)
            + ((n - i) * math.log1p(-p))
            for i in range(k + 1)
        ]
        m = max(logs)
        return math.exp(m) * sum(math.exp(v - m) for v in logs)

    lo, hi = k / n, 1.0 - 1e-12
    for _ in range(60):
        mid = (lo + hi) / 2
        if cdf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def binomial_lower_bound(k: int, n: int, alpha: float = 0.05) -> float:
    """One-sided Clopper-Pearson lower bound on a rate, from k events in n trials."""
    return 0.0 if k <= 0 else 1.0 - binomial_upper_bound(n - k, n, alpha)
