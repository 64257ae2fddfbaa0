"""Your own data at scale: tokenisation throughput and peak memory on a generated corpus.

    python bench/data_scale.py --sizes-mb 100 1000 --workers 2 --out /tmp/scale

For each size, writes a folder of .jsonl.gz and .parquet files (alternating, ~64 MB of text each) of
generated documents (word-like strings, numbers, punctuation, newlines), then times, each in a fresh
`gptlab` process whose whole process tree is sampled for memory every 0.1 s:

1. `gptlab tokenizer train --max-chars` on the corpus (once, on the first size);
2. `gptlab data prepare --workers N`: MB of text per second and the peak resident memory summed over
   the process and its workers (and the largest single process);
3. `gptlab pretrain` for a few steps on the prepared cache (reused by content hash), peak memory.

Peak memory flat in corpus size is the claim under test: compare the rows of two sizes.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def tree_rss_mb(root: int) -> tuple[float, float]:
    """(sum, max) resident MB over ``root`` and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    todo, rss = [root], []
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss.append(int(line.split()[1]) / 1024)
        except OSError:
            pass
    return (sum(rss), max(rss)) if rss else (0.0, 0.0)


def run_measured(cmd: list[str]) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"sum": 0.0, "max": 0.0}

    def sample():
        while proc.poll() is None:
            s, m = tree_rss_mb(proc.pid)
            peak["sum"], peak["max"] = max(peak["sum"], s), max(peak["max"], m)
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out = proc.communicate()[0]
    t.join()
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-2000:]}")
    return {"seconds": time.time() - t0, "peak_rss_mb": round(peak["sum"]), "peak_one_process_mb": round(peak["max"]),
            "output": out[-600:]}


def write_corpus(folder: Path, total_mb: int, seed: int = 0) -> int:
    """Generated documents in ~64 MB files, alternating .jsonl.gz and .parquet; returns text bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = np.array(["".join(rng.choice(letters, rng.integers(1, 10))) for _ in range(20000)] +
                     [str(i) for i in range(1000)] + [",", ".", ";", "?", "!", "\n", "\n\n", "(", ")"])
    p = 1 / np.arange(1, len(words) + 1)                       # Zipf-like word frequencies
    p /= p.sum()
    folder.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    while written < total_mb * 1e6:
        docs, size = [], 0
        while size < min(64e6, total_mb * 1e6 - written):
            ws = words[rng.choice(len(words), int(rng.integers(200, 1200)), p=p)]
            doc = " ".join(ws)
            docs.append(doc)
            size += len(doc.encode())
        if index % 2 == 0:
            with gzip.open(folder / f"part-{index:04d}.jsonl.gz", "wt", compresslevel=1, encoding="utf-8") as f:
                for d in docs:
                    f.write(json.dumps({"text": d}) + "\n")
        else:
            pq.write_table(pa.table({"text": docs}), folder / f"part-{index:04d}.parquet", row_group_size=2000)
        written += size
        index += 1
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-chars", type=int, default=50_000_000)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--pretrain-steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gptlab-data-scale"))
    args = ap.parse_args()
    env_home = args.out / "home"
    os.environ["GPTLAB_HOME"] = str(env_home)
    gptlab = [sys.executable, "-m", "gptlab"]
    rows = []
    tok = args.out / "tok"
    for i, mb in enumerate(args.sizes_mb):
        corpus = args.out / f"corpus-{mb}mb"
        t0 = time.time()
        text_bytes = write_corpus(corpus, mb) if not corpus.exists() else int(
            json.loads((corpus / ".bytes").read_text()))
        (corpus / ".bytes").write_text(str(text_bytes))
        disk = sum(f.stat().st_size for f in corpus.iterdir() if not f.name.startswith("."))
        print(f"corpus {corpus}: {text_bytes / 1e6:.0f} MB of text, {disk / 1e6:.0f} MB on disk "
              f"({time.time() - t0:.0f} s to write)", flush=True)
        if i == 0:
            r = run_measured(gptlab + ["tokenizer", "train", "--data", str(corpus), "--vocab-size",
                                       str(args.vocab_size), "--max-chars", str(args.max_chars), "--out", str(tok)])
            rows.append({"step": "tokenizer train", "corpus_mb": mb, "max_chars": args.max_chars, **r})
            print(json.dumps(rows[-1]), flush=True)
        r = run_measured(gptlab + ["data", "prepare", "--data", str(corpus), "--tokenizer", str(tok),
                                   "--workers", str(args.workers)])
        r["text_mb_per_s"] = round(text_bytes / 1e6 / r["seconds"], 2)
        rows.append({"step": "data prepare", "corpus_mb": round(text_bytes / 1e6), "workers": args.workers, **r})
        print(json.dumps(rows[-1]), flush=True)
        r = run_measured(gptlab + ["pretrain", "--data", str(corpus), "--tokenizer", str(tok), "--preset", "tiny",
                                   "--max-steps", str(args.pretrain_steps), "--eval-every", str(args.pretrain_steps),
                                   "--no-sample", "--workers", str(args.workers), "--out", str(args.out / f"run-{mb}")])
        rows.append({"step": "pretrain (cache reused)", "corpus_mb": round(text_bytes / 1e6), **r})
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
