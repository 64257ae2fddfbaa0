"""The ``gptlab`` command line.

Each subcommand lives next to the code it drives: a module listed in COMMANDS defines
``register(subparsers)``, which adds its parser(s) and sets ``func`` to a callable taking the parsed
args. This file only assembles them and turns user errors into one line and a non-zero exit.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from gptlab.errors import GptlabError

# Pipeline order: data -> tokenizer -> model -> training stages -> generation -> chat/serve -> evals.
# Each entry: the module that registers the commands, and the command names it adds. Only the chosen
# command's module is imported (start-up stays fast); `gptlab --help` imports them all.
COMMANDS = [
    ("gptlab.data.commands", ["data"]),
    ("gptlab.tokenizer.commands", ["tokenizer"]),
    ("gptlab.train.pretrain", ["pretrain"]),
    ("gptlab.train.finetune", ["finetune", "predict"]),
    ("gptlab.train.sft", ["sft"]),
    ("gptlab.train.reward", ["rm"]),
    ("gptlab.train.prm", ["prm"]),
    ("gptlab.train.ppo", ["ppo"]),
    ("gptlab.train.dpo", ["dpo"]),
    ("gptlab.train.vision", ["vision"]),
    ("gptlab.label.commands", ["label"]),
    ("gptlab.generate.commands", ["sample"]),
    ("gptlab.tools.search", ["index"]),
    ("gptlab.evals.tools", ["eval-tools"]),
    ("gptlab.chat.commands", ["chat"]),
    ("gptlab.serve.commands", ["serve", "feedback"]),
    ("gptlab.evals.commands", ["eval", "fill"]),
    ("gptlab.evals.compare", ["compare", "plot-compare"]),
    ("gptlab.evals.search", ["search"]),
    ("gptlab.evals.exam", ["exam"]),
    ("gptlab.evals.vision", ["eval-vision"]),
    ("gptlab.interop.commands", ["export", "import"]),
    ("gptlab.bench", ["bench"]),
    ("gptlab.speedrun", ["speedrun"]),
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (with ``command``) one holding only the module that defines it."""
    parser = argparse.ArgumentParser(
        prog="gptlab",
        description="Build a ChatGPT from its parts: data, tokenizer, GPT models, pre-training, "
        "fine-tuning, few-shot evals, InstructGPT (SFT, reward model, PPO, DPO), chat and serving.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, names in COMMANDS:
        if command is not None and command not in names:
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (e.name == name or name.startswith(e.name + ".")):
                continue  # that part of gptlab is not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    known = {n for _, names in COMMANDS for n in names}
    parser = build_parser(argv[0] if argv and argv[0] in known else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except GptlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # e.g. `gptlab sample ... | head`: stop quietly.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except OSError as e:
        # A path the user named that cannot be read or written (a file where a folder is needed, no
        # permission, a full disk): say which and why in one line.
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
