"""Held-out policy comparison: `gptlab compare` (two runs, same prompts) and `gptlab plot-compare`.

    gptlab compare runs/ppo runs/sft --prompts ~/.cache/gptlab/instruct/heldout.jsonl --out ppo_vs_sft.json
    gptlab plot-compare ppo_vs_sft.json dpo_vs_sft.json --out forest.png

Both runs answer the same held-out curriculum prompts greedily (gptlab.train.heldout.heldout_metrics,
the evaluation PPO runs while training); the figures are paired, so the prompts' own difficulty
cancels (gptlab.evals.stats).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from gptlab import runs
from gptlab.data.formats import load_conversations, load_prompt_items
from gptlab.data.instruct import check_answer
from gptlab.errors import GptlabError
from gptlab.evals.stats import paired_difference, win_rate
from gptlab.io import atomic_write_json, read_json
from gptlab.label.labeler import score as label_score
from gptlab.tokenizer.chat_template import transcript_prompt
from gptlab.train.heldout import encode_prompts, heldout_metrics


def fewshot_demos(items: list[dict], demos: list[dict], k: int) -> list[list[list[dict]]]:
    """For each held-out item, ``k`` demonstration conversations of its own task family, drawn
    reproducibly (seeded by the item's id) from ``demos`` (sft.jsonl)."""
    by_family: dict[str, list[list[dict]]] = {}
    for d in demos:
        if "family" in d and "messages" in d:
            by_family.setdefault(d["family"], []).append(d["messages"])
    out = []
    for i, it in enumerate(items):
        pool = by_family.get(it["family"], [])
        if len(pool) < k:
            raise GptlabError(f"--demos: {len(pool)} demonstrations of family {it['family']!r}, {k} shots asked for")
        out.append(random.Random(f"{it.get('id', i)}").sample(pool, k))
    return out


def compare_runs(run_a: str, run_b: str, prompts_path: str, n: int, max_new_tokens: int,
                 reward_model: str | None = None, shots: dict[str, int] | None = None,
                 demos_path: str | None = None) -> dict:
    """Greedy answers of two runs to the same held-out prompts: each side's accuracy, labeler score,
    RM score and length, and the labeler's win rate of A over B (ties count half) with a 95% interval.

    ``shots`` ({"a": k, "b": k}): a side with k > 0 is asked GPT-3 style instead of through the chat
    template, as a plain-text transcript after k same-family demonstrations from ``demos_path`` (the
    way to give a pre-trained-only model a fair chance; InstructGPT's "GPT-3 (prompted)")."""
    shots = shots or {}
    if any(k < 0 for k in shots.values()):
        raise GptlabError("--shots-a/--shots-b must be >= 0")
    items = load_prompt_items(prompts_path)[:n] if n > 0 else load_prompt_items(prompts_path)
    items = [it for it in items if "answer" in it and "family" in it]
    if not items:
        raise GptlabError(f"{prompts_path}: no curriculum items with 'family' and 'answer' (gptlab data instruct)")
    demo_sets = {}
    if any(shots.values()):
        demos_path = Path(demos_path) if demos_path else Path(prompts_path).with_name("sft.jsonl")
        if not demos_path.is_file():
            raise GptlabError(f"--demos {demos_path}: no such file (demonstrations for --shots-a/--shots-b)")
        demos = load_conversations(demos_path)
        demo_sets = {side: fewshot_demos(items, demos, k) for side, k in shots.items() if k > 0}
    rm = None
    if reward_model:
        rm, rm_tok, _ = runs.load_reward_model(reward_model, flag="--reward-model")
    sides, texts = {}, {}
    for name, run_dir in (("a", run_a), ("b", run_b)):
        model, tok, cfg = runs.load_run(run_dir)
        room = model.config.block_size - max_new_tokens - 1
        if name in demo_sets:
            ids = [transcript_prompt(tok, it["messages"], d, room) for it, d in zip(items, demo_sets[name])]
        else:
            kept, ids = encode_prompts(tok, items, room)
            if len(kept) != len(items):
                raise GptlabError(f"{run_dir}: {len(items) - len(kept)} prompts do not fit its context with "
                                  f"--max-new-tokens {max_new_tokens}; lower it")
        # an RM reads chat-template conversations only
        use_rm = rm if rm is not None and tok.same_as(rm_tok) and name not in demo_sets else None
        m, texts[name] = heldout_metrics(model, tok, items, ids, max_new_tokens, use_rm, tok.pad_id,
                                         transcript=name in demo_sets)
        m.update({"run": str(run_dir), "stage": cfg.get("stage"), "params": model.num_params(),
                  "shots": shots.get(name, 0)})
        sides[name] = m
    families = sorted({it["family"] for it in items})
    right = {s: [float(check_answer(it, t)) for it, t in zip(items, texts[s])] for s in ("a", "b")}
    labels = {s: [label_score(it, t) for it, t in zip(items, texts[s])] for s in ("a", "b")}
    rate, lo, hi = win_rate(labels["a"], labels["b"])
    acc_d = paired_difference(right["a"], right["b"])
    lab_d = paired_difference(labels["a"], labels["b"])
    only_a = sum(x > y for x, y in zip(right["a"], right["b"]))
    only_b = sum(y > x for x, y in zip(right["a"], right["b"]))
    per_family = {}
    for f in families:
        rows = [i for i, it in enumerate(items) if it["family"] == f]
        fa, fb = [right["a"][i] for i in rows], [right["b"][i] for i in rows]
        d, dlo, dhi = paired_difference(fa, fb)
        per_family[f] = {"a": sum(fa) / len(rows), "b": sum(fb) / len(rows), "n": len(rows),
                         "diff": d, "diff_ci95": [dlo, dhi]}
    return {"n": len(items), "a": sides["a"], "b": sides["b"], "win_rate_a": rate, "win_rate_ci95": [lo, hi],
            "per_family_accuracy": per_family, "prompts": str(prompts_path), "max_new_tokens": max_new_tokens,
            "accuracy_diff": acc_d[0], "accuracy_diff_ci95": list(acc_d[1:]), "only_a_right": only_a,
            "only_b_right": only_b, "label_score_diff": lab_d[0], "label_score_diff_ci95": list(lab_d[1:])}


def run_compare(args) -> int:
    res = compare_runs(args.a, args.b, args.prompts, args.n, args.max_new_tokens, args.reward_model,
                       {"a": args.shots_a, "b": args.shots_b}, args.demos)
    a, b = res["a"], res["b"]
    print(f"{res['n']} held-out prompts from {res['prompts']}, greedy, up to {res['max_new_tokens']} tokens")
    print(f"{'':<22}{'A':>14}{'B':>14}")
    print(f"{'run':<22}{Path(a['run']).name:>14}{Path(b['run']).name:>14}")
    desc = {k: f"{v['stage'] or '?'} {v['params'] / 1e6:.2f}M" for k, v in (("a", a), ("b", b))}
    print(f"{'stage, params':<22}{desc['a']:>14}{desc['b']:>14}")
    if a["shots"] or b["shots"]:
        how = {k: f"{v['shots']}-shot" if v["shots"] else "chat" for k, v in (("a", a), ("b", b))}
        print(f"{'prompted as':<22}{how['a']:>14}{how['b']:>14}")
    for key, label, fmt in [("heldout_accuracy", "task accuracy", "{:.1%}"),
                            ("heldout_label_score", "labeler score", "{:.3f}"),
                            ("heldout_rm_score", "RM score", "{:+.3f}"),
                            ("heldout_len", "response tokens", "{:.1f}"),
                            ("heldout_ended", "ended turn", "{:.0%}")]:
        if key in a or key in b:
            va = fmt.format(a[key]) if key in a else "-"
            vb = fmt.format(b[key]) if key in b else "-"
            print(f"{label:<22}{va:>14}{vb:>14}")
    for f, acc in res["per_family_accuracy"].items():
        dlo, dhi = acc["diff_ci95"]
        print(f"{'  ' + f:<22}{acc['a']:>14.1%}{acc['b']:>14.1%}   A - B {100 * acc['diff']:+.1f} "
              f"[{100 * dlo:+.1f}, {100 * dhi:+.1f}] on {acc['n']}")
    lo, hi = res["win_rate_ci95"]
    print(f"labeler win rate of A over B: {res['win_rate_a']:.1%} (95% interval {lo:.1%} - {hi:.1%})")
    dl, dh = res["accuracy_diff_ci95"]
    print(f"accuracy A - B, paired: {100 * res['accuracy_diff']:+.1f} points (95% interval {100 * dl:+.1f} to "
          f"{100 * dh:+.1f}); only A right on {res['only_a_right']}, only B right on {res['only_b_right']}")
    dl, dh = res["label_score_diff_ci95"]
    print(f"labeler score A - B, paired: {res['label_score_diff']:+.3f} (95% interval {dl:+.3f} to {dh:+.3f})")
    if args.out:
        atomic_write_json(args.out, res)
        print(f"wrote {args.out}")
    return 0


def run_plot_compare(args) -> int:
    from gptlab.plots import plot_comparisons
    if args.labels and len(args.labels) != len(args.results):
        raise GptlabError(f"--labels: {len(args.labels)} labels for {len(args.results)} results")
    results = []
    for path in args.results:
        res = read_json(path)
        if not isinstance(res, dict) or not {"accuracy_diff", "accuracy_diff_ci95", "win_rate_a",
                                             "win_rate_ci95"} <= res.keys():
            raise GptlabError(f"{path}: not a `gptlab compare --out` result")
        results.append(res)
    labels = args.labels or [f"{Path(r['a']['run']).name} vs {Path(r['b']['run']).name}" for r in results]
    plot_comparisons(results, labels, args.out, args.title)
    print(f"wrote {args.out} ({len(results)} comparisons)")
    return 0


def register(sub) -> None:
    c = sub.add_parser(
        "compare", help="head-to-head: labeler win rate of run A over run B on held-out prompts",
        description="Greedy answers of two GPT runs (e.g. PPO vs its SFT start, DPO vs SFT, a small PPO vs "
        "a large SFT model) to the same held-out curriculum prompts. Prints each side's task accuracy "
        "(per family too), labeler score, reward-model score (with --reward-model), response length and "
        "how often the programmatic labeler prefers A's answer (ties count half), with a 95% Wilson interval.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("a", help="run folder A")
    c.add_argument("b", help="run folder B")
    c.add_argument("--prompts", required=True, help="held-out curriculum prompts (heldout.jsonl)")
    c.add_argument("--n", type=int, default=500, help="first N prompts (0 = all)")
    c.add_argument("--max-new-tokens", type=int, default=48, help="longest answer in tokens")
    c.add_argument("--reward-model", default=None, help="also report this reward model's mean score")
    c.add_argument("--shots-a", type=int, default=0,
                   help="ask A GPT-3 style: a plain-text transcript after K same-family demonstrations instead "
                   "of the chat template (for a pre-trained-only run; 0 = chat template)")
    c.add_argument("--shots-b", type=int, default=0, help="the same for B")
    c.add_argument("--demos", default=None,
                   help="demonstrations for --shots-a/--shots-b (default: sft.jsonl beside --prompts)")
    c.add_argument("--out", default=None, help="write the figures as JSON here")
    c.set_defaults(func=run_compare)

    f = sub.add_parser(
        "plot-compare", help="forest plot (PNG) of several `gptlab compare --out` results",
        description="One row per `gptlab compare --out` JSON file: the paired accuracy difference A - B and "
        "the labeler's win rate of A, each with its 95% interval (blue where the interval excludes no "
        "effect).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("results", nargs="+", help="JSON files written by gptlab compare --out")
    f.add_argument("--out", required=True, help="PNG file to write")
    f.add_argument("--labels", nargs="+", default=None, help="one label per result (default: 'A vs B' run names)")
    f.add_argument("--title", default="", help="figure title")
    f.set_defaults(func=run_plot_compare)
