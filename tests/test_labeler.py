import json
import random

import pytest

from gptlab.errors import GptlabError
from gptlab.label.labeler import pairwise_agreement, rank, score, wilson_interval, win_rate

ARITH = {"family": "arithmetic", "answer": "81", "reference": "23 + 58 = 81.",
         "messages": [{"role": "user", "content": "What is 23 + 58?"}]}
DECLINE = {"family": "decline", "answer": "I'm sorry, I can't answer that.",
           "reference": "I'm sorry, I can't answer that: there is no king of Mars.",
           "messages": [{"role": "user", "content": "What is the phone number of the king of Mars?"}]}

GOOD = "23 + 58 = 81."
WRONG = "23 + 58 = 80."
RAMBLING = ("Well, let me think about this for a while, because addition of two-digit numbers means we add "
            "the tens and then the ones and carry when needed, so in the end 23 + 58 = 81.")
REPETITIVE = "23 + 58 = 81. 23 + 58 = 81. 23 + 58 = 81. 23 + 58 = 81."
TRUNCATED = "23 + 58 = 81 and"


def test_correct_beats_wrong():
    assert rank(ARITH, [WRONG, GOOD]) == [1, 0]
    # Correctness outweighs style: a rambling right answer still beats a tidy wrong one.
    assert score(ARITH, RAMBLING) > score(ARITH, WRONG)
    assert score(ARITH, REPETITIVE) > score(ARITH, WRONG)


def test_decline_beats_made_up():
    made_up = "The phone number of the king of Mars is 555-0199."
    polite = "I'm sorry, I can't answer that: there is no king of Mars."
    rude = "That is a stupid question, I can't answer it."
    assert rank(DECLINE, [made_up, polite]) == [1, 0]
    assert rank(DECLINE, [made_up, rude, polite]) == [2, 1, 0]


def test_concise_beats_rambling_and_repetitive():
    assert rank(ARITH, [RAMBLING, GOOD]) == [1, 0]
    assert rank(ARITH, [REPETITIVE, GOOD]) == [1, 0]
    wrong_loop = "80. 80. 80. 80. 80. 80. 80. 80. 80. 80. 80. 80."
    assert score(ARITH, WRONG) > score(ARITH, wrong_loop + " 80.")


def test_non_empty_and_proper_ending():
    assert rank(ARITH, ["", WRONG]) == [1, 0]
    assert rank(ARITH, ["   ", "23 + 58 = 80 because"]) == [1, 0]
    assert score(ARITH, GOOD) > score(ARITH, "23 + 58 = 81")        # same answer, no full stop
    assert score(ARITH, "23 + 58 = 80.") > score(ARITH, "23 + 58 = 80 plus")


def test_full_ranking_and_ties_deterministic():
    responses = [TRUNCATED, "", WRONG, RAMBLING, GOOD, REPETITIVE]
    order = rank(ARITH, responses)
    assert order[0] == 4 and order[-1] == 1
    assert rank(ARITH, responses) == order
    assert rank(ARITH, ["same.", "same."]) == [0, 1]
    assert rank(ARITH, ["b 1.", "a 1."]) == [1, 0]   # equal scores and lengths: text order, not position


@pytest.mark.parametrize("k, noise", [(2, 0.27), (4, 0.27), (9, 0.27), (4, 0.1), (4, 0.5)])
def test_noise_rate(k, noise):
    responses = [f"23 + 58 = {81 + i}." for i in range(k)]   # distinct scores: a strict clean order
    clean = rank(ARITH, responses)
    rng = random.Random(k)
    agree = [pairwise_agreement(clean, rank(ARITH, responses, noise=noise, rng=rng)) for _ in range(2000)]
    assert abs(sum(agree) / len(agree) - (1 - noise)) < 0.02


def test_noise_reproducible_with_seeded_rng():
    responses = [GOOD, WRONG, RAMBLING, ""]
    a = [rank(ARITH, responses, 0.3, random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2] and sorted(a[0]) == [0, 1, 2, 3]
    with pytest.raises(GptlabError):
        rank(ARITH, responses, noise=1.5)


def test_wilson_known_cases():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_win_rate_counts_ties_half():
    items = [ARITH] * 4
    rate, lo, hi = win_rate(items, [GOOD, GOOD, GOOD, WRONG], [WRONG, GOOD, "", GOOD])
    assert rate == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert (lo, hi) == pytest.approx(wilson_interval(2.5, 4))
    with pytest.raises(GptlabError):
        win_rate(items, [GOOD], [GOOD])


def test_curriculum_references_rank_first():
    """The demonstration beats corrupted versions of itself for every family."""
    from gptlab.data.instruct import build_curriculum
    cur = build_curriculum(seed=0, n_per_family=40, works={})
    for item in cur["prompts"]:
        ref = item["reference"]
        bad = [ref + " " + ref + " " + ref, ref[: len(ref) // 2], "", "I don't know, sorry."]
        if item["family"] == "decline":
            bad[-1] = "The answer is 42."
        assert rank(item, bad + [ref])[0] == len(bad), json.dumps(item, ensure_ascii=False)
