"""Eval tasks: built-in ones from held-out data, and user tasks from JSONL files.

A task is a list of query items plus a pool of demonstration items, all from the HELD-OUT side of
the data (never seen in pre-training). Three kinds:

* ``gen``   greedy generation, exact match after stripping whitespace (arithmetic, unscrambling,
            dictionary translation, string operations named only by demonstrations, any mixture
            family, user ``{"prompt", "answer"}`` files);
* ``mc``    multiple choice by the likelihood of each continuation (Shakespeare last-word cloze,
            user ``{"question", "choices", "answer"}`` files);
* ``blank`` one word inside a line is blanked; each candidate word is put in its place and the whole
            line is scored (GPT: sentence log-likelihood; BERT: pseudo-likelihood of the word).

Every item is one line of text, ``prompt + answer (+ right)``, in the pre-training mixture's format,
so a demonstration is exactly such a line and the query is the same line cut before the answer.

Held-out Shakespeare: the last 5% of the corpus (works in the order ``--data shakespeare`` reads
them), which lies inside the validation tail that ``gptlab pretrain`` holds out by default (10%).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gptlab.data.mixture import LOOKUP, WORD_OPS
from gptlab.errors import GptlabError
from gptlab.io import iter_jsonl

ARITHMETIC = ("add2", "add3", "sub2", "sub3")
UNSCRAMBLE = ("cycle", "anagram1", "anagram2", "reverse")
TRANSLATE = ("en2zh", "zh2en")
TRILINGUAL_PREFIX = "dict3_"
TRANSLATE3 = tuple(TRILINGUAL_PREFIX + f for f in TRANSLATE)
WORDOP_PREFIX = "icl_"
WORDOP_TASKS = tuple(WORDOP_PREFIX + op for op in WORD_OPS)
GROUPS = {
    "arithmetic": ARITHMETIC,
    "unscramble": UNSCRAMBLE,
    "translate": TRANSLATE,
    "translate3": TRANSLATE3,
    "icl": WORDOP_TASKS,
    "all": ARITHMETIC + UNSCRAMBLE + TRANSLATE + WORDOP_TASKS + ("cloze",),
}
SHAKESPEARE_HELDOUT_FRACTION = 0.05
DICT_ENTRIES = 8         # pairs in a translation prompt's dictionary (more at k > 7): query, demos, distractors


@dataclass
class Item:
    key: str                          # identity: a demonstration never has the query's key
    prompt: str                       # the line up to the answer (mc/gen) or up to the blank (blank)
    answer: str                       # gold continuation, e.g. " 81"
    choices: list[str] | None = None  # mc/blank: candidate continuations / words (with their space)
    label: int | None = None          # index of the right choice
    right: str = ""                   # blank: the rest of the line after the word
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        """The item as a complete demonstration line."""
        return self.prompt + self.answer + self.right


@dataclass
class Task:
    name: str
    kind: str                                   # "gen" | "mc" | "blank"
    items: list[Item]                           # queries
    pool: list[Item]                            # demonstrations are drawn from here (query excluded)
    description: str | None = None              # the optional task description line
    max_new_tokens: int = 16
    # Extra context lines built from the query and its demonstrations (the dictionary of translation).
    context: Callable[[Item, list[Item]], str | None] | None = None


# ----- prompt construction -------------------------------------------------------------------------
def prompt_prefix(task: Task, item: Item, demos: list[Item], description: bool = True) -> str:
    """Everything before the query line: description, context, demonstrations (each ending in \\n)."""
    lines = []
    if description and task.description:
        lines.append(task.description)
    if task.context is not None:
        ctx = task.context(item, demos)
        if ctx:
            lines.append(ctx)
    lines.extend(d.line() for d in demos)
    return "".join(line + "\n" for line in lines)


def build_prompt(task: Task, item: Item, demos: list[Item], description: bool = True) -> str:
    """The GPT-3 prompt: [description] [context] k demonstration lines, then the query (no answer)."""
    return prompt_prefix(task, item, demos, description) + item.prompt


def choose_demos(task: Task, k_max: int, seed: int) -> list[list[Item]]:
    """For each query, an ordered list of up to ``k_max`` demonstrations from the pool, never sharing
    the query's key. A k-shot prompt uses the first k, so prompts for different k are nested."""
    out = []
    for i, item in enumerate(task.items):
        rng = random.Random(f"{task.name}:{seed}:{i}:{item.key}")
        candidates = [d for d in task.pool if d.key != item.key]
        out.append(rng.sample(candidates, min(k_max, len(candidates))))
    return out


