"""The one training loop every stage runs through.

A stage (pre-training, fine-tuning, SFT, reward model, DPO, PPO) contributes only its data and its
loss; this loop owns everything else: the optimizer (AdamW, or Muon + AdamW: train/optim.py), warm-up
+ cosine (or linear/constant/warmup-stable-decay) learning rate, evaluation every N steps and/or
seconds, stopping at a target val loss, gradient accumulation, clipping, bf16 autocast on CUDA, optional
torch.compile, DDP across processes (torchrun), evaluation, the progress bar, metrics.jsonl, PNG
curves, atomic checkpoints and exact resume.

Exact resume works because nothing stateful hides in the data pipeline: the batch of micro-step m of
step s is drawn with a generator seeded from (seed, s, m), and the global RNG (dropout) is saved in the
checkpoint. On CPU a run killed at any moment and resumed ends bit-identical to an uninterrupted run.

A stage object provides:
    name: str
    get_batch(split, gen) -> batch             # "train" or "val"; randomness only from ``gen``
    loss(model, batch) -> (loss, {metric: float})
    count_tokens(batch) -> int                 # optional: tokens processed, for tokens/s and MFU
    evaluate(model) -> {metric: float}         # optional: extra held-out metrics at eval time
    export_state(model) -> {name: tensor}      # optional: what model.safetensors holds
    plot_keys: list[str]                       # optional: metrics to draw in curves.png
    on_step_end(model, step) / state() / load_state(d)  # optional hooks (EMA, PPO buffers, ...)
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from gptlab import runs
from gptlab.device import autocast, matmul_peak, pick_device, synchronize, tune_cpu_allocator
from gptlab.errors import GptlabError
from gptlab.io import append_jsonl, atomic_write_json, atomic_write_jsonl
from gptlab.plots import plot_curves, plot_loss, read_metrics
from gptlab.train.optim import OPTIMIZERS, make_optimizer  # noqa: F401  (make_optimizer: bench, tools)
from gptlab.train.memory import checkpoint_blocks
from gptlab.train.trackers import TRACKERS, Trackers


# With --target-loss: once the val loss predicted from the smoothed train loss (plus the val - train
# gap seen at the last evaluation) is this close to the target, evaluate every 10 steps.
NEAR_TARGET = 0.03   # nats
TRAIN_EMA = 0.9      # smoothing of the per-step train loss for that prediction (~10 steps)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16            # sequences per micro-batch per process
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1       # final lr = lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"        # cosine | linear | constant | wsd
    cooldown_frac: float = 0.4      # wsd: the final fraction of steps over which lr decays linearly
    optimizer: str = "adamw"        # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    muon_lr: float = 0.02           # muon: peak lr of the hidden matrices (--lr is the AdamW groups')
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_every_s: float | None = None   # also evaluate when this much time has passed since the last one
    target_loss: float | None = None    # stop once the evaluated val loss is <= this
    eval_batches: int = 20
    log_every: int = 10
    ckpt_every: int = 250
    seed: int = 1337
    device: str = "auto"
    compile: bool = False
    fsdp: bool = False              # under torchrun: shard the model with FSDP instead of DDP
    time_budget_s: float | None = None   # stop early (and save) after this much training time
    resume: bool = False
    progress: bool = True
    log: tuple = ()                 # experiment trackers mirroring metrics.jsonl: tensorboard, wandb
    activation_checkpointing: bool = False   # recompute each block's activations in backward (memory)

    def __post_init__(self):
        if self.max_steps < 1:
            raise GptlabError("--max-steps must be at least 1")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise GptlabError("--batch-size and --grad-accum must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise GptlabError("--lr must be a positive number")
        if self.schedule not in ("cosine", "linear", "constant", "wsd"):
            raise GptlabError("--schedule must be cosine, linear, constant or wsd")
        if not 0.0 < self.cooldown_frac <= 1.0:
            raise GptlabError("--cooldown-frac must be in (0, 1]")
        if self.optimizer not in OPTIMIZERS:
            raise GptlabError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if not (self.muon_lr > 0 and math.isfinite(self.muon_lr)):
            raise GptlabError("--muon-lr must be a positive number")
        if self.eval_every < 1 or (self.eval_every_s is not None and not self.eval_every_s > 0):
            raise GptlabError("--eval-every and --eval-every-s must be positive")
        if self.target_loss is not None and not math.isfinite(self.target_loss):
            raise GptlabError("--target-loss must be a finite number")
        bad = [t for t in self.log if t not in TRACKERS]
        if bad:
            raise GptlabError(f"--log {bad[0]}: unknown tracker (choose {', '.join(TRACKERS)})")


def lr_at(cfg: TrainConfig, step: int, elapsed_s: float | None = None) -> float:
    """Linear warm-up to ``lr``, then decay to ``lr * min_lr_ratio`` at ``max_steps``.

    With a time budget the schedule follows whichever is further along, the steps or the clock
    (``elapsed_s`` / ``time_budget_s`` of ``max_steps``): a run the clock stops early still ends its
    decay, instead of stopping at a high learning rate with its cool-down not yet begun.
    """
    if elapsed_s is not None and cfg.time_budget_s:
        step = max(step, min(cfg.max_steps, int(cfg.max_steps * elapsed_s / cfg.time_budget_s)))
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":   # warm-up, stable, then a linear cool-down over the last steps
        decay_steps = max(1, round(cfg.cooldown_frac * (cfg.max_steps - cfg.warmup_steps)))
        progress = min(1.0, max(0.0, (step - (cfg.max_steps - decay_steps)) / decay_steps))
        return cfg.lr - (cfg.lr - floor) * progress
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The only source of data randomness: a function of (seed, step, global micro-batch index)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_007 + micro)


# ----- distributed ---------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(), pick_device(device_arg)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def _mean_across(value: float, d: Dist, device) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / d.world


# ----- the loop ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    elapsed_s: float
    tokens: int
    metrics: dict = field(default_factory=dict)


def train(model: torch.nn.Module, stage, cfg: TrainConfig, run_dir: str | Path,
          flops_per_token: float | None = None, summary_extra: dict | None = None) -> TrainResult:
    """Train ``model`` on ``stage`` for ``cfg.max_steps`` optimizer steps, writing into ``run_dir``."""
    run_dir = Path(run_dir)
    d, device = init_distributed(cfg.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    metrics_path = run_dir / "metrics.jsonl"

    start_step, elapsed0, tokens_seen = 0, 0.0, 0
    has_ckpt = (run_dir / runs.CHECKPOINT_FILE).is_file()
    if has_ckpt and not cfg.resume:
        raise GptlabError(f"{run_dir} already holds a checkpoint: pass --resume to continue it, "
                          "or choose another --out")
    if has_ckpt:
        start_step, saved = runs.load_checkpoint(run_dir, model, optimizer)
        elapsed0, tokens_seen = saved.get("elapsed_s", 0.0), saved.get("tokens", 0)
        if hasattr(stage, "load_state") and saved.get("stage") is not None:
            stage.load_state(saved["stage"])
        if d.main:  # forget log lines written after the checkpoint we resume from
            rows = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= start_step]
            atomic_write_jsonl(metrics_path, rows)
    elif d.main and metrics_path.exists():
        metrics_path.unlink()
    if start_step >= cfg.max_steps:
        if d.main:
            print(f"{run_dir}: already trained for {start_step} steps")
    if cfg.fsdp and hasattr(stage, "export_state"):
        raise GptlabError(f"{stage.name} does not support --fsdp (its rollouts need the whole "
                          "policy on every rank); run it under torchrun without --fsdp (DDP)")
    fsdp = cfg.fsdp and d.world > 1
    if fsdp and cfg.activation_checkpointing:
        raise GptlabError("--activation-checkpointing does not work with --fsdp yet (the recomputed "
                          "forward would see sharded weights); use DDP, or --fsdp without it")
    if cfg.fsdp and d.world == 1 and d.main:
        print("note: --fsdp has no effect in a single process (launch with torchrun)")
    if fsdp:
        from gptlab.train import sharding
        # Train a sharded copy; the caller's model waits on the CPU and gets the trained weights
        # back at the end, so code after train() uses a plain module as with DDP. The resumed
        # optimizer state moves from the plain optimizer to the sharded one.
        resumed = optimizer.state_dict() if has_ckpt else None
        caller_model, model = model, copy.deepcopy(model)
        caller_model.to("cpu")
        sharding.shard_model(model)
        optimizer = make_optimizer(model, cfg, device)
        if resumed is not None:
            sharding.load_optimizer_state(model, optimizer, resumed)

    restore_blocks = checkpoint_blocks(model) if cfg.activation_checkpointing else None
    train_model = torch.compile(model) if cfg.compile else model
    # The stage's whole loss computation runs inside one module's forward, so DDP sees every parameter
    # use (stages may call model.hidden, heads or value functions, not just model.forward).
    step_module = _StageLoss(train_model, stage)
    if d.world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        from gptlab.model.gpt import GPT
        step_module = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=not isinstance(model, GPT))

    peak = matmul_peak(device) if flops_per_token else None
    count_tokens = getattr(stage, "count_tokens", None)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=stage.name, unit="step",
               disable=not (cfg.progress and d.main), dynamic_ncols=True, leave=True)

    def evaluate() -> dict:
        model.eval()
        out = {}
        with torch.no_grad(), autocast(device):
            # The same val batches every time, split across ranks: any world size sees the same set.
            # Under FSDP every forward is collective, so every rank runs every batch instead.
            total, count = 0.0, 0
            ranks, rank = (1, 0) if fsdp else (d.world, d.rank)
            for i in range(rank, cfg.eval_batches, ranks):
                batch = stage.get_batch("val", batch_generator(cfg.seed + 1, 0, i))
                if batch is None:
                    break
                loss, _ = stage.loss(model, _to(batch, device))
                total, count = total + float(loss), count + 1
            sums = [total, count]
            if ranks > 1:
                t = torch.tensor(sums, dtype=torch.float64, device=device)
                dist.all_reduce(t)
                sums = t.tolist()
            if sums[1]:
                out["val_loss"] = sums[0] / sums[1]
            if hasattr(stage, "evaluate"):
                # The stage's own evals (generation, accuracy) run on rank 0 only; under FSDP with
                # the weights gathered first, so its forward passes need no other rank.
                with sharding.gathered(model) if fsdp else contextlib.nullcontext():
                    if d.main:
                        out.update(stage.evaluate(model))
        model.train()
        return out

    def save(step: int, elapsed: float):
        # Under FSDP gathering the full state is collective: every rank calls save, rank 0 writes.
        model_state, optim_state = sharding.full_states(model, optimizer) if fsdp else (None, None)
        if not d.main:
            return
        export = (stage.export_state(model) if hasattr(stage, "export_state")
                  else runs.gpt_state(model, model_state))
        runs.save_tensors(run_dir / runs.MODEL_FILE, export, {"step": str(step)})
        state = {"elapsed_s": elapsed, "tokens": tokens_seen,
                 "stage": stage.state() if hasattr(stage, "state") else None}
        runs.save_checkpoint(run_dir, model, optimizer, step, state, model_state, optim_state)

    trackers = Trackers(cfg.log if d.main else (), run_dir, stage.name, asdict(cfg), start_step)
    model.train()
    t_start = time.perf_counter()
    window_t, window_tokens = time.perf_counter(), 0
    last_train, last_val, last_eval = None, None, {}
    last_eval_t, reached = t_start, None
    train_ema, val_gap = None, 0.0
    step = start_step
    while step < cfg.max_steps:
        # ranks agree on the clock (a mean), so they apply the same learning rate
        clock = (_mean_across(elapsed0 + time.perf_counter() - t_start, d, device)
                 if cfg.time_budget_s else None)
        lr = lr_at(cfg, step, clock)
        for g in optimizer.param_groups:   # each group's own peak (Muon's differs), same schedule
            g["lr"] = g.get("base_lr", cfg.lr) * lr / cfg.lr
        loss_sum, extra_sums = 0.0, {}
        for micro in range(cfg.grad_accum):
            gen = batch_generator(cfg.seed, step, d.rank * cfg.grad_accum + micro)
            batch = _to(stage.get_batch("train", gen), device)
            sync = micro == cfg.grad_accum - 1 or d.world == 1
            ctx = contextlib.nullcontext()
            if fsdp:
                sharding.gradient_sync(model, sync)
            elif d.world > 1 and not sync:
                ctx = step_module.no_sync()
            with ctx:
                with autocast(device):
                    loss, extra = step_module(batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
            for k, v in extra.items():
                extra_sums[k] = extra_sums.get(k, 0.0) + float(v)
            if count_tokens:
                window_tokens += count_tokens(batch) * d.world
        if not math.isfinite(loss_sum):
            raise GptlabError(f"loss became {loss_sum} at step {step}; lower --lr or check the data")
        step_loss = loss_sum / cfg.grad_accum
        train_ema = step_loss if train_ema is None else TRAIN_EMA * train_ema + (1 - TRAIN_EMA) * step_loss
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(stage, "on_step_end"):
            stage.on_step_end(model, step)
        step += 1
        bar.update(1)

        is_last = step == cfg.max_steps
        elapsed = elapsed0 + time.perf_counter() - t_start
        out_of_time = cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s
        # With a target, evaluate every 10 steps once the val loss is predicted near it: the time to
        # target is then precise without paying for frequent evaluations the whole run. The smoothed
        # loss is averaged over ranks, so under DDP every rank makes the same choice.
        near_target = (cfg.target_loss is not None and step % 10 == 0
                       and _mean_across(train_ema, d, device) + val_gap <= cfg.target_loss + NEAR_TARGET)
        do_eval = (step % cfg.eval_every == 0 or is_last or out_of_time or near_target
                   or _eval_due(cfg, last_eval_t, d, device))
        if step % cfg.log_every == 0 or do_eval:
            synchronize(device)   # GPUs and MPS queue work: time what has run
            now = time.perf_counter()
            tok_s = window_tokens / max(now - window_t, 1e-9)
            tokens_seen += window_tokens
            window_t, window_tokens = now, 0
            last_train = _mean_across(step_loss, d, device)
            row = {"step": step, "tokens": tokens_seen, "elapsed_s": round(elapsed, 3),
                   "train_loss": last_train, "lr": lr}
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            row.update({k: v / cfg.grad_accum for k, v in extra_sums.items()})
            if count_tokens:
                row["tokens_per_s"] = round(tok_s, 1)
                if peak:
                    achieved = flops_per_token * tok_s / d.world   # per process, like the peak
                    if achieved > peak:   # the cached peak was read under load: read it again
                        peak = matmul_peak(device, at_least=achieved)
                    row["mfu"] = round(achieved / peak, 4)
            if do_eval:
                last_eval = evaluate()
                last_eval_t = time.perf_counter()
                last_val = last_eval.get("val_loss", last_val)
                if cfg.target_loss is not None:   # every rank reaches this collective
                    ema = _mean_across(train_ema, d, device)
                    val_gap = last_eval["val_loss"] - ema if "val_loss" in last_eval else val_gap
                row.update(last_eval)
                if cfg.target_loss is not None and last_val is not None and last_val <= cfg.target_loss:
                    # The clock includes every evaluation so far, this one too.
                    reached = {"time_to_target_s": round(elapsed0 + last_eval_t - t_start, 3),
                               "steps_to_target": step}
                    row.update(reached)
            if d.main:
                append_jsonl(metrics_path, row, fsync=False)
                trackers.log(row)
                post = {"loss": f"{last_train:.3f}"}
                if last_val is not None:
                    post["val"] = f"{last_val:.3f}"
                if count_tokens:
                    post["tok/s"] = f"{tok_s:,.0f}"
                    if "mfu" in row:
                        post["mfu"] = f"{100 * row['mfu']:.0f}%"
                bar.set_postfix(post, refresh=False)
        stop = out_of_time or reached is not None
        if (d.main or fsdp) and (step % cfg.ckpt_every == 0 or is_last or stop):
            save(step, elapsed)
            if d.main:   # curves with each checkpoint, not each evaluation: drawing one takes ~0.2 s
                rows = read_metrics(metrics_path)
                plot_loss(rows, run_dir / "loss.png", title=f"{stage.name}: {run_dir.name}")
                if getattr(stage, "plot_keys", None):
                    plot_curves(rows, stage.plot_keys, run_dir / "curves.png", title=stage.name)
        if stop:
            break
    bar.close()
    trackers.close()
    if restore_blocks is not None:
        restore_blocks()

    elapsed = elapsed0 + time.perf_counter() - t_start
    if start_step >= cfg.max_steps:   # every rank: evaluate() holds collectives
        last_eval = evaluate()
        last_val = last_eval.get("val_loss")
    if fsdp:
        caller_model.load_state_dict(sharding.full_model_state(model), strict=False)
        caller_model.to(device)
    result = TrainResult(step, last_train, last_val, elapsed, tokens_seen, last_eval)
    if d.main:
        summary = {"stage": stage.name, "step": step, "train_loss": last_train, "val_loss": last_val,
                   "elapsed_s": round(elapsed, 2), "tokens": tokens_seen, "metrics": last_eval,
                   "train_config": asdict(cfg), "world_size": d.world,
                   "parallel": "fsdp" if fsdp else "ddp" if d.world > 1 else "single"}
        if cfg.target_loss is not None:
            summary.update({"target_loss": cfg.target_loss, **(reached or {"time_to_target_s": None,
                                                                           "steps_to_target": None})})
        summary.update(summary_extra or {})
        atomic_write_json(run_dir / runs.SUMMARY_FILE, summary)
    if d.world > 1:
        dist.barrier()
    return result


def _eval_due(cfg: TrainConfig, last_eval_t: float, d: Dist, device) -> bool:
    """--eval-every-s: has that much time passed since the last evaluation? Rank 0's clock decides,
    since every rank must enter evaluate() together."""
    if cfg.eval_every_s is None:
        return False
    due = time.perf_counter() - last_eval_t >= cfg.eval_every_s
    if d.world > 1:
        t = torch.tensor([float(due)], device=device)
        dist.broadcast(t, 0)
        due = bool(t.item())
    return due


class _StageLoss(torch.nn.Module):
    """forward(batch) = stage.loss(model, batch): the unit DDP wraps and synchronises."""

    def __init__(self, model: torch.nn.Module, stage):
        super().__init__()
        self.model = model
        object.__setattr__(self, "stage", stage)   # not a submodule: its frozen models stay out of DDP

    def forward(self, batch):
        return self.stage.loss(self.model, batch)


def _to(batch, device):
    """Move a batch (tensor, tuple/list or dict of tensors) to ``device``."""
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu":
            # Page-locked memory makes the copy truly asynchronous: the host goes on queueing the
            # step's kernels while the batch crosses to the GPU.
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch
