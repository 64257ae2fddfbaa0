"""Imports run down the pipeline only: a module may import its own layer or a lower one, never a higher one.

Every module (function-local imports included) is read with ``ast``, so an upward import cannot hide
inside a function. A module that no layer names fails the test too: a new module has to be placed.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "gptlab"

# Lowest first. A module belongs to the entry naming the longest prefix of its dotted name.
LAYERS = [
    # cross-cutting: user errors, files, devices, plots, and the arithmetic of intervals, which a
    # training stage's own summary uses as much as an evaluation does
    ("base", ["gptlab.errors", "gptlab.io", "gptlab.device", "gptlab.plots", "gptlab.evals.stats"]),
    # tools a model calls (calculator, search): plain Python, below the curriculum that teaches them
    ("tools", ["gptlab.tools"]),
    ("data", ["gptlab.data"]),
    # token bins need a tokenizer; the chat template turns conversations into token ids
    ("tokenizer", ["gptlab.tokenizer", "gptlab.data.tokens", "gptlab.data.commands"]),
    ("model", ["gptlab.model"]),
    # run folders: written by every stage, read by every consumer
    ("runs", ["gptlab.runs"]),
    # the engine: every stage that samples (pretrain's sample, SFT/DPO/PPO held-out answers, PPO
    # rollouts) uses it, so it sits below training
    ("generate", ["gptlab.generate"]),
    # the programmatic labeler: PPO's oracle reward and the held-out labeler score use it
    ("label", ["gptlab.label"]),
    ("train", ["gptlab.train"]),
    ("chat/serve", ["gptlab.chat", "gptlab.serve", "gptlab.interop"]),
    ("evals", ["gptlab.evals"]),
    # assembly: the CLI, the end-to-end run and its report, the benchmarks
    ("top", ["gptlab", "gptlab.__main__", "gptlab.cli", "gptlab.speedrun", "gptlab.report", "gptlab.bench"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index in LAYERS; the package itself ("gptlab") is matched exactly, never as a prefix."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            hit = module == p if p == "gptlab" else (module == p or module.startswith(p + "."))
            if hit and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, gptlab module) for every import in ``source``, wherever it stands."""
    out = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "gptlab"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "gptlab":
                continue
            for a in node.names:   # `from gptlab.train import rl` imports the module gptlab.train.rl
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in MODULES else base))
    return out


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    mine = layer_of(module)
    bad = []
    for line, target in imported_modules(source, module, is_package):
        theirs = layer_of(target)
        if theirs is not None and theirs > mine:
            bad.append(f"{module}:{line} imports {target} ({LAYERS[mine][0]} -> {LAYERS[theirs][0]})")
    return bad


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if layer_of(m) is None]
    assert not missing, f"place these modules in tests/test_layout.py LAYERS: {missing}"


def test_no_import_runs_up_the_pipeline():
    bad = []
    for module, path in MODULES.items():
        bad += upward_imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
    assert not bad, "imports that run back up the pipeline:\n" + "\n".join(bad)


@pytest.mark.parametrize("source", [
    "from gptlab.train.loop import train",
    "def f():\n    from gptlab.train import loop\n",     # inside a function
    "import gptlab.serve.app",
    "from ..train import sft",                           # relative
])
def test_the_check_sees_an_upward_import(source):
    assert upward_imports(source, "gptlab.generate.engine")


def test_the_check_allows_downward_and_sideways_imports():
    assert not upward_imports("from gptlab import runs\nfrom gptlab.generate.engine import Engine\n"
                              "from .args import add_train_args\n", "gptlab.train.sft")
