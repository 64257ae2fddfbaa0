"""Training memory of the GPU shapes, from what autograd actually saves, measured on the CPU.

    python bench/memory.py                       # gpt2-124m (the gpu preset) and gpt2-350m
    python bench/memory.py --json /tmp/mem.json

For each shape one sequence runs forward and backward under bf16 autocast (CPU autocast follows the
same op lists as CUDA's: matmuls in bf16, norms and softmax/loss in fp32) with the LM head computing
full logits as on a GPU, and every tensor autograd saves for the backward is counted, with and
without activation checkpointing. bf16 matmuls are slow on CPUs, so two short sequences (16 and 32
tokens) are measured and the count is extrapolated linearly: saved bytes = a fixed part (autocast's
bf16 copies of the weights) + a part per token (with SDPA's fused attention nothing grows faster than
the length). Memory for a micro-batch of B sequences of the shape's full context T is then

    16 bytes x parameters (fp32 weights, gradients and AdamW's two moments)
  + the fixed part + B x T x the bytes per token
  + B x T x vocab x 4 bytes (the loss's fp32 copy of the logits at the peak, outside the count)

which leaves out the CUDA context (~0.5 GB), allocator fragmentation and kernel workspaces: read the
figures as a lower bound with ~10-20% to add. No GPU was used to produce them.
"""
from __future__ import annotations

import argparse
import json

import torch

from gptlab.model.gpt import GPT, GPTConfig
from gptlab.train.memory import checkpoint_blocks

SHAPES = {"gpt2-124m (gpu preset: block 512, vocab 16384)": dict(preset="gpt2-124m", block_size=512, vocab_size=16384),
          "gpt2-350m (block 1024, vocab 16384)": dict(preset="gpt2-350m", block_size=1024, vocab_size=16384)}


def saved_bytes(model: GPT, T: int, checkpointing: bool) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    restore = checkpoint_blocks(model) if checkpointing else None
    x = torch.randint(0, model.config.vocab_size, (1, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
    if restore:
        restore()
    model.zero_grad(set_to_none=True)
    return total[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for name, shape in SHAPES.items():
        kw = dict(shape)
        cfg = GPTConfig.preset(kw.pop("preset"), "gpt2", **kw)
        torch.manual_seed(0)
        model = GPT(cfg).train()
        model.fused_loss = False   # a GPU computes the full logits; the fused CPU path would hide them
        n = sum(p.numel() for p in model.parameters())
        T = cfg.block_size
        fit = {}
        for ck in (False, True):
            a, b = saved_bytes(model, 16, ck), saved_bytes(model, 32, ck)
            fit[ck] = (2 * a - b, (b - a) / 16)   # (fixed bytes, bytes per token)
        for batch in args.batch:
            for ck in (False, True):
                fixed, per_token = fit[ck]
                gb = (16 * n + fixed + batch * T * (per_token + cfg.vocab_size * 4)) / 2 ** 30
                rows.append({"shape": name, "params_m": round(n / 1e6, 1), "micro_batch": batch, "context": T,
                             "activation_checkpointing": ck, "fixed_mb": round(fixed / 2 ** 20),
                             "kb_per_token": round(per_token / 1024, 1), "estimate_gib": round(gb, 1)})
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
