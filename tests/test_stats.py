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
    # Sign-test interval: 2 wins of 3 decisive items, scaled by the decisive share (3/4) around 1/2.
    q_lo, q_hi = wilson_interval(2, 3)
    assert (lo, hi) == pytest.approx((0.5 + 0.75 * (q_lo - 0.5), 0.5 + 0.75 * (q_hi - 0.5)))
    assert win_rate([1.0, 2.0], [1.0, 2.0]) == (0.5, 0.5, 0.5)     # all ties: no evidence either way


def test_win_rate_interval_ignores_ties_but_not_their_count():
    """Identical answers carry no evidence: 60 wins and 20 losses among 1,000 items are a clear
    preference (the sign test), which a Wilson interval on the tie-counted 52% would miss."""
    a = [1.0] * 60 + [0.0] * 20 + [0.5] * 920
    b = [0.0] * 60 + [1.0] * 20 + [0.5] * 920
    rate, lo, hi = win_rate(a, b)
    assert rate == pytest.approx(0.52) and lo > 0.5 and lo < rate < hi
    assert wilson_interval(520, 1000)[0] < 0.5
    flipped = win_rate(b, a)
    assert flipped[0] == pytest.approx(0.48) and flipped[2] < 0.5
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
