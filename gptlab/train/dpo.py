"""Direct Preference Optimization (Rafailov et al. 2023): learn from rankings without a reward model.

    gptlab dpo --init runs/sft --data rankings.jsonl --out runs/dpo --beta 0.1

For every (winner w, loser l) pair of a prompt the loss is

    -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

where pi_ref is the frozen SFT model and log pi(y|x) sums the response tokens' log-probs (content and
end-of-turn). beta * (log pi - log pi_ref) is the policy's implicit reward of a response; the run
logs its accuracy (winner above loser), the margin, and the chosen/rejected rewards. Rankings give
all C(K,2) pairs of a prompt in one batch element, as for the reward model; pairs files are K=2.

The reference never changes, so its log-probs are computed once, up front, for every response; the
reference model is then dropped and training holds a single model. The output is a plain GPT run.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gptlab import runs
from gptlab.errors import GptlabError
from gptlab.train.args import add_epoch_args, add_train_args, resolve_data, resolve_steps, train_config_from_args
from gptlab.train.heldout import format_accuracy, load_eval_items, task_accuracy
from gptlab.train.loop import train
from gptlab.train.sequences import (RankingBatches, collate_rankings, encode_rankings, group_mean, heldout_by_hash,
                                    require_pairs, sequence_logprobs)


def dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, pairs: torch.Tensor, group: torch.Tensor,
             n_groups, beta: float, positive: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPO over the pairs of each prompt, averaged per prompt then over prompts.

    policy_logps / ref_logps: [R] summed response log-probs per row; pairs: [P, 2] (winner, loser) rows.
    ``positive`` > 0 is DPO-Positive (Pal et al. 2024): the margin loses
    ``positive * max(0, log pi_ref(y_w) - log pi(y_w))``, so lowering the winner's own likelihood
    below the reference's costs the margin. Plain DPO can raise the margin by lowering both sides,
    and when a winner and a loser differ in one digit ("49." against "48.") that lowers the right
    answer's tokens too.
    """
    log_ratio = policy_logps.float() - ref_logps.float()
    rewards = beta * log_ratio                                       # implicit rewards
    chosen, rejected = rewards[pairs[:, 0]], rewards[pairs[:, 1]]
    gap = chosen - rejected                                          # what the logs report
    margin = gap - beta * positive * (-log_ratio[pairs[:, 0]]).clamp(min=0) if positive > 0 else gap
    loss = group_mean(-F.logsigmoid(margin), group, n_groups)
    chosen, rejected, gap = chosen.detach(), rejected.detach(), gap.detach()
    return loss, {"reward_accuracy": float(((gap > 0).float() + 0.5 * (gap == 0).float()).mean()),
                  "reward_margin": float(gap.mean()), "chosen_reward": float(chosen.mean()),
                  "rejected_reward": float(rejected.mean())}


@torch.no_grad()
def attach_reference_logprobs(ref_model, items, pad_id: int, batch_size: int = 16, progress: bool = True) -> None:
    """Fill each item's ``ref_logps`` with the frozen reference's log p of its responses."""
    device = next(ref_model.parameters()).device
    ref_model.eval()
    for i in tqdm(range(0, len(items), batch_size), desc="reference log-probs", unit="batch",
                  disable=not progress or len(items) <= batch_size, leave=False):
        chunk = items[i:i + batch_size]
        b = collate_rankings(chunk, pad_id)
        lp = sequence_logprobs(ref_model, b["ids"].to(device), b["mask"].to(device)).cpu().tolist()
        at = 0
        for item in chunk:
            item.ref_logps = lp[at:at + len(item.ids)]
            at += len(item.ids)


