"""Supervised fine-tuning (InstructGPT step 1): teach a pre-trained GPT to answer in the chat format.

    gptlab sft --init runs/pt --data ~/.cache/gptlab/instruct/sft.jsonl --out runs/sft

Conversations are rendered with the chat template; the loss is on assistant tokens only (content and
end-of-turn), everything else has target -100. Conversations are packed end to end into full context
windows. ``--ptx-fraction`` replaces that share of each batch's rows with pre-training windows (the
"ptx" mix), which keeps the model's language modelling from drifting. At every evaluation it reports
the held-out loss (a hash-chosen part of the conversations) and, given curriculum items with checkable
answers (``--eval-items``, by default the curriculum's heldout.jsonl next to its sft.jsonl), the task
accuracy of greedy answers, per family.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab import runs
from gptlab.errors import GptlabError
from gptlab.train.args import (add_epoch_args, add_ptx_data_arg, add_train_args, ptx_sources, resolve_data,
                               resolve_steps, train_config_from_args)
from gptlab.train.heldout import curriculum_heldout, format_accuracy, load_eval_items, task_accuracy
from gptlab.train.loop import train
from gptlab.train.sequences import EpochSampler, dist_rank_world, heldout_by_hash, pack


# ----- the stage ----------------------------------------------------------------------------------------
class SFTStage:
    """Packed conversation windows with assistant-only targets, optionally mixed with pre-training rows."""

    name = "sft"
    plot_keys = ["train_loss", "val_loss", "sft_loss", "ptx_loss", "accuracy"]

    def __init__(self, x, y, val, batch_size: int, seed: int, tok=None, ptx=None, ptx_fraction: float = 0.0,
                 eval_items: list[dict] | None = None, eval_max_new_tokens: int = 48):
        self.x, self.y, self.val = x, y, val
        self.block_size = x.shape[1]
        self.n_ptx = 0
        if ptx is not None and ptx_fraction > 0:
            self.n_ptx = max(1, round(ptx_fraction * batch_size))
            if self.n_ptx >= batch_size:
                raise GptlabError("--ptx-fraction leaves no room for conversations in a batch; lower it "
                                  "or raise --batch-size")
        self.rows = batch_size - self.n_ptx
        self.ptx = ptx
        self.sampler = EpochSampler(len(x), seed)
        self.counter = 0
        self.tok, self.eval_items, self.eval_max_new_tokens = tok, eval_items, eval_max_new_tokens
        self.last_accuracy: dict | None = None

    def get_batch(self, split, gen):
        if split != "train":
            return None   # held-out loss is computed over the whole held-out set in evaluate()
        rank, world = dist_rank_world()
        idx = self.sampler.batch(self.counter * world + rank, self.rows)
        self.counter += 1
        batch = {"x": self.x[idx], "y": self.y[idx]}
        if self.n_ptx:
            px, py = self.ptx.get_batch("train", self.n_ptx, self.block_size, gen)
            batch["px"], batch["py"] = px, py
        return batch

    def loss(self, model, batch):
        _, sft_loss = model(batch["x"], batch["y"])
        if "px" not in batch:
            return sft_loss, {}
        _, ptx_loss = model(batch["px"], batch["py"])
        f = self.n_ptx / (self.n_ptx + self.rows)   # rows' share of the batch weighs each part
        return (1 - f) * sft_loss + f * ptx_loss, {"sft_loss": float(sft_loss.detach()),
                                                            "ptx_loss": float(ptx_loss.detach())}

    def count_tokens(self, batch) -> int:
        return int(batch["x"].numel() + (batch["px"].numel() if "px" in batch else 0))

    def state(self):
        return {"counter": self.counter}

    def load_state(self, d):
        self.counter = int(d.get("counter", 0))

    def evaluate(self, model) -> dict:
        out = {}
        device = next(model.parameters()).device
        if self.val is not None:
            vx, vy = self.val
            total, count = 0.0, 0
            for i in range(0, len(vx), 32):
                x, y = vx[i:i + 32].to(device), vy[i:i + 32].to(device)
                logits, _ = model(x)
                total += float(F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1),
                                               ignore_index=-100, reduction="sum"))
                count += int((y != -100).sum())
            out["val_loss"] = total / max(1, count)
        if self.eval_items:
            acc = task_accuracy(model, self.tok, self.eval_items, self.eval_max_new_tokens)
            self.last_accuracy = acc
            out["accuracy"] = acc["accuracy"]
            out["response_tokens"] = acc["mean_response_tokens"]
            out.update({f"acc_{f}": a for f, a in acc["per_family"].items()})
        return out


def render_conversations(tok, convs: list[dict]) -> list[tuple[list[int], list[int]]]:
    from gptlab.tokenizer.chat_template import render
    return [render(tok, c["messages"], c.get("tools")) for c in convs]


def run(args) -> int:
    from gptlab.data.formats import load_conversations
    out = Path(args.out)
    data = resolve_data(args.data)
    convs = load_conversations(data)          # every line checked before anything trains
    eval_path = args.eval_items or (None if args.no_task_eval else curriculum_heldout(data))
    eval_items = load_eval_items(eval_path, args.eval_max_items) if eval_path else None
    if not 0 <= args.ptx_fraction < 1:
        raise GptlabError("--ptx-fraction must be in [0, 1)")

    torch.manual_seed(args.seed)
    model, tok, init_cfg = runs.load_run(args.init)
    model_cfg = model.config
    pad = tok.pad_id
    train_c, val_c = heldout_by_hash(convs, lambda c: c["messages"], args.val_fraction, salt="sft")
    x, y = pack(render_conversations(tok, train_c), model_cfg.block_size, tok.eot_id, pad)
    val = pack(render_conversations(tok, val_c), model_cfg.block_size, tok.eot_id, pad) if val_c else None

    ptx = None
    if args.ptx_fraction > 0:
        from gptlab.data.corpus import parse_sources
        from gptlab.data.tokens import TokenDataset
        args.ptx_data = ptx_sources(args)
        ptx = TokenDataset.prepare(parse_sources(args.ptx_data), tok, val_fraction=0.1)
        ptx.check_fits(model_cfg.block_size)
    stage = SFTStage(x, y, val, args.batch_size, args.seed, tok, ptx, args.ptx_fraction, eval_items,
                     args.eval_max_new_tokens)
    derived = resolve_steps(args, len(x), stage.rows)
    cfg = train_config_from_args(args)
    runs.write_run_config(out, model_cfg, tok, stage="sft", extra={
        "init": str(args.init), "init_stage": init_cfg.get("stage"), "data": str(data),
        "train": asdict(cfg), "sft": {"ptx_fraction": args.ptx_fraction, "ptx_data": args.ptx_data,
                                      "val_fraction": args.val_fraction, "epochs": args.epochs,
                                      "eval_items": str(eval_path) if eval_path else None}})
    targets = int((y != -100).sum())
    print(f"init: {args.init} ({model_cfg.arch} {model_cfg.n_layer}x{model_cfg.n_embd}, "
          f"{model.num_params() / 1e6:.2f}M parameters, context {model_cfg.block_size})")
    print(f"data: {data}: {len(train_c)} train / {len(val_c)} held-out conversations -> {len(x)} packed "
          f"windows ({targets:,} assistant target tokens, {100 * targets / y.numel():.0f}% of positions)")
    if ptx is not None:
        print(f"ptx: {stage.n_ptx} of {args.batch_size} rows per batch from {', '.join(args.ptx_data)}")
    if eval_items:
        print(f"task eval: {len(eval_items)} held-out items from {eval_path}")
    print(f"training: {cfg.max_steps} steps of {stage.rows} windows"
          + (f" (= {args.epochs:g} epochs)" if derived else ""))

    t0 = time.time()
    result = train(model, stage, cfg, out, flops_per_token=model.flops_per_token(),
                   summary_extra={"params": model.num_params(), "init": str(args.init)})
    extra = {}
    print(f"\ndone: {result.step} steps in {result.elapsed_s:.0f}s ({time.time() - t0:.0f}s wall); "
          f"train loss {result.train_loss:.3f}"
          + (f", held-out loss {result.val_loss:.3f}" if result.val_loss is not None else ""))
    if stage.last_accuracy is not None:
        acc = stage.last_accuracy
        extra = {"task_accuracy": acc["accuracy"], "per_family": acc["per_family"],
                 "mean_response_tokens": acc["mean_response_tokens"]}
        print(f"held-out task accuracy: {format_accuracy(acc)}")
    runs.update_summary(out, extra)
    print(f"run folder: {out} (model.safetensors, config.json, metrics.jsonl, loss.png, curves.png)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "sft", help="supervised fine-tuning on chat demonstrations (InstructGPT step 1)",
        description="Fine-tune a pre-trained run on conversations ({\"messages\": [...]} JSONL) with the chat "
        "template. Loss on assistant tokens only; conversations are packed into full windows; an optional "
        "share of each batch comes from pre-training data (--ptx-fraction). Reports held-out loss and, on "
        "curriculum items, greedy task accuracy per family.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", required=True, help="pre-trained run folder to start from")
    p.add_argument("--data", required=True,
                   help="conversations JSONL, or 'instruct' for the built-in curriculum's sft.jsonl")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of conversations held out (by hash)")
    p.add_argument("--ptx-fraction", type=float, default=0.0,
                   help="share of each batch's rows drawn from pre-training data")
    add_ptx_data_arg(p, "--ptx-fraction")
    p.add_argument("--eval-items", default=None,
                   help="curriculum items with answers for task accuracy (default: heldout.jsonl beside "
                   "the curriculum's sft.jsonl)")
    p.add_argument("--no-task-eval", action="store_true", help="skip the task-accuracy evaluation")
    p.add_argument("--eval-max-items", type=int, default=300, help="items used for task accuracy (0 = all)")
    p.add_argument("--eval-max-new-tokens", type=int, default=48, help="answer length limit in the task eval")
    add_train_args(p, batch_size=16, lr=3e-4, warmup_steps=20, eval_every=100, ckpt_every=100,
                   weight_decay=0.0)
    add_epoch_args(p, epochs=3.0)
    p.set_defaults(func=run)
