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
