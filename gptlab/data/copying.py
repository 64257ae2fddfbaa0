"""Copy drills: lines that say a random string twice, ``q8jt4ev49|q8jt4ev49``, ``vo pk asd -> vo pk asd``.

Answering in a person's own words needs copying: echo "59" and "63" before adding them, quote the
word to reverse, carry the last answer into a follow-up. A transformer copies with induction heads
(a head that finds the earlier occurrence of the current text and reads what came after it), and a
tiny character-level model pre-trained for the cpu speedrun's seven minutes on Shakespeare, the task
mixture and the chat transcripts grows none: on a random word sequence said twice, its loss on the
second saying is no lower than on the first. In these lines the second half can be predicted only by
copying the first, so they force the heads to form; a strong share of the pre-training rows is what it
takes at that budget (docs/INSTRUCT.md, "Copy drills").

Half the lines are a string of letters and digits (3-24 characters, so numbers get copied too) with
``|`` between the two sayings; half are two to five random letter words (2-7 letters each) with
``: ``, `` => `` or `` -> `` between them.
"""
from __future__ import annotations

import random
import string
from pathlib import Path

from gptlab.io import atomic_write_text

ALNUM = string.ascii_lowercase + string.digits
SEPARATORS = (": ", " => ", " -> ")
DEFAULT_LINES = 60_000


def copy_line(rng: random.Random) -> str:
    """One drill: a random string, a separator, the same string."""
    if rng.random() < 0.5:
        s = "".join(rng.choice(ALNUM) for _ in range(rng.randint(3, 24)))
        return f"{s}|{s}"
    words = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
                     for _ in range(rng.randint(2, 5)))
    return f"{words}{rng.choice(SEPARATORS)}{words}"


def copy_drills_path(out_dir: str | Path, seed: int = 0, n_lines: int = DEFAULT_LINES) -> Path:
    """Where ``write_copy_drills`` puts its file; the name records what the content depends on."""
    return Path(out_dir) / f"copy_drills_seed{seed}_lines{n_lines}.txt"


def write_copy_drills(out_dir: str | Path, seed: int = 0, n_lines: int = DEFAULT_LINES) -> Path:
    """Write ``n_lines`` drills (one per line, no blank lines: one long document) atomically."""
    rng = random.Random(seed)
    path = copy_drills_path(out_dir, seed, n_lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(copy_line(rng) for _ in range(n_lines)) + "\n")
    return path
