"""Means, 95% confidence intervals over seeds, and paired differences (Student's t, exact
quantiles from scipy)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scipy import stats

LEVEL = 0.95
TIE = 1e-12  # differences this close to 0 are 0 (float rounding)


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(stats.t.ppf(0.5 + level / 2, df))


def finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean_ci(values: Sequence[float | None]) -> tuple[float, float]:
    """(mean, half-width of the 95% interval); the half-width is nan for one value."""
    values = finite(values)
    if not values:
        return math.nan, math.nan
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(n - 1) * sd / math.sqrt(n)


@dataclass(frozen=True)
class Paired:
    """The paired difference ``other - reference`` over the seeds both have."""

    mean: float
    half: float  # half-width of the 95% interval (nan below two pairs)
    pairs: int
    diffs: tuple[float, ...] = ()  # the per-seed differences, in seed order

    @property
    def constant(self) -> bool:
        """True when every seed's difference is the same (up to float rounding: a mean of
        equal values need not give a half-width of exactly 0)."""
        return bool(self.diffs) and all(same_difference(d, self.diffs[0]) for d in self.diffs)

    @property
    def equal(self) -> bool:
        """True when every seed's difference is 0: the two tie on every paired seed."""
        return self.constant and same_difference(self.diffs[0], 0.0)

    @property
    def decided(self) -> bool:
        """True when the 95% interval excludes 0: at least two pairs, not equal on every
        seed, and either the same non-zero difference on every seed (half-width 0) or a
        mean farther from 0 than the half-width."""
        if self.pairs < 2 or self.equal:
            return False
        return self.constant or (not math.isnan(self.half) and abs(self.mean) > self.half)

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half


def same_difference(a: float, b: float) -> bool:
    """Whether two differences are one value but for float rounding (relative 1e-9, or
    1e-12 near 0)."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=TIE)


def paired_difference(other: dict[int, float], reference: dict[int, float]) -> Paired:
    """``other`` minus ``reference``, seed by seed (seed -> value), on the common seeds
    where both values are finite (a NaN or infinite metric pairs with nothing)."""
    seeds = sorted(s for s in set(other) & set(reference)
                   if is_finite(other[s]) and is_finite(reference[s]))
    diffs = tuple(other[s] - reference[s] for s in seeds)
    mean, half = mean_ci(list(diffs))
    return Paired(mean, half, len(seeds), diffs)


def is_finite(value: float | None) -> bool:
    """A number that is neither None, NaN nor infinite."""
    return value is not None and math.isfinite(value)


def fmt(mean: float, half: float, digits: int = 4) -> str:
    """'0.912 ± 0.013' (or '0.912' for one seed) with ``digits`` significant digits."""
    if math.isnan(mean):
        return "–"
    text = f"{mean:.{digits}g}"
    return text if math.isnan(half) else f"{text} ± {half:.2g}"


def fmt_paired(p: Paired, digits: int = 3) -> str:
    """'+0.12 [0.05, 0.19]' (the 95% interval), or '–' without two pairs."""
    if p.pairs < 2 or math.isnan(p.half):
        return "–" if math.isnan(p.mean) else f"{p.mean:+.{digits}g}"
    return f"{p.mean:+.{digits}g} [{p.low:.{digits}g}, {p.high:.{digits}g}]"
