"""docs/ARCHITECTURE.md matches the code: its module map lists every module and only modules that exist,
and every ``name(arguments)`` it writes has those parameters (``...`` = more left out).

Inline code spans are read outside fenced blocks. A span naming ``gptlab.x.y`` is resolved from the
top; a span ``Name(...)`` or ``Name.attr(...)`` is resolved in the module named in backticks by the
nearest heading above it (spans under a heading without a module are prose, not checked).
"""
import importlib
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "ARCHITECTURE.md"
NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def inline_spans(text: str) -> list[tuple[str | None, str]]:
    """(module of the nearest heading, span) for every inline code span outside fenced blocks."""
    out, module, fenced = [], None, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        spans = re.findall(r"`([^`]+)`", line)
        if line.startswith("#"):
            module = next((s for s in spans if s.startswith("gptlab.") or s == "gptlab"), None)
            continue
        out += [(module, s) for s in spans]
    return out


def split_call(span: str) -> tuple[str, list[str]] | None:
    """``a.b(x, y=1, ...)`` -> ("a.b", ["x", "y=1", "..."]); None when the span is not a call."""
    m = NAME.match(span)
    if not m or m.end() >= len(span) or span[m.end()] != "(":
        return None
    depth, args, cur = 0, [], ""
    for ch in span[m.end():]:
        if ch in "([{":
            depth += 1
            if depth == 1:
                continue
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                break
        if ch == "," and depth == 1:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        args.append(cur.strip())
    return m.group(0), args


def resolve(dotted: str, module: str | None = None):
    """The object ``dotted`` names: absolute when it starts with gptlab, else inside ``module``."""
    if not (dotted == "gptlab" or dotted.startswith("gptlab.")):
        return _attrs(importlib.import_module(module), dotted.split("."), f"{module}.{dotted}")
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            mod = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        return _attrs(mod, parts[i:], dotted)
    raise AssertionError(f"{dotted}: no such module")


def _attrs(obj, names, full):
    for n in names:
        if not hasattr(obj, n):
            raise AssertionError(f"docs/ARCHITECTURE.md names {full}, which does not exist")
        obj = getattr(obj, n)
    return obj


def parameter_names(obj) -> list[str]:
    params = list(inspect.signature(obj).parameters.values())
    return [p.name for p in params if p.name not in ("self", "cls")]


def documented_names(args: list[str]) -> tuple[list[str], bool]:
    names, more = [], False
    for a in args:
        if a == "...":
            more = True
        elif a != "*":
            names.append(re.match(r"\**(\w+)", a).group(1))
    return names, more


def check_span(module: str | None, span: str) -> str | None:
    """An error message, or None when the span is fine or not a checkable name."""
    call = split_call(span)
    name = call[0] if call else span
    if not NAME.fullmatch(name):
        return None
    absolute = name == "gptlab" or name.startswith("gptlab.")
    if not absolute and (call is None or module is None):
        return None
    try:
        obj = resolve(name, module)
    except AssertionError as e:
        return str(e)
    if call is None:
        return None
    want, more = documented_names(call[1])
    have = parameter_names(obj)
    if (have[:len(want)] if more else have) != want:
        return f"`{span}`: the code's parameters are ({', '.join(have)})"
    return None


def test_every_name_and_signature_exists():
    errors = [e for module, span in inline_spans(DOC.read_text(encoding="utf-8"))
              if (e := check_span(module, span))]
    assert not errors, "docs/ARCHITECTURE.md disagrees with the code:\n" + "\n".join(errors)


def test_module_map_lists_every_module_and_only_real_paths():
    text = DOC.read_text(encoding="utf-8")
    paths = set(re.findall(r"`(gptlab/[\w/.]*)`", text))
    missing_paths = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing_paths, f"docs/ARCHITECTURE.md names paths that do not exist: {missing_paths}"
    modules = {str(p.relative_to(REPO)) for p in (REPO / "gptlab").rglob("*.py") if p.stat().st_size}
    unlisted = sorted(modules - paths)
    assert not unlisted, f"add a one-line entry to docs/ARCHITECTURE.md's module map for: {unlisted}"


@pytest.mark.parametrize("span, module, wrong", [
    ("gptlab.runs.load_run(run_dir, device)", None, True),             # a parameter left out, no "..."
    ("gptlab.runs.load_run(run_dir, device, ...)", None, False),
    ("gptlab.runs.no_such_function(x)", None, True),
    ("load_run(path)", "gptlab.runs", True),                            # a wrong parameter name
    ("load_run(run_dir, device=\"cpu\", with_heads=False, context=None)", "gptlab.runs", False),
    ("gptlab.no_such_module", None, True),
])
def test_the_check_catches_a_wrong_signature(span, module, wrong):
    assert (check_span(module, span) is not None) == wrong


def test_the_layer_table_is_the_one_the_import_check_uses():
    from test_layout import LAYERS, layer_of
    text = DOC.read_text(encoding="utf-8").split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in text.splitlines() if line.startswith("| ") and "`" in line]
    named = set()
    for layer, cell in rows:
        for path in re.findall(r"`(gptlab/[\w/.]*)`", cell):
            module = path.removesuffix("/").removesuffix(".py").replace("/", ".")
            named.add(module)
            got = layer_of(module)
            assert got is not None and LAYERS[got][0] == layer.strip(), \
                f"docs/ARCHITECTURE.md puts {path} in layer {layer.strip()!r}, tests/test_layout.py does not"
    in_test = {p for _, prefixes in LAYERS for p in prefixes} - {"gptlab", "gptlab.__main__"}
    assert in_test <= named, f"layers in tests/test_layout.py missing from docs/ARCHITECTURE.md: {in_test - named}"
