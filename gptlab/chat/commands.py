"""`gptlab chat RUN_DIR`: talk to a chat-tuned run in the terminal.

    gptlab chat runs/sft --system "You are a helpful assistant." --temperature 0.7
"""
from __future__ import annotations

import argparse
import sys

from gptlab.errors import GptlabError


def run(args) -> int:
    from gptlab.chat.repl import ChatSession, setup_readline
    from gptlab.generate.commands import load_for_generation
    from gptlab.generate.engine import SamplingParams
    from gptlab.tokenizer.chat_template import require_chat_tokens
    from gptlab.io import gptlab_home
    from gptlab.tools import builtin_toolbox

    toolbox = builtin_toolbox(args.tools, args.index)   # checked before the model loads
    if args.max_tool_calls < 1:
        raise GptlabError("--max-tool-calls must be at least 1")
    engine, tok, _ = load_for_generation(args.run_dir, args.device)
    require_chat_tokens(tok, args.run_dir)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if sys.stdin.isatty():
        setup_readline(gptlab_home() / "chat_history")
    session = ChatSession(engine, params, system=args.system, toolbox=toolbox or None,
                          max_tool_calls=args.max_tool_calls)
    for path in args.image or ():
        if not session.attach(path):
            raise GptlabError(f"--image {path}: cannot be shown to this model (see above)")
    return session.run()


def register(sub) -> None:
    from gptlab.generate.commands import add_sampling_args
    from gptlab.tools import add_tool_args
    p = sub.add_parser(
        "chat", help="chat with a run in the terminal (streaming, history, /commands)",
        description="An interactive chat with RUN_DIR (an SFT/RLHF run, or any run whose tokenizer has the "
        "chat tokens). Answers stream as they are generated and stop at the end-of-turn token. Commands: "
        "/system TEXT, /temp X, /image PATH, /reset, /save FILE (conversations JSONL), /help, /quit. Ctrl-C stops the "
        "current answer (what came so far is kept); Ctrl-D leaves. Line editing and history use readline "
        "(history in $GPTLAB_HOME/chat_history). When the conversation outgrows the context window the "
        "oldest turns are dropped (the system message is kept) and a notice is shown.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder (sft, ppo, dpo, or import --add-chat-tokens)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message for the conversation")
    p.add_argument("--image", action="append", metavar="PATH",
                   help="a picture shown with your first message (a vision run; repeatable; /image in the chat)")
    add_sampling_args(p, temperature=0.7, top_p=0.9, max_new_tokens=256)
    add_tool_args(p)
    p.set_defaults(func=run)
