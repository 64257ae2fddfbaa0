"""The speedrun's report card: report.md built from what each stage left in its folder."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from gptlab.io import read_json


def _load(path: Path) -> dict:
    try:
        return read_json(path) if path.is_file() else {}
    except Exception:
        return {}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    line = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), " \
           f"Python {platform.python_version()}, PyTorch {torch.__version__}"
    if torch.cuda.is_available():
        line += f", GPU: {torch.cuda.get_device_name(0)}"
    else:
        line += ", no GPU (fp32 on CPU)"
    return line


def _samples(sr) -> list[str]:
    """Free text from the pre-trained model, then exam questions with the final model's real answers."""
    from gptlab.generate.engine import Engine, SamplingParams
    from gptlab.runs import load_run
    lines = []
    pre = sr.d["pretrain"]
    if (pre / "model.safetensors").is_file():
        model, tok, _ = load_run(pre)
        eng = Engine(model, tok)
        for prompt in ["ROMEO.\n", "User: What is 23 + 19?\nAssistant:"]:
            out = eng.generate([tok.encode(prompt)], SamplingParams(max_new_tokens=60, temperature=0.8, top_k=50,
                                                                    seed=0))[0]
            lines += [f"**pre-trained**, prompt `{prompt.strip()}`:", "", "```", prompt + out.text, "```", ""]
    res = _load(sr.d["exam"] / "results.json")
    if res:
        from gptlab.data.instruct import check_answer
        final = next((k for k in res["results"] if Path(k).name == "ppo"), next(iter(res["results"])))
        replies = res["results"][final]["responses"]
        lines += [f"Exam questions and the **{Path(final).name}** model's answers (greedy):", ""]
        for it, reply in list(zip(res["items"], replies))[:15]:
            turns = "  \n".join(f"**{m['role']}:** {m['content']}" for m in it["messages"])
            mark = "right" if check_answer(it, reply) else f"wrong (expected {it['answer']})"
            lines += [f"- {turns}  \n  **model:** {reply} — *{mark}*"]
    return lines


def _headline_exam(sr) -> list[str]:
    from gptlab.evals.exam import FAMILIES, format_restated, format_table
    res = _load(sr.d["exam"] / "results.json")
    if not res:
        return []
    results = {Path(k).name: v for k, v in res["results"].items()}
    best = max(results.values(), key=lambda r: r["mean_family_accuracy"])
    return ["### 1. It answers questions in a person's own words", "",
            f"`gptlab exam`: {res['results'][next(iter(res['results']))]['n'] // len(FAMILIES)} questions per family, five families, "
            "wordings the curriculum never uses, greedy (what `gptlab serve` answers at temperature 0). "
            f"Best mean family accuracy {best['mean_family_accuracy']:.1%}, its weakest family "
            f"{best['min_family_accuracy']:.1%}.", "", format_table(results), format_restated(results),
            "![exam](exam/results.png)", ""]


def _headline_rlhf(sr) -> list[str]:
    from gptlab.plots import plot_comparisons
    rows, found, labels = [], [], []
    for name, a, b in sr.comparisons():
        res = _load(sr.d["compare"] / f"{name}.json")
        if not res or b != "sft":
            continue
        lo, hi = res.get("win_rate_ci95", [0, 0])
        dlo, dhi = res.get("accuracy_diff_ci95", [0, 0])
        rows.append(f"| {a} vs {b} | {res['win_rate_a']:.1%} [{lo:.1%}, {hi:.1%}] | "
                    f"{100 * res.get('accuracy_diff', 0):+.1f} [{100 * dlo:+.1f}, {100 * dhi:+.1f}] | "
                    f"{res['a'].get('heldout_accuracy', 0):.1%} / {res['b'].get('heldout_accuracy', 0):.1%} | {res.get('n')} |")
        found.append(res)
        labels.append(f"{a} vs {b}")
    if not rows:
        return []
    try:
        plot_comparisons(found, labels, sr.d["compare"] / "rlhf.png", title="RLHF against its SFT starting point")
    except Exception:   # a report without the plot is still a report
        pass
    return ["### 2. RLHF against SFT on held-out prompts", "",
            "Labeler win rate (ties count half) and the paired task-accuracy difference, 95% intervals:", "",
            "| A vs B | A preferred | accuracy A - B (points) | accuracy A / B | prompts |", "|---|---|---|---|---|",
            *rows, "", "![RLHF vs SFT](compare/rlhf.png)", ""]


