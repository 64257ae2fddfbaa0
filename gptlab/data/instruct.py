"""A generated chat curriculum whose answers a program can check (``gptlab data instruct``).

InstructGPT's three stages need three disjoint prompt sets: demonstrations for SFT, prompts for the
reward model's rankings and PPO, and a held-out set to judge the result. Human labelers are replaced by
task families whose right answer is known, so `gptlab label --auto` can rank samples and evals can
score a policy without a person:

* arithmetic   "What is 23 + 58?" -> "23 + 58: 3+8=11, 2+5+1=8, so 81." (gptlab.data.sums)
* strings      reverse a word, uppercase, count a letter, sort words alphabetically
* translate    English <-> Chinese through gptlab.data.dictionary
* shakespeare  who speaks a line, which play it is from, complete the line (only when the corpus is there)
* multiturn    a follow-up that needs the previous turn ("And double that?")
* decline      nonsense or impossible requests, answered with a polite refusal

Splits are decided by hashing each item's underlying problem (not its wording, not the seed), so a
held-out problem never shows up in training under another phrasing, another family's follow-up, or
another seed's curriculum.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from gptlab.data import phrasing
from gptlab.data.phrasing import ask
from gptlab.data.sums import follow_up_reply, worked
from gptlab.errors import GptlabError

FAMILIES = ("arithmetic", "strings", "translate", "shakespeare", "multiturn", "decline")
SPLITS = ("sft", "prompts", "heldout")
HELDOUT_FRACTION, SFT_FRACTION = 0.10, 0.40      # the rest (0.50) are prompts for the RM and PPO
DECLINE_ANSWER = "I'm sorry, I can't answer that."
SYSTEMS = ("You are a helpful assistant.", "You are a concise assistant. Answer briefly.")


@dataclass
class _Gen:
    key: str          # the item's identity within its family (dedup, id)
    split_key: str    # the underlying problem: decides the split, shared across families
    messages: list[dict]
    answer: str
    extra: dict | None = None   # more fields for the item (the steps family's plan)


class _Context:
    """Word lists and Shakespeare lines the generators draw from."""

    def __init__(self, works: dict[str, str] | None):
        from gptlab.data.dictionary import EN_ZH, WORDS
        self.en_zh = dict(sorted(EN_ZH.items()))
        zh_count: dict[str, int] = {}
        for zh in self.en_zh.values():
            zh_count[zh] = zh_count.get(zh, 0) + 1
        # Only Chinese words with one English source have a single right answer going back.
        self.zh_en = {zh: en for en, zh in self.en_zh.items() if zh_count[zh] == 1}
        self.words = sorted({w for w in WORDS if w.isalpha() and w.islower() and 3 <= len(w) <= 10})
        self.lines = _shakespeare_lines(works) if works else []


# ----- Shakespeare -----------------------------------------------------------------------------------
# Bare titles name no one in particular ("KING." in King Lear): "who says this?" needs a real name.
_GENERIC = {"King", "Queen", "Duke", "Duchess", "Prince", "Princess", "Lord", "Lady", "All", "Both", "Servant",
            "Messenger", "Friar", "Page", "Boy", "Captain", "Soldier", "Gentleman", "Citizen", "Officer", "Clown",
            "Fool", "Bastard", "Nurse", "Porter", "Herald", "Lords", "Ladies", "Others", "Chorus", "Ghost"}


def _speaker_name(raw: str) -> str | None:
    """'KING LEAR' -> 'King Lear'; short mixed-case forms are abbreviations ('Ber') and are skipped."""
    if raw.isupper():
        name = " ".join(w.capitalize() if w not in ("OF", "AND", "THE") else w.lower() for w in raw.split())
    else:
        name = raw if len(raw) >= 5 else None
    return None if name in _GENERIC else name


def _quoted(line: str) -> str:
    """The line as quoted inside a question: no trailing full stop/comma/dash before the closing quote."""
    return line.rstrip(".,;:-")


def _shakespeare_lines(works: dict[str, str]) -> list[tuple[str, str | None, str]]:
    """(title, speaker or None, line) for distinctive lines that occur exactly once in all the works."""
    from gptlab.data.shakespeare import iter_speeches
    found, count = [], {}
    for title in sorted(works):
        for speaker, lines in iter_speeches(works[title]):
            for line in lines:
                line = " ".join(line.split())
                norm = line.lower()
                count[norm] = count.get(norm, 0) + 1
                if 6 <= len(line.split()) <= 14 and len(line) <= 90 and line[0].isupper() and '"' not in line:
                    found.append((title, _speaker_name(speaker), line))
    return [f for f in found if count[f[2].lower()] == 1]


# ----- generators: each returns one _Gen (or None to try again) ---------------------------------------
def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _arith(rng: random.Random, small: bool = False) -> tuple[int, str, int, int]:
    """(a, op, b, result): mostly 2-digit sums and differences (what people ask), some products."""
    op = rng.choices("+-*", weights=(4, 4, 2))[0]
    if op == "*":
        a, b = rng.randint(2, 12 if small else 30), rng.randint(2, 12)
    else:
        lo = 0 if rng.random() < 0.15 else 10          # mostly two digits, a few one-digit operands
        a, b = rng.randint(lo, 99), rng.randint(lo, 99)
        if op == "-" and a < b:
            a, b = b, a       # keep results non-negative: simpler for a small model, still checkable
    return a, op, b, a + b if op == "+" else a - b if op == "-" else a * b


def _arith_ask(rng, a: int, op: str, b: int) -> str:
    return ask(phrasing.ARITH[op], rng, a=a, b=b)


def _arith_reply(a: int, op: str, b: int, r: int) -> str:
    """Sums and differences worked in columns (gptlab.data.sums), products said at once."""
    return worked(a, op, b) if op in "+-" else f"{a} {op} {b} = {r}."


def gen_arithmetic(rng, ctx) -> _Gen:
    a, op, b, r = _arith(rng)
    q = f"{a} {op} {b}"
    # The reply restates the problem in one canonical form, whatever the wording: reading the request
    # and doing the sum are two steps, and the second is the same every time.
    return _Gen(q, f"arith:{q}", [_user(_arith_ask(rng, a, op, b)), _assistant(_arith_reply(a, op, b, r))], str(r))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


_ONSET = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "cl", "dr",
          "fl", "gr", "pl", "sh", "st", "th", "tr", "ch", "sp")
_VOWEL = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "ai", "ee", "oo", "ou", "y")
_CODA = ("", "", "", "n", "r", "s", "t", "l", "m", "ck", "nd", "st", "x", "p", "g")


def _pseudo_word(rng) -> str:
    """A pronounceable made-up word: string edits are about letters, not meaning, so invented words
    multiply the training words without teaching any false fact."""
    return "".join(rng.choice(_ONSET) + rng.choice(_VOWEL) for _ in range(rng.randint(1, 3))) + rng.choice(_CODA)


def _string_word(rng, ctx) -> str:
    return rng.choice(ctx.words) if rng.random() < 0.6 else _pseudo_word(rng)


def gen_strings(rng, ctx) -> _Gen:
    kind = rng.choices(("reverse", "upper", "count", "first", "last", "sort"), weights=(3, 2, 3, 2, 1, 1))[0]
    w = _string_word(rng, ctx)
    q = phrasing.quote(w, rng)
    if kind == "reverse":
        return _Gen(f"rev:{w}", f"rev:{w}", [_user(ask(phrasing.REVERSE, rng, w=q)),
                                             _assistant(f"'{w}' reversed is '{w[::-1]}'.")], w[::-1])
    if kind == "upper":
        p = " ".join([w] + [_string_word(rng, ctx) for _ in range(rng.choice((0, 0, 1, 2)))])
        return _Gen(f"up:{p}", f"up:{p}", [_user(ask(phrasing.UPPER, rng, w=phrasing.quote(p, rng))),
                                           _assistant(f"'{p}' in uppercase is '{p.upper()}'.")], p.upper())
    if kind == "count":
        # Mostly a letter that occurs; sometimes one that does not, so "0" is a learnable answer too.
        c = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        n = w.count(c)
        cq = rng.choice(("'{}'", "{}", '"{}"')).format(c)
        return _Gen(f"count:{c}:{w}", f"count:{c}:{w}",
                    [_user(ask(phrasing.COUNT, rng, c=cq, w=q)),
                     _assistant(f"'{w}' contains the letter '{c}' {_plural(n, 'time')}.")], str(n))
    if kind in ("first", "last"):
        letter = w[0] if kind == "first" else w[-1]
        templates = phrasing.FIRST if kind == "first" else phrasing.LAST
        return _Gen(f"{kind}:{w}", f"{kind}:{w}", [_user(ask(templates, rng, w=q)),
                                                   _assistant(f"The {kind} letter of '{w}' is '{letter}'.")], letter)
    words = rng.sample(ctx.words, rng.randint(3, 5))
    answer = ", ".join(sorted(words))
    return _Gen(f"sort:{','.join(words)}", f"sort:{answer}",
                [_user(ask(phrasing.SORT, rng, l=", ".join(words))), _assistant(f"In alphabetical order: {answer}.")],
                answer)


def _to_chinese(rng, ctx, en: str) -> tuple[str, str]:
    return ask(phrasing.TO_CHINESE, rng, en=phrasing.quote(en, rng)), f"'{en}' in Chinese is {ctx.en_zh[en]}."


def gen_translate(rng, ctx) -> _Gen:
    if rng.random() < 0.5:
        en = rng.choice(list(ctx.en_zh))
        ask_, reply = _to_chinese(rng, ctx, en)
        return _Gen(f"en-zh:{en}:{ask_}", f"word:{en}", [_user(ask_), _assistant(reply)], ctx.en_zh[en])
    zh = rng.choice(list(ctx.zh_en))
    en = ctx.zh_en[zh]
    ask_ = ask(phrasing.TO_ENGLISH, rng, zh=zh)
    return _Gen(f"zh-en:{zh}:{ask_}", f"word:{en}", [_user(ask_),
                                              _assistant(f"{zh} in English is '{en}'.")], en)


def gen_shakespeare(rng, ctx) -> _Gen | None:
    title, speaker, line = rng.choice(ctx.lines)
    kind = rng.choice(("speaker", "play", "complete"))
    if kind == "speaker" and speaker:
        return _Gen(f"speaker:{line}", f"line:{line}",
                    [_user(f'Who says this line in {title}: "{_quoted(line)}"?'), _assistant(f"That line is spoken by {speaker}.")],
                    speaker)
    if kind == "complete":
        words = line.split()
        cut = len(words) // 2
        head, tail = " ".join(words[:cut]), " ".join(words[cut:])
        return _Gen(f"complete:{line}", f"line:{line}",
                    [_user(f'Complete this line from {title}: "{head} ..."'), _assistant(f'The full line is: "{line}"')],
                    tail.rstrip(".,;:!?-'"))
    return _Gen(f"play:{line}", f"line:{line}",
                [_user(f'Which Shakespeare play has this line: "{_quoted(line)}"?'), _assistant(f"That line is from {title}.")], title)


def _followup_arith(rng) -> tuple[str, str, str, str, str, str]:
    """(base key, first question, first reply, follow-up, follow-up reply, answer) for arithmetic."""
    a, op, b, r = _arith(rng, small=True)
    q = f"{a} {op} {b}"
    kind = rng.choice(("double", "add", "sub", "half", "mul"))
    if kind == "half" and r % 2:
        kind = "double"
    c = rng.randint(2, 5) if kind == "mul" else rng.randint(1, 30)
    if kind == "sub" and c > r:
        kind = "add"
    reply, value = follow_up_reply(kind, r, c)
    return (f"arith:{q}", _arith_ask(rng, a, op, b), _arith_reply(a, op, b, r), ask(phrasing.FOLLOW[kind], rng, c=c),
            reply, str(value))


def gen_multiturn(rng, ctx) -> _Gen:
    roll = rng.random()
    if roll < 0.75:
        base, q1, a1, q2, a2, answer = _followup_arith(rng)
    elif roll < 0.88:
        w = _string_word(rng, ctx)
        rev = w[::-1]
        base, q1, a1 = f"rev:{w}", ask(phrasing.REVERSE, rng, w=phrasing.quote(w, rng)), f"'{w}' reversed is '{rev}'."
        q2 = rng.choice(("Now write that in uppercase.", "now in caps", "And in capital letters?", "Uppercase it."))
        a2, answer = f"'{rev}' in uppercase is '{rev.upper()}'.", rev.upper()
    else:
        en, other = rng.sample(list(ctx.en_zh), 2)
        base = f"word:{en}"
        q1, a1 = _to_chinese(rng, ctx, en)
        q2 = rng.choice(("And '{o}'?", "and {o}?", "What about {o}?", "How about '{o}'?", "And {o}?")).format(o=other)
        a2, answer = f"'{other}' in Chinese is {ctx.en_zh[other]}.", ctx.en_zh[other]
    return _Gen(f"{q1}|{q2}", base, [_user(q1), _assistant(a1), _user(q2), _assistant(a2)], answer)


_PLACES = ("Mars", "Atlantis", "the Moon", "the Sun", "Jupiter", "the bottom of the sea", "Saturn's rings", "Narnia",
           "the Milky Way")
_RULERS = ("king", "queen", "president", "mayor", "emperor")
_ATTRS = ("phone number", "home address", "shoe size", "middle name", "favourite colour", "email address")
_CITIES = ("Paris", "London", "Beijing", "Lagos", "Lima", "Sydney", "Tokyo", "Cairo", "Oslo", "Delhi")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
# Things only the person asking could know: no model can answer them, whatever its size.
_PRIVATE = ("What number am I thinking of?", "What is my name?", "What did I eat for breakfast today?", "How old am I?",
            "What's my password?", "Where did I leave my keys?", "What am I holding in my hand?",
            "What colour is my shirt?", "What is my dog's name?", "What is my phone number?",
            "What am I thinking about right now?", "Which card did I pick?", "What did I dream about last night?",
            "How much money is in my pocket?", "What's the name of my best friend?", "What song am I humming?",
            "我在想哪个数字？", "我叫什么名字？", "我今天早上吃了什么？")
_FUTURE = ("What will the weather be in {city} on {date}?", "Who will win the football world cup in {year}?",
           "What will the lottery numbers be next week?", "What will the price of gold be on {date}?",
           "Who will be the president in {year}?", "What will I have for dinner on {date}?",
           "{year}年谁会赢得世界杯？")
_ABSURD = ("What colour is the number {n}?", "How much does the word '{w}' weigh in kilograms?",
           "What does the letter Q smell like?", "How many hours are in a blue?", "What is the square root of a banana?",
           "How tall is the colour green?", "What is the last digit of pi?", "What is the largest number?",
           "What is {n} divided by zero?", "Compute {n} / 0.", "How loud is the number {n}?",
           "What is the {attr} of the {ruler} of {place}?", "Who was the first person to live on {place}?",
           "Translate '{nonsense}' into Chinese.", "What does '{nonsense}' mean?")


def _nonsense(rng, ctx) -> str:
    while True:
        w = "".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice(("", "", "y", "x", "q")) for _ in range(rng.randint(3, 5)))
        if w not in ctx.en_zh and len(w) >= 4:
            return w


def gen_decline(rng, ctx) -> _Gen:
    pool = rng.choices((_PRIVATE, _FUTURE, _ABSURD), weights=(3, 2, 5))[0]
    date = f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(2100, 2999)}"
    ask_ = rng.choice(pool).format(city=rng.choice(_CITIES), date=date, year=rng.randint(2100, 2999),
                                   n=rng.randint(1, 9999), w=rng.choice(ctx.words), attr=rng.choice(_ATTRS),
                                   ruler=rng.choice(_RULERS), place=rng.choice(_PLACES), nonsense=_nonsense(rng, ctx))
    ask_ = phrasing.roughen(ask_, rng, p=0.3)
    return _Gen(ask_, f"decline:{ask_}", [_user(ask_), _assistant(DECLINE_ANSWER)], DECLINE_ANSWER)


def gen_steps(rng, ctx) -> _Gen:
    """A multi-step problem solved one step per line (gptlab.data.steps), its plan kept for the checker."""
    from gptlab.data import steps
    question, plan = steps.gen_problem(rng, ctx.words)
    key = steps.plan_key(plan)
    return _Gen(f"{key}|{question}", key, [_user(question), _assistant(steps.worked_solution(plan))],
                str(steps.run_plan(plan)[-1]), {"plan": plan})


GENERATORS = {"arithmetic": gen_arithmetic, "strings": gen_strings, "translate": gen_translate,
              "shakespeare": gen_shakespeare, "multiturn": gen_multiturn, "decline": gen_decline,
              "steps": gen_steps}


# ----- assembling the splits --------------------------------------------------------------------------
def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _bucket(split_key: str) -> float:
    """A number in [0, 1) fixed by the problem alone: the same problem lands in the same split forever."""
    return int(_hash("split:" + split_key)[:12], 16) / 16 ** 12


def held_out(split_key: str) -> bool:
    """Whether a problem (its split key, e.g. "arith:59 + 63") is in the held-out split: never trained on."""
    return _bucket(split_key) < HELDOUT_FRACTION


def _split_of(b: float) -> str:
    return "heldout" if b < HELDOUT_FRACTION else "sft" if b < HELDOUT_FRACTION + SFT_FRACTION else "prompts"


def _assign(gens: list[_Gen]) -> dict[str, list[_Gen]]:
    """Split one family's items by hash; with 3+ items every split gets at least one (tiny curricula)."""
    b = {g.key: _bucket(g.split_key) for g in gens}
    out = {s: [] for s in SPLITS}
    for g in gens:
        out[_split_of(b[g.key])].append(g)
    if len(gens) >= 3:
        # Nearest item to each empty split's hash range, taken from a split that can spare one.
        targets = {"heldout": 0.0, "sft": HELDOUT_FRACTION + SFT_FRACTION / 2, "prompts": 1.0}
        for split, target in targets.items():
            if not out[split]:
                donors = [g for s in SPLITS if len(out[s]) > 1 for g in out[s]]
                g = min(donors, key=lambda g: (abs(b[g.key] - target), g.key))
                next(items for items in out.values() if g in items).remove(g)
                out[split].append(g)
    return out


