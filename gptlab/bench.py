"""``gptlab bench``: the speed figures in docs/BENCHMARKS.md, measured on this machine.

    gptlab bench peak                       # fp32 (CPU) / bf16 (GPU) matmul peak: MFU's denominator
    gptlab bench train --preset tiny --n-layer 4 --n-embd 128 --block-size 64 --batch-size 12
    gptlab bench generate --preset tiny --new-tokens 256
    gptlab bench serve RUN_DIR --clients 1 8 32
    gptlab bench all                        # peak + train + generate at the issue's reference shapes

Training is measured on random tokens (the data pipeline is not what is being timed) after warm-up
steps, through the same model, optimizer and autocast the training loop uses.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptlab.device import autocast, hardware_name, matmul_peak, measure_matmul_peak, pick_device, tune_cpu_allocator
from gptlab.errors import GptlabError
from gptlab.io import atomic_write_json
from gptlab.model.gpt import ARCHS, PRESETS, GPT, GPTConfig
from gptlab.train.loop import TrainConfig, make_optimizer


def _config(args) -> GPTConfig:
    return GPTConfig.preset(args.preset, args.arch, vocab_size=args.vocab_size, n_layer=args.n_layer,
                            n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)


def bench_train(cfg: GPTConfig, batch_size: int, steps: int = 40, warmup: int = 5, device="auto",
                compile: bool = False, rounds: int = 8) -> dict:
    dev = pick_device(device)
    if dev.type == "cpu":
        tune_cpu_allocator()   # as the training loop does
    torch.manual_seed(0)
    model = GPT(cfg).to(dev).train()
    opt = make_optimizer(model, TrainConfig(), dev)
    run = torch.compile(model) if compile else model
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), device=dev)
    y = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), device=dev)

    def step():
        with autocast(dev):
            _, loss = run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    flops = model.flops_per_token()
    tokens = batch_size * cfg.block_size
    if dev.type == "cuda":   # datasheet peak; one timed window
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        windows, mfus = [(time.perf_counter() - t0) / steps], []
        peak = matmul_peak(dev)
    else:
        # A shared CPU's speed drifts by tens of percent within minutes. So the loop alternates a
        # short matmul-peak reading with a window of training steps, and MFU is the median over
        # windows of (training FLOP/s / the peak read just before it): both sides see the same
        # machine state. The best-ever peak (matmul_peak's cache) gives a second, stricter figure.
        rounds = max(1, min(rounds, steps))
        windows, mfus = [], []
        for r in range(rounds):
            peak_now = measure_matmul_peak(dev, seconds=0.25)
            n = steps // rounds + (r < steps % rounds)
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            windows.append((time.perf_counter() - t0) / n)
            mfus.append(flops * tokens / windows[-1] / peak_now)
        peak = matmul_peak(dev, refresh=True)
    dt = min(windows)
    tok_s = tokens / dt
    mfu = statistics.median(mfus) if mfus else flops * tok_s / peak
    return {"what": "train", "device": str(dev), "arch": cfg.arch,
            "shape": f"{cfg.n_layer}x{cfg.n_embd} block {cfg.block_size} batch {batch_size}",
            "params": model.num_params(), "tokens_per_s": round(tok_s, 1),
            "tokens_per_s_median": round(tokens / statistics.median(windows), 1),
            "ms_per_step": round(1000 * dt, 2), "flops_per_token": flops,
            "achieved_flops": round(flops * tok_s), "peak_flops": round(peak), "mfu": round(mfu, 4),
            "mfu_vs_best_peak": round(flops * tok_s / peak, 4), "windows": len(windows),
            "compile": compile, "threads": torch.get_num_threads(), "hardware": hardware_name(dev)}


def bench_generate(cfg: GPTConfig, new_tokens: int = 256, batch: int = 1, device="auto", repeats: int = 3) -> dict:
    from gptlab.generate.engine import Engine, SamplingParams
    from gptlab.tokenizer import Tokenizer

    dev = pick_device(device)
    torch.manual_seed(0)
    if cfg.block_size < new_tokens + 8:
        raise GptlabError(f"--block-size must be at least {new_tokens + 8} to generate {new_tokens} tokens")
    model = GPT(cfg).to(dev).eval()
    tok = Tokenizer.train(["a b c d e f g h"], vocab_size=300)   # only its ids are used
    eng = Engine(model, tok)
    prompts = [[tok.eot_id, 5 + i] for i in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_ids=[-1])
    eng.default_stop_ids = lambda: set()   # random weights: never stop early, time exactly new_tokens
    # Alternate the two modes and keep each one's best round: a shared machine's speed drifts, and
    # measuring one mode early and the other late would fold that drift into the ratio.
    warm = SamplingParams(max_new_tokens=16, temperature=0, stop_ids=[-1])
    for use_cache in (True, False):   # first-call allocations and lazy init are not decoding speed
        eng.generate(prompts, warm, use_cache=use_cache)
    best = {True: float("inf"), False: float("inf")}
    for _ in range(repeats):
        for use_cache in (True, False):
            t0 = time.perf_counter()
            res = eng.generate(prompts, params, use_cache=use_cache)
            best[use_cache] = min(best[use_cache], time.perf_counter() - t0)
    n = sum(len(r.ids) for r in res)
    out = {"cache": round(n / best[True], 1), "no_cache": round(n / best[False], 1)}
    return {"what": "generate", "device": str(dev), "arch": cfg.arch,
            "shape": f"{cfg.n_layer}x{cfg.n_embd} block {cfg.block_size}", "batch": batch,
            "new_tokens": new_tokens, "tokens_per_s_cache": out["cache"],
            "tokens_per_s_no_cache": out["no_cache"], "speedup": round(out["cache"] / out["no_cache"], 2)}


def _print(row: dict) -> None:
    if row["what"] == "train":
        print(f"train   {row['arch']} {row['shape']} on {row['device']} ({row['hardware']}; {row['threads']} threads"
              f"{', compiled' if row['compile'] else ''}): {row['tokens_per_s']:,.0f} tokens/s, "
              f"{row['ms_per_step']} ms/step (best of {row['windows']} windows), "
              f"{row['achieved_flops'] / 1e9:.1f} GFLOP/s; MFU {100 * row['mfu']:.1f}% (median over windows "
              f"against the peak read beside each), {100 * row['mfu_vs_best_peak']:.1f}% of the best-ever "
              f"{row['peak_flops'] / 1e9:.1f} GFLOP/s peak")
    elif row["what"] == "generate":
        print(f"generate {row['arch']} {row['shape']} batch {row['batch']}, {row['new_tokens']} new tokens: "
              f"{row['tokens_per_s_cache']:,.0f} tok/s with KV cache, {row['tokens_per_s_no_cache']:,.0f} "
              f"without: {row['speedup']}x")
    elif row["what"] == "peak":
        print(f"peak    {row['device']} ({row['hardware']}) matmul {row['n']}x{row['n']}: {row['flops'] / 1e9:.1f} GFLOP/s")


def run(args) -> int:
    rows = []
    what = args.what
    if what in ("peak", "all"):
        dev = pick_device(args.device)
        peak = matmul_peak(dev, refresh=True)
        rows.append({"what": "peak", "device": str(dev), "hardware": hardware_name(dev), "n": 1024, "flops": round(peak)})
        _print(rows[-1])
    if what in ("train", "all"):
        cfg = _config(args)
        rows.append(bench_train(cfg, args.batch_size, args.steps, args.warmup, args.device, args.compile,
                                rounds=args.rounds))
        _print(rows[-1])
    if what in ("generate", "all"):
        cfg = _config(args)
        if cfg.block_size < args.new_tokens + 8:
            cfg = GPTConfig.from_dict({**cfg.to_dict(), "block_size": args.new_tokens + 64})
        rows.append(bench_generate(cfg, args.new_tokens, args.gen_batch, args.device))
        _print(rows[-1])
    if what == "serve":
        if not args.run:
            raise GptlabError("bench serve needs a RUN_DIR")
        from gptlab.serve.loadtest import run_load
        res = run_load(args.run, clients=tuple(args.clients), max_tokens=args.max_tokens)   # prints its table
        rows.extend({"what": "serve", **r} for r in res)
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure training tokens/s + MFU, generation speed, serving under load",
        description="Speed benchmarks. MFU = model FLOPs per token x tokens/s / matmul peak, where the peak "
        "is measured on this machine (fp32 on CPU) or the datasheet bf16 peak of a known GPU. Defaults are "
        "the reference shape of docs/BENCHMARKS.md (4 layers, width 128, block 64, batch 12).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "peak", "train", "generate", "serve"])
    p.add_argument("run", nargs="?", default=None, help="run folder (bench serve)")
    p.add_argument("--arch", choices=ARCHS, default="gpt2")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--steps", type=int, default=40, help="timed training steps")
    p.add_argument("--rounds", type=int, default=8, help="CPU: windows the timed steps are split into, each "
                   "paired with a matmul-peak reading")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gen-batch", type=int, default=1)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=run)
