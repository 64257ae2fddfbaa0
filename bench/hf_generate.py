"""Generation speed: gptlab's KV-cache engine vs transformers generate() on the same weights.

    python bench/hf_generate.py --tokenizer /tmp/tok_shk            # tiny + small, gpt2 + modern
    python bench/hf_generate.py --presets tiny --archs gpt2 --threads 2

For each preset/arch a random model is built (seed 0), saved as a gptlab run, exported with
`gptlab export --format hf` and loaded with AutoModelForCausalLM, so both sides run identical weights.
Both decode greedily at batch 1 with a KV cache, 256 new tokens by default (the context is widened to
512 so no sliding is needed: transformers cannot slide GPT-2's learned positions). Timing covers the
whole call (prefill + decode); the runs alternate between the two libraries and the median is printed.
The script also checks that both produced the same tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from gptlab.generate.engine import Engine, SamplingParams  # noqa: E402
from gptlab.interop.hf import export_hf  # noqa: E402
from gptlab.model.gpt import GPT, GPTConfig  # noqa: E402
from gptlab.tokenizer import Tokenizer  # noqa: E402
from gptlab import runs as ckpt  # noqa: E402

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"


def load_tokenizer(path: str | None) -> Tokenizer:
    if path:
        return Tokenizer.load(path)
    text = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the "
            "slings and arrows of outrageous fortune, or to take arms against a sea of troubles.\n") * 200
    return Tokenizer.train([text], vocab_size=512)


def bench_one(preset: str, arch: str, tok: Tokenizer, new_tokens: int, repeats: int, workdir: Path) -> dict:
    from transformers import AutoModelForCausalLM
    vocab = ((tok.vocab_size + 63) // 64) * 64
    torch.manual_seed(0)
    cfg = GPTConfig.preset(preset, arch, vocab_size=vocab, block_size=512)
    model = GPT(cfg).eval()
    run, hf_dir = workdir / f"{preset}-{arch}", workdir / f"{preset}-{arch}-hf"
    ckpt.write_run_config(run, cfg, tok, "bench")
    ckpt.save_tensors(run / ckpt.MODEL_FILE, ckpt.gpt_state(model))
    export_hf(run, hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    hf.generation_config.eos_token_id = None     # always produce exactly new_tokens tokens
    hf.generation_config.pad_token_id = tok.eot_id

    engine = Engine(model, tok)
    ids = tok.encode(PROMPT)
    x = torch.tensor([ids])
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)

    def run_gptlab():
        t = time.perf_counter()
        out = engine.generate([ids], params)[0].ids
        return time.perf_counter() - t, out

    def run_hf():
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                              do_sample=False)[0, len(ids):].tolist()
        return time.perf_counter() - t, out

    for fn in (run_gptlab, run_hf):   # warm-up: first calls allocate and pick kernels
        fn()
    times_g, times_h = [], []
    for _ in range(repeats):
        tg, out_g = run_gptlab()
        th, out_h = run_hf()
        times_g.append(len(out_g) / tg)
        times_h.append(len(out_h) / th)
    n = min(len(out_g), len(out_h))
    return {"preset": preset, "arch": arch, "params_m": model.num_params() / 1e6, "prompt": len(ids),
            "weight_bytes": weight_bytes_per_token(model),
            "gptlab_tokens": len(out_g), "hf_tokens": len(out_h),
            "gptlab_tps": statistics.median(times_g), "hf_tps": statistics.median(times_h),
            "same_tokens": out_g[:n] == out_h[:n]}


def weight_bytes_per_token(model: GPT) -> int:
    """Bytes of weights one decoding step must read: every parameter except the embedding tables, of
    which a step reads one row each, plus the LM head (the token table again when tied)."""
    tr = model.transformer
    tables = [m.weight for m in tr.modules() if isinstance(m, torch.nn.Embedding)]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    skipped = sum(t.numel() * t.element_size() for t in tables)
    head = model.lm_head.weight
    tied = any(head is t for t in tables)
    return total - skipped + (head.numel() * head.element_size() if tied else 0)


def read_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s this process reads from memory: the best of ``repeats`` sums over a buffer far larger
    than any cache (a STREAM-style read test, on the same threads as the decoding)."""
    buf = torch.ones(mb * (1 << 20) // 4)
    buf.sum()
    best = min(_timed_sum(buf) for _ in range(repeats))
    return buf.numel() * 4 / best


def _timed_sum(buf: torch.Tensor) -> float:
    t = time.perf_counter()
    buf.sum()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: a small BPE trained here)")
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--archs", nargs="+", default=["gpt2", "modern"], choices=["gpt2", "modern"])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="keep the run folders here (e.g. for `gptlab bench serve DIR/small-gpt2`)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    tok = load_tokenizer(args.tokenizer)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} "
          f"thread(s), CPU, batch 1, greedy, {args.new_tokens} new tokens, tokenizer {tok.vocab_size} tokens, "
          f"median of {args.repeats}")
    bw = read_bandwidth()
    print(f"memory read bandwidth {bw / 1e9:.1f} GB/s; '% bw' = weight bytes per token x tok/s / bandwidth")
    print(f"{'preset':<7}{'arch':<8}{'params':>9}{'gptlab tok/s':>14}{'HF tok/s':>11}{'ratio':>8}"
          f"{'% bw':>7}  same tokens")
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()) as tmp:
        for preset in args.presets:
            for arch in args.archs:
                r = bench_one(preset, arch, tok, args.new_tokens, args.repeats, Path(tmp))
                print(f"{r['preset']:<7}{r['arch']:<8}{r['params_m']:>8.2f}M{r['gptlab_tps']:>14.1f}"
                      f"{r['hf_tps']:>11.1f}{r['gptlab_tps'] / r['hf_tps']:>7.2f}x"
                      f"{100 * r['weight_bytes'] * r['gptlab_tps'] / bw:>6.0f}%  {r['same_tokens']}"
                      + (f" (gptlab stopped at {r['gptlab_tokens']})" if r["gptlab_tokens"] < args.new_tokens else ""),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
