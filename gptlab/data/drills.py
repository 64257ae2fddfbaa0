"""Drills: pre-training lines for the skills a small model does not pick up from text in minutes.

**Copy drills** say a random string twice, ``q8jt4ev49|q8jt4ev49``, ``vo pk asd -> vo pk asd``.

Answering in a person's own words needs copying: echo "59" and "63" before adding them, quote the
word to reverse, carry the last answer into a follow-up. A transformer copies with induction heads
(a head that finds the earlier occurrence of the current text and reads what came after it), and a
tiny character-level model pre-trained for the cpu speedrun's seven minutes on Shakespeare, the task
mixture and the chat transcripts grows hardly any: on a line of random words said twice, its loss on
the second saying is 5.78 nats per character against 6.02 on the first. In these lines the second
half can be predicted only by copying the first, so they force the heads to form; a strong share of
the pre-training rows is what it takes at that budget (docs/INSTRUCT.md, "Drills and worked sums").

Half the lines are a string of letters and digits (3-24 characters, so numbers get copied too) with
``|`` between the two sayings; half are two to five random letter words (2-7 letters each) with
``: ``, `` => `` or `` -> `` between them.

**Arithmetic drills** are two-digit additions and subtractions in the form every arithmetic reply
takes, worked in columns (``59 + 63: 9+3=12, 5+6+1=12, so 122.``, gptlab.data.sums), never one of
the curriculum's held-out problems, in either order, so the exam's questions stay unseen. Spread
through the mixed corpus, sums are too rare to be learnt in the speedrun's budget. Half the lines
are two-turn chats in the transcripts' form whose follow-up ("Now halve it.") is answered from the
first reply's result (``Half of 122 is 61.``): to answer a follow-up the model must find the last
answer and carry it over, and without these it answered from the follow-up alone
("Add 3 to the result." -> ``10 + 3 = 10.``). The follow-ups are built from parts (lead, operation,
reference, ending), so no fixed list of questions is learnt, and the earlier reply is in the model's
own form or in others (``59 + 63 = 122.``, ``That's 122.``), as a client's history may be.

**Dictionary drills** say a known word's translation in the reply's form, ``'ghost' in Chinese is 鬼.``
or ``鬼 in English is 'ghost'.``. The mixed corpus has the dictionary too, but too thinly: the model
learnt the reply's form and filled it with one word for every question. Words held out of the
mixture's dictionary families (the few-shot evals ask them) or of the curriculum are never drilled.
"""
from __future__ import annotations

import functools
import random
import string
from pathlib import Path

from gptlab.data.sums import follow_up_reply, worked
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


def _sum(rng: random.Random) -> tuple[int, str, int, int]:
    """A two-digit sum or difference that is not a held-out problem: (a, op, b, result)."""
    while True:
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
        if op == "-" and a < b:
            a, b = b, a
        if not _held_out(a, op, b):
            return a, op, b, a + b if op == "+" else a - b


# A follow-up refers to the last answer in many ways; phrases are built from parts so that the model
# meets the operation and the reference in many combinations, not a fixed list of questions.
_REFS = ("it", "that", "the result", "the answer", "your answer", "that number", "this", "the total", "the sum")
_VERB_LEADS = ("", "Now ", "Then ", "Can you ", "Could you ", "Please ", "What if you ", "What do you get if you ",
               "ok ", "and ")
_NOUN_LEADS = ("", "And ", "What's ", "What is ", "So what's ", "How much is ", "Now ", "then ")
_FOLLOW_VERB = {"add": ("add {c} to {r}", "add {c}", "increase {r} by {c}", "put {c} more on {r}", "plus {c}"),
                "sub": ("subtract {c} from {r}", "take {c} away from {r}", "take away {c}", "take {c} off {r}",
                        "decrease {r} by {c}", "minus {c}"),
                "double": ("double {r}", "multiply {r} by 2", "times {r} by 2", "double"),
                "half": ("halve {r}", "divide {r} by 2", "cut {r} in half", "split {r} in half")}
