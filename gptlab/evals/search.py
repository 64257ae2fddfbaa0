"""Best-of-N search on held-out multi-step problems (``gptlab search``): which verifier picks best?

For each held-out problem the policy samples N_max solutions once. For every N = 1, 2, 4, ..., N_max
the samples are cut into N_max / N disjoint sets of N (so each N uses every sample once and small N
is averaged over many draws, as Lightman et al. did), and each method picks one answer per set:

* PRM (product)   the solution whose steps' probabilities multiply to the most (Lightman et al.)
* PRM (min)       the solution whose weakest step is strongest
* ORM             the solution the outcome reward model (`gptlab rm`, trained on final-answer
                  correctness of the same samples) scores highest
* majority        the most common final answer (self-consistency); ties go to the earliest
* pass@N          whether any of the N is right: the ceiling every picker is under
* greedy          the temperature-0 answer, one per problem, the same for every N

A problem's accuracy at N is the share of its sets whose pick is right; the accuracy is the mean
over problems, with a 95% interval over problems; methods are compared on the same problems with
a paired interval.
"""
from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

import torch

from gptlab import runs
from gptlab.data.steps import final_answer, outcome_correct
from gptlab.errors import GptlabError
from gptlab.evals.stats import Z95, paired_difference, wilson_interval
from gptlab.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

METHODS = ("prm_prod", "prm_min", "orm", "orm_bce", "majority", "pass")
LABELS = {"prm_prod": "PRM (product)", "prm_min": "PRM (min)", "orm": "outcome RM (rm)",
          "orm_bce": "outcome RM (BCE)", "majority": "majority vote",
          "pass": "pass@N (any right)", "greedy": "greedy"}


def pick(method: str, scores: dict[str, list[float]], answers: list[str | None], right: list[bool]) -> bool:
    """Is the answer ``method`` picks from one set of samples right?"""
    if method == "pass":
        return any(right)
    if method == "majority":
        votes = Counter(a for a in answers if a is not None)
        if not votes:
            return False
        top = max(votes.values())
        winner = next(a for a in answers if a is not None and votes[a] == top)   # earliest of the tied
        return right[answers.index(winner)]
    s = scores[method]
    return right[max(range(len(s)), key=lambda i: (s[i], -i))]


