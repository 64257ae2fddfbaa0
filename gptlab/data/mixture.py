"""A generated multi-task pre-training corpus: tasks learned from plain text, as GPT-2/GPT-3 did.

Every example is one line, ``prompt + answer``, where the answer starts with a space (so a BPE model
sees " 81" exactly as in training when an eval stops the prompt before it):

===========  ====================================================  ==========================
family       line                                                  key (decides held-out)
===========  ====================================================  ==========================
add2, add3   ``23 + 58 = 81`` (2- or 3-digit operands)             "23,58" (sorted operands)
sub2, sub3   ``58 - 23 = 35`` (first >= second, answer >= 0)       "58,23"
mul2         ``12 * 34 = 408``                                     "12,34" (sorted operands)
en2zh        ``apple => 苹果``                                     "apple"
zh2en        ``苹果 => apple``                                     "apple"
cycle        ``rdenga = garden`` (letters rotated)                 "garden"
anagram1     ``gadren = garden`` (first and last letter kept)      "garden"
anagram2     ``gaedrn = garden`` (first two and last two kept)     "garden"
reverse      ``nedrag = garden``                                   "garden"
qa_math      ``Q: What is 12 plus 7? A: 19`` (plus, minus, times)  "plus,7,12"
qa_capital   ``Q: What is the capital of France? A: Paris``        "France"
qa_opposite  ``Q: What is the opposite of hot? A: cold``           "cold|hot" (both directions)
qa_letters   ``Q: How many letters are in the word cat? A: 3``     "cat"
qa_next      ``Q: What day comes after Monday? A: Tuesday``        "Monday" (also 0-999, months)
===========  ====================================================  ==========================

A document is 4-12 examples of one family, one per line, half the time preceded by a one-line task
description (``TASK_PROMPTS``); documents are separated by a blank line. Repeating a pattern inside
one context window is what lets a small model learn to continue it in context (few-shot).

Looking things up in the context is the other in-context skill the evals test (translation of words
the model never saw, from a dictionary in the prompt), so four kinds of document teach it:

* half the en2zh/zh2en documents carry a ``Dictionary: [桥 => bridge] [猫 => cat] ...`` line after the
  description, listing the document's pairs and three others, shuffled;
* ``lookup`` documents (one draw in ``len(FAMILIES) + 3``) pair Chinese words with made-up code
  words (or with real English words, never a word's own translation) at random:
  ``Dictionary: [桥 => vokter] ...`` then ``桥 => vokter`` (or the other way round).
  The mapping is new in every document, so copying from the dictionary is the only way to predict
  the answers; memorising translations cannot help. Dictionaries run from one entry up (the easy end);
* ``repeat`` documents (as often as ``lookup``) copy a line of made-up words after ``=>``:
  ``gobu lare kesi => gobu lare kesi``, the plainest lesson in copying (induction heads);
* ``lookup3`` documents (as often again, since v10) have three columns, ``Dictionary: [apple |
  vokter | 苹果] ...``, English, Chinese and a made-up word paired at random; every answer of the
  document comes from the same one of the two other columns, and no line says which, so only the
  answers already given do: reading the task from demonstrations, GPT-3's few-shot skill.

``wordop`` documents (v11; drawn ``DEFAULT_WEIGHTS`` = 4 times as often as one family) teach the
same skill on the word itself: every line applies one string operation, drawn per document and
named nowhere (no description line), ``garden -> GARDEN`` (upper), ``garden -> nedrag`` (reverse),
``garden -> g`` (first letter), ``garden -> n`` (last letter). The eval tasks ``icl_upper`` ...
``icl_last`` (gptlab/evals/tasks.py) ask ``word ->`` of held-out words: zero-shot a model can only
guess the operation; the demonstrations say which.

Held-out split: ``is_heldout(family, key)`` hashes the key (blake2b, not Python's salted hash), so
membership is the same on every machine and for every seed. Families that share a key space share
the decision: a held-out dictionary word is absent from both en2zh and zh2en, and a held-out word
is absent from all four unscrambling families. The corpus never contains a held-out item: no
held-out arithmetic problem, no held-out word next to its translation (the words themselves occur,
paired at random in ``lookup`` documents, so they are ordinary tokens to copy; since v9), no
held-out unscrambling word (the ``wordop`` documents share that split). The eval harness draws its questions from ``heldout_items``.

The corpus is a pure function of (seed, n_lines): ``random.Random(seed)`` drives every choice.
"""
from __future__ import annotations

