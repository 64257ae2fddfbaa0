"""`gptlab sample`: text from a trained run, streamed as it is generated.

    gptlab sample runs/tiny --prompt "ROMEO:" --temperature 0.8 --top-k 50
    gptlab sample runs/tiny --prompt "To be" --prompt "Once upon" --num-samples 2 --seed 0
    gptlab sample runs/sft --chat --prompt "What is 23 + 58?"

One prompt and one sample streams through Engine.stream; several go through Engine.generate as one
batch (each prompt in its own KV-cache row). --no-cache switches to the reference path that recomputes
the whole context for every token (slow; under greedy decoding it must give the same text).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.io import read_text


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        text = read_text(path, "--prompts-file")
        # One prompt per line; "\n" inside a line stands for a newline so prompts can span lines.
        prompts += [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
        if not prompts:
            raise GptlabError(f"--prompts-file {path}: no prompts (one per line)")
    return prompts or [""]   # no prompt: an unconditional sample starting from <|endoftext|>


def encode_prompt(tok, prompt: str, chat: bool, run_dir) -> list[int]:
    if not chat:
        return tok.encode(prompt)
    from gptlab.tokenizer.chat_template import render_prompt
    from gptlab.tokenizer.chat_template import require_chat_tokens
    require_chat_tokens(tok, run_dir)
    return render_prompt(tok, [{"role": "user", "content": prompt}])


def count_forward_passes(engine) -> list[int]:
    """Count the engine's single-row forward passes: each samples exactly one token.

    Streamed events do not map one-to-one to tokens (text held back inside a multi-byte character or a
    possible stop string, a final stop token with no text), so tokens/s counts model steps instead.
    """
    calls = [0]
    for name in ("_prefill", "_decode"):
        inner = getattr(engine, name)

        def wrapped(*a, _inner=inner, **kw):
            calls[0] += 1
            return _inner(*a, **kw)
        setattr(engine, name, wrapped)
    return calls


def load_for_generation(run_dir, device: str = "auto", context: dict | None = None):
    """(engine, tokenizer, model config) of a causal LM run; bert cannot generate left to right.
    ``context``: another context length / RoPE scaling than the run's (runs.load_run)."""
    from gptlab.device import pick_device
    from gptlab.generate.engine import Engine
    from gptlab.runs import load_run
    model, tok, _ = load_run(run_dir, pick_device(device), context=context)
    if not model.config.causal:
        raise GptlabError(f"{run_dir}: a {model.config.arch} model is bidirectional and cannot generate text; "
                          "use `gptlab fill` for cloze predictions")
    return Engine(model, tok), tok, model.config


def run(args) -> int:
    from gptlab.generate.engine import SamplingParams
    if args.num_samples < 1:
        raise GptlabError("--num-samples must be >= 1")
    prompts = read_prompts(args)
    from gptlab.runs import context_from_args
    engine, tok, _ = load_for_generation(args.run_dir, args.device, context_from_args(args))
    ids = [encode_prompt(tok, p, args.chat, args.run_dir) for p in prompts]

    def params(i: int) -> SamplingParams:
        # Each sample gets its own seed (seed + i) so --num-samples gives different, reproducible texts.
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, stop=args.stop or [],
                              seed=None if args.seed is None else args.seed + i)

    out = sys.stdout
    jobs = [(pi, s) for pi in range(len(prompts)) for s in range(args.num_samples)]
    t0 = time.perf_counter()
    n_tokens = 0
    if len(jobs) == 1 and not args.no_stream and not args.no_cache:
        if not args.chat:
            out.write(prompts[0])
        calls = count_forward_passes(engine)
        for ev in engine.stream(ids[0], params(0)):
            out.write(ev.text)
            out.flush()
        out.write("\n")
        n_tokens = calls[0]
    else:
        comps = engine.generate([ids[pi] for pi, _ in jobs], [params(i) for i, _ in enumerate(jobs)],
                                use_cache=not args.no_cache)
        for (pi, s), c in zip(jobs, comps):
            # Headers only tell several sequences apart: one sequence prints exactly what streaming
            # prints, so --no-stream and --no-cache give byte-identical output for the same text.
            if len(jobs) > 1:
                label = f"prompt {pi + 1}" + (f", sample {s + 1}" if args.num_samples > 1 else "")
                out.write(f"===== {label} ({len(c.ids)} tokens, {c.finish_reason}) =====\n")
            out.write(("" if args.chat else prompts[pi]) + c.text + "\n")
            n_tokens += len(c.ids)
        out.flush()
    dt = time.perf_counter() - t0
    print(f"[{n_tokens} tokens in {dt:.2f}s: {n_tokens / max(dt, 1e-9):.1f} tokens/s, "
          f"{'KV cache' if not args.no_cache else 'no cache'}, {len(jobs)} sequence(s)]", file=sys.stderr)
    return 0


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.8, top_p: float = 1.0,
                      max_new_tokens: int = 200) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy (argmax)")
    g.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling: smallest set with this mass")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    g.add_argument("--seed", type=int, default=None, help="random seed (sample i uses seed + i)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")


def register(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate text from a run (streaming, batched, KV cache)",
        description="Generate text from RUN_DIR. One prompt streams token by token; several prompts "
        "(--prompt repeated, --prompts-file, --num-samples) are generated as one batch. Speed (tokens/s) "
        "is printed to stderr at the end. Without a prompt, sampling starts from <|endoftext|>.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder (pretrain, sft, import ...)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="prompt text; repeat for a batch")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="text file with one prompt per line (write \\n for a newline inside a prompt)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--stop", action="append", metavar="S", help="stop string (repeatable; not printed)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn of the chat template and print the assistant's reply")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the full context for every token (reference path; implies --no-stream)")
    p.add_argument("--no-stream", action="store_true", help="print the text when it is complete")
    add_sampling_args(p)
    from gptlab.runs import add_context_args
    add_context_args(p)
    p.set_defaults(func=run)
