"""Labelled datasets for GPT-1 fine-tuning (``gptlab finetune``): built-in Shakespeare tasks and files.

Four task types, one per GPT-1 input transformation (see gptlab.train.finetune):

===================  =========================================  ==========================================
task type            columns (CSV header / JSONL keys)          label
===================  =========================================  ==========================================
classification       ``text,label``                             any string; the label set is the labels
                                                                seen in the training rows (or --labels)
entailment           ``premise,hypothesis,label``               as classification (e.g. entail/contradict)
similarity           ``text_a,text_b,label``                    as classification (e.g. same/different)
multiple_choice      ``context,choices,label`` where            0-based index of the right choice; every
                     ``choices`` is a JSON list (in CSV a       row has the same number of choices
                     JSON string), or ``context,choice_0,
                     choice_1,...,choice_N,label``
===================  =========================================  ==========================================

The type is read from the columns (``--task-type`` forces one). Extra columns are ignored. JSONL labels
may be strings, integers or booleans (compared as their string form: ``true`` -> "True").

Built-in tasks (offline, from gptlab.data.shakespeare), deterministic for a seed. Every work is cut at
90% of its text (at a line break); training examples come from the first 90%, held-out examples only
from the last 10%, so the splits never share a line (and a base model pre-trained on the first 90% of
each work has never seen a held-out line):

* ``play``          classification: which of six plays a verse line (>= 5 words) comes from.
* ``next-line``     entailment: does line B directly follow line A in the same speech? (yes/no, balanced;
                    the "no" line comes from the same play, so the play alone does not give it away)
* ``continuation``  multiple choice: which of four lines continues line A (three distractors from the
                    same play).
* ``same-play``     similarity: do two lines come from the same play (of the six)? (same/different,
                    balanced)
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.io import iter_jsonl, read_text

TASK_TYPES = ("classification", "entailment", "similarity", "multiple_choice")
# Columns that name each type, checked in this order (a file with premise+hypothesis is entailment even
# if it also has a text column).
_TYPE_COLUMNS = {
    "multiple_choice": ("context",),
    "entailment": ("premise", "hypothesis"),
    "similarity": ("text_a", "text_b"),
    "classification": ("text",),
}
BUILTIN_TASKS = ("play", "next-line", "continuation", "same-play")
# The six plays of the `play` and `same-play` tasks: distinct casts and settings, so a line carries
# some signal (names, places, diction) about its play.
PLAYS = ("Hamlet", "Macbeth", "Romeo and Juliet", "A Midsummer Night's Dream", "Julius Caesar",
         "The Tempest")
HELDOUT_TAIL = 0.1


@dataclass
class Example:
    texts: tuple[str, ...]          # (text,) | (premise, hypothesis) | (text_a, text_b) | (context,)
    label: int                      # class index, or index of the right choice
    choices: tuple[str, ...] = ()   # multiple choice only


@dataclass
class TaskData:
    name: str
    task_type: str
    labels: list[str]               # class names (multiple choice: "0".."K-1")
    train: list[Example]
    heldout: list[Example]
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def n_outputs(self) -> int:
        """Width of the linear head: one score per class, or a single score per answer."""
        return 1 if self.task_type == "multiple_choice" else len(self.labels)

    @property
    def n_choices(self) -> int:
        return len(self.labels) if self.task_type == "multiple_choice" else 0


# ----- files ---------------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a CSV (with a header) or JSONL file."""
    if not path.is_file():
        raise GptlabError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = list(iter_jsonl(path))
    elif suffix == ".csv":
        text = read_text(path, encoding="utf-8-sig")
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise GptlabError(f"{path}: empty file (expected a header row and labelled rows)")
        rows = []
        try:
            for row in reader:
                if None in row:
                    raise GptlabError(f"{path}:{reader.line_num}: more values than header columns")
                if all(v in (None, "") for v in row.values()):
                    continue
                rows.append((reader.line_num, {k.strip(): v for k, v in row.items()}))
        except csv.Error as e:
            raise GptlabError(f"{path}:{reader.line_num}: bad CSV ({e})") from None
    else:
        raise GptlabError(f"{path}: unknown file type {suffix or '(none)'} (use .csv or .jsonl)")
    if not rows:
        raise GptlabError(f"{path}: no labelled rows")
    return rows