def _item(family: str, g: _Gen, split: str, rng: random.Random) -> dict:
    messages = list(g.messages)
    if rng.random() < 0.1:   # a few system prompts, so the chat template's system turn is seen in training
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] + messages
    item = {"family": family, "id": f"{family}-{_hash(g.key)[:10]}", "answer": g.answer, **(g.extra or {})}
    if split == "sft":
        return {**item, "messages": messages}
    # Prompts end with the user's turn; the demonstration stays along as the reference answer.
    return {**item, "messages": messages[:-1], "reference": messages[-1]["content"]}


def _default_works() -> dict[str, str] | None:
    """The downloaded corpus, or None when it is not there (never downloads from here)."""
    try:
        from gptlab.data.shakespeare import shakespeare_works
        return shakespeare_works(ensure=False)
    except (ImportError, GptlabError):
        return None


def build_curriculum(seed: int, n_per_family: int, works: dict[str, str] | None = None,
                     steps: bool = False) -> dict[str, list[dict]]:
    """{split: [item]} with up to ``n_per_family`` distinct problems per family.

    ``works`` ({title: text}) feeds the Shakespeare family; None uses the downloaded corpus if present,
    and ``{}`` leaves the family out. ``steps`` adds the multi-step family (opt-in, so the default
    curriculum and every run made from it stay as they were).
    """
    if n_per_family < 1:
        raise GptlabError("--n-per-family must be at least 1")
    ctx = _Context(_default_works() if works is None else works)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for family in FAMILIES + (("steps",) if steps else ()):
        if family == "shakespeare" and not ctx.lines:
            continue
        rng = random.Random(f"{seed}:{family}")
        gen, found, tries = GENERATORS[family], {}, 0
        while len(found) < n_per_family and tries < 50 * n_per_family + 100:
            tries += 1
            g = gen(rng, ctx)
            if g is not None and g.key not in found:
                found[g.key] = g
        for split, gens in _assign(list(found.values())).items():
            splits[split] += [_item(family, g, split, rng) for g in gens]
    shuffle = random.Random(f"{seed}:shuffle")
    for items in splits.values():
        shuffle.shuffle(items)   # families interleaved, so any prefix of a file is a fair sample
    return splits


