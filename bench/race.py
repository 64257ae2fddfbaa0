"""The race: nanoGPT's CPU recipe vs `gptlab pretrain`'s defaults, same text, same machine, same run.

    gptlab data shakespeare && cat $(ls ~/.cache/gptlab/shakespeare/*.txt | sort) > /tmp/works.txt
    python bench/race.py --data /tmp/works.txt --nanogpt /path/to/nanoGPT --out /tmp/race

nanoGPT (a checkout you provide; nothing of it is copied into this repository) runs its README's CPU
recipe: 4 layers x 4 heads x 128, block 64, batch 12, 2000 iterations, eval every 250 on 20 batches,
on the text as one character-level corpus split 90/10 by its own data/shakespeare_char/prepare.py
(run in a scratch copy of the checkout). gptlab trains on the same text with a char-level tokenizer
(`gptlab tokenizer train --kind char`; the tail 10% is the same validation text) and `--target-loss`
set to the val loss nanoGPT finished with, plus nothing else unless --gptlab-args says so. With
--paper it also runs `--arch gpt2` at nanoGPT's exact shape and steps, for the per-step comparison.

Each side runs as a child process of this one; the wall time is the whole process (start-up,
evaluations and checkpoints included); data preparation happens before, untimed, for both. Both
sides' val-loss points are stamped with their time since process start as the lines appear, and
drawn together in --plot. The machine may be shared: --rounds N alternates the sides N times.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

NANOGPT_FLAGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                 "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                 "--n_embd=128", "--dropout=0.0"]
PAPER_FLAGS = ["--arch", "gpt2", "--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64",
               "--batch-size", "12"]


def timed(cmd: list[str], cwd: Path, val_pattern: re.Pattern, log: Path) -> tuple[float, list]:
    """Run ``cmd``; return its wall time and [(seconds since start, val loss)] read from its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    points = []
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            f.write(line)
            m = val_pattern.search(line)
            if m:
                points.append((time.perf_counter() - t0, float(m.group(1))))
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{cmd[:3]} failed (exit {p.returncode}); see {log}")
    return wall, points


def prepare_nanogpt(src: Path, data: Path, work: Path) -> Path:
    """A scratch copy of the checkout whose data/race_char holds the text, prepared by nanoGPT itself."""
    for need in ["train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
                 "data/shakespeare_char/prepare.py"]:
        if not (src / need).is_file():
            sys.exit(f"--nanogpt {src}: no {need}; pass a nanoGPT checkout")
    dst = work / "nanogpt"
    if dst.exists():
        shutil.rmtree(dst)
    for name in ["train.py", "model.py", "configurator.py"]:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / name, dst / name)
    shutil.copytree(src / "config", dst / "config")
    ds = dst / "data" / "race_char"
    ds.mkdir(parents=True)
    shutil.copy(src / "data/shakespeare_char/prepare.py", ds / "prepare.py")
    shutil.copy(data, ds / "input.txt")   # prepare.py reads input.txt when it exists (no download)
    subprocess.run([sys.executable, "prepare.py"], cwd=ds, check=True, stdout=subprocess.DEVNULL)
    return dst


