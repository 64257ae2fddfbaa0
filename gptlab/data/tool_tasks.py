"""Curriculum families whose right answer needs a tool (``gptlab data instruct --tools``).

* calc     3-4 digit sums and products: with the calculator shown the reply calls it and restates its
           result; a fifth of the problems come without tools, answered directly, in the same words (the
           model's own arithmetic, which the with/without comparison measures)
* lookup   questions about invented places, mountains, rivers, people and firms, answered by a passage
           the search tool returns from generated documents. The held-out questions' documents are
           written to a folder of their own, never to training data, so only retrieval can answer them
* funcs    generated function schemas (a verb_object name, described parameters, one or two other
           functions beside it): the reply calls the requested one with the values the user gave. The
           held-out functions have names and parameters that no training item has
* no_tool  tools are shown but not needed (small sums, string edits, translations): answered directly,
           so the model learns when not to call

Every conversation carries its ``tools`` (function definitions) and uses the chat template's tool turns.
A search result in a training conversation is what the real search tool returns from an index of the
training documents, so training and use see results of the same form.
"""
from __future__ import annotations

import hashlib
import json
import random
import tempfile
from pathlib import Path

from gptlab.data import phrasing
from gptlab.data.phrasing import ask
from gptlab.tools.calculator import calculator_tool, evaluate, show
from gptlab.tools.search import SEARCH_SPEC, build_index, format_results, search

TOOL_FAMILIES = ("calc", "lookup", "funcs", "no_tool")
CALC_SPEC = calculator_tool().spec()
FACTS_FILE = "facts.jsonl"


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text, call=None):
    m = {"role": "assistant", "content": text}
    if call is not None:
        m["tool_calls"] = [{"name": call[0], "arguments": call[1]}]
    return m


def _tool(text):
    return {"role": "tool", "content": text}


# ----- calc -------------------------------------------------------------------------------------------
def gen_calc(rng: random.Random) -> dict:
    op = rng.choice("+*")
    if op == "+":
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
    else:
        a, b = rng.randint(100, 9999), rng.randint(10, 999) if rng.random() < 0.5 else rng.randint(100, 9999)
    q = f"{a} {op} {b}"
    r = show(evaluate(q))
    return {"key": q, "ask": ask(phrasing.ARITH[op], rng, a=a, b=b), "expression": q, "result": r,
            "reply": f"{q} = {r}."}


# ----- lookup: invented things and their facts --------------------------------------------------------
_ONSET = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st",
          "th", "sh", "ch", "pl", "fl", "qu")
_VOWEL = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y")
_CODA = ("", "n", "r", "s", "l", "th", "nd", "rk", "x", "m")
_PRODUCTS = ("paper lanterns", "copper kettles", "blue marmalade", "wool blankets", "glass beads", "clay pots",
             "silk ribbons", "wooden clocks", "salt biscuits", "iron nails", "rope ladders", "tin whistles")
_FOODS = ("red berries", "river fish", "pine seeds", "grass", "beetles", "honey", "moss", "snails")


def _name(rng) -> str:
    return ("".join(rng.choice(_ONSET) + rng.choice(_VOWEL) for _ in range(rng.randint(2, 3)))
            + rng.choice(_CODA)).capitalize()


def gen_fact(rng: random.Random) -> dict:
    """One invented entity: its document (two facts) and a question answered by one of them."""
    kind = rng.choice(("country", "mountain", "river", "person", "firm"))
    e = _name(rng)
    if kind == "country":
        city, other = _name(rng), _name(rng)
        facts = [(f"The capital of {e} is {city}.", f"What is the capital of {e}?", f"capital of {e}", city),
                 (f"The largest port of {e} is {other}.", f"What is the largest port of {e}?",
                  f"largest port of {e}", other)]
    elif kind == "mountain":
        h, year = rng.randint(800, 8800), rng.randint(1700, 1990)
        facts = [(f"Mount {e} is {h} metres high.", f"How high is Mount {e}?", f"height of Mount {e}", f"{h} metres"),
                 (f"Mount {e} was first climbed in {year}.", f"When was Mount {e} first climbed?",
                  f"Mount {e} first climbed", str(year))]
    elif kind == "river":
        n, sea = rng.randint(40, 4000), _name(rng)
        facts = [(f"The river {e} is {n} kilometres long.", f"How long is the river {e}?", f"length of river {e}",
                  f"{n} kilometres"),
                 (f"The river {e} flows into the {sea} Sea.", f"Where does the river {e} flow?",
                  f"river {e} flows into", f"{sea} Sea")]
    elif kind == "person":
        year, town = rng.randint(1500, 1990), _name(rng)
        facts = [(f"{e} {_name(rng)} was born in {year}.", f"In which year was {e} born?", f"{e} born year", str(year)),
                 (f"{e} lived in the town of {town}.", f"Where did {e} live?", f"{e} lived town", town)]
    else:
        product, year = rng.choice(_PRODUCTS), rng.randint(1800, 2020)
        facts = [(f"The {e} company makes {product}.", f"What does the {e} company make?", f"{e} company makes",
                  product),
                 (f"The {e} company was founded in {year}.", f"When was the {e} company founded?",
                  f"{e} company founded", str(year))]
    rng.shuffle(facts)
    sentence, question, query, answer = facts[0]
    text = " ".join(f[0] for f in facts)
    return {"key": e, "doc": {"title": e, "text": text}, "ask": phrasing.roughen(question, rng, p=0.2),
            "query": query, "answer": answer, "sentence": sentence}