# ----- checking answers -------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_REFUSAL = re.compile(r"\b(?:can't|cannot|can not|unable to|not able to|don't know|do not know|no way to know|"
                      r"there is no|there are no|does not exist|doesn't exist|is undefined|is not an? \w+ word|"
                      r"do not have|don't have)\b", re.I)
_RUDE = re.compile(r"\b(?:stupid|dumb|idiot\w*|shut up|ridiculous|silly question)\b", re.I)
_QUOTED = re.compile(r'"[^"]*"|“[^”]*”')
_TRAILING = " \t\r\n.,;:!?\"'`)]}»”’」』。！？，-—–"


def _clean(text: str) -> str:
    return (text or "").replace("\u2019", "'").replace("\u2018", "'").strip()


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(_clean(text)))


def is_polite_refusal(text: str) -> bool:
    text = _clean(text)
    return is_refusal(text) and not _RUDE.search(text)


def ends_with_answer(text: str, answer: str) -> bool:
    """The response's final words are the answer (trailing punctuation/quotes ignored; whole words)."""
    text, answer = _clean(text).rstrip(_TRAILING), _clean(answer).rstrip(_TRAILING)
    if not answer:
        return False
    if not any(c.isupper() for c in answer) or answer != answer.upper():
        text, answer = text.lower(), answer.lower()   # case matters only when the task was uppercasing
    if not text.endswith(answer):
        return False
    before = text[: len(text) - len(answer)]
    return not before or not (before[-1].isalnum() or before[-1] == "_")


