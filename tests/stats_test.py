"""Student t quantiles and intervals against published values and hand computation."""

import math

import pytest

from maskax.ablation import stats


# t_{0.975, df} from any t table (scipy.stats.t.ppf(0.975, df) gives the same digits).
@pytest.mark.parametrize(
  "df, expected",
  [
    (1, 12.706205),
    (2, 4.302653),
    (4, 2.776445),
    (9, 2.262157),
    (30, 2.042272),
    (1000, 1.962339),
  ],
)
def test_t_quantile_matches_the_table(df, expected):
  assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)


def test_t_quantile_is_symmetric_and_inverts_the_cdf():
  assert stats.t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=1e-6)
  assert stats.t_quantile(0.995, 3) == pytest.approx(5.840909, abs=1e-6)
  for df in (1, 3, 7.5):
    for p in (0.6, 0.9, 0.999):
      assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
  with pytest.raises(ValueError):
    stats.t_quantile(1.0, 3)


@pytest.mark.parametrize(
  "values, mean, std, half",
  [
    # mean, sample std (n - 1), and t_{0.975, n-1} * std / sqrt(n), worked by hand
    ([1.0, 2.0, 3.0], 2.0, 1.0, 4.302653 / math.sqrt(3)),
    ([1.0, 2.0, 3.0, 4.0, 5.0], 3.0, math.sqrt(2.5), 2.776445 * math.sqrt(2.5) / math.sqrt(5)),
    ([float(v) for v in range(1, 11)], 5.5, math.sqrt(55 / 6), 2.262157 * math.sqrt(55 / 60)),
  ],
)
def test_summarize_gives_the_student_t_interval(values, mean, std, half):
  s = stats.summarize(values)
  assert (s.mean, s.n) == (pytest.approx(mean), len(values))
  assert s.std == pytest.approx(std)
  assert (s.low, s.high) == (
    pytest.approx(mean - half, abs=1e-6),
    pytest.approx(mean + half, abs=1e-6),
  )


def test_one_value_has_no_spread_and_a_nan_poisons_the_cell():
  one = stats.summarize([0.5])
  assert one.mean == 0.5 and one.n == 1 and math.isnan(one.std) and math.isnan(one.low)
  assert not one.excludes_zero()
  assert math.isnan(stats.summarize([1.0, float("nan"), 2.0]).mean)
  assert stats.summarize([]).n == 0


def test_paired_difference_pairs_by_seed():
  baseline = {0: 1.0, 1: 2.0, 2: 3.0}
  cell = {2: 5.0, 0: 2.0, 1: 4.0, 7: 100.0}  # seed 7 has no partner: left out
  d = stats.paired_difference(cell, baseline)
  # differences by seed: 1, 2, 2 -> mean 5/3, std sqrt(1/3), half t_{0.975,2} * std / sqrt(3)
  std = math.sqrt(1 / 3)
  assert (d.n, d.mean, d.std) == (3, pytest.approx(5 / 3), pytest.approx(std))
  assert d.low == pytest.approx(5 / 3 - 4.302653 * std / math.sqrt(3), abs=1e-6)
  assert d.excludes_zero()  # low = 0.232: the cell is higher beyond seed noise

  # A constant shift is certain even though each cell alone is spread: pairing removes it.
  shifted = stats.paired_difference({s: v + 0.1 for s, v in baseline.items()}, baseline)
  assert shifted.mean == pytest.approx(0.1) and shifted.std == pytest.approx(0.0, abs=1e-12)
  assert stats.summarize(list(baseline.values())).low < 1.0
