"""The statistics behind held-out comparisons: a proportion's interval, a win rate, a paired difference.

Plain arithmetic on lists of numbers (no models, no files), so a training stage that reports how its
result compares with its start (DPO's win rate over its init) uses the same formulas as `gptlab compare`,
`gptlab eval` and the forest plots.
"""
from __future__ import annotations

import math

from gptlab.errors import GptlabError

Z95 = 1.959963984540054     # the standard normal's 97.5% quantile: two-sided 95% intervals


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (works at 0 and n, unlike the normal approximation)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # The interval contains p exactly (at 0% and 100% rounding could put a bound a hair inside it).
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def win_rate(scores_a: list[float], scores_b: list[float]) -> tuple[float, float, float]:
    """How often A's score beats B's on the same item (ties count half), with a 95% interval:
    (rate, lo, hi).

    The interval is the sign test's: a tie says nothing about which side is better and has no
    variance, so the uncertainty is that of A's share among the decisive items (Wilson interval of
    wins / (wins + losses)), scaled by the decisive fraction around one half. A Wilson interval on
    the tie-counted rate itself would treat every tie as a coin flip and be far too wide when most
    answers are identical (two policies from the same start)."""
    if len(scores_a) != len(scores_b):
        raise GptlabError(f"win_rate needs one score from each side per item "
                          f"(got {len(scores_a)} and {len(scores_b)})")
    if not scores_a:
        raise GptlabError("win_rate needs at least one item")
    n = len(scores_a)
    wins = sum(sa > sb for sa, sb in zip(scores_a, scores_b))
    decisive = wins + sum(sa < sb for sa, sb in zip(scores_a, scores_b))
    rate = (wins + 0.5 * (n - decisive)) / n
    if not decisive:
        return rate, rate, rate
    q_lo, q_hi = wilson_interval(wins, decisive)
    share = decisive / n
    return rate, 0.5 + share * (q_lo - 0.5), 0.5 + share * (q_hi - 0.5)


def paired_difference(a: list[float], b: list[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean of a_i - b_i over the same items, with a 95% interval (normal approximation on the paired
    differences): (mean, lo, hi). Pairing removes the items' own difficulty from the spread, so two
    runs answering the same prompts are told apart with far fewer prompts than two unpaired rates."""
    if len(a) != len(b) or not a:
        raise GptlabError(f"paired_difference needs the same positive number of values on each side "
                          f"(got {len(a)} and {len(b)})")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half