def _headline_fewshot(sr) -> list[str]:
    res = _load(sr.d["eval_pretrain"] / "results.json")
    if not res:
        return []
    run = next(iter(res["runs"]))
    shots = [str(k) for k in res["settings"]["shots"]]
    lo_k, hi_k = shots[0], shots[-1]
    rows = []
    for task in res["tasks"]:
        per = res["runs"][run].get(task, {})
        if lo_k in per and hi_k in per and "gold_prob" in per[hi_k]:
            rise = per[hi_k]["acc"] - per[lo_k]["acc"]
            rows.append(f"| {task} | " + " | ".join(f"{100 * per[k]['acc']:.0f}%" for k in shots if k in per)
                        + f" | **{100 * rise:+.0f}** |")
    if not rows:
        return []
    return ["### 3. In-context learning in the pre-trained model", "",
            f"Generation tasks, greedy exact match; the rise is k={hi_k} minus k={lo_k}, in points:", "",
            "| task | " + " | ".join(f"k={k}" for k in shots) + " | rise |", "|---|" + "---|" * (len(shots) + 1),
            *rows, "", "![accuracy vs shots](eval_pretrain/accuracy_vs_shots.png)", ""]


def build_report(sr) -> str:
    d = sr.d
    state = _load(sr.state_path)
    md = [f"# gptlab speedrun report ({sr.preset} preset, seed {sr.seed})", "", f"Hardware: {_hardware()}.", ""]
    headline = _headline_exam(sr) + _headline_rlhf(sr) + _headline_fewshot(sr)
    if headline:
        md += ["## Results", "", *headline]

    # Time and parameters per stage.
    md += ["## Stages", "", "| stage | time | parameters | result |", "|---|---|---|---|"]
    total = 0.0
    results = {
        "pretrain": lambda s: f"val loss {_fmt(s.get('val_loss'))}",
        "sft": lambda s: f"val loss {_fmt(s.get('val_loss'))}",
        "rm": lambda s: f"held-out pairwise accuracy {_fmt(s.get('pairwise_accuracy', s.get('metrics', {}).get('pairwise_accuracy')))}",
        "ppo": lambda s: f"{s.get('step')} PPO steps",
        "dpo": lambda s: f"{s.get('step')} DPO steps",
    }
    for name, rec in state.get("stages", {}).items():
        secs = rec.get("seconds", 0.0)
        total += secs
        summ = _load(d[name] / "summary.json") if name in d else {}
        params = summ.get("params")
        res = results.get(name, lambda s: "")(summ) if summ else ""
        md.append(f"| {name} | {secs:.0f} s | {f'{params / 1e6:.2f}M' if params else ''} | {res} |")
    md += [f"| **total** | **{total / 60:.1f} min** | | |", ""]

    pre = _load(d["pretrain"] / "summary.json")
    md += ["## Pre-training", "", f"Final train loss {_fmt(pre.get('train_loss'))}, val loss "
           f"{_fmt(pre.get('val_loss'))} after {pre.get('step')} steps ({pre.get('tokens', 0):,} tokens).", "",
           "![pre-training loss](pretrain/loss.png)", ""]

    ev = d["eval_pretrain"] / "results.md"
    if ev.is_file():
        md += ["## Zero- and few-shot evaluation of the pre-trained model", "", ev.read_text(encoding="utf-8"), "",
               "![accuracy vs shots](eval_pretrain/accuracy_vs_shots.png)", ""]

    sft = _load(d["sft"] / "summary.json")
    if sft:
        metrics = sft.get("metrics", {})
        accs = {k: v for k, v in metrics.items() if "acc" in k}
        md += ["## SFT", "", f"Held-out loss {_fmt(sft.get('val_loss'))}.", ""]
        if accs:
            md += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(accs.items())]
        md += ["", "![SFT loss](sft/loss.png)", ""]

    rm = _load(d["rm"] / "summary.json")
    if rm:
        acc = rm.get("pairwise_accuracy", rm.get("metrics", {}).get("pairwise_accuracy"))
        md += ["## Reward model", "", f"Held-out pairwise accuracy: {_fmt(acc)} (rankings from the programmatic "
               f"labeler with noise {sr.p['label'][sr.p['label'].index('--noise') + 1] if '--noise' in sr.p['label'] else 0}).", ""]

    if (d["ppo"] / "curves.png").is_file():
        md += ["## PPO-ptx", "", "Reward, KL, entropy, clip fraction, value loss and response length per step:", "",
               "![PPO curves](ppo/curves.png)", ""]

    rows = []
    for name, a, b in sr.comparisons():
        res = _load(d["compare"] / f"{name}.json")
        if not res:
            continue
        lo, hi = res.get("win_rate_ci95", [0, 0])
        ra, rb = res.get("a", {}), res.get("b", {})
        rows.append(f"| {a} vs {b} | {res['win_rate_a']:.1%} [{lo:.1%}, {hi:.1%}] | "
                    f"{ra.get('heldout_accuracy', 0):.1%} / {rb.get('heldout_accuracy', 0):.1%} | "
                    f"{ra.get('heldout_len', 0):.1f} / {rb.get('heldout_len', 0):.1f} | {res.get('n')} |")
    if rows:
        md += ["## Held-out win rates (programmatic labeler, greedy answers)", "",
               "| A vs B | A preferred (95% interval) | task accuracy A / B | response tokens A / B | prompts |",
               "|---|---|---|---|---|", *rows, ""]

    tools = _load(d["tools"] / "results.json") if "tools" in d else None
    if tools:
        from gptlab.evals.tools import format_table
        md += ["## Tools", "", "Held-out items answered by the SFT model with the tools shown and run, and with none "
               "(`gptlab eval-tools`; lookup documents never reached training):", "", format_table(tools["table"]), ""]

    vision = _load(d["eval_vision"] / "results.json") if "eval_vision" in d else None
    if vision:
        md += _vision_section(vision, sr.out)

    try:
        samples = _samples(sr)
    except Exception as e:  # a report without samples is still a report
        samples = [f"(samples unavailable: {e})"]
    if samples:
        md += ["## Samples", "", *samples, ""]

    final = next((k for k in ("ppo", "dpo", "sft") if (d[k] / "model.safetensors").is_file()), "pretrain")
    md += ["## Talk to it", "", "```", f"gptlab chat {d[final]}", f"gptlab serve {d[final]}   # then open http://127.0.0.1:8000/",
           f"gptlab sample {d['pretrain']} --prompt 'ROMEO.'", "```", ""]
    return "\n".join(md)


def _vision_section(res: dict, out) -> list[str]:
    """Held-out questions about pictures (`gptlab eval-vision`): the table, the plot, a few pictures
    with their questions and the model's answers."""
    from gptlab.evals.vision import format_table
    md = ["## Pictures", "", "Held-out pictures, each question asked with its picture and with a blank one "
          "(`gptlab eval-vision`; docs/VISION.md):", "", format_table(res), "",
          "![accuracy per question kind](eval_vision/accuracy.png)", "",
          "| picture | question | expected | answer | answer without the picture |", "|---|---|---|---|---|"]
    for ex in res.get("examples", [])[:8]:
        img = Path(ex["image"])
        rel = img.relative_to(out) if img.is_absolute() and img.is_relative_to(out) else img
        cells = [f"![]({rel})", ex["question"], ex["answer"], ex["reply"], ex["blank_reply"]]
        md.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return md + [""]
