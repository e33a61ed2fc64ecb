"""Mean and 95% confidence interval over seeds (Student's t)."""

from __future__ import annotations

import math

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
       2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
       2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    return T95[df - 1] if df <= len(T95) else 1.960


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% interval); the half-width is nan for one value."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t95(n - 1) * sd / math.sqrt(n)


def fmt(mean: float, half: float, digits: int = 4) -> str:
    """'0.912 ± 0.013' (or '0.912' for one seed) with ``digits`` significant digits."""
    if math.isnan(mean):
        return "–"
    text = f"{mean:.{digits}g}"
    return text if math.isnan(half) else f"{text} ± {half:.2g}"
