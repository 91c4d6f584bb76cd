"""95% confidence intervals for the three kinds of score evaluation reports (torch-free).

- accuracies (a fraction of 0/1 outcomes): the Wilson score interval, which stays inside [0, 1] and is honest
  for small slices and for accuracies near 0 or 1, where the normal approximation is not;
- means of per-row scores (Rouge-L): mean +- 1.96 standard errors (the harness's `mean_stderr`);
- per-token means pooled over rows of different lengths (losses, perplexity): a ratio estimator whose standard
  error treats rows, not tokens, as the independent units (tokens of one row are correlated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson_ci(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        raise ValueError("an interval needs at least one row")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_ci(values: Sequence[float], z: float = Z95) -> tuple[float, tuple[float, float] | None]:
    """(mean, interval); the interval is None for fewer than two values (no spread to estimate)."""
    n = len(values)
    if n == 0:
        raise ValueError("a mean needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(variance / n)
    return mean, (mean - half, mean + half)


def ratio_ci(numerators: Sequence[float], denominators: Sequence[float], z: float = Z95,
             ) -> tuple[float, tuple[float, float] | None]:
    """(sum(num) / sum(den), interval) by the delta method with rows as clusters; None for fewer than two rows."""
    n = len(numerators)
    total = sum(denominators)
    if n == 0 or total <= 0:
        raise ValueError("a ratio needs rows with a positive total denominator")
    ratio = sum(numerators) / total
    if n < 2:
        return ratio, None
    residual_sq = sum((a - ratio * b) ** 2 for a, b in zip(numerators, denominators, strict=True))
    half = z * math.sqrt(n / (n - 1) * residual_sq) / total
    return ratio, (ratio - half, ratio + half)


BOOTSTRAP_SAMPLES = 2000


def paired_difference(a: Sequence[tuple[float, int]], b: Sequence[tuple[float, int]],
                      samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Per-token loss of model a minus model b on the same rows, each given as (loss sum, scored tokens) per row, with
    a 95% percentile bootstrap interval that resamples rows, the same rows for both models (a paired comparison:
    the rows' own difficulty cancels). A difference counts only when its interval excludes 0."""
    import numpy as np

    if len(a) != len(b) or len(a) < 2:
        raise ValueError("a paired difference needs the same rows, at least two, for both models")
    sums = np.array([[row[0] for row in a], [row[0] for row in b]])
    counts = np.array([[row[1] for row in a], [row[1] for row in b]], dtype=float)
    if (counts[0] != counts[1]).any():
        raise ValueError("the two models were scored on different tokens: not the same rows")
    difference = sums[0].sum() / counts[0].sum() - sums[1].sum() / counts[1].sum()
    picks = np.random.default_rng(seed).integers(0, len(a), size=(samples, len(a)))
    tokens = counts[0][picks].sum(axis=1)
    resampled = (sums[0][picks].sum(axis=1) - sums[1][picks].sum(axis=1)) / tokens
    low, high = np.percentile(resampled, [2.5, 97.5])
    return float(difference), (float(low), float(high))