# ----- funcs: generated function schemas -----------------------------------------------------------------
_VERBS = ("book", "find", "set", "send", "order", "cancel", "play", "check", "add", "remove", "schedule", "rent",
          "track", "rate", "share", "print", "start", "stop", "open", "close", "buy", "sell", "renew", "report")
_OBJECTS = ("flight", "table", "alarm", "message", "pizza", "song", "reminder", "ticket", "meeting", "taxi", "room",
            "parcel", "recipe", "timer", "invoice", "bike", "photo", "lamp", "door", "car", "book", "plant", "game",
            "coupon")
_PARAMS = (("city", "string"), ("count", "integer"), ("name", "string"), ("time", "string"), ("colour", "enum"),
           ("size", "enum"), ("day", "enum"), ("minutes", "integer"), ("note", "string"), ("level", "integer"),
           ("seats", "integer"), ("item", "string"))
_ENUMS = {"colour": ["red", "green", "blue"], "size": ["small", "medium", "large"],
          "day": ["monday", "friday", "sunday"]}
_REQUESTS = ("Please {verb} a {obj}: {args}.", "{Verb} a {obj} with {args}.", "I need to {verb} a {obj}. {args}.",
             "can you {verb} a {obj} for me, {args}", "{Verb} the {obj} please ({args})")


def _param(rng, name: str, kind: str) -> tuple[dict, object]:
    if kind == "integer":
        return {"type": "integer"}, rng.randint(1, 99)
    if kind == "enum":
        values = _ENUMS.get(name) or sorted({_name(rng).lower() for _ in range(3)})
        return {"enum": values}, rng.choice(values)
    if name == "time":
        return {"type": "string"}, f"{rng.randint(1, 12)}:{rng.choice(('00', '15', '30', '45'))}"
    return {"type": "string"}, _name(rng) if name in ("city", "name") else rng.choice(phrasing_words())


def phrasing_words() -> list[str]:
    from gptlab.data.dictionary import WORDS
    return [w for w in WORDS if 3 <= len(w) <= 8][:400]


def _function(rng, name: str) -> tuple[dict, dict]:
    """(definition, argument values) for a function called ``name`` with 1-3 parameters, one of them
    often a made-up word so that held-out functions bring parameters never seen in training."""
    chosen = rng.sample(_PARAMS, rng.randint(1, 2))
    if rng.random() < 0.5:
        chosen.append((_name(rng).lower(), rng.choice(("string", "integer", "enum"))))
    props, values = {}, {}
    for pname, kind in chosen:
        props[pname], values[pname] = _param(rng, pname, kind)
    verb, obj = name.split("_", 1)
    spec = {"name": name, "description": f"{verb.capitalize()} a {obj}",
            "parameters": {"type": "object", "properties": props, "required": list(props)}}
    return spec, values


def gen_function(rng: random.Random) -> dict:
    verb, obj = rng.choice(_VERBS), rng.choice(_OBJECTS)
    name = f"{verb}_{obj}"
    spec, values = _function(rng, name)
    others = []
    while len(others) < rng.randint(0, 2):
        o = f"{rng.choice(_VERBS)}_{rng.choice(_OBJECTS)}"
        if o != name and o not in [x["name"] for x in others]:
            others.append(_function(rng, o)[0])
    tools = others + [spec]
    rng.shuffle(tools)
    args_text = ", ".join(f"{k} {v}" for k, v in values.items())
    request = rng.choice(_REQUESTS).format(verb=verb, Verb=verb.capitalize(), obj=obj, args=args_text)
    result = rng.choice(("ok", "done", json.dumps({"status": "ok", "id": rng.randint(100, 999)})))
    return {"key": name, "tools": tools, "ask": request, "call": {"name": name, "arguments": values},
            "result": result, "reply": f"Done: the {obj} request went through."}