import hashlib
import random
import re
import sys
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gptlab.data.dictionary import CAPITALS, EN_ZH, OPPOSITES, WORDS
from gptlab.errors import GptlabError
from gptlab.io import atomic_write_text, gptlab_home

DEFAULT_SEED = 0
DEFAULT_LINES = 150_000
MIXTURE_VERSION = 11
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]


@dataclass(frozen=True)
class _Family:
    description: str
    prompts: tuple[str, ...]       # task description lines that may open a document
    namespace: str                 # families with the same namespace share held-out decisions
    fraction: float                # share of keys held out
    make: Callable[[str, random.Random], dict]   # key -> item fields (may use rng, e.g. to scramble)
    render: Callable[[dict], tuple[str, str]]    # item fields -> (prompt, answer)
    keys: Callable[[], list[str]] | None = None  # the whole key space when small enough to list
    sample: Callable[[random.Random], str] | None = None  # a random key, for large key spaces


# ----- arithmetic ----------------------------------------------------------------------------------
def _arith(op: str, digits: int, commutative: bool) -> dict:
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1

    def sample(rng: random.Random) -> str:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        a, b = (min(a, b), max(a, b)) if commutative else (max(a, b), min(a, b))
        return f"{a},{b}"

    def make(key: str, rng: random.Random) -> dict:
        a, b = map(int, key.split(","))
        if commutative and rng.random() < 0.5:
            a, b = b, a  # the key is unordered; show both orders
        return {"a": a, "b": b, "op": op}

    return {"sample": sample, "make": make, "render": _render_arith}


def _calc(op: str, a: int, b: int) -> int:
    return a + b if op in ("+", "plus") else a - b if op in ("-", "minus") else a * b


def _render_arith(it: dict) -> tuple[str, str]:
    return f"{it['a']} {it['op']} {it['b']} =", f" {_calc(it['op'], it['a'], it['b'])}"


# ----- translation ---------------------------------------------------------------------------------
def _make_dict(key: str, rng: random.Random) -> dict:
    return {"en": key, "zh": EN_ZH[key]}


# ----- unscrambling --------------------------------------------------------------------------------
def _scramble(kind: str) -> Callable[[str, random.Random], dict]:
    def make(word: str, rng: random.Random) -> dict:
        if kind == "reverse":
            s = word[::-1]
        elif kind == "cycle":
            r = rng.randint(1, len(word) - 1)
            s = word[r:] + word[:r]
        else:
            keep = 1 if kind == "anagram1" else 2
            middle = list(word[keep:-keep])
            s = word
            while s == word:  # the word lists guarantee the middle has two different letters
                rng.shuffle(middle)
                s = word[:keep] + "".join(middle) + word[-keep:]
        return {"word": word, "scrambled": s}
    return make


def _words_for(kind: str) -> list[str]:
    def ok(w: str) -> bool:
        if kind == "reverse":
            return len(w) >= 3 and w != w[::-1]
        if kind == "cycle":
            return 4 <= len(w) and len(set(w)) > 1
        keep = 1 if kind == "anagram1" else 2
        return len(w) >= 2 * keep + 2 and len(set(w[keep:-keep])) > 1
    return [w for w in WORDS if ok(w)]


# ----- question / answer ---------------------------------------------------------------------------
def _qa_math_keys() -> list[str]:
    keys = [f"plus,{a},{b}" for a in range(51) for b in range(a, 51)]
    keys += [f"minus,{a},{b}" for a in range(51) for b in range(a + 1)]
    keys += [f"times,{a},{b}" for a in range(13) for b in range(a, 13)]
    return keys


