"""Sums worked digit by digit: the form every arithmetic reply takes.

    59 + 63: 9+3=12, 5+6+1=12, so 122.
    85 - 27: 15-7=8, 8-1-2=5, so 58.
    Double 156: 6+6=12, 5+5+1=11, 1+1+1=3, so 312.

Each step is one column, units first: its two digits, the carry (``+1``) or borrow (``-1``) from the
column before, and the column's value; a column that borrows writes its digit with the borrowed ten
(``15-7``). The answer is then read off the steps. A small model learns sums in this form from far
less data than ``59 + 63 = 122``, where every digit of the answer must be computed at once
(bench/worked_sums.py; docs/INSTRUCT.md, "Drills and worked sums"). The question is restated first
(``59 + 63:``), so a reply shows that the model read the question, and its last number is the answer.
"""
from __future__ import annotations


def _digits(n: int, width: int) -> list[int]:
    """The digits of ``n``, units first, padded with zeros to ``width``."""
    return [int(c) for c in str(n).zfill(width)[::-1]]


def columns(a: int, op: str, b: int) -> str:
    """The column steps of ``a + b`` or ``a - b`` (``a >= b >= 0``): "9+3=12, 5+6+1=12"."""
    if op not in "+-" or a < 0 or b < 0 or (op == "-" and a < b):
        raise ValueError(f"columns: {a} {op} {b} is not a sum of naturals with a natural result")
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width)):
        if op == "+":
            value = da + db + carry
            steps.append(f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={value}")
            carry = value // 10
        else:
            borrow = 1 if da - carry < db else 0
            value = 10 * borrow + da - carry - db
            steps.append(("1" if borrow else "") + f"{da}" + (f"-{carry}" if carry else "") + f"-{db}={value}")
            carry = borrow
    return ", ".join(steps)


def worked(a: int, op: str, b: int) -> str:
    """The reply to ``a op b``: "59 + 63: 9+3=12, 5+6+1=12, so 122."."""
    return f"{a} {op} {b}: {columns(a, op, b)}, so {a + b if op == '+' else a - b}."


def worked_double(r: int) -> str:
    """The reply to doubling ``r``, as ``r + r`` in columns: "Double 156: 6+6=12, ..., so 312."."""
    return f"Double {r}: {columns(r, '+', r)}, so {2 * r}."


def follow_up_reply(kind: str, r: int, c: int) -> tuple[str, int]:
    """(reply, value) of a follow-up on the result ``r``: "add" / "sub" ``c`` worked in columns, "double"
    as ``r + r``, "half" and "mul" (times ``c``) said at once."""
    if kind == "add":
        return worked(r, "+", c), r + c
    if kind == "sub":
        return worked(r, "-", c), r - c
    if kind == "double":
        return worked_double(r), 2 * r
    if kind == "half":
        return f"Half of {r} is {r // 2}.", r // 2
    if kind == "mul":
        return f"{r} * {c} = {r * c}.", r * c
    raise ValueError(f"follow_up_reply: unknown kind {kind!r}")