# ----- built-in tasks ------------------------------------------------------------------------------
def _mixture_items(family: str, n: int, seed: int) -> tuple[list[Item], list[Item]]:
    from gptlab.data.mixture import heldout_items
    raw = heldout_items(family, n + 64, seed)
    items = [Item(key=r["key"], prompt=r["prompt"], answer=r["answer"], extra=r) for r in raw]
    return items[:n], items


def _dictionary_context(pair_of: Callable[[dict], tuple], line: Callable[[list], str] | None = None,
                        order: Callable[[Item, tuple], tuple] | None = None):
    """A one-line dictionary listing the query's pair, every demonstration's pair and a few others;
    ``pair_of(item.extra)`` gives an item's entry, (source, target) by default, written by ``line``
    (``dictionary_line``); ``order(query, entry)`` may rearrange each entry's columns."""
    from gptlab.data.mixture import dictionary_line
    line = line or dictionary_line

    def context(item: Item, demos: list[Item]) -> str:
        # The same number of entries at every k (distractors fill what demonstrations leave), so
        # adding shots adds demonstrations only, not a longer dictionary to search.
        size = max(DICT_ENTRIES, 1 + len(demos))
        seen, pairs = set(), []
        for e in [item] + list(demos) + list(item.extra.get("distractors", [])):
            if len(pairs) == size:
                break
            if e.key in seen:
                continue
            seen.add(e.key)
            entry = pair_of(e.extra)
            pairs.append(order(item, entry) if order else entry)
        random.Random(f"dict:{item.key}:{len(demos)}").shuffle(pairs)
        return line(pairs)
    return context


def _add_distractors(pool: list[Item], name: str, seed: int) -> None:
    rng = random.Random(f"distractors:{name}:{seed}")
    for it in pool:
        others = [p for p in pool if p.key != it.key]
        it.extra["distractors"] = rng.sample(others, min(DICT_ENTRIES, len(others)))


def lookup_task(n: int, seed: int) -> Task:
    """In-context look-up in its purest form: Chinese words paired with made-up code words
    (``桥 => vokter``), the pairing drawn afresh for this task, so nothing memorised in pre-training
    can answer and copying from the prompt's dictionary is the only way (the mixture's ``lookup``
    documents train exactly this)."""
    from gptlab.data.dictionary import EN_ZH
    from gptlab.data.mixture import LOOKUP_DESCRIPTION, code_word
    rng = random.Random(f"lookup:{seed}")
    zh_words = sorted(set(EN_ZH.values()))
    rng.shuffle(zh_words)
    codes: set[str] = set()
    pool = []
    for zh in zh_words[:n + 64]:
        code = code_word(rng)
        while code in codes:
            code = code_word(rng)
        codes.add(code)
        pool.append(Item(key=zh, prompt=f"{zh} =>", answer=f" {code}", extra={"zh": zh, "code": code}))
    _add_distractors(pool, LOOKUP, seed)
    return Task(LOOKUP, "gen", pool[:n], pool, description=LOOKUP_DESCRIPTION, max_new_tokens=16,
                context=_dictionary_context(lambda x: (x["zh"], x["code"])))


def mixture_task(family: str, n: int, seed: int) -> Task:
    from gptlab.data.mixture import FAMILIES, TASK_PROMPTS, dictionary_pair
    if family not in FAMILIES:
        raise GptlabError(f"unknown task {family!r}")
    items, pool = _mixture_items(family, n, seed)
    context = None
    if family in TRANSLATE:
        # A held-out word's translation was never in pre-training (the word itself only in random
        # look-up pairings): the model can only answer by looking the word up in the dictionary
        # line of the prompt, which is what in-context translation tests.
        _add_distractors(pool, family, seed)
        context = _dictionary_context(lambda extra: dictionary_pair(family, extra))
    longest = max(len(it.answer) for it in pool)
    return Task(family, "gen", items, pool, description=TASK_PROMPTS[family][0],
                max_new_tokens=min(48, 4 * longest + 4), context=context)


