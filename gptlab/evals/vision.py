"""Does the model see? Held-out accuracy per question kind, with the picture and with it blanked.

    gptlab eval-vision runs/vision --data ~/.cache/gptlab/images --out vision.json --plot vision.png

Every checkable question of the held-out pictures is asked on its own (picture + question, greedy
answer) twice: with its picture, and with a flat grey picture in its place. The blanked answers show
what the question alone gives away (about chance: 1 in 6 colours, 1 in 5 shapes or counts); the gap is
what the picture adds. With ``--text`` the run's text curriculum held-out accuracy is measured next to
the run it started from, the check that learning to see did not cost its text skills.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from gptlab import runs
from gptlab.errors import GptlabError
from gptlab.evals.stats import wilson_interval
from gptlab.io import atomic_write_json

KIND_ORDER = ["colour", "shape", "count", "read", "relation"]


def evaluate(run_dir, data: Path, limit: int | None = None, text: bool = False, text_items: int = 300) -> dict:
    from gptlab.data.images import load_image_records
    from gptlab.train.vision import accuracy_by_kind, answer_questions, blank_like, heldout_questions, load_pixels
    model, tok, cfg = runs.load_run(run_dir)
    if model.vision is None:
        raise GptlabError(f"{run_dir}: a text-only run (no vision encoder); train one with `gptlab vision`")
    held = data / "heldout.jsonl" if data.is_dir() else data
    recs = load_image_records(held)
    qs = heldout_questions(recs, limit)
    if not qs:
        raise GptlabError(f"{held}: no checkable questions (records need \"questions\" with kind and answer)")
    pixels = load_pixels([r["image"] for r in recs], model.vision.config.image_size)
    seen = answer_questions(model, tok, qs, pixels)
    blind = answer_questions(model, tok, qs, blank_like(pixels))
    out = {"run": str(run_dir), "data": str(held), "n": len(qs), "kinds": {}}
    for k in [k for k in KIND_ORDER if any(q["kind"] == k for q in qs)]:
        idx = [i for i, q in enumerate(qs) if q["kind"] == k]
        n = len(idx)
        right = round(accuracy_by_kind([qs[i] for i in idx], [seen[i] for i in idx])[k] * n)
        blank = round(accuracy_by_kind([qs[i] for i in idx], [blind[i] for i in idx])[k] * n)
        out["kinds"][k] = {"n": n, "accuracy": right / n, "ci95": wilson_interval(right, n),
                           "blank": blank / n, "blank_ci95": wilson_interval(blank, n)}
    out["examples"] = [{"image": recs[q["image"]]["image"], "kind": q["kind"], "question": q["question"],
                        "answer": q["answer"], "reply": seen[i], "blank_reply": blind[i]}
                       for i, q in enumerate(qs[:40])]
    if text:
        out["text"] = text_accuracy(run_dir, cfg, model, tok, text_items)
    return out


def text_accuracy(run_dir, cfg: dict, model, tok, limit: int) -> dict:
    """Text curriculum held-out accuracy of the run and of the run it started from (same items)."""
    from gptlab.train.heldout import curriculum_heldout, load_eval_items, task_accuracy
    text_data = (cfg.get("vision_train") or {}).get("text_data")
    items_path = curriculum_heldout(Path(text_data)) if text_data else None
    if items_path is None:
        raise GptlabError(f"{run_dir}: no text curriculum recorded (vision_train.text_data) to evaluate --text on")
    items = load_eval_items(items_path, limit)
    base, base_tok, _ = runs.load_run(cfg["init"])
    now, before = task_accuracy(model, tok, items), task_accuracy(base, base_tok, items)
    return {"items": str(items_path), "n": len(items), "accuracy": now["accuracy"], "per_family": now["per_family"],
            "init": cfg["init"], "init_accuracy": before["accuracy"], "init_per_family": before["per_family"]}


def format_table(res: dict) -> str:
    lines = ["| question kind | n | with the picture | picture blanked |", "|---|---:|---:|---:|"]
    for k, r in res["kinds"].items():
        lo, hi = r["ci95"]
        lines.append(f"| {k} | {r['n']} | {100 * r['accuracy']:.1f}% ({100 * lo:.0f}-{100 * hi:.0f}) | "
                     f"{100 * r['blank']:.1f}% |")
    if "text" in res:
        t = res["text"]
        lines.append(f"\ntext curriculum held-out accuracy ({t['n']} items): {100 * t['accuracy']:.1f}% "
                     f"(the text run it started from: {100 * t['init_accuracy']:.1f}%)")
    return "\n".join(lines)


def run(args) -> int:
    from gptlab.plots import plot_family_bars
    res = evaluate(args.run_dir, Path(args.data), args.n or None, args.text, args.text_items)
    print(format_table(res))
    if args.out:
        atomic_write_json(args.out, res)
        print(f"wrote {args.out}")
    if args.plot:
        kinds = list(res["kinds"])
        plot_family_bars({"with the picture": {"per_family": {k: r["accuracy"] for k, r in res["kinds"].items()}},
                          "picture blanked": {"per_family": {k: r["blank"] for k, r in res["kinds"].items()}}},
                         kinds, args.plot, title=f"held-out questions: {Path(args.run_dir).name}", floor=0.9)
        print(f"wrote {args.plot}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval-vision", help="held-out accuracy per question kind, with and without the picture",
                       description="Ask every held-out picture's questions with the picture and with a blank "
                       "picture; print accuracy per kind (95%% intervals), optionally the text curriculum "
                       "accuracy against the starting run (--text).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", required=True, help="picture folder (its heldout.jsonl) or a JSONL of records")
    p.add_argument("--n", type=int, default=0, help="questions asked, spread over the kinds (0 = all)")
    p.add_argument("--text", action="store_true", help="also the text curriculum accuracy, against the init run")
    p.add_argument("--text-items", type=int, default=300, help="curriculum items for --text")
    p.add_argument("--out", default=None, help="write the figures and example answers as JSON")
    p.add_argument("--plot", default=None, help="write a bar chart PNG")
    p.set_defaults(func=run)
