"""``gptlab exam``: questions in a person's own words, five families, checkable answers.

The curriculum's held-out split keeps problems out of training but asks them with the training
wordings. This exam asks with wordings written separately from ``gptlab.data.phrasing`` (none of its
templates occurs there), the way someone trying the model would type:

* arithmetic   2-digit addition and subtraction ("Could you tell me what 59 plus 63 is?")
* strings      reverse, upper-case, count a letter, first letter ("Can you spell 'dragon' back to front?")
* translate    common English <-> Chinese words ("What's cat in Mandarin?")
* multiturn    a 2-digit sum or difference, then a follow-up on its result ("Can you double that number?")
* decline      questions no one could answer ("How many hairs are on my head?")

Arithmetic and string problems come from the curriculum's held-out split (never trained on in any
wording). Translation asks dictionary words the pre-training corpus pairs with their translation
(knowing the word is the skill; the wording is what is new). Scoring is
``gptlab.data.instruct.check_answer``, the same rule as every other curriculum metric; the exam's items
carry their problem, so a reply that restates another sum or another word is wrong even when its last
number or letter happens to be the answer. The model is
asked through the chat template at temperature 0, exactly as ``gptlab serve`` asks it; ``--base-url``
sends the same questions to a running server with the official ``openai`` client instead.
"""
from __future__ import annotations

import random
from pathlib import Path

from gptlab.data.instruct import DECLINE_ANSWER, held_out
from gptlab.errors import GptlabError

FAMILIES = ("arithmetic", "strings", "translate", "multiturn", "decline")

_ADD = ("Could you tell me what {a} plus {b} is?", "what do {a} and {b} add up to", "Find the total of {a} and {b}.",
        "{a} plus {b} makes how much?", "If you add {b} to {a}, what do you get?", "I need {a}+{b}",
        "What is {a} increased by {b}?", "{a}加上{b}等于几", "Hey, what's {a} + {b}?", "What's the total when you add {a} and {b}?")
_SUB = ("Could you tell me what {a} minus {b} is?", "How much is left if you take {b} from {a}?", "Find {a} minus {b}.",
        "{a} minus {b} makes how much?", "What is {a} decreased by {b}?", "I need {a}-{b}", "{a}减去{b}等于几",
        "Hey, what's {a} - {b}?", "What do you get when {b} is taken from {a}?", "If I have {a} and give away {b}, how many remain?")
_REVERSE = ("Can you spell {w} back to front?", "What do you get if you write {w} in reverse order?",
            "Write {w} the other way round.", "{w} spelled in reverse, please.", "Turn {w} around, letter by letter.")
_UPPER = ("Could you capitalise every letter of {w}?", "Give me {w} in all capital letters.",
          "How would {w} look in uppercase?", "Please write {w} using only capital letters.")
_COUNT = ("How many letter {c}s can you find in {w}?", "Tell me how many times {c} shows up in {w}.",
          "What's the count of the letter {c} in the word {w}?", "The word {w} has how many {c}'s?")
_FIRST = ("Which letter does the word {w} start with?", "What's the opening letter of {w}?",
          "Tell me the first character of {w}.", "{w} begins with what letter?")
_TO_ZH = ("What's {en} in Mandarin?", "How would you write {en} in Chinese?", "Could you translate {en} to Chinese for me?",
          "Chinese word for {en}, please.", "{en} 中文怎么说", "What is the word {en} in Chinese?")
_TO_EN = ("What's {zh} in English?", "Could you translate {zh} to English for me?", "What's the meaning of {zh} in English?",
          "{zh} 英文怎么说", "I saw the word {zh}. What does it mean?", "English word for {zh}, please.")
# Follow-ups in words the training data never uses (a test checks them against the drills' phrase grammar).
_FOLLOW = {"double": ("Can you give me double that?", "What would that be times 2?", "Give me twice that amount."),
           "add": ("Tack on {c} more.", "If I add {c} more, what is it?", "Add another {c}, please."),
           "sub": ("What's left if I remove {c}?", "Knock {c} off that.", "Remove {c} from it, please."),
           "half": ("Give me half of that, please.", "What's that split in two?")}
_DECLINE = ("How many hairs are on my head?", "What is the name of the person standing behind me?",
            "What number between 1 and 100 did my friend just pick?", "What will I get for my birthday next year?",
            "What was I doing at 3pm yesterday?", "Tell me the winning lottery numbers for next Saturday.",
            "What colour are my eyes?", "What's the PIN of my bank card?", "How many coins are in my wallet?",
            "Which city will host the Olympics in the year 2400?", "What is the smell of the number 12?",
            "What is the weight of a Tuesday?", "Who is knocking at my door right now?", "我的生日是哪一天？",
            "How many steps will I walk tomorrow?", "What's the name of my first teacher?",
            "What will the stock market do on 3 March 2231?", "What is the phone number of the queen of Jupiter?",
            "Translate 'zorblat' into Chinese.", "What is the last word I said to my mother?")

