"""``gptlab label``: sample K responses per prompt from a policy and rank them, by hand or by program.

This is InstructGPT's comparison-data step. A person sees the prompt and K numbered responses and types
an order ("2 1 4 3", best first); with ``--auto`` the programmatic labeler (gptlab.label.labeler) ranks
instead, which needs prompts that carry their checkable answer (``gptlab data instruct`` writes them).

Labelling is slow and precious, so it is resumable: every ranking is appended and fsynced the moment it
is given, and a restart skips the prompts already in the output (matched by index and a hash of the
prompt, so an edited prompts file is not mistaken for a finished one). Sampling seeds and labeler noise
are derived from the prompt, so a resumed run writes exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Callable

from gptlab.data.formats import MAX_K, MIN_K, load_prompt_items, ranking_row
from gptlab.errors import GptlabError
from gptlab.io import append_jsonl, iter_jsonl

ResponsesFn = Callable[[list[dict], int], list[str]]

GUIDE = ("Rank the responses from best to worst, as InstructGPT's labelers did: a correct, helpful and "
         "honest answer first; a polite refusal beats a made-up answer to an impossible question; "
         "then prefer concise over rambling or repetitive, and finished over cut-off responses.")


def _digest(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def prompt_key(index: int, messages: list[dict]) -> str:
    """Identity of a prompt within a prompts file: its position plus a hash of its content."""
    return f"{index}:{_digest(messages)[:16]}"


# ----- the output file --------------------------------------------------------------------------------
def _repair_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-append) so the next append starts on a line of its own."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        os.truncate(path, cut)            # unparseable fragment: it was never a finished answer
        return
    with open(path, "ab") as f:           # a whole record that only lost its newline: keep it
        f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())


def done_keys(out: str | os.PathLike) -> set[str]:
    """Keys of the prompts already ranked in ``out`` (repairing a torn last line first)."""
    out = Path(out)
    if not out.exists():
        return set()
    if out.is_dir():
        raise GptlabError(f"--out {out}: is a folder; give a .jsonl file")
    keys = {row["key"] for _, row in iter_jsonl(out, skip_partial_last=True) if isinstance(row.get("key"), str)}
    _repair_tail(out)
    return keys


# ----- the terminal UI --------------------------------------------------------------------------------
def parse_order(text: str, k: int) -> list[int]:
    """'2 1 4 3' (1-based, best first) -> [1, 0, 3, 2]. Also '2,1,4,3', '2143', or K-1 numbers."""
    parts = [p for p in re.split(r"[\s,>]+", text.strip()) if p]
    if len(parts) == 1 and parts[0].isdigit() and len(parts[0]) in (k - 1, k) and k <= 9:
        parts = list(parts[0])
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"use the response numbers 1-{k}, e.g. '{' '.join(map(str, range(1, k + 1)))}'") from None
    if any(not 1 <= n <= k for n in nums):
        raise ValueError(f"numbers must be between 1 and {k}")
    if len(set(nums)) != len(nums):
        raise ValueError("each response may appear only once")
    if len(nums) == k - 1:                 # the last place is implied
        nums.append(next(n for n in range(1, k + 1) if n not in nums))
    if len(nums) != k:
        raise ValueError(f"give all {k} responses in order (got {len(nums)})")
    return [n - 1 for n in nums]


def ask_ranking(messages: list[dict], responses: list[str], ask=None, show=print) -> list[int] | str:
    """Show one prompt and its responses; return the ranking, or 'skip' / 'quit'."""
    ask = ask or input   # looked up per call, so tests can monkeypatch builtins.input
    for m in messages:
        show(f"[{m['role']}] {m['content']}")
    for j, r in enumerate(responses, 1):
        show(f"--- {j} ---\n{r if r.strip() else '(empty)'}")
    example = " ".join(str(n) for n in range(1, len(responses) + 1))
    while True:
        try:
            answer = ask(f"order best to worst (e.g. {example}), s = skip, q = quit: ")
        except EOFError:
            return "quit"
        word = answer.strip().lower()
        if word in ("q", "quit"):
            return "quit"
        if word in ("s", "skip"):
            return "skip"
        try:
            return parse_order(answer, len(responses))
        except ValueError as e:
            show(f"  {e}; try again")


# ----- the reusable core --------------------------------------------------------------------------------
def _as_item(p) -> dict:
    return {"messages": p} if isinstance(p, list) else p


def check_auto_items(items: list[dict], source: str = "prompts") -> None:
    for i, item in enumerate(items):
        if "family" not in item or "answer" not in item:
            raise GptlabError(f"{source}: prompt {i + 1} has no \"family\"/\"answer\" fields; --auto needs prompts "
                              f"from `gptlab data instruct` (prompts.jsonl), or label by hand without --auto")


def label_rankings(prompts: list, responses_fn: ResponsesFn, k: int, out: str | os.PathLike, auto: bool = False,
                   noise: float = 0.0, seed: int = 0, ask=None, show=print, progress: bool = False) -> dict:
    """Rank K responses for every prompt not yet in ``out``; returns counts.

    ``prompts``: prompt items ({"messages": [...], optional "family"/"answer"/"id"...}) or bare messages
    lists. ``responses_fn(messages, k)`` supplies the K responses (a policy, or a fake in tests).
    """
    if not MIN_K <= k <= MAX_K:
        raise GptlabError(f"-k must be between {MIN_K} and {MAX_K} (InstructGPT's labelers ranked 4 to 9)")
    items = [_as_item(p) for p in prompts]
    if auto:
        check_auto_items(items)
        from gptlab.label.labeler import rank, ties
    done = done_keys(out)
    keyed = [(i, prompt_key(i, it["messages"]), it) for i, it in enumerate(items)]
    todo = [t for t in keyed if t[1] not in done]
    stats = {"total": len(items), "already": len(items) - len(todo), "labelled": 0, "skipped": 0, "quit": False}
    if auto and progress:
        from tqdm import tqdm
        todo = tqdm(todo, desc="label", unit="prompt")
    elif not auto:
        show(GUIDE)
    for n, (i, key, item) in enumerate(todo, 1):
        messages = item["messages"]
        responses = list(responses_fn(messages, k))
        if len(responses) != k or not all(isinstance(r, str) for r in responses):
            raise ValueError(f"responses_fn returned {len(responses)} responses for k={k}")
        if auto:
            ranking = rank(item, responses, noise=noise, rng=random.Random(f"{seed}:{key}"))
        else:
            show(f"\n=== prompt {i + 1} of {len(items)} ({len(todo) - n + 1} to go) ===")
            ranking = ask_ranking(messages, responses, ask=ask, show=show)
            if ranking == "quit":
                stats["quit"] = True
                break
            if ranking == "skip":      # not recorded: a skipped prompt comes back on the next run
                stats["skipped"] += 1
                continue
        # The item's own fields (id, family, answer...) ride along; ours win on a name clash.
        meta = {k_: v for k_, v in item.items() if k_ not in ("messages", "prompt", "responses", "ranking")}
        meta.update(key=key, prompt_index=i, labeler="auto" if auto else "human")
        if auto:
            meta["noise"] = noise
            meta["ties"] = ties(item, responses)
        append_jsonl(out, ranking_row(messages, responses, ranking, **meta))
        stats["labelled"] += 1
    return stats


# ----- sampling from a policy ---------------------------------------------------------------------------
def policy_responses_fn(run_dir: str | os.PathLike, temperature: float = 1.0, top_p: float = 1.0,
                        max_new_tokens: int = 96, seed: int = 0, device: str = "cpu") -> ResponsesFn:
    """K samples from a run folder's model, seeded by the prompt so a resumed run samples the same."""
    from gptlab.tokenizer.chat_template import fit_prompt
    from gptlab.generate.engine import Engine, SamplingParams
    from gptlab.runs import load_run
    model, tok, _ = load_run(run_dir, device=device)
    engine = Engine(model, tok)
    room = model.config.block_size - max_new_tokens
    if room < 8:
        raise GptlabError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in a "
                          f"{model.config.block_size}-token context")

    def responses(messages: list[dict], k: int) -> list[str]:
        ids = fit_prompt(tok, messages, room).ids
        base = int(_digest(messages)[:8], 16) + 1_000_003 * seed
        params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=base + j) for j in range(k)]
        return [c.text.strip() for c in engine.generate([ids] * k, params)]

    return responses


