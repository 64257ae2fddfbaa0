"""Multi-step problems with worked, checkable steps (the ``steps`` family of `gptlab data instruct --steps`).

A process reward model needs solutions whose every step a program can judge. Three kinds of problem,
each solved one operation per line and closed by an answer line:

* chains     "What is 17 + 6 - 9 + 4?"             Step 1: 17 + 6 = 23 / Step 2: 23 - 9 = 14 / ...
* stories    "Mia has 12 shells. She finds 7 more, then gives away 5. How many now?" (same step format)
* strings    "Reverse 'garden', then uppercase it, then keep the first 3 letters."
             Step 1: 'garden' reversed = 'nedrag' / Step 2: ... / Answer: NED

Operands are small (one-digit steps on a running total below 30, words of 3 to 6 letters): a
character-level model of a few minutes gets some solutions right and many wrong, which is what
best-of-N search needs to tell apart. (With totals up to 99 the speedrun's 1.1M-parameter char model
got 1 step in 100 right at temperature 1.)

Every item carries its ``plan`` (start value and operations), so ``label_steps`` can judge a sampled
solution line by line: a line is good when it performs the next planned operation on the right input
and gets it right. The first bad line and every line after it are bad (Lightman et al.'s convention:
a solution that went wrong stays wrong). Lines are the steps: the chat template keeps newlines.
"""
from __future__ import annotations

import re

STEP_KINDS = ("chain", "story", "string")
ANSWER_PREFIX = "Answer:"

# ----- wordings ---------------------------------------------------------------------------------------
CHAIN_ASK = ("What is {e}?", "What's {e}?", "whats {e}", "{e} = ?", "Compute {e}.", "Calculate {e} step by step.",
             "Work out {e}, one step at a time.", "Please work out {e}.", "Solve {e} and show your steps.",
             "{e}", "Can you do {e} for me?", "What does {e} come to?", "Evaluate {e}, showing each step.",
             "计算{e}", "{e}等于多少？")
_NAMES = ("Mia", "Sam", "Ava", "Leo", "Zoe", "Max", "Ivy", "Tom", "Lin", "Ana", "Raj", "Eve")
_THINGS = ("apples", "marbles", "stickers", "shells", "coins", "books", "cards", "stamps", "pens", "sweets")
_GAIN = ("gets {b} more", "finds {b} more", "buys {b} more", "is given {b} more", "wins {b} more")
_LOSE = ("gives away {b}", "loses {b}", "uses {b}", "sells {b}", "gives {b} to a friend")
_DOUBLE = ("doubles the pile", "ends up with twice as many")
_QUESTION = ("How many {t} does {n} have now?", "How many {t} are there now?", "How many {t} now?",
             "How many does {n} have at the end?", "What is the final number of {t}?")
STRING_ASK = ("Take {w}, {ops}.", "Start with the word {w}: {ops}.", "{ops_cap}, starting from {w}.",
              "Word: {w}. {ops_cap}.", "please take {w} and {ops}", "Begin with {w}; {ops}.")
_STRING_OPS = {"reverse": ("reverse it", "write it backwards", "spell it backwards"),
               "upper": ("make it uppercase", "put it in capitals", "uppercase it"),
               "first": ("keep the first {n} letters", "take the first {n} letters"),
               "last": ("keep the last {n} letters", "take the last {n} letters")}


# ----- the plan: a start value and operations -----------------------------------------------------------
def apply_op(value, op: list):
    """The result of one planned operation: ["+", 7], ["-", 3], ["*", 2], ["reverse"], ["upper"],
    ["first", 3], ["last", 2]."""
    kind = op[0]
    if kind == "+":
        return value + op[1]
    if kind == "-":
        return value - op[1]
    if kind == "*":
        return value * op[1]
    if kind == "reverse":
        return value[::-1]
    if kind == "upper":
        return value.upper()
    if kind == "first":
        return value[:op[1]]
    if kind == "last":
        return value[-op[1]:]
    raise ValueError(f"unknown step operation {kind!r}")