def detect_type(columns: set[str], source: str) -> str:
    for task_type, needed in _TYPE_COLUMNS.items():
        if all(c in columns for c in needed):
            return task_type
    raise GptlabError(f"{source}: cannot tell the task from columns {sorted(columns)}; expected "
                      "text,label | premise,hypothesis,label | text_a,text_b,label | context,choices,label")


def _choices(row: dict, where: str) -> list[str]:
    if "choices" in row:
        value = row["choices"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise GptlabError(f"{where}: 'choices' must be a JSON list of strings") from None
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise GptlabError(f"{where}: 'choices' must be a list of strings")
        return value
    out, k = [], 0
    while f"choice_{k}" in row:
        if row[f"choice_{k}"] not in (None, ""):
            out.append(str(row[f"choice_{k}"]))
        k += 1
    if not out:
        raise GptlabError(f"{where}: missing column 'choices' (a JSON list) or choice_0..choice_N")
    return out


def _field(row: dict, col: str, where: str) -> str:
    if col not in row:
        raise GptlabError(f"{where}: missing column {col!r}")
    v = row[col]
    if v is None or (isinstance(v, str) and not v.strip()):
        raise GptlabError(f"{where}: empty value in column {col!r}")
    if not isinstance(v, (str, int, float, bool)):
        raise GptlabError(f"{where}: column {col!r} must be a string")
    return str(v)


def parse_rows(rows: list[tuple[int, dict]], source: str, task_type: str | None) -> tuple[str, list]:
    """-> (task type, [(line, texts, label string, choices)])."""
    columns = set(rows[0][1])
    task_type = task_type or detect_type(columns, source)
    if task_type not in TASK_TYPES:
        raise GptlabError(f"unknown task type {task_type!r} (choose from {', '.join(TASK_TYPES)})")
    out = []
    for line, row in rows:
        where = f"{source}:{line}"
        label = _field(row, "label", where)
        if task_type == "multiple_choice":
            out.append((line, (_field(row, "context", where),), label, tuple(_choices(row, where))))
        else:
            cols = {"classification": ("text",), "entailment": ("premise", "hypothesis"),
                    "similarity": ("text_a", "text_b")}[task_type]
            out.append((line, tuple(_field(row, c, where) for c in cols), label, ()))
    return task_type, out


def _to_examples(parsed, labels: list[str], task_type: str, source: str) -> list[Example]:
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    for line, texts, label, choices in parsed:
        where = f"{source}:{line}"
        if task_type == "multiple_choice":
            if len(choices) != len(labels):
                raise GptlabError(f"{where}: {len(choices)} choices, but the first row has {len(labels)} "
                                  "(every row needs the same number)")
            if label not in index:
                raise GptlabError(f"{where}: label {label!r} is not a choice index 0..{len(labels) - 1}")
        elif label not in index:
            raise GptlabError(f"{where}: label {label!r} is not in the label set {labels}")
        examples.append(Example(texts, index[label], choices))
    return examples


def load_file(path: str | Path, task_type: str | None = None, labels: list[str] | None = None,
              heldout: str | Path | None = None, heldout_fraction: float = 0.2, seed: int = 0) -> TaskData:
    """A labelled CSV/JSONL file -> TaskData. Without ``heldout`` a deterministic ``heldout_fraction``
    of the rows (shuffled with ``seed``) is held out."""
    path = Path(path)
    task_type, parsed = parse_rows(_read_rows(path), str(path), task_type)
    if task_type == "multiple_choice":
        n = len(parsed[0][3])
        if n < 2:
            raise GptlabError(f"{path}: multiple choice needs at least 2 choices per row")
        labels = [str(i) for i in range(n)]
    elif labels is None:
        labels = sorted({p[2] for p in parsed})
    if task_type != "multiple_choice" and len(labels) < 2:
        raise GptlabError(f"{path}: needs at least two different labels (found {labels})")
    examples = _to_examples(parsed, labels, task_type, str(path))
    if heldout is not None:
        h_type, h_parsed = parse_rows(_read_rows(Path(heldout)), str(heldout), task_type)
        held = _to_examples(h_parsed, labels, h_type, str(heldout))
        train = examples
    else:
        if not 0.0 < heldout_fraction < 1.0:
            raise GptlabError("--heldout-fraction must be between 0 and 1")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_held = max(1, round(len(examples) * heldout_fraction))
        if len(examples) - n_held < 1:
            raise GptlabError(f"{path}: too few rows ({len(examples)}) to hold some out; add rows or pass --heldout")
        held = [examples[i] for i in sorted(order[:n_held])]
        train = [examples[i] for i in sorted(order[n_held:])]
    return TaskData(path.stem, task_type, labels, train, held, source=str(path))


# ----- built-in Shakespeare tasks --------------------------------------------------------------------
def split_work(text: str, tail: float = HELDOUT_TAIL) -> tuple[str, str]:
    """(first part, held-out tail) of a work, cut at a line break near (1 - tail) of its length."""
    cut = int(len(text) * (1.0 - tail))
    cut = text.rfind("\n", 0, cut) + 1
    return text[:cut], text[cut:]


def _speeches(text: str) -> list[list[str]]:
    from gptlab.data.shakespeare import iter_speeches
    return [lines for _, lines in iter_speeches(text)]


def _play_parts(works: dict[str, str]) -> dict[str, tuple[list[list[str]], list[list[str]]]]:
    """{title: (train speeches, held-out speeches)} for every work that has speeches (the plays)."""
    out = {}
    for title, text in works.items():
        head, tail = split_work(text)
        # iter_speeches skips the first line (the title); give the tail a blank one to skip.
        parts = (_speeches(head), _speeches("\n" + tail))
        if parts[0] and parts[1]:
            out[title] = parts
    return out


def _good(line: str, min_words: int) -> bool:
    return len(line.split()) >= min_words and len(line) <= 160


def _lines(speeches: list[list[str]], min_words: int = 5) -> list[str]:
    return [ln for sp in speeches for ln in sp if _good(ln, min_words)]


def _pairs(speeches: list[list[str]]) -> list[tuple[str, str]]:
    """Consecutive lines inside one speech (both at least 3 words)."""
    return [(a, b) for sp in speeches for a, b in zip(sp, sp[1:]) if _good(a, 3) and _good(b, 3)]


def _cap(items: list, n: int, rng: random.Random) -> list:
    items = list(items)
    rng.shuffle(items)
    return items[:n]


def _six_plays(parts: dict) -> list[str]:
    chosen = [t for t in PLAYS if t in parts]
    if len(chosen) < 2:  # another corpus (e.g. tests): the first plays it has
        chosen = sorted(parts)[:len(PLAYS)]
    if len(chosen) < 2:
        raise GptlabError("the play tasks need at least two plays with speeches")
    return chosen


def _task_play(parts, rng, n_train, n_held):
    plays = _six_plays(parts)
    splits = []
    for which in (0, 1):
        per_play = [_lines(parts[t][which]) for t in plays]
        # Balanced classes: as many lines from each play as the smallest play (or the cap) allows.
        k = min(min(len(p) for p in per_play), (n_train if which == 0 else n_held) // len(plays))
        ex = [Example((ln,), c) for c, lines in enumerate(per_play) for ln in _cap(lines, k, rng)]
        rng.shuffle(ex)
        splits.append(ex)
    return "classification", list(plays), splits


def _task_next_line(parts, rng, n_train, n_held):
    splits = []
    for which, n in ((0, n_train), (1, n_held)):
        ex = []
        titles = sorted(parts)
        per_play = {t: (_pairs(parts[t][which]), _lines(parts[t][which], 3)) for t in titles}
        pool = [(t, p) for t in titles for p in per_play[t][0]]
        for t, (a, b) in _cap(pool, n, rng):
            if len(ex) % 2 == 0:  # alternate: exactly balanced
                ex.append(Example((a, b), 1))
            else:
                lines = per_play[t][1]
                other = rng.choice(lines)
                while other == b and len(lines) > 1:
                    other = rng.choice(lines)
                ex.append(Example((a, other), 0))
        rng.shuffle(ex)
        splits.append(ex)
    return "entailment", ["no", "yes"], splits


def _task_continuation(parts, rng, n_train, n_held, k: int = 4):
    splits = []
    for which, n in ((0, n_train), (1, n_held)):
        titles = sorted(parts)
        per_play = {t: (_pairs(parts[t][which]), _lines(parts[t][which], 3)) for t in titles}
        pool = [(t, p) for t in titles for p in per_play[t][0] if len(per_play[t][1]) > k]
        ex = []
        for t, (a, b) in _cap(pool, n, rng):
            distractors = set()
            while len(distractors) < k - 1:
                line = rng.choice(per_play[t][1])
                if line not in (a, b):
                    distractors.add(line)
            choices = sorted(distractors)
            answer = rng.randrange(k)
            choices.insert(answer, b)
            ex.append(Example((a,), answer, tuple(choices)))
        splits.append(ex)
    return "multiple_choice", [str(i) for i in range(k)], splits


def _task_same_play(parts, rng, n_train, n_held):
    plays = _six_plays(parts)
    splits = []
    for which, n in ((0, n_train), (1, n_held)):
        lines = {t: _lines(parts[t][which]) for t in plays}
        ex = []
        for i in range(n):
            a_play = rng.choice(plays)
            b_play = a_play if i % 2 == 0 else rng.choice([p for p in plays if p != a_play])
            a, b = rng.choice(lines[a_play]), rng.choice(lines[b_play])
            ex.append(Example((a, b), int(a_play == b_play)))
        rng.shuffle(ex)
        splits.append(ex)
    return "similarity", ["different", "same"], splits


_BUILDERS = {"play": _task_play, "next-line": _task_next_line, "continuation": _task_continuation,
             "same-play": _task_same_play}


def builtin_task(name: str, seed: int = 0, n_train: int = 4000, n_heldout: int = 600,
                 works: dict[str, str] | None = None) -> TaskData:
    """One of BUILTIN_TASKS, built from the Shakespeare works (``works`` overrides them, for tests)."""
    if name not in _BUILDERS:
        raise GptlabError(f"unknown task {name!r} (built-in: {', '.join(BUILTIN_TASKS)}; or a .csv/.jsonl file)")
    if works is None:
        from gptlab.data.shakespeare import shakespeare_works
        works = shakespeare_works()
    parts = _play_parts(works)
    if not parts:
        raise GptlabError("no plays with speeches found in the Shakespeare corpus")
    rng = random.Random(f"{name}:{seed}")
    task_type, labels, (train, held) = _BUILDERS[name](parts, rng, n_train, n_heldout)
    # A few short lines recur across a play ("No, my lord."): keep held-out examples whose lines never
    # occur in training, so held-out accuracy measures generalisation, not recall.
    seen = {x for e in train for x in e.texts + e.choices}
    held = [e for e in held if not any(x in seen for x in e.texts + e.choices)]
    if not train or not held:
        raise GptlabError(f"task {name}: the corpus is too small to build training and held-out examples")
    return TaskData(name, task_type, labels, train, held, source=f"built-in ({name}, seed {seed})",
                    info={"plays": _six_plays(parts)} if name in ("play", "same-play") else {})


def load_task(name_or_file: str, task_type: str | None = None, labels: list[str] | None = None,
              heldout: str | None = None, heldout_fraction: float = 0.2, seed: int = 0,
              n_train: int = 4000, n_heldout: int = 600) -> TaskData:
    """A built-in task name or a CSV/JSONL path."""
    if name_or_file in _BUILDERS:
        if task_type or labels or heldout:
            raise GptlabError(f"--task-type, --labels and --heldout are for files, not the built-in {name_or_file!r}")
        return builtin_task(name_or_file, seed, n_train, n_heldout)
    path = Path(name_or_file)
    if not path.exists():
        raise GptlabError(f"unknown task {name_or_file!r} (built-in: {', '.join(BUILTIN_TASKS)}; "
                          "or a .csv/.jsonl file)")
    return load_file(path, task_type, labels, heldout, heldout_fraction, seed)