def _make_qa_math(key: str, rng: random.Random) -> dict:
    op, a, b = key.split(",")
    a, b = int(a), int(b)
    if op == "minus":
        a, b = max(a, b), min(a, b)
    elif rng.random() < 0.5:
        a, b = b, a
    return {"op": op, "a": a, "b": b}


def _make_opposite(key: str, rng: random.Random) -> dict:
    x, y = key.split("|")
    if rng.random() < 0.5:
        x, y = y, x
    return {"word": x, "opposite": y}


def _next_keys() -> list[str]:
    return [str(i) for i in range(1000)] + _DAYS + _MONTHS


def _render_next(it: dict) -> tuple[str, str]:
    k = it["key"]
    if k in _DAYS:
        return f"Q: What day comes after {k}? A:", " " + _DAYS[(_DAYS.index(k) + 1) % 7]
    if k in _MONTHS:
        return f"Q: What month comes after {k}? A:", " " + _MONTHS[(_MONTHS.index(k) + 1) % 12]
    return f"Q: What number comes after {k}? A:", f" {int(k) + 1}"


_ADD = ("Add the numbers.", "Addition:", "Compute each sum.")
_SUB = ("Subtract the second number from the first.", "Subtraction:")
_UNSCRAMBLE = "Unscramble the letters into a word:"
_QA = ("Answer each question.", "Questions and answers:")

_SPECS: dict[str, _Family] = {
    "add2": _Family("2-digit addition: 23 + 58 = 81", _ADD, "add2", 0.1, **_arith("+", 2, True)),
    "add3": _Family("3-digit addition: 123 + 458 = 581", _ADD, "add3", 0.1, **_arith("+", 3, True)),
    "sub2": _Family("2-digit subtraction: 58 - 23 = 35", _SUB, "sub2", 0.1, **_arith("-", 2, False)),
    "sub3": _Family("3-digit subtraction: 458 - 123 = 335", _SUB, "sub3", 0.1,
                    **_arith("-", 3, False)),
    "mul2": _Family("2-digit multiplication: 12 * 34 = 408", ("Multiply the numbers.",
                    "Multiplication:"), "mul2", 0.1, **_arith("*", 2, True)),
    "en2zh": _Family("English to Chinese word translation: apple => 苹果",
                     ("Translate English to Chinese:", "English => Chinese"), "dict", 0.2,
                     _make_dict, lambda it: (f"{it['en']} =>", f" {it['zh']}"),
                     keys=lambda: sorted(EN_ZH)),
    "zh2en": _Family("Chinese to English word translation: 苹果 => apple",
                     ("Translate Chinese to English:", "Chinese => English"), "dict", 0.2,
                     _make_dict, lambda it: (f"{it['zh']} =>", f" {it['en']}"),
                     keys=lambda: sorted(EN_ZH)),
    "cycle": _Family("cycled letters: rdenga = garden",
                     (_UNSCRAMBLE, "The letters of each word were rotated. Write the word:"),
                     "word", 0.2, _scramble("cycle"), lambda it: (f"{it['scrambled']} =",
                     f" {it['word']}"), keys=lambda: _words_for("cycle")),
    "anagram1": _Family("anagram keeping the first and last letter: gadren = garden",
                        (_UNSCRAMBLE, "Unscramble each word; its first and last letters are in place:"),
                        "word", 0.2, _scramble("anagram1"), lambda it: (f"{it['scrambled']} =",
                        f" {it['word']}"), keys=lambda: _words_for("anagram1")),
    "anagram2": _Family("anagram keeping the first two and last two letters: gaedrn = garden",
                        (_UNSCRAMBLE, "Unscramble each word; its first two and last two letters "
                         "are in place:"), "word", 0.2, _scramble("anagram2"),
                        lambda it: (f"{it['scrambled']} =", f" {it['word']}"),
                        keys=lambda: _words_for("anagram2")),
    "reverse": _Family("reversed words: nedrag = garden",
                       ("Each word is spelled backwards. Write the word:", "Reverse the letters:"),
                       "word", 0.2, _scramble("reverse"), lambda it: (f"{it['scrambled']} =",
                       f" {it['word']}"), keys=lambda: _words_for("reverse")),
    "qa_math": _Family("arithmetic questions: Q: What is 12 plus 7? A: 19", _QA, "qa_math", 0.1,
                       _make_qa_math, lambda it: (f"Q: What is {it['a']} {it['op']} {it['b']}? A:",
                       f" {_calc(it['op'], it['a'], it['b'])}"), keys=_qa_math_keys),
    "qa_capital": _Family("capital cities: Q: What is the capital of France? A: Paris", _QA,
                          "capital", 0.2, lambda k, rng: {"country": k, "capital": CAPITALS[k]},
                          lambda it: (f"Q: What is the capital of {it['country']}? A:",
                                      f" {it['capital']}"), keys=lambda: sorted(CAPITALS)),
    "qa_opposite": _Family("opposites: Q: What is the opposite of hot? A: cold", _QA, "opposite",
                           0.2, _make_opposite, lambda it: (f"Q: What is the opposite of "
                           f"{it['word']}? A:", f" {it['opposite']}"),
                           keys=lambda: sorted("|".join(sorted(p)) for p in OPPOSITES)),
    "qa_letters": _Family("word length: Q: How many letters are in the word cat? A: 3", _QA,
                          "letters", 0.2, lambda k, rng: {"word": k},
                          lambda it: (f"Q: How many letters are in the word {it['word']}? A:",
                                      f" {len(it['word'])}"), keys=lambda: list(WORDS)),
    "qa_next": _Family("successors: Q: What day comes after Monday? A: Tuesday", _QA, "next", 0.1,
                       lambda k, rng: {}, _render_next, keys=_next_keys),
}

