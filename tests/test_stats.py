"""gptlab.evals.stats: the intervals and paired figures every comparison reports, checked by hand."""
import math

import pytest

from gptlab.errors import GptlabError
from gptlab.evals.stats import paired_difference, wilson_interval, win_rate


def test_wilson_known_cases():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_win_rate_counts_ties_half():
    rate, lo, hi = win_rate([3.0, 2.0, 1.5, -1.0], [1.0, 2.0, -1.0, 0.0])
    assert rate == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert (lo, hi) == pytest.approx(wilson_interval(2.5, 4))
    with pytest.raises(GptlabError):
        win_rate([1.0], [1.0, 2.0])
    with pytest.raises(GptlabError):
        win_rate([], [])


def test_paired_difference_hand_computed():
    # differences 1, 0, 0, -1, 1: mean 0.2, sample sd sqrt(0.7), half-width 1.96 sd / sqrt(5)
    mean, lo, hi = paired_difference([1, 1, 0, 0, 1], [0, 1, 0, 1, 0])
    half = 1.959963984540054 * math.sqrt(0.7) / math.sqrt(5)
    assert mean == pytest.approx(0.2) and (lo, hi) == pytest.approx((0.2 - half, 0.2 + half))
    assert paired_difference([3.0], [1.0]) == (2.0, 2.0, 2.0)       # one item: no spread to estimate
    with pytest.raises(GptlabError):
        paired_difference([1.0], [1.0, 2.0])


def test_wilson_interval_contains_the_rate_at_the_ends():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    for n in range(1, 300):   # float rounding once put the bound inside 0% / 100% (and broke the plot)
        lo, hi = wilson_interval(n, n)
        assert lo <= 1.0 <= hi
        lo, hi = wilson_interval(0, n)
        assert lo <= 0.0 <= hi
