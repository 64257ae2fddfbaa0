"""Pre-training: next-token prediction (GPT) or masked-LM cloze (BERT) on a token corpus.

    gptlab pretrain --data shakespeare --tokenizer TOK_DIR --arch gpt2 --preset tiny --out runs/tiny
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gptlab import runs
from gptlab.errors import GptlabError
from gptlab.model.gpt import GPT
from gptlab.tokenizer import MASK, Tokenizer
from gptlab.train.args import add_model_args, add_train_args, model_config_from_args, train_config_from_args
from gptlab.train.loop import train


class LanguageModeling:
    """Next-token prediction on random windows of the corpus (GPT-1/2/3)."""

    name = "pretrain"

    def __init__(self, dataset, batch_size: int, block_size: int):
        self.dataset, self.batch_size, self.block_size = dataset, batch_size, block_size

    def get_batch(self, split, gen):
        return self.dataset.get_batch(split, self.batch_size, self.block_size, gen)

    def loss(self, model, batch):
        x, y = batch
        _, loss = model(x, y)
        return loss, {}

    def count_tokens(self, batch) -> int:
        return batch[0].numel()


def mask_tokens(x: torch.Tensor, gen: torch.Generator, mask_id: int, vocab_size: int,
                special_ids: list[int], rate: float = 0.15):
    """BERT's masking: select ``rate`` of the positions; of those 80% -> [MASK], 10% -> a random
    ordinary token (never a special one: a stray <|endoftext|> or <|mask|> would teach the model
    that specials stand for words), 10% unchanged. Targets are -100 (ignored) everywhere except the
    selected positions."""
    u = torch.rand(x.shape, generator=gen)
    special = torch.tensor(special_ids, dtype=x.dtype)
    selectable = ~torch.isin(x, special)
    selected = (u < rate) & selectable
    action = torch.rand(x.shape, generator=gen)
    ordinary = torch.arange(vocab_size, dtype=x.dtype)
    ordinary = ordinary[~torch.isin(ordinary, special)]
    if len(ordinary) == 0:
        raise GptlabError("the vocabulary has only special tokens; masked-LM needs ordinary ones")
    random_tokens = ordinary[torch.randint(0, len(ordinary), x.shape, generator=gen)]
    inputs = x.clone()
    inputs[selected & (action < 0.8)] = mask_id
    swap = selected & (action >= 0.8) & (action < 0.9)
    inputs[swap] = random_tokens[swap]
    targets = torch.where(selected, x, torch.full_like(x, -100))
    return inputs, targets


class MaskedLanguageModeling(LanguageModeling):
    """BERT's cloze objective over the same windows; loss only on the selected positions."""

    name = "pretrain-mlm"

    def __init__(self, dataset, batch_size, block_size, tokenizer: Tokenizer):
        super().__init__(dataset, batch_size, block_size)
        self.mask_id = tokenizer.special_id(MASK)
        if self.mask_id is None:
            raise GptlabError("this tokenizer has no <|mask|> token; BERT needs one")
        self.vocab_size = tokenizer.vocab_size
        self.special = sorted(tokenizer.special_ids)

    def get_batch(self, split, gen):
        x, _ = self.dataset.get_batch(split, self.batch_size, self.block_size, gen)
        return mask_tokens(x, gen, self.mask_id, self.vocab_size, self.special)


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Round the embedding table up to a multiple of 64: faster matmuls, ids beyond n never occur."""
    return ((n + multiple - 1) // multiple) * multiple


def run(args) -> int:
    from gptlab.data.corpus import parse_sources
    from gptlab.data.tokens import TokenDataset

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"--out {out}: is a file; give a run folder to write")
    torch.manual_seed(args.seed)
    if args.init:
        # Continued training at a longer context: the run's weights under the new length and RoPE
        # scaling (a learned position table is interpolated to it), then the same loop as ever.
        factor = args.rope_factor
        if args.rope_scaling not in (None, "none") and factor is None:
            if args.block_size is None:
                raise GptlabError(f"--rope-scaling {args.rope_scaling} needs --rope-factor F or --block-size N")
            from gptlab.model.gpt import GPTConfig
            trained = GPTConfig.from_dict(runs.read_run_config(args.init)["model"]).trained_context
            factor = max(1.0, args.block_size / trained)
        context = {"block_size": args.block_size, "scaling": args.rope_scaling or "keep", "factor": factor}
        changed = args.block_size is not None or args.rope_scaling is not None or args.rope_factor is not None
        model, tok, _ = runs.load_run(args.init, context=context if changed else None)
        model_cfg = model.config
    elif args.rope_scaling not in (None, "none"):
        raise GptlabError("--rope-scaling applies to continued training (--init RUN): a model trained "
                          "from scratch at a length needs no stretching to it")
    else:
        if not args.tokenizer:
            raise GptlabError("--tokenizer is required (or --init a run to continue from)")
        tok = Tokenizer.load(args.tokenizer)
        model_cfg = model_config_from_args(args, padded_vocab(tok.vocab_size))
        model = GPT(model_cfg)
    # The papers' archs train with AdamW as the papers did; this project's recipe with Muon, except
    # under --fsdp, whose sharded matrices Muon cannot orthogonalise.
    muon = model_cfg.arch == "fast" and not args.fsdp
    cfg = train_config_from_args(args, optimizer=args.optimizer or ("muon" if muon else "adamw"))
    sources = parse_sources(args.data)
    dataset = TokenDataset.prepare(sources, tok, val_fraction=args.val_fraction, workers=args.workers)
    dataset.check_fits(model_cfg.block_size)
    if model_cfg.arch == "bert":
        stage = MaskedLanguageModeling(dataset, cfg.batch_size, model_cfg.block_size, tok)
    else:
        stage = LanguageModeling(dataset, cfg.batch_size, model_cfg.block_size)
    runs.write_run_config(out, model_cfg, tok, stage="pretrain",
                          extra={"data": args.data, "train": asdict(cfg)})
    n_params = model.num_params()
    print(f"model: {model_cfg.arch} {model_cfg.n_layer}x{model_cfg.n_embd} ({model_cfg.n_head} heads), "
          f"context {model_cfg.block_size}, vocab {model_cfg.vocab_size}: {n_params / 1e6:.2f}M parameters, "
          f"{model.flops_per_token() / 1e6:.1f} MFLOPs/token")
    print(f"data: {', '.join(f'{s}' for s in args.data)}: {dataset.num_tokens('train'):,} train / "
          f"{dataset.num_tokens('val'):,} val tokens")
    t0 = time.time()
    result = train(model, stage, cfg, out, flops_per_token=model.flops_per_token(),
                   summary_extra={"params": n_params, "arch": model_cfg.arch})
    print(f"\ndone: {result.step} steps in {result.elapsed_s:.0f}s ({time.time() - t0:.0f}s wall), "
          f"{result.tokens:,} tokens; train loss {result.train_loss:.3f}"
          + (f", val loss {result.val_loss:.3f}" if result.val_loss is not None else ""))
    print(f"run folder: {out} (model.safetensors, config.json, tokenizer.json, metrics.jsonl, loss.png)")
    if model_cfg.arch != "bert" and not args.no_sample and int(os.environ.get("RANK", "0")) == 0:
        _print_sample(out)
    return 0


def _print_sample(out: Path) -> None:
    try:
        from gptlab.generate.engine import Engine, SamplingParams
    except ModuleNotFoundError:
        return
    model, tok, _ = runs.load_run(out)
    text = Engine(model, tok).generate([[tok.eot_id]], SamplingParams(max_new_tokens=120, temperature=0.8,
                                                                       top_k=50, seed=0))[0].text
    print("sample:\n" + text.strip()[:600])


def register(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train a GPT (next token) or BERT (masked LM) on a corpus",
        description="Pre-train on one or more corpora. --data takes built-in names (shakespeare, mixture), "
        "text files, JSONL files with a 'text' field (also .jsonl.gz / .jsonl.zst), Parquet files with a 'text' "
        "column, or folders of any of these, each optionally :WEIGHT "
        "(e.g. --data shakespeare:3 mixture:1). Writes the run folder given by --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", default=["shakespeare"], metavar="SOURCE[:WEIGHT]")
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (gptlab tokenizer train)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--init", default=None, help="start from this run's weights (continued pre-training); "
                   "with a larger --block-size: continued training at the longer context")
    from gptlab.model.rope import SCALINGS
    p.add_argument("--rope-scaling", choices=("none",) + SCALINGS, default=None,
                   help="with --init: RoPE scaling to train the longer context with (modern/fast; "
                   "recorded in config.json, so sample/eval/chat/serve apply it too)")
    p.add_argument("--rope-factor", type=float, default=None, metavar="F",
                   help="with --rope-scaling: context multiple (default --block-size / the run's training context)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="tail of each source held out for validation")
    p.add_argument("--no-sample", action="store_true", help="skip the sample printed at the end")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes that tokenize a large corpus side by side (default: one per CPU core)")
    add_model_args(p, arch="fast")
    # This project's recipe (docs/BENCHMARKS.md, "Learning per CPU second"): Muon at 0.04 on the
    # blocks' matrices, AdamW at 3e-3 elsewhere, batch 12, short warm-up, constant lr, then a linear
    # cool-down to 0 over the last 40% of the steps.
    add_train_args(p, max_steps=500, batch_size=12, lr=3e-3, warmup_steps=30, eval_every=100,
                   ckpt_every=250, optimizer=None, muon_lr=0.04, schedule="wsd", min_lr_ratio=0.0)
    p.set_defaults(func=run)