FAMILIES: dict[str, str] = {name: spec.description for name, spec in _SPECS.items()}
TASK_PROMPTS: dict[str, tuple[str, ...]] = {name: spec.prompts for name, spec in _SPECS.items()}


def _spec(family: str) -> _Family:
    if family not in _SPECS:
        raise GptlabError(f"unknown mixture family {family!r} (choose from {', '.join(_SPECS)})")
    return _SPECS[family]


_KEY_CACHE: dict[str, list[str]] = {}


def _keys(family: str) -> list[str] | None:
    spec = _spec(family)
    if spec.keys is None:
        return None
    if family not in _KEY_CACHE:
        _KEY_CACHE[family] = spec.keys()
    return _KEY_CACHE[family]


def is_heldout(family: str, key: str) -> bool:
    """Whether ``key`` belongs to the held-out split of ``family`` (same answer everywhere)."""
    spec = _spec(family)
    h = hashlib.blake2b(f"{spec.namespace}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") < spec.fraction * 2 ** 64


def format_example(family: str, item: dict) -> tuple[str, str]:
    """(prompt, answer) of an item; the corpus line is ``prompt + answer``."""
    return _spec(family).render(item)


def _item(family: str, key: str, rng: random.Random) -> dict:
    item = {"family": family, "key": key, **_spec(family).make(key, rng)}
    item["prompt"], item["answer"] = format_example(family, item)
    return item


def _items(family: str, n: int, seed: int, heldout: bool) -> list[dict]:
    """Up to ``n`` items with distinct keys on one side of the split (fewer if the side is small)."""
    rng = random.Random(f"{family}:{seed}:{heldout}")
    keys = _keys(family)
    if keys is not None:
        chosen = [k for k in keys if is_heldout(family, k) == heldout]
        rng.shuffle(chosen)
        chosen = chosen[:n]
    else:
        seen: set[str] = set()
        chosen = []
        for _ in range(200 * n + 10_000):  # bounded: a side may hold fewer than n keys
            if len(chosen) >= n:
                break
            k = _spec(family).sample(rng)
            if k not in seen and is_heldout(family, k) == heldout:
                seen.add(k)
                chosen.append(k)
    return [_item(family, k, rng) for k in chosen]