def final_number(text: str) -> float | None:
    nums = _NUMBER.findall(_clean(text).replace(",", ""))
    return float(nums[-1]) if nums else None


def check_answer(item: dict, response_text: str) -> bool:
    """True when the response's final answer is the item's checkable answer.

    Numbers: the last number in the response. Text: the response ends with the answer. Declines: a
    polite refusal. A refusal is never a right answer to a question that has one.
    """
    if "answer" not in item or "family" not in item:
        raise GptlabError("check_answer needs an item with \"family\" and \"answer\" (from `gptlab data instruct`)")
    text = _clean(response_text)
    if not text:
        return False
    if item["family"] == "decline":
        return is_polite_refusal(text)
    if item["family"] == "steps" and "plan" in item:
        from gptlab.data.steps import outcome_correct
        return outcome_correct(item["plan"], text)
    if is_refusal(_QUOTED.sub("", text)):   # quoted text (a Shakespeare line) may say "cannot"
        return False
    if not _about_the_problem(item, text):
        return False
    answer = str(item["answer"])
    if _NUMBER.fullmatch(answer):
        value = final_number(text)
        return value is not None and value == float(answer)
    return ends_with_answer(text, answer)


_RESTATED_SUM = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)\s*[=:]")   # "59 + 63 = 122", "59 + 63: 9+3=12, ..."
_FIRST_QUOTED = re.compile(r"(?<![^\W\d_])['\"‘“]([^'\"’”]+)['\"’”]")   # not an apostrophe (it's)


