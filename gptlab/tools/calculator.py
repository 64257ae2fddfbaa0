"""The calculator tool: exact arithmetic on integers, decimals and fractions, parsed by hand.

Grammar (precedence low to high; ``^`` and ``**`` are right-associative)::

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/" | "//" | "%") unary)*
    unary  := ("-" | "+") unary | power
    power  := atom (("^" | "**") unary)?
    atom   := NUMBER | "(" expr ")"

Every value is a ``fractions.Fraction``, so 0.1 + 0.2 is exactly 0.3 and 1/3 * 3 is exactly 1. Nothing
is evaluated by Python: the text is tokenised and walked by this parser, and sizes are bounded (input
length, nesting depth, exponent, digits of every intermediate result) so no input can take long.
"""
from __future__ import annotations

import re
from fractions import Fraction

from gptlab.errors import GptlabError

MAX_CHARS = 300
MAX_DEPTH = 40
MAX_DIGITS = 2000          # of any numerator or denominator along the way
MAX_EXPONENT = 10_000

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\*\*|//|[-+*/%^()]))")
_SPACES = str.maketrans({"\u00d7": "*", "\u00f7": "/", "\u2212": "-", ",": ""})


def _tokens(text: str) -> list[str]:
    text = text.translate(_SPACES)   # ×, ÷, the minus sign, thousands separators
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise GptlabError(f"unexpected {text[pos:].strip()[:10]!r} (numbers, + - * / // % ^ and brackets only)")
        out.append(m.group(1) or m.group(2))
        pos = m.end()
    return out


def _bounded(x: Fraction) -> Fraction:
    if max(x.numerator.bit_length(), x.denominator.bit_length()) > MAX_DIGITS * 3.33:
        raise GptlabError(f"a result has more than {MAX_DIGITS} digits")
    return x


class _Parser:
    def __init__(self, tokens: list[str]):
        self.t, self.i, self.depth = tokens, 0, 0

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise GptlabError("the expression ends too early")
        self.i += 1
        return tok

    def expr(self) -> Fraction:
        x = self.term()
        while self.peek() in ("+", "-"):
            x = _bounded(x + self.term() if self.take() == "+" else x - self.term())
        return x

    def term(self) -> Fraction:
        x = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op, y = self.take(), self.unary()
            if op == "*":
                x = x * y
            elif y == 0:
                raise GptlabError("division by zero")
            elif op == "/":
                x = x / y
            elif op == "//":
                x = Fraction(x // y)
            else:
                x = x - y * (x // y)
            x = _bounded(x)
        return x

    def unary(self) -> Fraction:
        if self.peek() in ("-", "+"):
            sign = -1 if self.take() == "-" else 1
            return sign * self.nested(self.unary)
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() in ("^", "**"):
            self.take()
            exp = self.nested(self.unary)
            if exp.denominator != 1:
                raise GptlabError("only whole-number exponents give exact results")
            if abs(exp) > MAX_EXPONENT or (abs(base.numerator) > 1 and abs(exp) * max(
                    base.numerator.bit_length(), base.denominator.bit_length()) > MAX_DIGITS * 3.33):
                raise GptlabError(f"the power is too large (more than {MAX_DIGITS} digits)")
            if base == 0 and exp < 0:
                raise GptlabError("division by zero")
            return _bounded(base ** int(exp))
        return base

    def atom(self) -> Fraction:
        tok = self.take()
        if tok == "(":
            x = self.nested(self.expr)
            if self.take() != ")":
                raise GptlabError("a bracket is not closed")
            return x
        if tok[0].isdigit() or tok[0] == ".":
            if len(tok) > MAX_DIGITS:
                raise GptlabError(f"a number has more than {MAX_DIGITS} digits")
            return Fraction(tok)   # a decimal string is read exactly, never through a float
        raise GptlabError(f"expected a number, got {tok!r}")

    def nested(self, rule):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise GptlabError("the expression is nested too deeply")
        try:
            return rule()
        finally:
            self.depth -= 1


def evaluate(text: str) -> Fraction:
    """The exact value of an arithmetic expression; GptlabError saying what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise GptlabError("an empty expression")
    if len(text) > MAX_CHARS:
        raise GptlabError(f"the expression is longer than {MAX_CHARS} characters")
    p = _Parser(_tokens(text))
    x = p.expr()
    if p.peek() is not None:
        raise GptlabError(f"unexpected {p.peek()!r}")
    return x


def show(x: Fraction) -> str:
    """An integer as digits, a terminating decimal exactly, any other fraction as p/q and its decimal."""
    if x.denominator == 1:
        return str(x.numerator)
    d, twos, fives = x.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    sign = "-" if x < 0 else ""
    if d == 1:   # terminates: exactly max(twos, fives) decimal places
        places = max(twos, fives)
        digits = str(abs(x.numerator) * 10 ** places // x.denominator).rjust(places + 1, "0")
        return f"{sign}{digits[:-places]}.{digits[-places:]}"
    approx = abs(x.numerator) * 10 ** 12 // x.denominator
    whole, frac = divmod(approx, 10 ** 12)
    return f"{x.numerator}/{x.denominator} (about {sign}{whole}.{str(frac).rjust(12, '0').rstrip('0') or '0'})"


def calculate(arguments: dict, deadline: float = 0.0) -> str:
    return show(evaluate(arguments.get("expression", "")))


def calculator_tool():
    from gptlab.tools import Tool
    return Tool("calculator", "exact arithmetic",
                {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
                calculate)
