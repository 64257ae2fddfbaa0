"""Does a reward model judge arithmetic, or only its surface? Scores each held-out arithmetic prompt's
reference answer against two corrupted copies: the sum off by 1 or 10, and the sum cut to its first
digit. A model that checks sums prefers the reference to both; one that learned "shorter is better"
prefers the cut one.

    python bench/rm_probe.py RM_DIR --prompts /tmp/fs/instruct/heldout.jsonl [--n 150]
"""
from __future__ import annotations

import argparse
import random

from gptlab.data.formats import load_prompt_items
from gptlab.train.ppo import load_scalar_model
from gptlab.train.reward import score_responses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rm")
    ap.add_argument("--prompts", required=True, help="curriculum items (gptlab data instruct: heldout.jsonl)")
    ap.add_argument("--n", type=int, default=150)
    args = ap.parse_args()
    rm, tok, _ = load_scalar_model(args.rm, "rm")
    items = [it for it in load_prompt_items(args.prompts) if it.get("family") == "arithmetic"][:args.n]
    rng = random.Random(0)
    over_near = over_cut = 0
    for it in items:
        ref, answer = it["reference"], int(it["answer"])
        lhs = ref.rsplit("=", 1)[0]
        near = f"{lhs}= {answer + rng.choice([-10, -1, 1, 10])}."
        cut = f"{lhs}= {str(answer)[0]}."
        s_ref, s_near, s_cut = score_responses(rm, tok, it["messages"], [ref, near, cut])
        over_near += s_ref > s_near
        over_cut += s_ref > s_cut
    n = max(1, len(items))
    print(f"{args.rm}: prefers the right sum over one off by 1 or 10: {over_near / n:.1%}; "
          f"over its first digit alone: {over_cut / n:.1%} (n={len(items)})")


if __name__ == "__main__":
    main()