def trilingual_task(family: str, n: int, seed: int) -> Task:
    """Dictionary translation where only the demonstrations say what is asked (``dict3_en2zh``,
    ``dict3_zh2en``).

    The prompt's dictionary has three columns, ``[apple | 苹果 | vokter]``: the query's word, its
    translation and a made-up word, the last two in an order drawn once per query. The query
    ``apple =>`` asks for the translation, but nothing in a zero-shot prompt says so (there is no
    description line): which column to answer from is the task, and only demonstrations
    (``banana => 香蕉``) show it, as in the mixture's ``lookup3`` documents. A model that reads
    the task from its demonstrations rises from a guess at k = 0 (at best a coin flip between two
    columns it can copy) towards its look-up accuracy; the held-out words are the ``en2zh``/``zh2en``
    ones, never seen next to their translation.
    """
    from gptlab.data.mixture import code_word, dictionary_pair, dictionary3_line
    name = TRILINGUAL_PREFIX + family
    items, pool = _mixture_items(family, n, seed)
    rng = random.Random(f"{name}:{seed}")
    codes: set[str] = set()
    for it in pool:
        code = code_word(rng)
        while code in codes:
            code = code_word(rng)
        codes.add(code)
        it.extra["code"] = code
    _add_distractors(pool, name, seed)

    def order(query: Item, entry: tuple) -> tuple:
        # One column order per query, the same at every k, so prompts for different k differ
        # only in their demonstrations.
        swap = random.Random(f"cols:{name}:{seed}:{query.key}").random() < 0.5
        return (entry[0], entry[2], entry[1]) if swap else entry

    longest = max(len(it.answer) for it in pool)
    return Task(name, "gen", items, pool, description=None, max_new_tokens=min(48, 4 * longest + 4),
                context=_dictionary_context(lambda x: (*dictionary_pair(family, x), x["code"]),
                                            dictionary3_line, order))


def wordop_task(op: str, n: int, seed: int) -> Task:
    """A string operation that only the demonstrations name (``icl_upper``, ``icl_reverse``,
    ``icl_first``, ``icl_last``): ``garden ->`` asks for ``GARDEN``, ``nedrag``, ``g`` or ``n``,
    and nothing in a zero-shot prompt says which (no description line), as in the mixture's
    ``wordop`` documents. Zero-shot a model can only guess one of four operations; with
    demonstrations it can read the task from them, GPT-3's in-context learning. Queries and
    demonstrations are held-out words, never in a ``wordop`` document of pre-training."""
    from gptlab.data.mixture import wordop_example, wordop_words
    words = list(wordop_words(True))
    # The same words for every operation: the four tasks' zero-shot prompts are identical.
    random.Random(f"{WORDOP_PREFIX}:{seed}").shuffle(words)
    pool = [Item(key=w, prompt=p, answer=a, extra={"word": w})
            for w in words[:n + 64] for p, a in [wordop_example(op, w)]]
    longest = max(len(it.answer) for it in pool)
    return Task(WORDOP_PREFIX + op, "gen", pool[:n], pool, description=None,
                max_new_tokens=min(48, 4 * longest + 4))


_WORD = re.compile(r"^[A-Za-z][a-z']*[a-z]$")