_FOLLOW_NOUN = {"add": ("{r} plus {c}", "{c} more than {r}", "{r} + {c}", "{c} more"),
                "sub": ("{r} minus {c}", "{c} less than {r}", "{r} - {c}", "{c} less", "{c} fewer"),
                "double": ("twice {r}", "{r} times 2", "double {r}", "{r} doubled", "2 times {r}"),
                "half": ("half of {r}", "half {r}", "{r} divided by 2", "{r} halved", "{r} / 2")}
_ENDS = ("?", ".", "", "?", "!")
_EARLIER = ("{r}.", "{r}", "The answer is {r}.", "That's {r}.", "{a} {op} {b} is {r}.", "It is {r}.", "= {r}",
            "{a}{op}{b}={r}", "You get {r}.", "The result is {r}.")


def follow_up(rng: random.Random, kind: str, c: int) -> str:
    """A person's follow-up question asking for ``kind`` ("add", "sub", "double", "half") of the last answer."""
    if rng.random() < 0.5:
        text = rng.choice(_VERB_LEADS) + rng.choice(_FOLLOW_VERB[kind])
    else:
        text = rng.choice(_NOUN_LEADS) + rng.choice(_FOLLOW_NOUN[kind])
    text = text.format(r=rng.choice(_REFS), c=c) + rng.choice(_ENDS)
    return text[0].upper() + text[1:] if rng.random() < 0.7 else text


def arithmetic_line(rng: random.Random) -> str:
    """One drill: a two-digit sum or difference (not held out), or a two-turn chat with a follow-up.

    The follow-up chats are in the transcripts' ``User:`` / ``Assistant:`` form: the follow-up's reply
    starts from the previous reply's result, so the model learns to carry that number over.
    """
    a, op, b, r = _sum(rng)
    if rng.random() < 0.5:
        return worked(a, op, b)
    while True:   # the follow-up's own sum may be a held-out problem ("73 - 30"): draw again
        c = rng.randint(1, 30)
        kind = rng.choice(("add", "sub", "double", "half"))
        if kind == "sub" and c > r:
            kind = "add"
        if kind == "half" and r % 2:
            kind = "double"
        if kind in ("double", "half") or not _held_out(r, "+" if kind == "add" else "-", c):
            break
    reply, _ = follow_up_reply(kind, r, c)
    # The earlier reply may be in any words (a client can send its own history): the model must find the
    # result wherever it stands, not only after its own "so".
    roll = rng.random()
    first = (worked(a, op, b) if roll < 0.4 else f"{a} {op} {b} = {r}." if roll < 0.7
             else rng.choice(_EARLIER).format(a=a, op=op, b=b, r=r))
    from gptlab.data.instruct import _arith_ask
    return (f"User: {_arith_ask(rng, a, op, b)}\nAssistant: {first}\n"
            f"User: {follow_up(rng, kind, c)}\nAssistant: {reply}")


@functools.cache
def _known_words() -> tuple[tuple[str, str], ...]:
    """Dictionary words whose translation may be trained on: not held out of the mixture's dictionary
    families (the few-shot evals ask those) nor of the curriculum's translate family."""
    from gptlab.data.dictionary import EN_ZH
    from gptlab.data.instruct import held_out
    from gptlab.data.mixture import is_heldout
    return tuple((en, EN_ZH[en]) for en in sorted(EN_ZH)
                 if not is_heldout("en2zh", en) and not held_out(f"word:{en}"))


def dictionary_line(rng: random.Random) -> str:
    """One drill: a known word's translation, in the form a translation reply takes, either direction."""
    en, zh = rng.choice(_known_words())
    return f"'{en}' in Chinese is {zh}." if rng.random() < 0.5 else f"{zh} in English is '{en}'."


KINDS = {"copy": copy_line, "arithmetic": arithmetic_line, "dictionary": dictionary_line}


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