def accuracy_by_n(scores: list[dict[str, list[float]]], answers: list[list], right: list[list[bool]],
                  ns: list[int], methods=METHODS) -> dict[str, dict[int, list[float]]]:
    """{method: {N: [per-problem accuracy]}} over disjoint sets of N samples per problem."""
    out = {m: {n: [] for n in ns} for m in methods}
    for sc, ans, ok in zip(scores, answers, right):
        total = len(ok)
        for n in ns:
            sets = [range(s, s + n) for s in range(0, total - n + 1, n)]
            for m in methods:
                hits = [pick(m, {k: [v[i] for i in r] for k, v in sc.items()}, [ans[i] for i in r],
                             [ok[i] for i in r]) for r in sets]
                out[m][n].append(sum(hits) / len(hits))
    return out


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): Wilson when every value is 0 or 1, else the normal interval over problems."""
    n = len(values)
    mean = sum(values) / max(1, n)
    if all(v in (0.0, 1.0) for v in values):
        lo, hi = wilson_interval(sum(values), n)
        return mean, lo, hi
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(max(1, n))
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def plot_accuracy_vs_n(table: dict, greedy: tuple, ns: list[int], out: Path, title: str, methods=METHODS) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from gptlab.plots import save_figure
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"prm_prod": ("C0", "o-"), "prm_min": ("C2", "s-"), "orm": ("C3", "^-"), "orm_bce": ("C4", "v-"),
              "majority": ("C1", "d-"), "pass": ("0.6", ":")}
    for m in methods:
        mean = [table[m][n][0] for n in ns]
        lo = [table[m][n][1] for n in ns]
        hi = [table[m][n][2] for n in ns]
        color, style = styles[m]
        ax.plot(ns, [100 * v for v in mean], style, color=color, label=LABELS[m], markersize=4)
        ax.fill_between(ns, [100 * v for v in lo], [100 * v for v in hi], color=color, alpha=0.12)
    ax.axhline(100 * greedy[0], color="k", ls="--", lw=1, label=f"greedy {100 * greedy[0]:.1f}%")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("N (samples per problem)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, out)
    plt.close(fig)


def reused_samples(path: Path, items: list[dict], args) -> list[list[str]] | None:
    """The samples an earlier run with the same problems and --n wrote (to rescore with other
    verifiers without sampling again), or None when there are none that match."""
    from gptlab.io import iter_jsonl
    if not path.is_file():
        return None
    rows = [r for _, r in iter_jsonl(path)]
    if [r.get("id") for r in rows] != [it.get("id") for it in items] or any(len(r["responses"]) != args.n for r in rows):
        raise GptlabError(f"--reuse-samples: {path} holds other problems or another --n; drop the flag to resample")
    print(f"reusing the samples in {path}")
    return [r["responses"] for r in rows]


def run(args) -> int:
    from gptlab.train.heldout import generate, reply_text
    from gptlab.train.prm import aggregate, fit_problems, load_prm, sample_solutions, step_problems, step_scores
    from gptlab.train.reward import score_responses

    if args.n < 1 or args.n & (args.n - 1):
        raise GptlabError("--n must be a power of two (1, 2, 4, ..., 64)")
    out = Path(args.out)
    policy, tok, _ = runs.load_run(args.policy)
    prm, prm_tok, _ = load_prm(args.prm)
    orm, orm_tok, orm_cfg = runs.load_reward_model(args.orm, flag="--orm")
    if orm_cfg.get("stage") == "prm":
        raise GptlabError(f"--orm {args.orm}: that is a process reward model; give a `gptlab rm` run")
    toks = [("--prm", prm_tok), ("--orm", orm_tok)]
    orm_bce = None
    if args.orm_bce:
        orm_bce, bce_tok, bce_cfg = load_prm(args.orm_bce, flag="--orm-bce")
        if not (bce_cfg.get("prm") or {}).get("outcome"):
            raise GptlabError(f"--orm-bce {args.orm_bce}: not an outcome run (train it with `gptlab prm --outcome`)")
        toks.append(("--orm-bce", bce_tok))
    for name, t in toks:
        if not tok.same_as(t):
            raise GptlabError(f"{name} uses a different tokenizer than --policy {args.policy}")
    methods = tuple(m for m in METHODS if m != "orm_bce" or orm_bce is not None)
    items, prompt_ids = fit_problems(tok, step_problems(args.problems, args.max_problems),
                                     policy.config.block_size, args.max_new_tokens)
    torch.manual_seed(args.seed)
    greedy = generate(policy, tok, prompt_ids, args.max_new_tokens, 0.0)
    greedy_right = [float(outcome_correct(it["plan"], reply_text(tok, c))) for it, c in zip(items, greedy)]
    samples = reused_samples(out / "samples.jsonl", items, args) if args.reuse_samples else None
    if samples is None:
        samples = sample_solutions(policy, tok, prompt_ids, args.n, args.temperature, args.max_new_tokens, args.seed,
                                   progress=not args.no_progress)
    scores, answers, right, rows = [], [], [], []
    for it, texts in zip(items, samples):
        steps = step_scores(prm, tok, it["messages"], texts)
        sc = {"prm_prod": [aggregate(s, "prod") for s in steps], "prm_min": [aggregate(s, "min") for s in steps],
              "orm": score_responses(orm, tok, it["messages"], texts)}
        if orm_bce is not None:      # P(right) read at the end-of-turn token: the last "step" of an outcome run
            sc["orm_bce"] = [s[-1] if s else 0.0 for s in step_scores(orm_bce, tok, it["messages"], texts)]
        ok = [outcome_correct(it["plan"], t) for t in texts]
        scores.append(sc)
        answers.append([final_answer(t) for t in texts])
        right.append(ok)
        rows.append({"id": it.get("id"), "responses": texts, "correct": ok, "step_scores": steps, "orm": sc["orm"]})

    ns = [2 ** i for i in range(int(math.log2(args.n)) + 1)]
    per_problem = accuracy_by_n(scores, answers, right, ns, methods)
    table = {m: {n: mean_interval(per_problem[m][n]) for n in ns} for m in methods}
    g = mean_interval(greedy_right)
    n_cmp = min(16, args.n)
    paired = {f"prm_prod - {m}": paired_difference(per_problem["prm_prod"][n_cmp], per_problem[m][n_cmp])
              for m in ("orm", "orm_bce", "majority", "prm_min") if m in methods}
    paired["prm_prod - greedy"] = paired_difference(per_problem["prm_prod"][n_cmp], greedy_right)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / "samples.jsonl", rows)
    result = {"policy": str(args.policy), "prm": str(args.prm), "orm": str(args.orm), "problems": str(args.problems),
              "n_problems": len(items), "n_max": args.n, "temperature": args.temperature,
              "orm_bce": args.orm_bce, "temperature_note": "samples reused" if args.reuse_samples else "sampled",
              "greedy": list(g), "accuracy": {m: {str(n): list(table[m][n]) for n in ns} for m in methods},
              "paired_at_n": n_cmp, "paired": {k: list(v) for k, v in paired.items()},
              "sample_accuracy": sum(sum(r) for r in right) / max(1, sum(len(r) for r in right))}
    atomic_write_json(out / "results.json", result)
    lines = ["| N | " + " | ".join(LABELS[m] for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for n in ns:
        lines.append(f"| {n} | " + " | ".join(f"{100 * table[m][n][0]:.1f}% [{100 * table[m][n][1]:.1f}, "
                                             f"{100 * table[m][n][2]:.1f}]" for m in methods) + " |")
    md = "\n".join(lines) + (f"\n\ngreedy: {100 * g[0]:.1f}% [{100 * g[1]:.1f}, {100 * g[2]:.1f}]; "
                             f"{len(items)} held-out problems; one sample right: {100 * result['sample_accuracy']:.1f}%\n"
                             f"\npaired differences at N = {n_cmp} (percentage points, 95% interval):\n")
    md += "".join(f"- {k}: {100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]\n" for k, v in paired.items())
    atomic_write_text(out / "results.md", md)
    plot_accuracy_vs_n(table, g, ns, out / "accuracy_vs_n.png",
                       f"best-of-N on {len(items)} held-out multi-step problems", methods)
    print(md)
    print(f"wrote {out}/results.json, results.md, accuracy_vs_n.png, samples.jsonl")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "search", help="best-of-N on held-out multi-step problems: PRM vs outcome RM vs majority vote vs greedy",
        description="Sample --n solutions per held-out multi-step problem from --policy, then for N = 1, 2, "
        "4, ..., --n pick one answer per disjoint set of N samples by the process reward model (product or "
        "minimum of step scores), by the outcome reward model, by majority vote over final answers, and "
        "compare with greedy decoding and pass@N. Writes results.json, results.md (accuracy with 95% "
        "intervals, paired differences at N=16) and accuracy_vs_n.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", required=True, help="run that samples the solutions")
    p.add_argument("--prm", required=True, help="process reward model run (`gptlab prm`)")
    p.add_argument("--orm", required=True, help="outcome reward model run (`gptlab rm` on outcome_rankings.jsonl)")
    p.add_argument("--orm-bce", default=None,
                   help="also an outcome model trained like the PRM on the same samples (`gptlab prm --outcome`: "
                   "BCE on each solution's correctness at its last token, Lightman et al.'s ORM)")
    p.add_argument("--reuse-samples", action="store_true",
                   help="rescore the samples.jsonl an earlier run left in --out instead of sampling again")
    p.add_argument("--problems", required=True, help="held-out multi-step prompts (heldout.jsonl of `data instruct --steps`)")
    p.add_argument("--out", required=True, help="folder for results.json, results.md, accuracy_vs_n.png")
    p.add_argument("--max-problems", type=int, default=200, help="problems evaluated (0 = all)")
    p.add_argument("--n", type=int, default=64, help="largest N (a power of two)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest solution in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