class DPOStage(RankingBatches):
    name = "dpo"
    plot_keys = ["train_loss", "val_loss", "reward_accuracy", "reward_margin", "chosen_reward",
                 "rejected_reward", "val_reward_accuracy", "accuracy"]

    def __init__(self, train_items, val_items, batch_size: int, seed: int, pad_id: int, beta: float,
                 tok=None, eval_items=None, eval_max_new_tokens: int = 48, positive: float = 0.0):
        super().__init__(train_items, val_items, batch_size, seed, pad_id)
        self.positive, self.beta = positive, beta
        self.tok, self.eval_items, self.eval_max_new_tokens = tok, eval_items, eval_max_new_tokens
        self.last_accuracy: dict | None = None

    def loss(self, model, batch):
        logps = sequence_logprobs(model, batch["ids"], batch["mask"])
        return dpo_loss(logps, batch["ref_logps"], batch["pairs"], batch["group"], batch["n_groups"], self.beta,
                        self.positive)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        out = {}
        if self.val_items:
            device = next(model.parameters()).device
            losses, margins, right, n = [], [], 0.0, 0
            for i in range(0, len(self.val_items), self.batch_size):
                b = collate_rankings(self.val_items[i:i + self.batch_size], self.pad_id)
                logps = sequence_logprobs(model, b["ids"].to(device), b["mask"].to(device)).cpu()
                loss, m = dpo_loss(logps, b["ref_logps"], b["pairs"], b["group"], b["n_groups"], self.beta,
                                   self.positive)
                groups = int(b["n_groups"])
                losses.append(float(loss) * groups)
                pairs = len(b["pairs"])
                right += m["reward_accuracy"] * pairs
                margins.append(m["reward_margin"] * pairs)
                n += pairs
            out.update(val_loss=sum(losses) / len(self.val_items), val_reward_accuracy=right / n,
                       val_reward_margin=sum(margins) / n)
        if self.eval_items:
            acc = task_accuracy(model, self.tok, self.eval_items, self.eval_max_new_tokens, return_responses=True)
            self.last_accuracy = acc
            out["accuracy"] = acc["accuracy"]
            out["response_tokens"] = acc["mean_response_tokens"]
            out.update({f"acc_{f}": a for f, a in acc["per_family"].items()})
        return out