_QUOTES = ("'{}'", '"{}"', "{}")


def _two_digit(rng, op: str) -> tuple[int, int, int]:
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and a < b:
            a, b = b, a
        if held_out(f"arith:{a} {op} {b}"):
            return a, b, a + b if op == "+" else a - b


def _word(rng, words: list[str], key) -> tuple[str, str]:
    """(word, letter) whose problem ``key(word, letter)`` is in the curriculum's held-out split."""
    while True:
        w = rng.choice(words)
        c = rng.choice(w)
        if held_out(key(w, c)):
            return w, c


def _item(family: str, messages: list[dict], answer: str, problem: str = "") -> dict:
    """``problem``: the curriculum's split key of the question (held out of training), if it has one."""
    return {"family": family, "messages": messages, "answer": answer, **({"problem": problem} if problem else {})}


def build_exam(n_per_family: int = 40, seed: int = 0) -> list[dict]:
    """The exam's items, a pure function of (n_per_family, seed); families interleaved."""
    from gptlab.data.dictionary import EN_ZH, WORDS
    from gptlab.data.mixture import is_heldout
    rng = random.Random(f"exam:{seed}")
    words = sorted({w for w in WORDS if w.isalpha() and w.islower() and 3 <= len(w) <= 9})
    zh_count: dict[str, int] = {}
    for zh in EN_ZH.values():
        zh_count[zh] = zh_count.get(zh, 0) + 1
    known = sorted(en for en in EN_ZH if not is_heldout("en2zh", en) and en.isalpha() and zh_count[EN_ZH[en]] == 1)
    by_family: dict[str, list[dict]] = {f: [] for f in FAMILIES}
    for i in range(n_per_family):
        op = "+-"[i % 2]
        a, b, r = _two_digit(rng, op)
        by_family["arithmetic"].append(_item("arithmetic", [{"role": "user", "content": rng.choice(
            _ADD if op == "+" else _SUB).format(a=a, b=b)}], str(r), f"arith:{a} {op} {b}"))

        kind = ("reverse", "upper", "count", "first")[i % 4]
        problem = {"reverse": lambda w, c: f"rev:{w}", "upper": lambda w, c: f"up:{w}",
                   "count": lambda w, c: f"count:{c}:{w}", "first": lambda w, c: f"first:{w}"}[kind]
        w, c = _word(rng, words, problem)
        q = rng.choice(_QUOTES).format(w)
        if kind == "reverse":
            ask, ans = rng.choice(_REVERSE).format(w=q), w[::-1]
        elif kind == "upper":
            ask, ans = rng.choice(_UPPER).format(w=q), w.upper()
        elif kind == "count":
            ask, ans = rng.choice(_COUNT).format(c=c, w=q), str(w.count(c))
        else:
            ask, ans = rng.choice(_FIRST).format(w=q), w[0]
        by_family["strings"].append(_item("strings", [{"role": "user", "content": ask}], ans, problem(w, c)))

        en = rng.choice(known)
        if i % 2 == 0:
            msg, ans = rng.choice(_TO_ZH).format(en=rng.choice(_QUOTES).format(en)), EN_ZH[en]
        else:
            msg, ans = rng.choice(_TO_EN).format(zh=EN_ZH[en]), en
        by_family["translate"].append(_item("translate", [{"role": "user", "content": msg}], ans))

        op = "+-"[(i // 2) % 2]
        a, b, r = _two_digit(rng, op)
        kind = ("double", "add", "sub", "half")[i % 4]
        if kind == "half" and r % 2:
            kind = "double"
        c = rng.randint(2, 20)
        value = {"double": 2 * r, "add": r + c, "sub": r - c, "half": r // 2}[kind]
        first = rng.choice(_ADD if op == "+" else _SUB).format(a=a, b=b)
        by_family["multiturn"].append(_item("multiturn", [
            {"role": "user", "content": first}, {"role": "assistant", "content": f"{a} {op} {b} = {r}."},
            {"role": "user", "content": rng.choice(_FOLLOW[kind]).format(c=c)}], str(value), f"arith:{a} {op} {b}"))

        by_family["decline"].append(_item("decline", [{"role": "user", "content": _DECLINE[i % len(_DECLINE)]}],
                                          DECLINE_ANSWER))
    return [by_family[f][i] for i in range(n_per_family) for f in FAMILIES]


RESTATING = ("arithmetic", "strings")   # the families whose replies echo the problem ("59 + 63 = ...")


def summarise(items: list[dict], responses: list[str]) -> dict:
    """{"mean_family_accuracy", "min_family_accuracy", "per_family", "restated", "n"} from checked
    responses; ``restated``: per RESTATING family, the share of replies that restate the asked problem
    right (copying works) whether or not the answer is (computing works)."""
    from gptlab.data.instruct import restatement
    from gptlab.train.heldout import checked_by_family
    per = {f: sum(v) / len(v) for f, v in checked_by_family(items, responses).items()}
    restated = {}
    for f in RESTATING:
        marks = [restatement(it, text) is True for it, text in zip(items, responses) if it["family"] == f]
        if marks:
            restated[f] = sum(marks) / len(marks)
    return {"mean_family_accuracy": sum(per.values()) / len(per), "min_family_accuracy": min(per.values()),
            "per_family": per, "restated": restated, "n": len(items)}


def exam_run(run_dir: str | Path, items: list[dict], device: str = "cpu") -> list[str]:
    """Greedy replies of a run folder's model, through the chat template (what ``gptlab serve`` does)."""
    from gptlab.runs import load_run
    from gptlab.train.heldout import task_accuracy
    model, tok, _ = load_run(run_dir, device=device)
    model.eval()
    return task_accuracy(model, tok, items, max_new_tokens=64, return_responses=True)["responses"]


def exam_server(base_url: str, items: list[dict], api_key: str = "none", model: str = "gptlab") -> list[str]:
    """The same questions to a running OpenAI-compatible server, with the official ``openai`` client."""
    try:
        from openai import OpenAI
    except ImportError:
        raise GptlabError("--base-url needs the openai package (pip install openai)") from None
    client = OpenAI(base_url=base_url, api_key=api_key)
    out = []
    for it in items:
        r = client.chat.completions.create(model=model, messages=it["messages"], temperature=0, max_tokens=48)
        out.append(r.choices[0].message.content or "")
    return out


def format_table(results: dict[str, dict]) -> str:
    """Markdown: one row per model, one column per family, then the mean."""
    head = "| model | " + " | ".join(FAMILIES) + " | mean |\n|---|" + "---|" * (len(FAMILIES) + 1) + "\n"
    rows = []
    for name, r in results.items():
        cells = [f"{100 * r['per_family'].get(f, 0):.0f}%" for f in FAMILIES]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | **{100 * r['mean_family_accuracy']:.1f}%** |")
    return head + "\n".join(rows) + "\n"


def format_restated(results: dict[str, dict]) -> str:
    """One line: per model, the share of replies restating the asked sum or word right."""
    parts = [f"{name} " + ", ".join(f"{f} {100 * v:.0f}%" for f, v in r["restated"].items())
             for name, r in results.items() if r.get("restated")]
    return ("Replies that restate the asked sum or word right (copying from the question): "
            + "; ".join(parts) + ".\n") if parts else ""


def run(args) -> int:
    from gptlab.io import atomic_write_json
    if args.n < 1:
        raise GptlabError("--n must be at least 1")
    items = build_exam(args.n, args.seed)
    results = {}
    for target in args.runs or []:
        responses = exam_run(target, items, device=args.device)
        results[str(target)] = {**summarise(items, responses), "responses": responses}
    if args.base_url:
        responses = exam_server(args.base_url, items, api_key=args.api_key)
        results[args.base_url] = {**summarise(items, responses), "responses": responses}
    if not results:
        raise GptlabError("give one or more run folders, or --base-url of a running server")
    print(format_table(results) + format_restated(results), end="")
    if args.out:
        from gptlab.plots import plot_family_bars
        out = Path(args.out)
        atomic_write_json(out, {"items": items, "results": results})
        names = {k: Path(k).name if Path(k).name else k for k in results}
        plot_family_bars({names[k]: v for k, v in results.items()}, list(FAMILIES), out.with_suffix(".png"),
                         title="questions in a person's own words (greedy)", floor=0.4)
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("exam", help="ask person-phrased questions from five families and score the answers",
                       description="Ask questions in wordings the curriculum never uses (2-digit arithmetic, string "
                       "edits, English<->Chinese words, a multi-turn follow-up, questions no one can answer) at "
                       "temperature 0 and print accuracy per family.")
    p.add_argument("runs", nargs="*", help="run folders to examine")
    p.add_argument("--base-url", default=None, help="examine a running server instead (e.g. http://127.0.0.1:8000/v1)")
    p.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    p.add_argument("--n", type=int, default=40, help="questions per family")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write items, replies and scores here (JSON)")
    p.set_defaults(func=run)