def _about_the_problem(item: dict, text: str) -> bool:
    """A reply that restates its question must restate the one asked: "'supper' contains the letter
    's' 1 time." is no answer to how many b's are in "subject", though its last number is right.
    Needs the item's ``problem`` (the exam's items carry it); a reply that restates nothing passes."""
    return restatement(item, text) is not False


def restatement(item: dict, text: str) -> bool | None:
    """Whether a reply restates the asked problem right ("59 + 63 = ...", "'shore' reversed ..."):
    True or False when it restates a sum (arithmetic) or quotes a word (string edits), None when it
    restates nothing or the item has no ``problem`` to compare with. Echoing the question is copying,
    so this tells a model that cannot copy from one that copies but cannot compute."""
    problem = item.get("problem", "")
    if item.get("family") == "arithmetic" and problem.startswith("arith:"):
        a, op, b = problem[len("arith:"):].split(" ")
        m = _RESTATED_SUM.search(text)
        if m is None:
            return None
        ops = {(a, b), (b, a)} if op == "+" else {(a, b)}
        return m.group(2) == op and (m.group(1), m.group(3)) in ops
    if item.get("family") == "strings" and problem.split(":")[0] in ("rev", "up", "count", "first"):
        word, answer = problem.split(":")[-1].lower(), str(item.get("answer", "")).lower()
        m = _FIRST_QUOTED.search(text)
        return None if m is None else m.group(1).lower() in (word, answer)
    return None