def gptlab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gptlab", *args]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the corpus as one .txt file")
    ap.add_argument("--nanogpt", default=None, help="a nanoGPT checkout (without it, only gptlab runs)")
    ap.add_argument("--target", type=float, default=None,
                    help="val loss gptlab must reach (default: nanoGPT's final val loss in the same round)")
    ap.add_argument("--tokenizer", default=None, help="a char tokenizer of --data (default: trained here)")
    ap.add_argument("--gptlab-args", default="", help="extra flags for gptlab pretrain (quoted)")
    ap.add_argument("--paper", action="store_true", help="also run --arch gpt2 at nanoGPT's shape and steps")
    ap.add_argument("--iters", type=int, default=2000,
                    help="nanoGPT's iterations, and the steps of --paper (2000: the README's recipe)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default="race", help="folder for logs, runs, results.json")
    ap.add_argument("--plot", default=None, help="PNG of val loss vs wall time, both recipes")
    args = ap.parse_args()
    out, data = Path(args.out).resolve(), Path(args.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not data.is_file():
        sys.exit(f"--data {data}: no such file")
    if args.nanogpt is None and args.target is None:
        sys.exit("without --nanogpt, give --target")
    tok = Path(args.tokenizer).resolve() if args.tokenizer else out / "chartok"
    if not args.tokenizer:
        subprocess.run(gptlab_cmd("tokenizer", "train", "--data", str(data), "--kind", "char", "--out", str(tok)),
                       check=True, stdout=subprocess.DEVNULL)
    # Untimed, like nanoGPT's prepare.py: tokenize once into gptlab's token cache.
    from gptlab.data.corpus import parse_sources
    from gptlab.data.tokens import TokenDataset
    from gptlab.tokenizer import Tokenizer
    TokenDataset.prepare(parse_sources([str(data)]), Tokenizer.load(tok), val_fraction=0.1)
    nano = prepare_nanogpt(Path(args.nanogpt).resolve(), data, out) if args.nanogpt else None

    gl_val = re.compile(r'"val_loss": ([0-9.]+)')
    results = []
    for r in range(args.rounds):
        res: dict = {"round": r}
        if nano:
            shutil.rmtree(nano / "out", ignore_errors=True)
            wall, pts = timed([sys.executable, "train.py", *NANOGPT_FLAGS, f"--max_iters={args.iters}",
                               f"--lr_decay_iters={args.iters}", "--dataset=race_char", "--out_dir=out"],
                              nano, re.compile(r"^step \d+: train loss [0-9.]+, val loss ([0-9.]+)"),
                              out / f"nanogpt_{r}.log")
            res["nanogpt"] = {"wall_s": round(wall, 2), "final_val": pts[-1][1], "points": pts}
        target = args.target if args.target is not None else res["nanogpt"]["final_val"]
        run = out / f"gptlab_{r}"
        shutil.rmtree(run, ignore_errors=True)
        # --log-every 1 prints nothing extra; the val points come from metrics.jsonl below.
        wall, _ = timed(gptlab_cmd("pretrain", "--data", str(data), "--tokenizer", str(tok), "--out", str(run),
                                   "--target-loss", str(target), "--no-progress", *args.gptlab_args.split()),
                        Path.cwd(), gl_val, out / f"gptlab_{r}.log")
        summary = json.loads((run / "summary.json").read_text())
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        start = wall - summary["elapsed_s"]   # approximate: the loop's start within the process
        res["gptlab"] = {"wall_s": round(wall, 2), "time_to_target_s": summary.get("time_to_target_s"),
                         "steps_to_target": summary.get("steps_to_target"), "target": target,
                         "points": [(start + x["elapsed_s"], x["val_loss"]) for x in rows if "val_loss" in x]}
        if res["gptlab"]["time_to_target_s"] is None:
            print(f"round {r}: gptlab did not reach {target} (last val {summary.get('val_loss')})")
        if args.paper:
            prun = out / f"paper_{r}"
            shutil.rmtree(prun, ignore_errors=True)
            wall, _ = timed(gptlab_cmd("pretrain", "--data", str(data), "--tokenizer", str(tok), "--out", str(prun),
                                       "--no-progress", "--no-sample", "--eval-every", "250", *PAPER_FLAGS,
                                       "--max-steps", str(args.iters)),
                            Path.cwd(), gl_val, out / f"paper_{r}.log")
            res["paper"] = {"wall_s": round(wall, 2),
                            "val": json.loads((prun / "summary.json").read_text())["val_loss"]}
        line = f"round {r}: gptlab {res['gptlab']['wall_s']:.1f}s to val <= {target:.4f}"
        if nano:
            line += (f"; nanoGPT {res['nanogpt']['wall_s']:.1f}s ({args.iters} iters, final val "
                     f"{res['nanogpt']['final_val']:.4f}); ratio {res['gptlab']['wall_s'] / res['nanogpt']['wall_s']:.3f}")
            if args.paper:
                line += f"; gptlab --arch gpt2 {args.iters} steps {res['paper']['wall_s']:.1f}s " \
                        f"(nanoGPT/gptlab-gpt2 speed {res['nanogpt']['wall_s'] / res['paper']['wall_s']:.3f}x)"
        print(line, flush=True)
        results.append(res)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results[-1], Path(args.plot))
    return 0


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, label in [("nanogpt", "nanoGPT CPU recipe (AdamW, 4x128, block 64, batch 12)"),
                       ("gptlab", "gptlab pretrain defaults (--target-loss)")]:
        if key in res:
            pts = res[key]["points"]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"{label}: {res[key]['wall_s']:.0f} s")
    ax.axhline(res["gptlab"]["target"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("wall time since process start (s)")
    ax.set_ylabel("val loss (nats/char)")
    ax.set_ylim(top=3.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    sys.exit(main())
