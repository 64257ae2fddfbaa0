"""GPT-3's banded sparse layers against dense attention at long context: time per token.

    OMP_NUM_THREADS=1 python bench/sparse_attention.py                 # 2k, 4k, 8k tokens
    OMP_NUM_THREADS=1 python bench/sparse_attention.py --lengths 1024 --json /tmp/sparse.json

One model shape, three attention implementations over the same weights:

* ``gpt3 banded``  the odd layers attend over their band through ``banded_attention`` (blocks of
                   ``band`` tokens, each over itself and the block before: 2 x band scores per query);
* ``gpt3 masked``  the same layers through the full T x T product with a band mask (the reference
                   the banded path must equal, and what gptlab ran before it);
* ``dense``        every layer dense (the gpt2 arch with the same weights).

Rows: forward + backward time per token of one sequence of T tokens, and decoding time per token
with T tokens already in the KV cache (filled with random keys: the time does not depend on them).
Run it with nothing else heavy on the machine; the rows of one run are comparable with each other.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from gptlab.model import gpt as gpt_module
from gptlab.model.gpt import GPT, GPTConfig


def fwd_bwd_s(model: GPT, T: int, reps: int) -> float:
    x = torch.randint(0, model.config.vocab_size, (1, T))
    best = float("inf")
    for _ in range(reps + 1):   # the first repetition warms up (allocations, mask caches)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def decode_s(model: GPT, T: int, steps: int) -> float:
    cache = model.new_cache(1, T + steps + 1)
    cache.k.normal_()
    cache.v.normal_()
    cache.lengths[0] = T
    tok = [1]
    model.decode(tok, cache, [0])   # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        model.decode(tok, cache, [0])
    return (time.perf_counter() - t0) / steps


def masked_reference(q, k, v, band, dropout=0.0):
    T = q.size(2)
    return gpt_module.attend(q, k, v, gpt_module.band_mask(T, T, band, q.device), dropout=dropout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--band", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lengths = [int(s) for s in args.lengths.split(",")]
    shape = dict(vocab_size=512, block_size=max(lengths) + args.decode_steps + 2, n_layer=args.n_layer,
                 n_embd=args.n_embd, n_head=args.n_head, sparse_band=args.band)
    torch.manual_seed(0)
    sparse = GPT(GPTConfig.for_arch("gpt3", **shape))
    dense = GPT(GPTConfig.for_arch("gpt2", **shape))
    dense.load_state_dict(sparse.state_dict())
    banded = gpt_module.banded_attention
    rows = []
    print(f"{args.n_layer} layers x {args.n_embd} wide, {args.n_head} heads; gpt3 band {args.band} on the odd "
          f"layers; threads {torch.get_num_threads()}")
    print(f"{'T':>6} {'train ms/token: banded':>23} {'masked':>8} {'dense':>8} {'banded/dense':>13}"
          f" {'decode ms/token: banded':>24} {'dense':>8} {'banded/dense':>13}")
    for T in lengths:
        r = {"T": T}
        r["train_banded_ms"] = 1e3 * fwd_bwd_s(sparse, T, args.reps) / T
        gpt_module.banded_attention = masked_reference
        try:
            r["train_masked_ms"] = 1e3 * fwd_bwd_s(sparse, T, args.reps) / T
        finally:
            gpt_module.banded_attention = banded
        r["train_dense_ms"] = 1e3 * fwd_bwd_s(dense, T, args.reps) / T
        r["decode_banded_ms"] = 1e3 * decode_s(sparse.eval(), T, args.decode_steps)
        r["decode_dense_ms"] = 1e3 * decode_s(dense.eval(), T, args.decode_steps)
        sparse.train(), dense.train()
        rows.append(r)
        print(f"{T:>6} {r['train_banded_ms']:>23.3f} {r['train_masked_ms']:>8.3f} {r['train_dense_ms']:>8.3f} "
              f"{r['train_banded_ms'] / r['train_dense_ms']:>13.2f} {r['decode_banded_ms']:>24.3f} "
              f"{r['decode_dense_ms']:>8.3f} {r['decode_banded_ms'] / r['decode_dense_ms']:>13.2f}", flush=True)
    if args.json:
        from gptlab.io import atomic_write_json
        atomic_write_json(args.json, {"settings": vars(args), "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
