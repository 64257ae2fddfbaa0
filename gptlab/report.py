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
    """A few generations from the final models: free text from the pre-trained model and chat turns."""
    from gptlab.tokenizer.chat_template import render_prompt
    from gptlab.generate.engine import Engine, SamplingParams
    from gptlab.runs import load_run
    lines = []
    pre = sr.d["pretrain"]
    if (pre / "model.safetensors").is_file():
        model, tok, _ = load_run(pre)
        eng = Engine(model, tok)
        for prompt in ["ROMEO.\n", "23 + 58 ="]:
            out = eng.generate([tok.encode(prompt)], SamplingParams(max_new_tokens=60, temperature=0.8, top_k=50,
                                                                    seed=0))[0]
            lines += [f"**pre-trained**, prompt `{prompt.strip()}`:", "", "```", prompt + out.text, "```", ""]
    final = next((sr.d[k] for k in ("ppo", "dpo", "sft") if (sr.d[k] / "model.safetensors").is_file()), None)
    if final is None:
        return lines
    model, tok, cfg = load_run(final)
    eng = Engine(model, tok)
    greedy = SamplingParams(max_new_tokens=48, temperature=0)
    for question in ["What is 23 + 19?", "Spell 'water' backwards.", "What is 'apple' in Chinese?",
                     "What is the phone number of the king of Mars?"]:
        msgs = [{"role": "user", "content": question}]
        answer = eng.generate([render_prompt(tok, msgs)], greedy)[0].text
        lines.append(f"- **user:** {question}  \n  **{cfg.get('stage', 'model')}:** {answer}")
    convo = [{"role": "user", "content": "What is 12 + 5?"}]
    convo.append({"role": "assistant", "content": eng.generate([render_prompt(tok, convo)], greedy)[0].text})
    convo.append({"role": "user", "content": "And double that?"})
    convo.append({"role": "assistant", "content": eng.generate([render_prompt(tok, convo)], greedy)[0].text})
    lines += ["", f"A multi-turn conversation with the {cfg.get('stage', 'final')} model:", ""]
    lines += [f"> **{m['role']}:** {m['content']}  " for m in convo]
    return lines


def build_report(sr) -> str:
    d = sr.d
    state = _load(sr.state_path)
    md = [f"# gptlab speedrun report ({sr.preset} preset)", "", f"Hardware: {_hardware()}.", ""]

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