# ----- the command --------------------------------------------------------------------------------------
def add_instruct_parser(data_sub) -> None:
    p = data_sub.add_parser(
        "instruct", help="generate the chat curriculum (SFT demos, RM/PPO prompts, held-out eval)",
        description="Write sft.jsonl (conversations), prompts.jsonl (prompts for the reward model and PPO) "
        "and heldout.jsonl (evaluation only) of generated tasks with checkable answers: " + ", ".join(FAMILIES)
        + ". The Shakespeare family is included when the corpus is downloaded (`gptlab data shakespeare`).")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same files)")
    p.add_argument("--out", default=None, help="output folder (default GPTLAB_HOME/instruct)")
    p.add_argument("--n-per-family", type=int, default=2000, help="distinct problems per family (default 2000)")
    p.add_argument("--no-shakespeare", action="store_true", help="leave the Shakespeare family out")
    p.add_argument("--steps", action="store_true", help="add the multi-step family (chains of one-digit "
                   "sums, short word problems, string edits in several steps; one worked step per line, "
                   "gptlab.data.steps) that `gptlab prm` and `gptlab search` use")
    p.add_argument("--tools", action="store_true", help="add the tool families (calculator, search, function "
                   "calls; gptlab.data.tool_tasks) to sft.jsonl, their held-out prompts in tools_heldout.jsonl "
                   "and their documents in tool_docs/")
    p.set_defaults(func=run_instruct)


