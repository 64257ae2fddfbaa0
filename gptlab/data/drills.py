"""Drills: pre-training lines for the two skills a small model does not pick up from text in minutes.

**Copy drills** say a random string twice, ``q8jt4ev49|q8jt4ev49``, ``vo pk asd -> vo pk asd``.

Answering in a person's own words needs copying: echo "59" and "63" before adding them, quote the
word to reverse, carry the last answer into a follow-up. A transformer copies with induction heads
(a head that finds the earlier occurrence of the current text and reads what came after it), and a
tiny character-level model pre-trained for the cpu speedrun's seven minutes on Shakespeare, the task
mixture and the chat transcripts grows hardly any: on a line of random words said twice, its loss on
the second saying is 5.78 nats per character against 6.02 on the first. In these lines the second
half can be predicted only by copying the first, so they force the heads to form; a strong share of
the pre-training rows is what it takes at that budget (docs/INSTRUCT.md, "Drills").

Half the lines are a string of letters and digits (3-24 characters, so numbers get copied too) with
``|`` between the two sayings; half are two to five random letter words (2-7 letters each) with
``: ``, `` => `` or `` -> `` between them.

**Arithmetic drills** are sums in the form every arithmetic reply takes, ``59 + 63 = 122``: two-digit
additions and subtractions (never one of the curriculum's held-out problems, in either order, so the
exam's questions stay unseen) and the follow-ups of a multi-turn chat on such a result
(``122 + 7 = 129``, ``Double 61 is 122``, ``Half of 84 is 42``). A small model learns such sums
suddenly, after it has seen a few thousand; spread through the mixed corpus they are too rare for
that to happen in the speedrun's budget.
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


def _held_out(a: int, op: str, b: int) -> bool:
    """The sum is a held-out problem of the curriculum, in either order for "+"."""
    from gptlab.data.instruct import held_out
    keys = [f"arith:{a} {op} {b}"] + ([f"arith:{b} {op} {a}"] if op == "+" else [])
    return any(held_out(k) for k in keys)


def arithmetic_line(rng: random.Random) -> str:
    """One drill: a two-digit sum or difference (not held out), or a follow-up on a result."""
    if rng.random() < 0.6:
        while True:
            a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
            if op == "-" and a < b:
                a, b = b, a
            if not _held_out(a, op, b):
                return f"{a} {op} {b} = {a + b if op == '+' else a - b}"
    while True:   # a follow-up may look like a held-out problem ("73 - 30"): draw again
        r, c = rng.randint(0, 198), rng.randint(1, 30)
        kind = rng.choice(("add", "sub", "double", "half"))
        if kind == "sub" and c > r:
            kind = "add"
        if kind == "half" and r % 2:
            kind = "double"
        if kind in ("double", "half") or not _held_out(r, "+" if kind == "add" else "-", c):
            break
    return {"add": f"{r} + {c} = {r + c}", "sub": f"{r} - {c} = {r - c}",
            "double": f"Double {r} is {2 * r}", "half": f"Half of {r} is {r // 2}"}[kind]


KINDS = {"copy": copy_line, "arithmetic": arithmetic_line}


def drills_path(out_dir: str | Path, kind: str, seed: int = 0, n_lines: int = DEFAULT_LINES) -> Path:
    """Where ``write_drills`` puts its file; the name records what the content depends on."""
    return Path(out_dir) / f"{kind}_drills_seed{seed}_lines{n_lines}.txt"


def write_drills(out_dir: str | Path, kind: str, seed: int = 0, n_lines: int = DEFAULT_LINES) -> Path:
    """Write ``n_lines`` drills of one kind (one per line, no blank lines: one long document) atomically."""
    rng = random.Random(seed)
    path = drills_path(out_dir, kind, seed, n_lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(KINDS[kind](rng) for _ in range(n_lines)) + "\n")
    return path