def heldout_shakespeare_lines(fraction: float = SHAKESPEARE_HELDOUT_FRACTION, min_words: int = 6) -> list[str]:
    """Verse/prose lines of speeches in the last ``fraction`` of the Shakespeare corpus."""
    from gptlab.data.corpus import Source
    from gptlab.data.shakespeare import iter_speeches
    docs = list(Source("shakespeare").documents())
    total = sum(len(d) for d in docs)
    keep, budget = [], int(total * fraction)
    for doc in reversed(docs):   # collect the tail: whole documents, then the end of one
        if budget <= 0:
            break
        if len(doc) > budget:
            # A cut document starts mid-speech: start at a block boundary, after a stand-in title.
            tail = doc[-budget:]
            start = tail.find("\n\n")
            doc = "title\n" + tail[start:] if start >= 0 else ""
        keep.append(doc)
        budget -= len(doc)
    lines = []
    for doc in reversed(keep):
        for _, speech in iter_speeches(doc):
            lines.extend(s for s in speech if len(s.split()) >= min_words)
    return lines


def _split_last_word(line: str) -> tuple[str, str] | None:
    words = line.rstrip(" ,.;:!?'\"-").split(" ")
    if len(words) < 2 or not _WORD.match(words[-1]):
        return None
    return " ".join(words[:-1]), " " + words[-1]


def cloze_task(n: int, seed: int, n_choices: int = 4, lines: list[str] | None = None) -> Task:
    """Shakespeare last word: the right word against distractors (last words of other lines)."""
    lines = lines if lines is not None else heldout_shakespeare_lines()
    pairs = [p for p in (_split_last_word(s) for s in lines) if p]
    if len(pairs) < n_choices + 1:
        raise GptlabError("too few held-out Shakespeare lines for the cloze task")
    rng = random.Random(f"cloze:{seed}")
    rng.shuffle(pairs)
    vocab = sorted({w for _, w in pairs})
    pool = []
    for i, (prefix, word) in enumerate(pairs[:n + 64]):
        wrong = rng.sample([w for w in vocab if w.lower() != word.lower()], n_choices - 1)
        choices = wrong + [word]
        rng.shuffle(choices)
        pool.append(Item(key=f"{i}", prompt=prefix, answer=word, choices=choices,
                         label=choices.index(word)))
    return Task("cloze", "mc", pool[:n], pool, description=None)


def blank_task(n: int, seed: int, tokenizer=None, n_choices: int = 10,
               lines: list[str] | None = None) -> Task:
    """One word inside a held-out Shakespeare line is blanked; candidates are the word and
    ``n_choices - 1`` words from other held-out lines. With a tokenizer, the blanked word and the
    candidates are single tokens (so BERT's masked prediction of one token is exact)."""
    lines = lines if lines is not None else heldout_shakespeare_lines()
    rng = random.Random(f"blank:{seed}")

    def ok(w: str) -> bool:
        if not (_WORD.match(w) and len(w) >= 3):
            return False
        return tokenizer is None or len(tokenizer.encode(" " + w)) == 1

    cands: list[tuple[str, str, str]] = []
    for line in lines:
        words = line.split(" ")
        spots = [j for j in range(1, len(words) - 1) if ok(words[j])]   # not the first or last word
        if spots:
            j = rng.choice(spots)
            cands.append((" ".join(words[:j]), " " + words[j], " " + " ".join(words[j + 1:])))
    if len(cands) < n_choices + 1:
        raise GptlabError("too few held-out Shakespeare lines for the blank task")
    rng.shuffle(cands)
    vocab = sorted({w for _, w, _ in cands})
    pool = []
    for i, (left, word, right) in enumerate(cands[:n + 64]):
        wrong = rng.sample([w for w in vocab if w.lower() != word.lower()], n_choices - 1)
        choices = wrong + [word]
        rng.shuffle(choices)
        pool.append(Item(key=f"{i}", prompt=left, answer=word, choices=choices,
                         label=choices.index(word), right=right))
    return Task("blank", "blank", pool[:n], pool, description=None)


# ----- user tasks ----------------------------------------------------------------------------------
def _join(a: str, b: str) -> str:
    """Continuation text for ``a`` + ``b``: a space between them unless one side already has it."""
    return b if (not a or a[-1].isspace() or not b or b[0].isspace()) else " " + b