def run_instruct(args) -> int:
    from gptlab.data.formats import render_transcript
    from gptlab.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, gptlab_home
    out = Path(args.out) if args.out else gptlab_home() / "instruct"
    if out.exists() and not out.is_dir():
        raise GptlabError(f"--out {out}: exists and is not a folder")
    with_steps = bool(getattr(args, "steps", False))
    splits = build_curriculum(args.seed, args.n_per_family, works={} if args.no_shakespeare else None,
                              steps=with_steps)
    families = FAMILIES + (("steps",) if with_steps else ())
    # The demonstrations again as plain text, one conversation a document, for the pre-training corpus:
    # the task wordings are learned there too, and a pre-trained-only model can be asked GPT-3 style.
    tool_counts = None
    if getattr(args, "tools", False):
        # Opt-in: the default curriculum (and every run made from it) stays as it was. The tool
        # conversations join the transcripts too: their results come from the training documents only,
        # so no held-out document reaches pre-training.
        from gptlab.data.tool_tasks import TOOL_FAMILIES, build_tool_curriculum
        tools = build_tool_curriculum(args.seed, args.n_per_family, GENERATORS, _Context({}),
                                      lambda key: _split_of(_bucket(key)), out / "tool_docs")
        splits["sft"] += tools["sft"]
        random.Random(f"{args.seed}:tools").shuffle(splits["sft"])
        atomic_write_jsonl(out / "tools_heldout.jsonl", tools["heldout"])
        tool_counts = {s: {f: sum(i["family"] == f for i in tools[s]) for f in TOOL_FAMILIES} for s in tools}
    transcripts = "\n".join(render_transcript(i["messages"]) for i in splits["sft"])
    for split, items in splits.items():
        atomic_write_jsonl(out / f"{split}.jsonl", items)
    atomic_write_text(out / "transcripts.txt", transcripts)
    counts = {s: {f: sum(i["family"] == f for i in items) for f in families} for s, items in splits.items()}
    atomic_write_json(out / "curriculum.json", {"seed": args.seed, "n_per_family": args.n_per_family,
                                               "families": list(families), "counts": counts,
                                               **({"tool_counts": tool_counts} if tool_counts else {})})
    print(f"{'family':<12}" + "".join(f"{s:>9}" for s in SPLITS))
    for f in families:
        print(f"{f:<12}" + "".join(f"{counts[s][f]:>9}" for s in SPLITS))
    if not any(counts[s]["shakespeare"] for s in SPLITS) and not args.no_shakespeare:
        print("(no Shakespeare family: run `gptlab data shakespeare` first to include it)")
    if tool_counts:
        for f in tool_counts["sft"]:
            print(f"{f:<12}{tool_counts['sft'][f]:>9}{'-':>9}{tool_counts['heldout'][f]:>9}   (tools)")
        print(f"wrote {out}/tools_heldout.jsonl and {out}/tool_docs/ (train, heldout)")
    print(f"wrote {out}/sft.jsonl, prompts.jsonl, heldout.jsonl, transcripts.txt")
    return 0