def run(args) -> int:
    from gptlab.data.formats import load_preferences
    out = Path(args.out)
    if not args.beta > 0:
        raise GptlabError("--beta must be positive")
    if not args.dpop >= 0:
        raise GptlabError("--dpop must be 0 (plain DPO) or positive")
    data = resolve_data(args.data, "rankings.jsonl")
    rankings = load_preferences(data)
    eval_items = load_eval_items(args.eval_items, args.eval_max_items) if args.eval_items else None
    torch.manual_seed(args.seed)
    policy, tok, init_cfg = runs.load_run(args.init)
    block = policy.config.block_size
    pad = tok.pad_id
    train_r, val_r = heldout_by_hash(rankings, lambda r: r.prompt, args.val_fraction, salt="dpo")
    train_items = encode_rankings(tok, train_r, block)
    val_items = encode_rankings(tok, val_r, block)
    require_pairs(train_items, data)

    # The reference is the SFT model itself before any update: score everything with it once.
    from gptlab.device import pick_device
    device = pick_device(args.device)
    policy.to(device)
    attach_reference_logprobs(policy, train_items + val_items, pad, args.batch_size, not args.no_progress)

    before = None
    if eval_items:   # the reference's own answers: what the win rate compares against
        before = task_accuracy(policy, tok, eval_items, args.eval_max_new_tokens, return_responses=True)
        print(f"reference task accuracy: {format_accuracy(before)}")

    stage = DPOStage(train_items, val_items, args.batch_size, args.seed, pad, args.beta, tok, eval_items,
                     args.eval_max_new_tokens, positive=args.dpop)
    derived = resolve_steps(args, len(train_items), args.batch_size)
    cfg = train_config_from_args(args)
    runs.write_run_config(out, policy.config, tok, stage="dpo", extra={
        "init": str(args.init), "init_stage": init_cfg.get("stage"), "reference": str(args.init),
        "data": str(data), "train": asdict(cfg),
        "dpo": {"beta": args.beta, "dpop": args.dpop, "val_fraction": args.val_fraction, "epochs": args.epochs}})
    n_pairs = sum(len(it.pairs) for it in train_items)
    print(f"init and reference: {args.init} ({policy.config.arch} {policy.config.n_layer}x{policy.config.n_embd})")
    print(f"data: {data}: {len(train_items)} train prompts ({n_pairs} pairs of different responses), "
          f"{len(val_items)} held out; beta {args.beta:g}"
          + (f", DPO-Positive lambda {args.dpop:g}" if args.dpop else ""))
    print(f"training: {cfg.max_steps} steps of {args.batch_size} prompts" + (f" = {args.epochs:g} epoch(s)" if derived else ""))
    if eval_items:
        print(f"task eval: {len(eval_items)} items from {args.eval_items}")
    t0 = time.time()
    result = train(policy, stage, cfg, out, summary_extra={"params": policy.num_params(), "init": str(args.init),
                                                           "beta": args.beta})
    m = result.metrics
    extra = {}
    print(f"\ndone: {result.step} steps in {result.elapsed_s:.0f}s ({time.time() - t0:.0f}s wall); "
          f"train loss {result.train_loss:.3f}")
    if "val_reward_accuracy" in m:
        extra.update(val_reward_accuracy=m["val_reward_accuracy"], val_reward_margin=m["val_reward_margin"])
        print(f"held-out: DPO loss {m['val_loss']:.3f} (log 2 = 0.693 at the start), implicit reward accuracy "
              f"{100 * m['val_reward_accuracy']:.1f}%, margin {m['val_reward_margin']:+.3f}")
    if stage.last_accuracy is not None:
        acc = stage.last_accuracy
        extra.update(task_accuracy=acc["accuracy"], per_family=acc["per_family"],
                     mean_response_tokens=acc["mean_response_tokens"])
        print(f"held-out task accuracy: {format_accuracy(acc)}")
        from gptlab.evals.stats import win_rate
        from gptlab.label.labeler import score
        rate, lo, hi = win_rate([score(it, r) for it, r in zip(eval_items, acc["responses"])],
                                [score(it, r) for it, r in zip(eval_items, before["responses"])])
        extra.update(win_rate_vs_init={"rate": rate, "lo95": lo, "hi95": hi, "n": len(eval_items),
                                       "judge": "gptlab.label.labeler.score, ties count half"},
                     init_task_accuracy=before["accuracy"], init_per_family=before["per_family"],
                     init_mean_response_tokens=before["mean_response_tokens"])
        print(f"labeler win rate vs {args.init}: {100 * rate:.1f}% (95% interval {100 * lo:.1f}-{100 * hi:.1f}%, "
              f"{len(eval_items)} held-out prompts, greedy answers); mean answer length "
              f"{before['mean_response_tokens']:.1f} -> {acc['mean_response_tokens']:.1f} tokens")
    runs.update_summary(out, extra)
    print(f"run folder: {out} (a GPT run: model.safetensors, config.json stage 'dpo', metrics.jsonl, curves.png)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "dpo", help="Direct Preference Optimization on rankings or pairs (reference = the SFT run)",
        description="Fine-tune an SFT run on preferences with the DPO loss -log sigmoid(beta * ((log pi_w - "
        "log ref_w) - (log pi_l - log ref_l))) over every pair of each ranking (or each pair of a pairs "
        "file). The reference is the frozen --init run. Logs implicit-reward accuracy, margin and "
        "chosen/rejected rewards; the output is a normal GPT run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", required=True, help="SFT run folder: the starting policy and the frozen reference")
    p.add_argument("--data", required=True, help="rankings and/or pairs JSONL")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--beta", type=float, default=0.1, help="strength of the implicit KL constraint")
    p.add_argument("--dpop", type=float, default=0.0, metavar="LAMBDA",
                   help="DPO-Positive (Pal et al. 2024): penalise the winner's log-prob falling below the "
                        "reference's by LAMBDA inside the margin (0 = plain DPO; the paper used 50)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of prompts held out (by hash)")
    p.add_argument("--eval-items", default=None, help="curriculum items with answers: task accuracy at each eval")
    p.add_argument("--eval-max-items", type=int, default=300, help="items used for task accuracy (0 = all)")
    p.add_argument("--eval-max-new-tokens", type=int, default=48, help="answer length limit in the task eval")
    add_train_args(p, batch_size=8, lr=5e-5, warmup_steps=10, eval_every=100, ckpt_every=100, weight_decay=0.0)
    add_epoch_args(p, epochs=1.0)
    p.set_defaults(func=run)