def load_jsonl_task(path: str | Path, n: int | None = None, seed: int = 0) -> Task:
    """A user task: every record ``{"question", "choices", "answer"}`` (multiple choice; answer is
    the right choice's text or index) or every record ``{"prompt", "answer"}`` (generation)."""
    path = Path(path)
    items: list[Item] = []
    kind = None
    for line_no, rec in iter_jsonl(path):
        where = f"{path}:{line_no}"
        this = "mc" if "question" in rec else "gen" if "prompt" in rec else None
        if this is None:
            raise GptlabError(f"{where}: a record needs \"question\"+\"choices\"+\"answer\" or "
                              f"\"prompt\"+\"answer\"")
        if kind is not None and this != kind:
            raise GptlabError(f"{where}: mixes multiple-choice and generation records in one file")
        kind = this
        if "answer" not in rec:
            raise GptlabError(f"{where}: no \"answer\"")
        if kind == "mc":
            q, choices, ans = rec["question"], rec.get("choices"), rec["answer"]
            if not isinstance(q, str):
                raise GptlabError(f"{where}: \"question\" must be a string")
            if (not isinstance(choices, list) or len(choices) < 2
                    or not all(isinstance(c, str) and c.strip() for c in choices)):
                raise GptlabError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
            if isinstance(ans, bool) or not isinstance(ans, (int, str)):
                raise GptlabError(f"{where}: \"answer\" must be a choice's text or its index")
            if isinstance(ans, int):
                if not 0 <= ans < len(choices):
                    raise GptlabError(f"{where}: answer index {ans} is out of range")
                label = ans
            elif ans in choices:
                label = choices.index(ans)
            else:
                raise GptlabError(f"{where}: answer {ans!r} is not one of the choices")
            conts = [_join(q, c) for c in choices]
            items.append(Item(key=f"{line_no}", prompt=q, answer=conts[label], choices=conts, label=label))
        else:
            p, ans = rec["prompt"], rec["answer"]
            if not isinstance(p, str) or not isinstance(ans, str) or not ans.strip():
                raise GptlabError(f"{where}: \"prompt\" and \"answer\" must be strings (answer non-empty)")
            if "\n" in ans.strip():
                raise GptlabError(f"{where}: the answer must be one line (generation stops at a newline)")
            items.append(Item(key=f"{line_no}", prompt=p, answer=_join(p, ans)))
    if not items:
        raise GptlabError(f"{path}: no records")
    queries = list(items)
    if n is not None and n < len(queries):
        queries = random.Random(f"{path.name}:{seed}").sample(queries, n)
    longest = max(len(it.answer) for it in items)
    return Task(path.stem, kind, queries, items, description=None, max_new_tokens=min(64, 4 * longest + 4))


# ----- resolving --task names --------------------------------------------------------------------
def task_names(specs: list[str]) -> list[str]:
    """Expand comma lists and groups (arithmetic, unscramble, translate, all); keep files as given."""
    out: list[str] = []
    for spec in specs:
        for name in (s.strip() for s in spec.split(",")):
            if not name:
                continue
            for x in GROUPS.get(name, (name,)):
                if x not in out:
                    out.append(x)
    if not out:
        raise GptlabError("--tasks: give at least one task name or JSONL file")
    return out


def load_task(name: str, n: int, seed: int, tokenizer=None) -> Task:
    from gptlab.data.mixture import FAMILIES
    if name.endswith(".jsonl") or Path(name).is_file():
        return load_jsonl_task(name, n, seed)
    if name == "cloze":
        return cloze_task(n, seed)
    if name == "blank":
        return blank_task(n, seed, tokenizer)
    if name == LOOKUP:
        return lookup_task(n, seed)
    if name in TRANSLATE3:
        return trilingual_task(name[len(TRILINGUAL_PREFIX):], n, seed)
    if name in WORDOP_TASKS:
        return wordop_task(name[len(WORDOP_PREFIX):], n, seed)
    if name in FAMILIES:
        return mixture_task(name, n, seed)
    known = ", ".join(list(GROUPS) + ["cloze", "blank", LOOKUP, *TRANSLATE3, *WORDOP_TASKS] + list(FAMILIES))
    raise GptlabError(f"--tasks: unknown task {name!r} (choose from {known}, or a .jsonl file)")
