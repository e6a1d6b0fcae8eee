"""Paired comparisons of base and quantized outputs: where two token paths split, and how sure a delta is."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def first_divergence(a: Sequence, b: Sequence) -> int | None:
    """Index of the first position where `a` and `b` differ; None if they are identical.

    Used on greedy token ids of base vs quantized: how far the quantized model follows the base
    before its path splits. When one is a strict prefix of the other, they diverge at the
    shorter length (one stopped, the other went on).
    """
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    if len(a) != len(b):
        return min(len(a), len(b))
    return None


# --------------------------------------------------------------------------------- statistics


def paired_bootstrap_ci(
    base: Sequence[float], quant: Sequence[float], n_resamples: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(delta, low, high): mean(quant) - mean(base) and its percentile bootstrap interval.

    Items are resampled *jointly* (the same indices for both models) because base and quantized
    answer the same prompts: per-item difficulty cancels in the paired difference, giving a much
    tighter interval than two independent bootstraps. Vectorised with numpy; the seed makes the
    interval reproducible. Raises ValueError for different lengths, no items, non-finite values
    or arguments out of range.
    """
    b = np.asarray(base, dtype=float)
    q = np.asarray(quant, dtype=float)
    if b.ndim != 1 or q.ndim != 1:
        raise ValueError("base and quant must be flat sequences of numbers")
    if len(b) != len(q):
        raise ValueError(f"paired samples must have the same length: {len(b)} base vs {len(q)} quant")
    if len(b) == 0:
        raise ValueError("paired_bootstrap_ci needs at least one item")
    if not (np.isfinite(b).all() and np.isfinite(q).all()):
        raise ValueError("paired_bootstrap_ci needs finite values (drop NaN items first)")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    diff = q - b
    delta = float(diff.mean())
    rng = np.random.default_rng(seed)
    n = len(diff)
    chunk = max(1, min(n_resamples, 4_000_000 // n))  # bound memory to a few million indices
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        means[start : start + size] = diff[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return delta, float(low), float(high)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sound at small n and at 0 or 1, unlike the normal one.

    Used to ask whether a base model's multiple-choice accuracy is distinguishable from chance."""
    if n <= 0:
        raise ValueError("wilson_interval needs at least one item")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