# ----- the command ----------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser(
        "label", help="rank K sampled responses per prompt (by hand or --auto) -> rankings.jsonl",
        description="Sample K responses per prompt from a policy and rank them best to worst, in the "
        "terminal or with the programmatic labeler (--auto). Resumable: rerun the same command to continue. "
        "--noise 0.27 mimics InstructGPT's ~73% inter-labeler agreement.")
    p.add_argument("--prompts", required=True, help="prompts .jsonl (from `gptlab data instruct` for --auto)")
    p.add_argument("--policy", required=True, help="run folder of the model that writes the responses")
    p.add_argument("-k", "--k", type=int, default=4, help="responses per prompt, 2-9 (default 4)")
    p.add_argument("--out", required=True, help="rankings .jsonl to append to (resumes if it exists)")
    p.add_argument("--auto", action="store_true", help="rank with the programmatic labeler")
    p.add_argument("--noise", type=float, default=0.0,
                   help="--auto: expected fraction of flipped comparisons (0.27 ~ InstructGPT labelers)")
    p.add_argument("--seed", type=int, default=0, help="sampling and noise seed")
    p.add_argument("--max-prompts", type=int, default=None, help="label only the first N prompts of the file")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="longest response in tokens (default 96)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.set_defaults(func=run)


def run(args) -> int:
    if not MIN_K <= args.k <= MAX_K:
        raise GptlabError(f"-k must be between {MIN_K} and {MAX_K} (InstructGPT's labelers ranked 4 to 9)")
    if not 0.0 <= args.noise <= 1.0:
        raise GptlabError(f"--noise must be between 0 and 1 (got {args.noise})")
    if args.noise and not args.auto:
        raise GptlabError("--noise only applies with --auto (people bring their own)")
    if args.temperature <= 0:
        raise GptlabError("--temperature must be > 0: at 0 all K responses would be the same")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise GptlabError("--max-prompts must be at least 1")
    if args.max_new_tokens < 1:
        raise GptlabError("--max-new-tokens must be at least 1")
    if not (Path(args.policy) / "config.json").is_file():
        raise GptlabError(f"--policy {args.policy}: not a run folder (no config.json)")
    items = load_prompt_items(args.prompts)
    if args.max_prompts is not None:
        items = items[: args.max_prompts]
    if args.auto:
        check_auto_items(items, args.prompts)
    done_keys(args.out)   # a bad output file fails now, not after the model has loaded
    try:   # and one that cannot be appended to (what labeling does), not after the first ranking
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise GptlabError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    from gptlab.device import pick_device
    fn = policy_responses_fn(args.policy, args.temperature, args.top_p, args.max_new_tokens, args.seed,
                             device=str(pick_device(args.device)))
    stats = label_rankings(items, fn, args.k, args.out, auto=args.auto, noise=args.noise, seed=args.seed,
                           progress=args.auto)
    print(f"labelled {stats['labelled']} prompts ({stats['already']} already done, {stats['skipped']} skipped"
          f"{', stopped early' if stats['quit'] else ''}); rankings in {args.out}")
    return 0
