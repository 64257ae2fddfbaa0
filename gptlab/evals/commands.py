"""``gptlab eval`` (few-shot accuracy, perplexity / bits per byte) and ``gptlab fill`` (cloze)."""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.io import atomic_write_json, atomic_write_jsonl, atomic_write_text


def parse_shots(spec: str) -> list[int]:
    try:
        shots = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise GptlabError(f"--shots {spec!r}: expected comma-separated integers like 0,1,4,8") from None
    if not shots or shots[0] < 0:
        raise GptlabError(f"--shots {spec!r}: give one or more numbers >= 0")
    return shots


def _load(run_dir: str, device: str, args=None):
    """A run for evaluation; ``args`` carries --context/--rope-scaling/--rope-factor overrides."""
    from gptlab.device import pick_device
    from gptlab.runs import context_from_args, load_run
    ctx = context_from_args(args, (args.rope_scaling or ["keep"])[0]) if args is not None else None
    model, tok, cfg = load_run(run_dir, pick_device(device), context=ctx)
    return model, tok, cfg


def _run_name(run_dir: str, taken: set[str]) -> str:
    name = Path(run_dir).resolve().name or run_dir
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


# ----- reports -------------------------------------------------------------------------------------
def results_markdown(res: dict) -> str:
    lines = ["# Few-shot evaluation", "",
             f"Items per task: up to {res['settings']['n']}, seed {res['settings']['seed']}; multiple choice "
             f"scored by {'log-prob per token' if res['settings']['normalize'] else 'summed log-prob'}; "
             "generation: greedy, exact match. Accuracy with a 95% Wilson interval; k = demonstrations "
             "asked for (the mean number that fit the context is shown when fewer fit).", ""]
    for task in res["tasks"]:
        shots = res["settings"]["shots"]
        lines += [f"## {task}", "", "| run | " + " | ".join(f"k={k}" for k in shots) + " |",
                  "|---|" + "---|" * len(shots)]
        for run, per_task in res["runs"].items():
            cells = []
            for k in shots:
                r = per_task.get(task, {}).get(str(k))
                if r is None:
                    cells.append("n/a")
                    continue
                cell = f"{100 * r['acc']:.1f}% [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}] (n={r['n']})"
                if r["shots_used"] < k - 1e-9:
                    cell += f" used {r['shots_used']:.1f}"
                cells.append(cell)
            lines.append(f"| {run} | " + " | ".join(cells) + " |")
        lines.append("")
        vocab = {run: {k: v.get("acc_vocab_top1") for k, v in per_task.get(task, {}).items()}
                 for run, per_task in res["runs"].items()}
        if any(x is not None for v in vocab.values() for x in v.values()):
            lines += ["Whole-vocabulary top-1 (no candidate set; BERT sees both sides of the blank, GPT "
                      "only the left):", "", "| run | " + " | ".join(f"k={k}" for k in shots) + " |",
                      "|---|" + "---|" * len(shots)]
            for run, v in vocab.items():
                lines.append(f"| {run} | " + " | ".join(
                    "n/a" if v.get(str(k)) is None else f"{100 * v[str(k)]:.1f}%" for k in shots) + " |")
            lines.append("")
        gold = {run: per_task.get(task, {}) for run, per_task in res["runs"].items()}
        if any("gold_prob" in m for v in gold.values() for m in v.values()):
            lines += ["Probability of the right answer (mean over items of P(answer | prompt), teacher-forced; "
                      "rises with in-context learning before greedy answers become exactly right):", "",
                      "| run | " + " | ".join(f"k={k}" for k in shots) + " |", "|---|" + "---|" * len(shots)]
            for run, v in gold.items():
                lines.append(f"| {run} | " + " | ".join(
                    "n/a" if "gold_prob" not in v.get(str(k), {}) else f"{100 * v[str(k)]['gold_prob']:.1f}%"
                    for k in shots) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_shots(res: dict, out: Path) -> None:
    """Accuracy vs number of demonstrations, one panel per task, one line per run (GPT-3, Fig. 1.2);
    for generation tasks a dashed line gives the probability of the right answer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from gptlab.plots import save_figure
    tasks = res["tasks"]
    cols = min(4, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for run, per_task in res["runs"].items():
            pts = sorted((int(k), v) for k, v in per_task.get(task, {}).items())
            if not pts:
                continue
            xs = [k for k, _ in pts]
            ys = [100 * v["acc"] for _, v in pts]
            err = [[100 * (v["acc"] - v["ci95"][0]) for _, v in pts], [100 * (v["ci95"][1] - v["acc"]) for _, v in pts]]
            line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=run)
            if all("gold_prob" in v for _, v in pts):   # generation tasks: P(right answer), dashed
                ax.plot(xs, [100 * v["gold_prob"] for _, v in pts], ls="--", marker=".",
                        color=line.lines[0].get_color(), label=f"{run}: P(right answer)")
        chance = res.get("chance", {}).get(task)
        if chance:
            ax.axhline(100 * chance, color="gray", ls="--", lw=1, label="chance")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.3, max(res["settings"]["shots"]) * 1.15 + 0.3)
        ax.set_xticks(res["settings"]["shots"])
        ax.set_xticklabels([str(k) for k in res["settings"]["shots"]])
        ax.set_ylim(-2, 102)
        ax.set_title(task)
        ax.set_xlabel("demonstrations in context (k)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    seen = {}
    for ax in list(axes.flat)[:len(tasks)]:   # every label once, from whichever panel has it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    handles, labels = list(seen.values()), list(seen)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, out)


# ----- eval ----------------------------------------------------------------------------------------
def parse_floats(spec: str, flag: str, lowest: float, highest: float | None = None) -> list[float]:
    try:
        vals = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise GptlabError(f"{flag} {spec!r}: expected comma-separated numbers") from None
    if not vals or any(not (lowest <= v <= (highest if highest is not None else math.inf)) for v in vals):
        rng = f"{lowest:g}..{highest:g}" if highest is not None else f">= {lowest:g}"
        raise GptlabError(f"{flag} {spec!r}: give one or more numbers in {rng}")
    return vals


def _run_passkey(args) -> int:
    """Passkey retrieval by depth x length, and loss against position, for each run x scaling."""
    from gptlab.device import pick_device
    from gptlab.evals import passkey
    from gptlab.model.gpt import GPTConfig
    from gptlab.runs import context_from_args, load_run, read_run_config
    if not args.out:
        raise GptlabError("--out DIR is required for --passkey (results.json, results.md, two PNGs)")
    if args.keys < 1:
        raise GptlabError("--keys must be at least 1")
    multiples = parse_floats(args.lengths, "--lengths", 0.05)
    depths = parse_floats(args.depths, "--depths", 0.0, 1.0)
    scalings = args.rope_scaling or ["keep"]
    res: dict = {"variants": {}}
    taken: set[str] = set()
    t0 = time.time()
    for run_dir in args.run_dirs:
        trained = GPTConfig.from_dict(read_run_config(run_dir)["model"]).trained_context
        if res.setdefault("train_len", trained) != trained:
            raise GptlabError(f"{run_dir}: trained at {trained} tokens, the first run at {res['train_len']}; "
                              "compare runs of one training length")
        longest = int(round(max(multiples) * trained))
        base = _run_name(run_dir, taken)
        for scaling in scalings:
            ctx = context_from_args(args, scaling) or {}
            ctx["block_size"] = max(longest + 16, args.context or 0)   # room for the answer tokens
            model, tok, _ = load_run(run_dir, pick_device(args.device), context=ctx)
            c = model.config
            if not c.causal:
                raise GptlabError(f"{run_dir}: a bert model cannot answer left to right")
            label = base if len(scalings) == 1 and scaling == "keep" else (
                f"{base}: {c.rope_scaling or 'plain'}" + (f" x{c.rope_factor:g}" if c.rope_scaling else ""))
            print(f"{label}: passkey at {', '.join(f'{m:g}x' for m in multiples)} of {trained} tokens", flush=True)
            grid = passkey.passkey_grid(
                model, tok, trained, multiples, depths, args.keys, seed=args.seed, batch_size=args.batch_size,
                progress=lambda n, d, a: print(f"  {n:>6} tokens, depth {d:4.2f}: {100 * a:5.1f}%", flush=True))
            ids = passkey.eval_text_ids(tok, (longest + 1) * args.windows,
                                        args.seed, _read_text(args.text) if args.text else None)
            pos = passkey.loss_by_position(model, ids, longest, args.windows)
            inside = [l for p, l in zip(pos["positions"], pos["loss"]) if p < trained]
            beyond = [l for p, l in zip(pos["positions"], pos["loss"]) if p >= trained]
            pos["inside"] = sum(inside) / len(inside)
            pos["beyond"] = sum(beyond) / len(beyond) if beyond else pos["inside"]
            res["variants"][label] = {"run": run_dir, "model": c.to_dict(), "passkey": grid, "position_loss": pos}
            res.update(lengths=grid["lengths"], multiples=multiples, depths=depths, n=args.keys)
    res["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "results.md", passkey.results_markdown(res))
    passkey.plot_heatmaps(res, out / "passkey_heatmap.png")
    passkey.plot_position_loss(res, out / "loss_vs_position.png")
    print("\n" + passkey.results_markdown(res))
    print(f"wrote {out}/results.json, results.md, passkey_heatmap.png, loss_vs_position.png ({res['seconds']:.0f}s)")
    return 0


def _read_text(path) -> str:
    from gptlab.evals.perplexity import read_text_file
    return read_text_file(path)


def run_eval(args) -> int:
    if args.passkey:
        return _run_passkey(args)
    if args.rope_scaling and len(args.rope_scaling) > 1:
        raise GptlabError("several --rope-scaling values compare side by side only with --passkey")
    if args.text:
        return _run_perplexity(args)
    if args.copy:
        return _run_copy(args)
    if not args.out:
        raise GptlabError("--out DIR is required for few-shot evaluation (results.json, results.md, PNG)")
    if args.n < 1:
        raise GptlabError("--n must be at least 1")
    from gptlab.evals.fewshot import evaluate_task
    from gptlab.evals.tasks import load_task, task_names
    shots = parse_shots(args.shots)
    names = task_names(args.tasks)
    out = Path(args.out)
    res = {"settings": {"shots": shots, "n": args.n, "seed": args.seed, "normalize": not args.raw,
                        "description": not args.no_description, "run_dirs": args.run_dirs},
           "tasks": [], "runs": {}, "chance": {}}
    preds_all = []
    taken: set[str] = set()
    tasks: dict = {}
    t0 = time.time()
    for run_dir in args.run_dirs:
        name = _run_name(run_dir, taken)
        model, tok, _ = _load(run_dir, args.device, args)
        per_task = res["runs"].setdefault(name, {})
        for tname in names:
            if tname not in tasks:   # the same items and demonstrations for every run
                tasks[tname] = load_task(tname, args.n, args.seed, tok)
                res["tasks"].append(tasks[tname].name)
                if tasks[tname].kind != "gen":
                    res["chance"][tasks[tname].name] = sum(1 / len(i.choices) for i in tasks[tname].items) / len(tasks[tname].items)
            task = tasks[tname]
            metrics, preds = evaluate_task(model, tok, task, shots, seed=args.seed, normalize=not args.raw,
                                           description=not args.no_description, batch_size=args.batch_size,
                                           label=f"{name}: ")
            per_task[task.name] = metrics
            preds_all.extend(dict(p, run=name) for p in preds)
            print(f"{name:>16} {task.name:>10}: " + "  ".join(
                f"k={k} {100 * m['acc']:5.1f}%" + (f" (P(right) {100 * m['gold_prob']:.1f}%)" if "gold_prob" in m else "")
                for k, m in metrics.items()), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "results.md", results_markdown(res))
    atomic_write_jsonl(out / "predictions.jsonl", preds_all)
    plot_shots(res, out / "accuracy_vs_shots.png")
    print(f"\nwrote {out}/results.json, results.md, predictions.jsonl, accuracy_vs_shots.png "
          f"({res['seconds']:.0f}s)")
    return 0


def _run_perplexity(args) -> int:
    from gptlab.evals.perplexity import perplexity, read_text_file
    text = read_text_file(args.text)
    rows = {}
    taken: set[str] = set()
    for run_dir in args.run_dirs:
        name = _run_name(run_dir, taken)
        model, tok, _ = _load(run_dir, args.device, args)
        r = perplexity(model, tok, text, stride=args.stride, batch_size=args.batch_size)
        rows[name] = r
        print(f"{name}: {r['tokens']:,} tokens, {r['bytes']:,} bytes: loss {r['loss']:.4f} nats/token, "
              f"perplexity {r['perplexity']:.2f}, {r['bits_per_byte']:.4f} bits/byte "
              f"(window {r['block_size']}, stride {r['stride']})")
    if args.out:
        atomic_write_json(Path(args.out) / "perplexity.json", {"text": str(args.text), "runs": rows})
        print(f"wrote {Path(args.out) / 'perplexity.json'}")
    return 0


def _run_copy(args) -> int:
    from gptlab.evals.perplexity import copy_losses
    if args.n < 1:
        raise GptlabError("--n must be at least 1")
    rows = {}
    taken: set[str] = set()
    for run_dir in args.run_dirs:
        name = _run_name(run_dir, taken)
        model, tok, _ = _load(run_dir, args.device, args)
        r = rows[name] = copy_losses(model, tok, n=args.n, seed=args.seed, batch_size=args.batch_size)
        print(f"{name}: loss per token on a random line said once {r['first']:.3f}, said again "
              f"{r['second']:.3f}: copying lowers it by {r['drop']:.3f} nats ({r['n']} lines)")
    if args.out:
        atomic_write_json(Path(args.out) / "copy.json", {"runs": rows})
        print(f"wrote {Path(args.out) / 'copy.json'}")
    return 0


# ----- fill ----------------------------------------------------------------------------------------
def run_fill(args) -> int:
    from gptlab.evals.fill import fill
    if args.top_k < 1:
        raise GptlabError("--top-k must be at least 1")
    model, tok, _ = _load(args.run_dir, args.device)
    cands = args.candidates.split(",") if args.candidates is not None else None
    res = fill(model, tok, args.text, top_k=args.top_k, candidates=cands)
    if args.json:
        print(json.dumps(res, ensure_ascii=False, indent=2))
        return 0
    print(f"method: {res['method']}")
    for j, ranked in enumerate(res["blanks"], 1):
        print(f"blank {j}:")
        for r in ranked:
            print(f"  {r['prob']:6.1%}  {r['text']}   (log-score {r['score']:.2f})")
    print(f"best: {res['filled']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="few-shot accuracy (GPT-3 style) or perplexity / bits per byte of runs",
        description="Zero-, one- and few-shot evaluation without gradient updates. Prompts are an optional "
        "task description line, k demonstration lines and the query line. Built-in tasks use held-out items "
        "only: add2 add3 sub2 sub3 (groups: arithmetic), cycle anagram1 anagram2 reverse (unscramble), "
        "en2zh zh2en with a dictionary in the prompt (translate), dict3_en2zh dict3_zh2en with a "
        "three-column dictionary where only the demonstrations say which column answers (translate3), "
        "icl_upper icl_reverse icl_first icl_last (`word ->`: only the demonstrations say which string "
        "operation; group icl), "
        "lookup, cloze (Shakespeare last word, multiple choice), blank (a word inside a Shakespeare line, 10 candidates; works for BERT runs too), any "
        "other `gptlab data mixture` family, and 'all'. A JSONL file is a user task: records "
        '{"question","choices","answer"} (multiple choice) or {"prompt","answer"} (generation). '
        "Writes results.json, results.md, predictions.jsonl and accuracy_vs_shots.png to --out. "
        "With --text FILE: perplexity and bits per byte of that file instead.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s); several give one line each in the plot")
    p.add_argument("--tasks", nargs="+", default=["all"], metavar="NAME|FILE",
                   help="task names, groups or .jsonl files (space or comma separated)")
    p.add_argument("--shots", default="0,1,4,8", help="numbers of demonstrations, comma separated")
    p.add_argument("--out", default=None, help="folder for results.json, results.md and the PNG")
    p.add_argument("--n", type=int, default=100, help="query items per task (fewer if the held-out side is smaller)")
    p.add_argument("--seed", type=int, default=0, help="picks the items and demonstrations")
    p.add_argument("--raw", action="store_true",
                   help="multiple choice by the summed log-prob instead of the per-token mean")
    p.add_argument("--no-description", action="store_true", help="leave out the task description line")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--text", default=None, metavar="FILE", help="report perplexity and bits per byte of this text file")
    p.add_argument("--copy", action="store_true",
                   help="in-context copying: the loss on a random line said a second time against the first "
                        "(the induction test; --n lines)")
    p.add_argument("--stride", type=int, default=None,
                   help="--text: tokens between sliding windows (default half the context)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    g = p.add_argument_group("passkey retrieval (long context)")
    g.add_argument("--passkey", action="store_true",
                   help="passkey retrieval by needle depth x context length, and loss against position; "
                   "writes results.json, results.md, passkey_heatmap.png, loss_vs_position.png to --out")
    g.add_argument("--lengths", default="1,2,4,8", metavar="M,...",
                   help="--passkey: context lengths as multiples of the run's training context")
    g.add_argument("--depths", default="0,0.25,0.5,0.75,1", metavar="D,...",
                   help="--passkey: needle depths (0 = start of the filler, 1 = just before the question)")
    g.add_argument("--keys", type=int, default=20, help="--passkey: keys (prompts) per depth x length cell")
    g.add_argument("--windows", type=int, default=8,
                   help="--passkey: windows of the longest length averaged for loss against position "
                   "(text: --text, else fresh passkey documents)")
    from gptlab.runs import add_context_args
    add_context_args(p, several=True)
    p.set_defaults(func=run_eval)

    f = sub.add_parser(
        "fill", help="fill the blank(s) ___ of a sentence with a BERT or GPT run",
        description="Fill each ___ with the model's top candidates and their probabilities. BERT runs put "
        "1 to 3 mask tokens in a blank, fill them by beam search and rank the strings by "
        "pseudo-log-likelihood; GPT runs rank candidate words (from the left context and the tokenizer's "
        "frequent words) by the likelihood of the completed sentence. Probabilities are a softmax over "
        "every candidate considered, so the listed ones sum to at most 1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("run_dir", metavar="RUN_DIR")
    f.add_argument("text", metavar="TEXT", help='sentence with one or more blanks, e.g. "The ___ of Denmark"')
    f.add_argument("--candidates", default=None, metavar="A,B,C", help="rank exactly these strings")
    f.add_argument("--top-k", type=int, default=5, help="candidates shown per blank")
    f.add_argument("--json", action="store_true", help="print the result as JSON")
    f.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    f.set_defaults(func=run_fill)
