"""How fast a small model learns two-digit sums, written plainly or worked in columns.

    python bench/worked_sums.py --form worked --steps 300
    python bench/worked_sums.py --form plain --steps 600

Trains a 4-layer, 128-wide `fast` model from scratch on lines of two-digit additions and
subtractions, one character per token, either ``59 + 63 = 122`` (plain) or
``59 + 63: 9+3=12, 5+6+1=12, so 122.`` (worked, gptlab.data.sums), batches of 16 x 256 characters,
Muon at the pre-training defaults, one thread. Every 50 steps from step 100 it answers 100 held-out
problems greedily (after two training lines as context) and prints how many final answers are exact.
The held-out problems never appear in training. One run per form is what docs/INSTRUCT.md reports.
"""
from __future__ import annotations

import argparse
import random
import time
import types

import torch

from gptlab.data.sums import worked
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.train.optim import make_optimizer

CHARS = "0123456789+-=:, so.\n"
BLOCK, BATCH = 256, 16


def problem(rng: random.Random) -> tuple[int, str, int]:
    a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def split(form: str, a: int, op: str, b: int) -> tuple[str, str]:
    """(question part, answer part) of one line."""
    if form == "plain":
        return f"{a} {op} {b} = ", str(a + b if op == "+" else a - b)
    text = worked(a, op, b)
    cut = text.index(":") + 2
    return text[:cut], text[cut:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--form", choices=("plain", "worked"), default="worked")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    index = {c: i for i, c in enumerate(CHARS)}
    held_rng, rng = random.Random(args.seed + 1), random.Random(args.seed)
    tests = [problem(held_rng) for _ in range(100)]
    held = set(tests)

    def line() -> str:
        while True:
            p = problem(rng)
            if p not in held:
                return "".join(split(args.form, *p)) + "\n"

    def batch() -> torch.Tensor:
        rows = []
        for _ in range(BATCH):
            text = ""
            while len(text) < BLOCK + 61:
                text += line()
            start = rng.randrange(20)
            rows.append([index[c] for c in text[start:start + BLOCK + 1]])
        return torch.tensor(rows)

    model = GPT(GPTConfig.for_arch("fast", vocab_size=64, block_size=BLOCK, n_layer=4, n_head=4, n_embd=128))
    opt = make_optimizer(model, types.SimpleNamespace(optimizer="muon", lr=3e-3, muon_lr=0.04, weight_decay=0.1,
                                                      beta1=0.9, beta2=0.95, fsdp=False), torch.device("cpu"))

    def exact() -> int:
        model.eval()
        right = 0
        with torch.no_grad():
            for p in tests:
                question, answer = split(args.form, *p)
                context = line() + line() + question
                ids = [index[c] for c in context]
                for _ in range(len(answer) + 1):
                    ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
                said = "".join(CHARS[i] for i in ids[len(context):]).split("\n")[0]
                right += said.rstrip(".").split(" ")[-1] == answer.rstrip(".").split(" ")[-1]
        model.train()
        return right

    t0 = time.time()
    for step in range(args.steps + 1):
        x = batch()
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= 100 and step % 50 == 0:
            print(f"{args.form} step {step}: loss {loss.item():.3f}, exact {exact()}/100, {time.time() - t0:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
