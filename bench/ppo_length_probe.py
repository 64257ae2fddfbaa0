"""Can PPO move a plain signal? Replaces the labeler's score with +-(words / 5), so --oracle-reward
rewards only length, and runs `gptlab ppo` on it. Used in docs/PPO.md (session 5) to tell "PPO does
not optimise" from "the correctness signal is too sparse".

    python bench/ppo_length_probe.py SFT_RUN RM_RUN PROMPTS OUT {shorter,longer} [extra ppo flags...]
"""
import sys

from gptlab.cli import main
from gptlab.label import labeler

if __name__ == "__main__":
    if len(sys.argv) < 6 or sys.argv[5] not in ("shorter", "longer"):
        sys.exit(__doc__)
    sft, rm, prompts, out, direction, *extra = sys.argv[1:]
    sign = -1.0 if direction == "shorter" else 1.0
    labeler.score = lambda item, response: sign * len(response.split()) / 5.0
    sys.exit(main(["ppo", "--init", sft, "--reward-model", rm, "--prompts", prompts, "--oracle-reward",
                   "--out", out, "--no-progress", *extra]))