# ----- assembling --------------------------------------------------------------------------------------
def build_tool_curriculum(seed: int, n: int, base_gens: dict, ctx, split_of, docs_dir: Path) -> dict[str, list[dict]]:
    """{"sft": [conversation], "heldout": [prompt item]} for the tool families, and the documents under
    ``docs_dir``/train and ``docs_dir``/heldout. ``split_of(key)`` is the curriculum's hash split
    ("heldout" or not); ``base_gens`` are the plain families the no-tool turns borrow."""
    out = {"sft": [], "heldout": []}

    def add(family, key, messages, tools, answer, split_key, **extra):
        split = "heldout" if split_of(split_key) == "heldout" else "sft"
        digest = hashlib.sha256(f"{family}:{key}".encode()).hexdigest()[:10]
        item = {"family": family, "id": f"{family}-{digest}", "answer": answer,
                **({"tools": tools} if tools else {}), **extra}
        if split == "sft":
            out["sft"].append({**item, "messages": messages})
        else:   # a prompt: the question only; the demonstration is the reference
            cut = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            out["heldout"].append({**item, "messages": messages[:cut]})

    rng = random.Random(f"{seed}:calc")
    seen = set()
    for _ in range(n):
        g = gen_calc(rng)
        if g["key"] in seen:
            continue
        seen.add(g["key"])
        if rng.random() < 0.8:
            msgs = [_user(g["ask"]), _assistant("", ("calculator", {"expression": g["expression"]})),
                    _tool(g["result"]), _assistant(g["reply"])]
            add("calc", g["key"], msgs, [CALC_SPEC] + ([SEARCH_SPEC] if rng.random() < 0.3 else []), g["result"],
                f"calc:{g['key']}")
        else:
            add("calc", g["key"], [_user(g["ask"]), _assistant(g["reply"])], None, g["result"], f"calc:{g['key']}")

    rng = random.Random(f"{seed}:lookup")
    facts, names = [], set()
    while len(facts) < n:
        f = gen_fact(rng)
        if f["key"] not in names:
            names.add(f["key"])
            facts.append(f)
    held = [f for f in facts if split_of(f"lookup:{f['key']}") == "heldout"]
    train = [f for f in facts if split_of(f"lookup:{f['key']}") != "heldout"]
    from gptlab.io import atomic_write_jsonl
    for sub, group in (("train", train), ("heldout", held)):
        atomic_write_jsonl(docs_dir / sub / FACTS_FILE, [f["doc"] for f in group])
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "train.index"
        build_index(docs_dir / "train", index)
        for f in facts:
            tools = [SEARCH_SPEC] + ([CALC_SPEC] if rng.random() < 0.3 else [])
            if f in held:
                add("lookup", f["key"], [_user(f["ask"]), _assistant("")], tools, f["answer"], f"lookup:{f['key']}")
                continue
            result = format_results(search(index, f["query"]))
            msgs = [_user(f["ask"]), _assistant("", ("search", {"query": f["query"]})), _tool(result),
                    _assistant(f["sentence"])]
            add("lookup", f["key"], msgs, tools, f["answer"], f"lookup:{f['key']}")

    rng = random.Random(f"{seed}:funcs")
    seen = set()
    for _ in range(n):
        g = gen_function(rng)
        if g["ask"] in seen:
            continue
        seen.add(g["ask"])
        if split_of(f"funcs:{g['key']}") != "heldout":   # no held-out function shows up in training, even unused
            g["tools"] = [t for t in g["tools"] if t["name"] == g["key"]
                          or split_of(f"funcs:{t['name']}") != "heldout"]
        msgs = [_user(g["ask"]), _assistant("", (g["call"]["name"], g["call"]["arguments"])), _tool(g["result"]),
                _assistant(g["reply"])]
        add("funcs", g["ask"], msgs, g["tools"], g["call"]["name"], f"funcs:{g['key']}", call=g["call"])

    rng = random.Random(f"{seed}:no_tool")
    families = [f for f in ("arithmetic", "strings", "translate") if f in base_gens]
    for i in range(n // 2):
        g = base_gens[rng.choice(families)](rng, ctx)
        tools = rng.choice(([CALC_SPEC], [SEARCH_SPEC], [CALC_SPEC, SEARCH_SPEC]))
        add("no_tool", f"{i}:{g.key}", g.messages, tools, g.answer, g.split_key)
    return out
