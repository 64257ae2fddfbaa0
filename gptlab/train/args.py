"""Command-line flags shared by every training stage, so each one spells them the same way."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.model.gpt import ARCHS, PRESETS, GPTConfig
from gptlab.train.loop import TrainConfig
from gptlab.train.optim import OPTIMIZERS


def add_model_args(p: argparse.ArgumentParser, arch: str = "gpt2") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default=arch,
                   help=f"architecture (default {arch}; fast is this project's recipe, the others are the papers')")
    g.add_argument("--preset", choices=list(PRESETS), default="tiny",
                   help="size preset; the flags below override single fields (default tiny)")
    for flag, typ, help_ in [("--n-layer", int, "transformer blocks"), ("--n-head", int, "attention heads"),
                             ("--n-embd", int, "model width"), ("--n-kv-head", int, "key/value heads (GQA)"),
                             ("--block-size", int, "context window in tokens"),
                             ("--ffn-hidden", int, "feed-forward width"),
                             ("--dropout", float, "dropout probability"),
                             ("--sparse-band", int, "gpt3: window of the banded sparse layers")]:
        g.add_argument(flag, type=typ, default=None, help=help_)


def model_config_from_args(args, vocab_size: int) -> GPTConfig:
    return GPTConfig.preset(args.preset, args.arch, vocab_size=vocab_size, n_layer=args.n_layer,
                            n_head=args.n_head, n_embd=args.n_embd, n_kv_head=args.n_kv_head,
                            block_size=args.block_size, ffn_hidden=args.ffn_hidden, dropout=args.dropout,
                            sparse_band=args.sparse_band)


def add_train_args(p: argparse.ArgumentParser, **defaults) -> None:
    """The optimiser/loop flags; ``defaults`` lets a stage choose its own defaults."""
    d = TrainConfig(**{k: v for k, v in defaults.items() if k in TrainConfig.__dataclass_fields__ and v is not None})
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help=f"optimizer steps (default {d.max_steps})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per micro-batch (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr as a fraction of --lr")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant", "wsd"], default=d.schedule,
                   help="lr after warm-up; wsd: constant, then linear decay over the last --cooldown-frac")
    g.add_argument("--cooldown-frac", type=float, default=d.cooldown_frac, help="wsd: fraction of steps decaying")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), default=defaults.get("optimizer", d.optimizer),
                   help="muon: Muon (orthogonalised momentum) on the blocks' matrices, AdamW at --lr on "
                   "embeddings, head, gains and biases; adamw: AdamW on everything"
                   + ("; default: muon for --arch fast, adamw for the papers' archs (as they were trained)"
                      if defaults.get("optimizer", "") is None else ""))
    g.add_argument("--muon-lr", type=float, default=d.muon_lr, help="muon: peak lr of the hidden matrices")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay on matrices")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0 = off)")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations")
    g.add_argument("--eval-every-s", type=float, default=d.eval_every_s, metavar="SECONDS",
                   help="also evaluate whenever this much time has passed since the last evaluation")
    g.add_argument("--target-loss", type=float, default=None, metavar="L",
                   help="stop as soon as the evaluated val loss is <= L; the time it took (evaluations "
                   "included) goes into summary.json and metrics.jsonl as time_to_target_s")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches, help="batches per evaluation")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between metrics lines")
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state across ranks "
                   "(FSDP fully_shard) instead of replicating them (DDP), for models too big for one device")
    g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop (and save) after this much training time")
    g.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each block's input in the forward pass and recompute the rest in the "
                   "backward (~1/3 more compute, a fraction of the activation memory); with --batch-size "
                   "(the micro-batch) and --grad-accum, what fits a model into a smaller GPU")
    g.add_argument("--log", nargs="+", choices=["tensorboard", "wandb"], default=[], metavar="TRACKER",
                   help="also send metrics.jsonl's rows to tensorboard (event files in OUT/tensorboard) "
                   "and/or wandb (WANDB_MODE=offline logs locally, under OUT/wandb)")


def train_config_from_args(args, **overrides) -> TrainConfig:
    """The TrainConfig the flags describe; ``overrides`` settle what the flags left to the stage."""
    return TrainConfig(**{**dict(
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, schedule=args.schedule,
        cooldown_frac=args.cooldown_frac, optimizer=args.optimizer or "adamw", muon_lr=args.muon_lr,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
        eval_every_s=args.eval_every_s, target_loss=args.target_loss,
        eval_batches=args.eval_batches, log_every=args.log_every, ckpt_every=args.ckpt_every, seed=args.seed, device=args.device,
        compile=args.compile, fsdp=args.fsdp, time_budget_s=args.time_budget, resume=args.resume,
        progress=not args.no_progress, log=tuple(getattr(args, "log", None) or ()),
        activation_checkpointing=bool(getattr(args, "activation_checkpointing", False))), **overrides})


def add_ptx_data_arg(p, what: str) -> None:
    p.add_argument("--ptx-data", nargs="+", default=None, metavar="SOURCE[:WEIGHT]",
                   help=f"pre-training corpora for {what} (as in `gptlab pretrain --data`); default: the "
                        "corpora --init was pre-trained on (read from its run folders), else shakespeare")


def ptx_sources(args) -> list[str]:
    """--ptx-data, or what --init's chain of runs was pre-trained on, or the built-in corpus."""
    from gptlab.runs import pretraining_sources
    return list(args.ptx_data or pretraining_sources(args.init) or ["shakespeare"])


# ----- the InstructGPT stages (sft, rm, dpo): epochs and data ------------------------------------------
def add_epoch_args(p: argparse.ArgumentParser, epochs: float) -> None:
    """--epochs, and --max-steps defaulting to "whatever --epochs needs" (the loop needs a number)."""
    for action in p._actions:
        if action.dest == "max_steps":
            action.default = argparse.SUPPRESS   # absent unless given; resolve_steps fills it in
            action.help = "optimizer steps (default: as many as --epochs takes)"
    p.add_argument("--epochs", type=float, default=epochs,
                   help="passes over the training examples when --max-steps is not given")


def resolve_steps(args, n_examples: int, rows_per_batch: int) -> bool:
    """Fill args.max_steps from --epochs when the user did not give it (then return True)."""
    if getattr(args, "max_steps", None) is not None:
        return False
    if not args.epochs > 0:
        raise GptlabError("--epochs must be positive")
    from gptlab.train.sequences import steps_for_epochs
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.max_steps = steps_for_epochs(args.epochs, n_examples, rows_per_batch, args.grad_accum, world)
    return True


def resolve_data(spec: str, name: str = "sft.jsonl") -> Path:
    """A file path, or "instruct" for the built-in curriculum written by `gptlab data instruct`."""
    if spec == "instruct":
        from gptlab.io import gptlab_home
        path = gptlab_home() / "instruct" / name
        if not path.is_file():
            raise GptlabError(f"--data instruct: {path} not found; run `gptlab data instruct` first")
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise GptlabError(f"--data {spec}: no such file")
    return path