def heldout_items(family: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` held-out items (fewer when the held-out side is smaller), deterministic in ``seed``.

    Each item has 'family', 'key', 'prompt', 'answer' and the family's raw fields ('a', 'b', 'op';
    'en', 'zh'; 'word', 'scrambled'; 'country', 'capital'; ...).
    """
    return _items(family, n, seed, heldout=True)


def train_items(family: str, n: int, seed: int = 0) -> list[dict]:
    """Like ``heldout_items`` but from the training side (e.g. for few-shot demonstrations)."""
    return _items(family, n, seed, heldout=False)


def _sample_train_key(family: str, rng: random.Random) -> str:
    keys, spec = _keys(family), _spec(family)
    while True:
        k = rng.choice(keys) if keys is not None else spec.sample(rng)
        if not is_heldout(family, k):
            return k


# ----- in-context lookup ---------------------------------------------------------------------------
LOOKUP = "lookup"
_LOOKUP_PROMPTS = ("Use the dictionary:", "Look each word up in the dictionary:")
LOOKUP_DESCRIPTION = _LOOKUP_PROMPTS[0]
_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwz", "aeiou"


def dictionary_pair(family: str, item: dict) -> tuple[str, str]:
    """(source word, its translation) of an en2zh or zh2en item, in the family's direction."""
    return (item["en"], item["zh"]) if family == "en2zh" else (item["zh"], item["en"])


def dictionary_line(pairs: list[tuple[str, str]]) -> str:
    """The one-line dictionary of translation prompts (the eval harness writes the same form)."""
    # Each entry is written in the query's own form ("桥 => bridge"), so the answer is whatever
    # followed an earlier copy of the query: the pattern an induction head copies (mixture v2 wrote
    # "桥 = bridge", which a 4-layer model never learned to use; docs/EVALS.md). Entries sit in
    # brackets, not after ", ": byte-level BPE glues a leading space to a word (" 猫" is two byte
    # tokens where a line-initial "猫" is one), so "..., 猫 => cat" and the query line "猫 =>"
    # would not share tokens; "[猫 => cat]" and "猫 =>" do (mixture v4).
    return "Dictionary: " + " ".join(f"[{src} => {tgt}]" for src, tgt in pairs)


def parse_dictionary_line(line: str) -> list[tuple[str, ...]]:
    """The entries of a ``dictionary_line`` (source, target) or a ``dictionary3_line`` (3 columns)."""
    return [tuple(re.split(r" => | \| ", e)) for e in re.findall(r"\[([^\]]*)\]", line)]


@lru_cache(maxsize=1)
def _lookup_words() -> tuple[list[str], list[str]]:
    """(English, Chinese) words that look-up documents pair at random: every dictionary-table word,
    held-out ones included, plus English words without a translation (not held out from
    unscrambling).

    Held-out table words appear here, never next to their translation (``_lookup_document`` skips
    true pairs), so their translation stays unknown while the words themselves are ordinary tokens
    to copy. Mixture v8 left them out, and a model then almost never produced a held-out word after
    ``=>``: it copied 60-70% of random real words from a dictionary but only 18-31% of table words.
    """
    en = sorted(set(w for w in WORDS if w not in EN_ZH and not is_heldout("cycle", w)) | set(EN_ZH))
    return en, sorted(set(EN_ZH.values()))


def code_word(rng: random.Random) -> str:
    """A pronounceable made-up word (consonant-vowel syllables), e.g. 'vokter'."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def _lookup_document(rng: random.Random, k: int) -> list[str]:
    """A dictionary with a fresh random mapping, then ``k`` lines answered from it.

    Dictionaries range from one entry to ``k + 3``. The small ones are the easy end of a curriculum:
    with one or two entries, "copy what followed ``=>`` earlier" already predicts the answer, a
    plain induction head, which a tiny model learns; matching the queried word among many entries
    builds on it. Dictionaries of 7-15 entries alone (mixture v4) taught a 4-layer model nothing in
    12M tokens (docs/EVALS.md). Queries repeat when there are fewer entries than lines.
    """
    en_words, zh_pool = _lookup_words()
    n = rng.randint(1, k + 3)
    zh_words = rng.sample(zh_pool, n)
    to_code = rng.random() < 0.5    # Chinese -> code word, else the other way round
    # Half the documents pair the Chinese words with real English words (a fresh pairing each
    # document, never a word's true translation, so no answer is ever memorised): a model that had
    # only seen made-up words copied those, yet answered a translation prompt about a real word from
    # memory. Drawn without repeats: two entries for one word would make its answer ambiguous.
    if rng.random() < 0.5:
        other = [w if EN_ZH.get(w) != zh else code_word(rng)
                 for w, zh in zip(rng.sample(en_words, n), zh_words)]
    else:
        other = [code_word(rng) for _ in zh_words]
    # Entries keyed by either side are unique (a repeated code word is dropped with its pair).
    pairs = list({o: (z, o) for z, o in zip(zh_words, other)}.values())
    if not to_code:
        pairs = [(o, z) for z, o in pairs]
    queries = pairs[:k] if len(pairs) >= k else [rng.choice(pairs) for _ in range(k)]
    rng.shuffle(pairs)
    # Half the headed documents say "translate": a model that learned to copy only under "Use the
    # dictionary:" still answered translation prompts from memory, and so never translated a held-out
    # word. Under these headers too, the dictionary is the authority.
    heads = _LOOKUP_PROMPTS + TASK_PROMPTS["zh2en" if to_code else "en2zh"]
    lines = [rng.choice(heads)] if rng.random() < 0.5 else []
    return lines + [dictionary_line(pairs)] + [f"{src} => {tgt}" for src, tgt in queries]


REPEAT = "repeat"
_REPEAT_PROMPTS = ("Repeat the words:", "Say it again:")


def _repeat_document(rng: random.Random, k: int) -> list[str]:
    """``k`` lines ``gobu lare kesi => gobu lare kesi`` of fresh made-up words.

    Copying is the skill under in-context look-up, and a repeated random sequence is the plainest
    lesson in it: every token of the second half is predictable only by finding its earlier copy
    (an induction head). A tiny model trained without such lines showed no induction at all: its
    loss on the second copy of a repeated random token sequence was no lower than on the first.
    """
    lines = [rng.choice(_REPEAT_PROMPTS)] if rng.random() < 0.5 else []
    for _ in range(k):
        words = " ".join(code_word(rng) for _ in range(rng.randint(2, 6)))
        lines.append(f"{words} => {words}")
    return lines


LOOKUP3 = "lookup3"


def dictionary3_line(entries: list[tuple[str, str, str]]) -> str:
    """A three-column dictionary line, ``Dictionary: [apple | 苹果 | vokter] ...``: the query's word
    first (bracketed, so its tokens match a line-initial query), then two translations."""
    return "Dictionary: " + " ".join(f"[{a} | {b} | {c}]" for a, b, c in entries)


def _lookup3_document(rng: random.Random, k: int) -> list[str]:
    """A three-column dictionary (English, Chinese and a made-up word, paired at random), then
    ``k`` lines that look words up and answer with ONE of the two other columns, the same one all
    document long. No line says which: only the answers already given do.

    This is the in-context skill GPT-3's few-shot evaluations rest on, reading the task from the
    demonstrations: the first answer of a document is a coin flip, every later one is determined
    by the earlier ones. Two-column look-ups (``lookup``) cannot teach it, because the dictionary
    alone says what the answer is, so demonstrations carry no information (docs/EVALS.md a4).
    Pairings are fresh per document and never a word's true translation, as in ``lookup``.
    """
    en_words, zh_pool = _lookup_words()
    n = rng.randint(1, k + 3)
    zh_words = rng.sample(zh_pool, n)
    en = [w if EN_ZH.get(w) != zh else code_word(rng)
          for w, zh in zip(rng.sample(en_words, n), zh_words)]
    codes = [code_word(rng) for _ in range(n)]
    rows = list({(e, c): (e, z, c) for e, z, c in zip(en, zh_words, codes)}.values())
    rows = list({r[0]: r for r in rows}.values())          # one entry per English word
    rows = list({r[2]: r for r in rows}.values())          # and per code word
    src = rng.randrange(2)                                 # 0: English first, 1: Chinese first
    others = [1 - src, 2]
    rng.shuffle(others)                                    # column order is fixed per document
    target = rng.choice(others)                            # the column every answer comes from
    entries = [(r[src], r[others[0]], r[others[1]]) for r in rows]
    answers = {r[src]: r[target] for r in rows}
    queries = [e[0] for e in entries[:k]] if len(entries) >= k else \
        [rng.choice(entries)[0] for _ in range(k)]
    rng.shuffle(entries)
    return [dictionary3_line(entries)] + [f"{q} => {answers[q]}" for q in queries]


WORDOP = "wordop"
# One string operation per ``wordop`` document; the eval tasks are named ``icl_`` + the key.
WORD_OPS: dict[str, Callable[[str], str]] = {
    "upper": str.upper,                   # garden -> GARDEN
    "reverse": lambda w: w[::-1],         # garden -> nedrag
    "first": lambda w: w[0],              # garden -> g
    "last": lambda w: w[-1],              # garden -> n
}


def wordop_example(op: str, word: str) -> tuple[str, str]:
    """(prompt, answer) of one ``wordop`` line, ``garden -> GARDEN``."""
    return f"{word} ->", f" {WORD_OPS[op](word)}"


def _distinct_under_ops(w: str) -> bool:
    # Every operation gives a different answer (no palindromes, first letter != last letter), so an
    # answer tells which operation it applies and a query is never right by a coincidence of two ops.
    return len(w) >= 3 and w[0] != w[-1] and w != w[::-1]


@lru_cache(maxsize=2)
def wordop_words(heldout: bool) -> list[str]:
    """Real words on one side of the unscrambling families' held-out split (namespace "word"):
    the training side appears in ``wordop`` documents, the held-out side only in evals."""
    return [w for w in WORDS if _distinct_under_ops(w) and is_heldout("cycle", w) == heldout]


def _wordop_document(rng: random.Random, k: int) -> list[str]:
    """``k`` lines ``garden -> GARDEN`` that all apply the same operation, drawn per document, with
    no line saying which: the first answer is a guess, every later one is determined by the earlier
    ones (the in-context skill GPT-3's few-shot evaluations rest on, as in ``lookup3``, but on the
    word itself rather than a dictionary). Words are training-side real words or made-up ones, so
    the operation, not a memorised answer, is what predicts each line.
    """
    op = rng.choice(list(WORD_OPS))
    words = wordop_words(False)
    lines = []
    for _ in range(k):
        w = rng.choice(words) if rng.random() < 0.5 else code_word(rng)
        while not _distinct_under_ops(w):
            w = code_word(rng)
        lines.append("".join(wordop_example(op, w)))
    return lines


# Document kinds besides the _SPECS families (no items, no held-out split): name -> (rng, k) -> lines.
_EXTRA_DOCUMENTS = {LOOKUP: _lookup_document, REPEAT: _repeat_document, LOOKUP3: _lookup3_document,
                    WORDOP: _wordop_document}
EXTRA_FAMILIES = tuple(_EXTRA_DOCUMENTS)
# Relative weights when none are given (every other kind: 1). ``wordop`` documents are drawn more
# often: a small model needs several thousand of them to read four operations from demonstrations.
DEFAULT_WEIGHTS: dict[str, float] = {WORDOP: 4.0}


def parse_weights(spec: str | None) -> dict[str, float] | None:
    """``"lookup=4,add2=2"`` -> {family: weight}; unnamed families keep their default weight
    (``DEFAULT_WEIGHTS``, else 1). None/"" -> None."""
    if not spec:
        return None
    known = list(_SPECS) + list(EXTRA_FAMILIES)
    weights = {}
    for part in spec.split(","):
        name, _, value = part.strip().partition("=")
        if name not in known:
            raise GptlabError(f"--weights: unknown family {name!r} (choose from {', '.join(known)})")
        try:
            w = float(value)
        except ValueError:
            raise GptlabError(f"--weights: {part.strip()!r} is not NAME=NUMBER") from None
        if not (w >= 0 and w < float("inf")):
            raise GptlabError(f"--weights: the weight of {name} must be a non-negative number")
        weights[name] = w
    if not any(weights.get(n, DEFAULT_WEIGHTS.get(n, 1.0)) > 0 for n in known):
        raise GptlabError("--weights: at least one family needs a positive weight")
    return weights


def generate_documents(seed: int = DEFAULT_SEED, n_lines: int = DEFAULT_LINES,
                       weights: dict[str, float] | None = None):
    """Yield documents (str, lines joined by newlines) until ``n_lines`` example lines are out.

    ``weights`` (family -> relative weight; unnamed ones keep ``DEFAULT_WEIGHTS``, else 1) skews
    how often each kind of document is drawn, e.g. more look-up documents to teach copying.
    """
    rng = random.Random(seed)
    names = list(_SPECS) + list(EXTRA_FAMILIES)
    odds = [(weights or {}).get(n, DEFAULT_WEIGHTS.get(n, 1.0)) for n in names]
    done = 0
    while done < n_lines:
        family = rng.choices(names, odds)[0]
        k = min(rng.randint(4, 12), n_lines - done)
        done += k
        if family in _EXTRA_DOCUMENTS:
            yield "\n".join(_EXTRA_DOCUMENTS[family](rng, k))
            continue
        lines = [rng.choice(_SPECS[family].prompts)] if rng.random() < 0.5 else []
        items = [_item(family, _sample_train_key(family, rng), rng) for _ in range(k)]
        if family in ("en2zh", "zh2en") and rng.random() < 0.5:
            extra = [_item(family, _sample_train_key(family, rng), rng) for _ in range(3)]
            pairs = list(dict.fromkeys(dictionary_pair(family, it) for it in items + extra))
            rng.shuffle(pairs)
            lines.append(dictionary_line(pairs))
        lines += [it["prompt"] + it["answer"] for it in items]
        yield "\n".join(lines)


def mixture_path(seed: int = DEFAULT_SEED, n_lines: int = DEFAULT_LINES,
                 out_dir: str | Path | None = None, weights: dict[str, float] | None = None) -> Path:
    """Where ``write_mixture`` puts a corpus; the name encodes everything its content depends on."""
    folder = Path(out_dir) if out_dir else gptlab_home() / "mixture"
    suffix = "" if n_lines == DEFAULT_LINES else f"_lines{n_lines}"
    if weights:
        spec = ",".join(f"{k}={v:g}" for k, v in sorted(weights.items()))
        suffix += "_w" + hashlib.blake2b(spec.encode(), digest_size=4).hexdigest()
    # The version changes whenever the generator does, so a cached corpus is never stale.
    return folder / f"mixture_v{MIXTURE_VERSION}_seed{seed}{suffix}.txt"


def write_mixture(out_dir: str | Path | None = None, seed: int = DEFAULT_SEED,
                  n_lines: int = DEFAULT_LINES, weights: dict[str, float] | None = None) -> Path:
    """Generate the corpus and write it atomically; returns its path."""
    if n_lines < 1:
        raise GptlabError(f"--lines must be at least 1, got {n_lines}")
    path = mixture_path(seed, n_lines, out_dir, weights)
    atomic_write_text(path, "\n\n".join(generate_documents(seed, n_lines, weights)) + "\n")
    return path


def ensure_mixture(seed: int = DEFAULT_SEED, n_lines: int = DEFAULT_LINES) -> Path:
    """The default corpus path, generated first if missing (used by ``--data mixture``)."""
    path = mixture_path(seed, n_lines)
    if not path.is_file():
        print(f"generating the task mixture (seed {seed}) into {path}...", file=sys.stderr)
        write_mixture(None, seed, n_lines)
    return path