def run_plan(plan: dict) -> list:
    """Every intermediate value: [start, after step 1, ..., final answer]."""
    values = [plan["start"]]
    for op in plan["ops"]:
        values.append(apply_op(values[-1], op))
    return values


def step_line(i: int, value, op: list) -> str:
    """The canonical text of step ``i`` (1-based) applying ``op`` to ``value``."""
    out = apply_op(value, op)
    if op[0] in "+-*":
        return f"Step {i}: {value} {op[0]} {op[1]} = {out}"
    # Short forms: a three-step string solution must fit a 256-character context with its question.
    what = {"reverse": "'{v}' reversed = '{o}'", "upper": "'{v}' in uppercase = '{o}'",
            "first": "first {n} of '{v}' = '{o}'", "last": "last {n} of '{v}' = '{o}'"}
    return f"Step {i}: " + what[op[0]].format(v=value, o=out, n=op[1] if len(op) > 1 else "")


def worked_solution(plan: dict) -> str:
    values = run_plan(plan)
    lines = [step_line(i + 1, values[i], op) for i, op in enumerate(plan["ops"])]
    return "\n".join(lines + [f"{ANSWER_PREFIX} {values[-1]}"])


# ----- generators ---------------------------------------------------------------------------------------
TOTAL_MAX = 29      # running totals stay in 0..29


def _arith_ops(rng, start: int, n: int, allow_double: bool) -> list:
    """``n`` one-digit additions/subtractions (and, in stories, a doubling) keeping the total in 0..29."""
    ops, v = [], start
    for _ in range(n):
        if allow_double and 2 <= v <= 12 and rng.random() < 0.2:
            op = ["*", 2]
        else:
            sign = rng.choice("+-")
            if sign == "-" and v < 2 or sign == "+" and v > TOTAL_MAX - 9:
                sign = "+" if sign == "-" else "-"
            op = [sign, rng.randint(1, min(9, v) if sign == "-" else 9)]
        ops.append(op)
        v = apply_op(v, op)
    return ops


def gen_chain(rng) -> tuple[str, dict]:
    start = rng.randint(2, 20)
    plan = {"kind": "chain", "start": start, "ops": _arith_ops(rng, start, rng.choice((2, 2, 3)), False)}
    sep = rng.choice((" ", " ", ""))
    e = f"{start}" + "".join(f"{sep}{op}{sep}{b}" for op, b in plan["ops"])
    return _roughen(rng.choice(CHAIN_ASK).format(e=e), rng), plan


def gen_story(rng) -> tuple[str, dict]:
    start = rng.randint(2, 20)
    plan = {"kind": "story", "start": start, "ops": _arith_ops(rng, start, rng.choice((2, 3)), True)}
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    parts = []
    for op in plan["ops"]:
        pool = _GAIN if op[0] == "+" else _LOSE if op[0] == "-" else _DOUBLE
        parts.append(rng.choice(pool).format(b=op[1]))
    joined = ", then ".join(parts) if len(parts) < 3 else f"{parts[0]}, then {parts[1]}, and then {parts[2]}"
    text = f"{name} has {start} {thing}. {name} {joined}. " + rng.choice(_QUESTION).format(t=thing, n=name)
    return _roughen(text, rng), plan


def gen_string(rng, words: list[str]) -> tuple[str, dict]:
    word = rng.choice([w for w in words if 3 <= len(w) <= 6] or words)
    kinds = rng.sample(("reverse", "upper", "cut"), rng.choice((2, 2, 3)))
    ops = []
    for k in kinds:
        if k == "cut":
            ops.append([rng.choice(("first", "last")), rng.randint(2, 3)])
        else:
            ops.append([k])
    plan = {"kind": "string", "start": word, "ops": ops}
    phrases = [rng.choice(_STRING_OPS[op[0]]).format(n=op[1] if len(op) > 1 else "") for op in ops]
    said = ", then ".join(phrases)
    q = rng.choice(("'{}'", '"{}"', "{}")).format(word)
    text = rng.choice(STRING_ASK).format(w=q, ops=said, ops_cap=said[0].upper() + said[1:])
    return _roughen(text, rng), plan


