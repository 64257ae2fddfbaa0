"""Passkey documents (Mohtashami & Jaggi 2023): a number hidden in repeated filler, asked for at the end.

The same pieces build the training documents (``gptlab data passkey``) and the prompts of the
passkey eval (gptlab.evals.passkey), so the eval asks exactly the question the model was taught.
A document is: filler, the needle ("The pass key is N. Remember it."), more filler, then the
question and its answer. The filler is five fixed sentences repeated: it carries no information,
so the only way to answer is to find the needle, however far back it sits.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.io import atomic_write_text

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
QUESTION = "What is the pass key? The pass key is "
KEY_DIGITS = 5


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. "


def random_key(rng: random.Random) -> str:
    return str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))


def filler(n_chars: int, offset: int = 0) -> str:
    """``n_chars`` characters of the repeated filler, starting ``offset`` characters into it."""
    reps = (offset + n_chars) // len(FILLER) + 2
    return (FILLER * reps)[offset:offset + n_chars]


def document(rng: random.Random, n_chars: int) -> str:
    """One training document of about ``n_chars`` characters with the needle at a uniform depth.

    Filler pieces are cut at sentence ends so the text stays well-formed English.
    """
    key = random_key(rng)
    body = max(0, n_chars - len(needle(key)) - len(QUESTION) - KEY_DIGITS - 2)
    sentences = [s + ". " for s in FILLER.strip().rstrip(".").split(". ")]
    start = rng.randrange(len(sentences))
    pieces, total = [], 0
    while total < body:
        s = sentences[(start + len(pieces)) % len(sentences)]
        pieces.append(s)
        total += len(s)
    cut = rng.randint(0, len(pieces))
    text = "".join(pieces[:cut]) + needle(key) + "".join(pieces[cut:])
    return text + QUESTION + key + ".\n"


def write_documents(out: str | Path, n: int, min_chars: int, max_chars: int, seed: int) -> Path:
    """``n`` documents of ``min_chars`` .. ``max_chars`` characters as JSONL (a ``text`` field each).

    Lengths vary so that the needle sits at every distance from the question up to the longest
    document: the model learns to look back across its whole training context, not one distance."""
    if n < 1:
        raise GptlabError("--n must be at least 1")
    shortest = len(needle("0" * KEY_DIGITS)) + len(QUESTION) + KEY_DIGITS + 2
    if not shortest <= min_chars <= max_chars:
        raise GptlabError(f"--min-chars/--max-chars: need {shortest} <= min <= max "
                          f"(got {min_chars}, {max_chars})")
    rng = random.Random(seed)
    lines = [json.dumps({"text": document(rng, rng.randint(min_chars, max_chars))}) for _ in range(n)]
    path = Path(out)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
