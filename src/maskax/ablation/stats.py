"""Means and Student t intervals over seeds: what a sweep's table says about its cells.

With a handful of seeds the normal 1.96 would understate the uncertainty badly (the 97.5%
quantile of Student t is 4.30 at 2 degrees of freedom, 2.78 at 4), so every interval here uses
the t quantile for n - 1 degrees of freedom. It is computed from the regularized incomplete beta
function with `math` alone (scipy is not a dependency); `t_quantile` matches scipy.stats.t.ppf
to about 1e-10.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence


def _beta_fraction(x: float, a: float, b: float) -> float:
  """The continued fraction of I_x(a, b), by the modified Lentz method (Numerical Recipes 6.4);
  it converges fast for x < (a + 1) / (a + b + 2)."""
  tiny, eps = 1e-300, 1e-16
  c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 1000):
    for numerator in (
      m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
      -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
    ):
      d = 1.0 + numerator * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + numerator / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < eps:
      break
  return h


def incomplete_beta(x: float, a: float, b: float) -> float:
  """The regularized incomplete beta function I_x(a, b) for 0 <= x <= 1."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  log_front = (
    math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
  )
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(log_front) * _beta_fraction(x, a, b) / a
  return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def t_cdf(t: float, df: float) -> float:
  """P(T <= t) for Student's t with `df` degrees of freedom."""
  tail = 0.5 * incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
  return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
  """The t with P(T <= t) = p, by bisection on `t_cdf` (monotone, so bisection cannot fail)."""
  if not 0.0 < p < 1.0 or not df > 0:
    raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
  if p < 0.5:
    return -t_quantile(1.0 - p, df)
  low, high = 0.0, 1.0
  while t_cdf(high, df) < p:
    low, high = high, 2.0 * high
  for _ in range(200):
    mid = 0.5 * (low + high)
    if mid in (low, high):
      break
    low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
  return 0.5 * (low + high)


@dataclasses.dataclass(frozen=True)
class Summary:
  """A sample's mean, standard deviation (n - 1 in the denominator), size and the confidence
  interval of its mean; the spread and interval are NaN below two values."""

  mean: float
  std: float
  n: int
  low: float
  high: float

  def excludes_zero(self) -> bool:
    """Whether the interval lies wholly above or below 0 (False when it is NaN)."""
    return self.low > 0 or self.high < 0


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
  """Mean, standard deviation, n and the Student t interval `mean +- t * std / sqrt(n)`.

  A NaN value (a run that diverged) makes every number NaN rather than being dropped: a cell
  with a failed seed must not look more certain than one without.
  """
  values = [float(v) for v in values]
  n = len(values)
  if n == 0:
    return Summary(math.nan, math.nan, 0, math.nan, math.nan)
  mean = math.fsum(values) / n
  if n < 2:
    return Summary(mean, math.nan, n, math.nan, math.nan)
  std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
  half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
  return Summary(mean, std, n, mean - half, mean + half)


def paired_difference(
  values: Mapping[int, float], baseline: Mapping[int, float], confidence: float = 0.95
) -> Summary:
  """`values - baseline` paired by seed (the keys), over the seeds both have.

  Pairing removes what two cells share at one seed (the same init and data order), so the
  interval of a difference is usually much tighter than the two cells' own intervals suggest.
  """
  seeds = sorted(set(values) & set(baseline))
  return summarize([values[s] - baseline[s] for s in seeds], confidence)
