"""A programmatic labeler: ranks K responses the way InstructGPT's labelers were told to.

Rules, most important first (``score`` encodes them so each outweighs everything below it):

1. correct and well-formed above wrong (``check_answer`` on the curriculum item); for impossible or
   nonsense requests a polite decline counts as correct and a made-up answer as wrong;
2. concise above rambling: repeated n-grams and length far beyond the reference are penalised;
3. ends properly above truncated (a sentence that stops mid-way).

An empty response ranks below everything, right or wrong: it helps nobody.
Responses with equal scores (two wrong answers, say) are ordered by a hash of their text, and
``gptlab label --auto`` lists them in the row's ``"ties"`` so reward models and DPO skip those pairs:
ordering them shorter-first taught reward models "shorter is better", and PPO then cut answers short.

Human labelers disagree with each other: InstructGPT's training labelers agreed on ~73% of
comparisons (72.6%). ``noise`` reproduces that: ``--noise 0.27`` makes ~27% of all pairwise
comparisons disagree with the noiseless labeler. The noisy ranking is drawn from a Mallows model
centred on the noiseless one, its dispersion solved so that the expected fraction of flipped pairs is
exactly ``noise``; for K=2 that is "flip the pair with probability noise". Unlike flipping pairs
independently it always yields a consistent order (no A>B>C>A cycles to resolve).

Note what 73% measured: agreement *between* two labelers, each with their own errors. Two independent
labelers with noise q agree on a pair with probability (1-q)^2 + q^2, so two simulated labelers that
agree 73% of the time each need ``noise`` ~0.16; ``--noise 0.27`` is the simpler reading (one labeler
that agrees 73% with the rules).
"""
from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache

from gptlab.data.instruct import check_answer, is_polite_refusal, is_refusal
from gptlab.errors import GptlabError

_WORD = re.compile(r"\w+|[^\w\s]")
_ENDINGS = tuple(".!?。！？…")

CORRECT, PARTIAL = 4.0, 1.0        # correctness dominates: conciseness + ending add at most 2.5
CONCISE, ENDS = 2.0, 0.5
EMPTY = -1.0


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repetition(text: str, n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier one (0 = none, ->1 = a loop)."""
    toks = _tokens(text)
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _needed_length(item: dict) -> int:
    """Tokens a good answer needs: the reference demonstration's length, else the answer's plus slack."""
    ref = item.get("reference")
    if not ref and item.get("messages") and item["messages"][-1].get("role") == "assistant":
        ref = item["messages"][-1]["content"]
    if ref:
        return max(4, len(_tokens(ref)))
    return len(_tokens(str(item.get("answer", "")))) + 8


def conciseness(item: dict, response: str) -> float:
    """CONCISE minus penalties for repetition and for length well beyond what the answer needs."""
    need = _needed_length(item)
    excess = max(0, len(_tokens(response)) - 1.5 * need - 3)
    length_pen = min(1.0, excess / (need + 5))
    rep_pen = min(1.0, 2 * repetition(response))
    return CONCISE - length_pen - rep_pen


def ends_properly(response: str) -> bool:
    """Ends like a finished sentence (closing quotes allowed after it), or closes a quotation."""
    text = response.rstrip()
    if text.endswith('"') and text.count('"') % 2 == 0:
        return True   # a complete quoted line, e.g. Shakespeare completions ending in ',' or ':'
    return text.rstrip("\"')]”’」』").endswith(_ENDINGS)


def score(item: dict, response: str) -> float:
    """Higher is better; see the module docstring for the rules and their order."""
    text = (response or "").strip()
    if not text:
        return EMPTY
    if item.get("family") == "decline":
        right = CORRECT if is_polite_refusal(text) else PARTIAL if is_refusal(text) else 0.0
    else:
        right = CORRECT if check_answer(item, text) else 0.0
    return right + conciseness(item, text) + (ENDS if ends_properly(text) else 0.0)


def _tie_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def _order(item: dict, responses: list[str]) -> list[int]:
    # Ties (equal scores, e.g. two wrong answers) go by a hash of the text, then position: the same
    # inputs always rank the same way, and no feature of the text decides them. Breaking ties by
    # length taught reward models "shorter is better" from the many wrong-vs-wrong pairs, and PPO
    # then cut answers short ("12 * 5 = 6.").
    return sorted(range(len(responses)),
                  key=lambda i: (-score(item, responses[i]), _tie_key(responses[i] or ""), i))


def _expected_inversions(phi: float, k: int) -> float:
    """Mean number of discordant pairs of a Mallows(phi) permutation of k items (insertion model)."""
    total = 0.0
    for i in range(1, k):
        w = [phi ** m for m in range(i + 1)]
        total += sum(m * x for m, x in enumerate(w)) / sum(w)
    return total


@lru_cache(maxsize=256)
def _mallows_phi(k: int, noise: float) -> float:
    """Dispersion whose expected fraction of flipped pairs is ``noise`` (0 < noise <= 0.5)."""
    target, lo, hi = noise * k * (k - 1) / 2, 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _expected_inversions(mid, k) < target else (lo, mid)
    return (lo + hi) / 2


def _mallows(order: list[int], noise: float, rng: random.Random) -> list[int]:
    """A permutation of ``order`` drawn by repeated insertion: item i jumps ahead of m better items w.p. ~phi^m."""
    if noise > 0.5:   # more than half the pairs flipped = a noisy labeler of the reversed order
        order, noise = order[::-1], 1.0 - noise
    if noise <= 0 or len(order) < 2:
        return list(order)
    phi = _mallows_phi(len(order), round(noise, 12))
    out: list[int] = []
    for i, x in enumerate(order):
        m = rng.choices(range(i + 1), weights=[phi ** j for j in range(i + 1)])[0]
        out.insert(len(out) - m, x)
    return out


def rank(item: dict, responses: list[str], noise: float = 0.0, rng: random.Random | None = None) -> list[int]:
    """Indices of ``responses`` from best to worst; ``noise`` is the expected fraction of flipped pairs."""
    if not 0.0 <= noise <= 1.0:
        raise GptlabError(f"--noise must be between 0 and 1 (got {noise})")
    order = _order(item, responses)
    if noise == 0:
        return order
    return _mallows(order, noise, rng or random.Random())


def ties(item: dict, responses: list[str]) -> list[list[int]]:
    """Index pairs of different responses with equal scores: equally good by the rules, so the
    ranking's order between them is arbitrary and training should not learn from it."""
    scores = [score(item, r) for r in responses]
    return [[i, j] for i in range(len(responses)) for j in range(i + 1, len(responses))
            if scores[i] == scores[j] and responses[i] != responses[j]]


def pairwise_agreement(a: list[int], b: list[int]) -> float:
    """Fraction of the C(K,2) pairs that two rankings of the same responses order the same way."""
    pos_a, pos_b = {x: i for i, x in enumerate(a)}, {x: i for i, x in enumerate(b)}
    pairs = [(x, y) for i, x in enumerate(a) for y in a[i + 1:]]
    same = sum((pos_a[x] < pos_a[y]) == (pos_b[x] < pos_b[y]) for x, y in pairs)
    return same / len(pairs) if pairs else 1.0


__all__ = ["score", "rank", "ties", "pairwise_agreement", "repetition", "conciseness", "ends_properly"]