def _roughen(text: str, rng) -> str:
    """Person-like typing (lower case, no final stop) without touching numbers or the word."""
    if rng.random() < 0.2 and text[:1].isupper() and not text.startswith(("Take", "Word")):
        text = text[0].lower() + text[1:]
    if rng.random() < 0.2:
        text = text.rstrip(".?")
    return text


def gen_problem(rng, words: list[str]) -> tuple[str, dict]:
    kind = rng.choices(STEP_KINDS, weights=(4, 3, 3))[0]
    if kind == "chain":
        return gen_chain(rng)
    if kind == "story":
        return gen_story(rng)
    return gen_string(rng, words)


def plan_key(plan: dict) -> str:
    return f"steps:{plan['start']}:" + ";".join(",".join(str(x) for x in op) for op in plan["ops"])


# ----- checking a sampled solution, step by step ---------------------------------------------------------
_ARITH_STEP = re.compile(r"(-?\d+)\s*([-+*x×])\s*(-?\d+)\s*=\s*(-?\d+)")
_QUOTED = re.compile(r"['\"‘“]([^'\"’”]*)['\"’”]")
_KEYWORD = {"reverse": re.compile(r"revers|backward", re.I), "upper": re.compile(r"upper|capital", re.I),
            "first": re.compile(r"\bfirst\b", re.I), "last": re.compile(r"\blast\b", re.I)}


def split_steps(text: str) -> list[str]:
    """The solution's steps: its non-empty lines, stripped. Only a newline ends a line (not the other
    characters str.splitlines breaks at), the same rule gptlab.train.prm.step_ids reads by."""
    return [line.strip() for line in (text or "").split("\n") if line.strip()]


def _answer_of(line: str) -> str | None:
    if not line.lower().startswith(ANSWER_PREFIX.lower()):
        return None
    return line[len(ANSWER_PREFIX):].strip().strip(" .'\"`")


def _step_ok(line: str, value, op: list) -> bool:
    """Does ``line`` apply ``op`` to ``value`` and get it right?"""
    want = apply_op(value, op)
    if op[0] in "+-*":
        m = _ARITH_STEP.search(line)
        if not m:
            return False
        a, sym, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        sym = "*" if sym in "x×" else sym
        operands = {(value, op[1]), (op[1], value)} if sym in "+*" else {(value, op[1])}
        return sym == op[0] and (a, b) in operands and c == want
    quoted = _QUOTED.findall(line)
    if len(quoted) < 2 or not _KEYWORD[op[0]].search(line):
        return False
    if op[0] in ("first", "last"):
        n = re.search(rf"\b{op[0]}\s+(\d+)", line, re.I)     # "first 3 of ...", not the step's own number
        if not n or int(n.group(1)) != op[1]:
            return False
    return quoted[0] == value and quoted[-1] == want


def label_steps(plan: dict, text: str) -> list[bool]:
    """One label per step (line) of ``text``: True while every step so far performed the planned
    operation correctly; the first wrong step and all after it are False. The answer line is a step
    too: right only after all planned steps, with the plan's answer. A solution that stops early has
    no answer line to be right; one that goes on past its answer has extra, wrong, steps."""
    values = run_plan(plan)
    labels, ok = [], True
    n_ops = len(plan["ops"])
    for i, line in enumerate(split_steps(text)):
        if ok:
            if i < n_ops:
                ok = _answer_of(line) is None and _step_ok(line, values[i], plan["ops"][i])
            elif i == n_ops:
                ok = _answer_of(line) == str(values[-1])
            else:
                ok = False
        labels.append(ok)
    return labels


def final_answer(text: str) -> str | None:
    """What the solution answers: its last answer line (None when it has none)."""
    for line in reversed(split_steps(text)):
        a = _answer_of(line)
        if a is not None:
            return a
    return None


def outcome_correct(plan: dict, text: str) -> bool:
    """Only the final answer is judged (what an outcome reward model learns from)."""
    return final_answer(text) == str(run_plan(plan)[-1])
