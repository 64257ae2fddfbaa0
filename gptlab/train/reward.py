"""Reward model (InstructGPT step 2): a scalar score of (prompt, response) learnt from rankings.

    gptlab rm --init runs/sft --data rankings.jsonl --out runs/rm

The model is the SFT GPT plus a linear head read at the final token of prompt + response (the
assistant's end-of-turn token). For a prompt with K ranked responses, InstructGPT's loss is

    loss = -1/C(K,2) * sum over (winner w, loser l) of log sigmoid(r(x, y_w) - r(x, y_l))

with all C(K,2) pairs of one prompt in ONE batch element: each response is scored once and reused by
every pair it is in (shuffling the pairs as separate examples made InstructGPT's RM overfit). One epoch
by default. A pairs file ({prompt, chosen, rejected}) is the K=2 case. After training a bias is added
so demonstrations (the top-ranked responses, or --demos) score 0 on average: rewards are then
"better or worse than a demonstration", which is what PPO wants to see.

By default the head is summed over the answer's tokens (``--reads response_tokens``) and the score adds
the answer's confidence under the model's own LM head; ``--reads last_token --no-logprob-feature`` is
InstructGPT's head, one score at the end-of-turn token (gptlab.model.heads.ScalarHeadModel says why).

``score_responses`` is the API PPO and evaluations use (``gptlab.runs.load_reward_model`` loads a run).
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab import runs
from gptlab.errors import GptlabError
from gptlab.model.heads import READS, ScalarHeadModel
from gptlab.tokenizer import ASSISTANT_START
from gptlab.train.args import add_epoch_args, add_train_args, resolve_data, resolve_steps, train_config_from_args
from gptlab.train.loop import train
from gptlab.train.sequences import (RankingBatches, collate_rankings, encode_rankings, group_mean, heldout_by_hash,
                                    pad_batch, require_pairs, response_ids)


def ranking_loss(scores: torch.Tensor, pairs: torch.Tensor, group: torch.Tensor, n_groups) -> tuple[torch.Tensor, dict]:
    """InstructGPT's loss: -log sigmoid(r_w - r_l) averaged over each prompt's pairs, then over prompts.

    scores: [R] one per response row; pairs: [P, 2] (winner row, loser row); group: [P] prompt of each pair.
    """
    diff = scores[pairs[:, 0]] - scores[pairs[:, 1]]
    loss = group_mean(-F.logsigmoid(diff.float()), group, n_groups)
    acc = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()
    return loss, {"accuracy": float(acc.detach()), "margin": float(diff.detach().mean())}


class RewardStage(RankingBatches):
    """Batches of prompts, each with all its responses and pairs; held-out pairwise accuracy."""

    name = "reward"
    plot_keys = ["train_loss", "val_loss", "accuracy", "pairwise_accuracy", "margin"]

    def loss(self, model, batch):
        scores = model(batch["ids"], batch["lengths"])
        return ranking_loss(scores, batch["pairs"], batch["group"], batch["n_groups"])

    def evaluate(self, model) -> dict:
        return evaluate_rankings(model, self.val_items, self.pad_id, self.batch_size) if self.val_items else {}


@torch.no_grad()
def evaluate_rankings(model, items, pad_id: int, batch_size: int = 16) -> dict:
    """Held-out loss (per-prompt mean) and pairwise accuracy over every pair (ties count half)."""
    device = next(model.parameters()).device
    losses, right, pairs = [], 0.0, 0
    for i in range(0, len(items), batch_size):
        b = collate_rankings(items[i:i + batch_size], pad_id)
        scores = model(b["ids"].to(device), b["lengths"].to(device)).cpu()
        diff = scores[b["pairs"][:, 0]] - scores[b["pairs"][:, 1]]
        per = -F.logsigmoid(diff)
        n = int(b["n_groups"])
        sums = torch.zeros(n).index_add(0, b["group"], per)
        counts = torch.zeros(n).index_add(0, b["group"], torch.ones_like(per))
        losses += (sums / counts).tolist()
        right += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        pairs += len(diff)
    return {"val_loss": sum(losses) / len(losses), "pairwise_accuracy": right / max(1, pairs), "val_pairs": pairs}


def fit_pair_weight(d: torch.Tensor, group: torch.Tensor, n_groups: int, hi: float = 4.0) -> float:
    """argmin over w in [0, hi] of the ranking loss of w x a feature, per-prompt mean of softplus(-w d)
    (``d``: winner minus loser feature per pair). Convex in w, so golden-section search finds it."""
    def loss(w: float) -> float:
        return float(group_mean(F.softplus(-w * d), group, n_groups))

    lo, ratio = 0.0, (5 ** 0.5 - 1) / 2
    for _ in range(48):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if loss(a) < loss(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


@torch.no_grad()
def fit_logprob_weight(model, items, pad_id: int, batch_size: int = 16, max_items: int = 1000) -> float:
    """Set the confidence feature's weight (ScalarHeadModel, ``logprob_feature``) to its maximum-
    likelihood value for the feature alone on the first ``max_items`` training prompts. Why before
    training: Adam moves a single weight only ~lr per step, so one that starts at 0 stays near 0 for
    a whole epoch (0.015 after 493 steps at lr 3e-4, where the fit says ~0.8), and one that starts
    too large makes the ranking gradient reshape the transformer's likelihoods instead. Returns the
    weight (also set).
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    diffs, groups, base = [], [], 0
    for i in range(0, min(len(items), max_items), batch_size):
        b = collate_rankings(items[i:i + batch_size], pad_id)
        lp = model.answer_confidence(b["ids"].to(device), b["lengths"].to(device)).cpu()
        diffs.append(lp[b["pairs"][:, 0]] - lp[b["pairs"][:, 1]])
        groups.append(b["group"] + base)
        base += int(b["n_groups"])
    w = fit_pair_weight(torch.cat(diffs).double(), torch.cat(groups), base)
    model.logprob_weight.fill_(w)
    model.train(was)
    return w


# ----- the API for PPO and evaluations ---------------------------------------------------------------
@torch.no_grad()
def score_responses(rm, tok, prompt_messages, responses: list[str], batch_size: int = 32) -> list[float]:
    """Reward of each response. ``prompt_messages`` is one prompt (a messages list ending with a user
    turn) shared by all responses, or a list of prompts, one per response."""
    if prompt_messages and isinstance(prompt_messages[0], dict):
        prompts = [prompt_messages] * len(responses)
    else:
        prompts = list(prompt_messages)
    if len(prompts) != len(responses):
        raise GptlabError(f"score_responses: {len(prompts)} prompts for {len(responses)} responses")
    device = next(rm.parameters()).device
    block = rm.config.block_size
    out: list[float] = []
    for i in range(0, len(responses), batch_size):
        seqs = [response_ids(tok, p, r, block)[0] for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        ids, lengths = pad_batch(seqs, tok.pad_id)
        out += rm(ids.to(device), lengths.to(device)).cpu().tolist()
    return out


def labeler_agreement(rankings, scorer) -> dict[str, tuple[float, int]]:
    """Pairwise accuracy against the noise-free programmatic labeler, overall and per task family.

    Held-out accuracy on the rankings themselves is capped by their label noise (at --noise 0.16 a
    perfect reward model agrees with ~84% of pairs); this is the reward model's own quality. Only
    rankings that carry their curriculum item (``family``/``answer``, as `gptlab label --auto` writes
    them) count, and only pairs the labeler scores differently. ``scorer(prompt, responses)`` gives
    one score per response. Returns {family or "all": (accuracy, pairs)}; ties in score count half.
    """
    from gptlab.label.labeler import score
    right: dict[str, float] = {}
    total: dict[str, int] = {}
    for r in rankings:
        item = {"messages": r.prompt, **r.meta}
        if "answer" not in item or "family" not in item:
            continue
        truth = [score(item, x) for x in r.responses]
        pairs = [(i, j) for i in range(r.k) for j in range(i + 1, r.k)
                 if truth[i] != truth[j] and r.responses[i] != r.responses[j]]
        if not pairs:
            continue
        got = scorer(r.prompt, r.responses)
        for i, j in pairs:
            agree = (got[i] - got[j]) * (truth[i] - truth[j])
            for key in (item["family"], "all"):
                total[key] = total.get(key, 0) + 1
                right[key] = right.get(key, 0.0) + (1.0 if agree > 0 else 0.5 if agree == 0 else 0.0)
    return {k: (right[k] / total[k], total[k]) for k in sorted(total, key=lambda k: (k != "all", -total[k]))}


MAX_DEMOS = 2000   # demonstrations scored for the bias (a seeded sample when --demos has more)


def demonstration_pairs(path: str | Path | None, rankings) -> tuple[list, list[str], str]:
    """(prompts, responses, what) whose mean score the bias sets to 0: --demos conversations (the last
    assistant turn of each, after the messages before it), else each ranking's best response."""
    if path:
        from gptlab.data.formats import load_conversations
        prompts, responses = [], []
        for c in load_conversations(path):
            msgs = c["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            if last == 0 or msgs[last - 1]["role"] != "user":
                continue   # an assistant turn with no user turn before it is no demonstration of an answer
            prompts.append(msgs[:last])
            responses.append(msgs[last]["content"])
        if not prompts:
            raise GptlabError(f"--demos {path}: no conversation ends a user turn with an assistant answer")
        n = len(prompts)
        if n > MAX_DEMOS:   # a mean: a fixed sample estimates it, at a fraction of the forward passes
            keep = sorted(random.Random(0).sample(range(n), MAX_DEMOS))
            prompts, responses = [prompts[i] for i in keep], [responses[i] for i in keep]
        return prompts, responses, f"{len(prompts)} of the {n} demonstrations in {path}"
    return ([r.prompt for r in rankings], [r.responses[r.ranking[0]] for r in rankings],
            f"the top-ranked responses of {len(rankings)} training prompts")


def normalise_to_demonstrations(rm, tok, prompts, responses) -> float:
    """Shift the head's bias so the demonstrations' mean score is 0; return the mean before."""
    was = rm.training
    rm.eval()
    mean = sum(score_responses(rm, tok, prompts, responses)) / len(responses)
    with torch.no_grad():
        rm.score_head.bias -= mean
    rm.train(was)
    return mean


def select_families(rankings, families: str | None, exclude: str | None, other_fraction: float = 0.0) -> list:
    """The rankings of some task families (their ``family`` field), for reward models of one objective
    (Llama 2 trains a helpfulness and a safety RM on separate data). ``other_fraction`` keeps that
    share of the remaining rankings too, chosen by a hash of the prompt: Llama 2 mixed some
    helpfulness data into the safety RM's so it still tells good answers from bad on safe prompts."""
    if not families and not exclude:
        return list(rankings)
    if not 0 <= other_fraction <= 1:
        raise GptlabError("--other-fraction must be in [0, 1]")
    keep = {f for f in (families or "").split(",") if f}
    drop = {f for f in (exclude or "").split(",") if f}
    chosen, rest = [], []
    for r in rankings:
        fam = r.meta.get("family")
        ((chosen if (not keep or fam in keep) and fam not in drop else rest)).append(r)
    if other_fraction > 0:
        _, extra = heldout_by_hash(rest, lambda r: r.prompt, other_fraction, salt="other")
        chosen += extra
    if not chosen:
        raise GptlabError(f"no rankings of families {sorted(keep) or 'any'} (excluding {sorted(drop) or 'none'})")
    return chosen


def _describe(rankings, items) -> str:
    ks: dict[int, int] = {}
    for r in rankings:
        ks[r.k] = ks.get(r.k, 0) + 1
    pairs = sum(len(it.pairs) for it in items)
    skipped = len(rankings) - len(items)
    return (f"{len(rankings)} prompts (K: {', '.join(f'{k}x{n}' for k, n in sorted(ks.items()))}; {pairs} pairs of "
            f"different responses" + (f"; {skipped} prompts with identical responses only, skipped" if skipped else "")
            + ")")


def run(args) -> int:
    from gptlab.data.formats import load_preferences
    out = Path(args.out)
    data = resolve_data(args.data, "rankings.jsonl")
    rankings = select_families(load_preferences(data), args.families, args.exclude_families, args.other_fraction)
    if args.demos:
        demonstration_pairs(args.demos, [])     # check the file before training
    torch.manual_seed(args.seed)
    gpt, tok, init_cfg = runs.load_run(args.init)
    start_id = tok.special_id(ASSISTANT_START)
    model = ScalarHeadModel(gpt, reads=args.reads, response_start_id=start_id, logprob_feature=args.logprob_feature)
    block = gpt.config.block_size
    train_r, val_r = heldout_by_hash(rankings, lambda r: r.prompt, args.val_fraction, salt="rm")
    pad = tok.pad_id
    train_items = encode_rankings(tok, train_r, block)
    val_items = encode_rankings(tok, val_r, block)
    require_pairs(train_items, data)
    stage = RewardStage(train_items, val_items, args.batch_size, args.seed, pad)
    derived = resolve_steps(args, len(train_items), args.batch_size)
    cfg = train_config_from_args(args)
    heads = {"score_head": {"kind": "scalar", "reads": args.reads, "init": "zeros"}}
    if args.reads == "response_tokens" or args.logprob_feature:
        heads["score_head"]["response_start_id"] = start_id
    if args.logprob_feature:
        heads["score_head"]["logprob_feature"] = True
    runs.write_run_config(out, gpt.config, tok, stage="reward", extra={
        "init": str(args.init), "init_stage": init_cfg.get("stage"), "data": str(data), "heads": heads,
        "train": asdict(cfg), "reward": {"val_fraction": args.val_fraction, "epochs": args.epochs,
                                         "demos": args.demos, "families": args.families,
                                         "exclude_families": args.exclude_families,
                                         "other_fraction": args.other_fraction}})
    where = "at the last token" if args.reads == "last_token" else "summed over the response's tokens"
    where += " + a learnt weight x the answer's confidence -log(1 + NLL)" if args.logprob_feature else ""
    print(f"init: {args.init} ({gpt.config.arch} {gpt.config.n_layer}x{gpt.config.n_embd}) + scalar head {where}")
    print(f"data: {data}: train {_describe(train_r, train_items)}; held out "
          f"{_describe(val_r, val_items) if val_r else 'nothing'}")
    print(f"training: {cfg.max_steps} steps of {args.batch_size} prompts (all pairs of a prompt in one batch element)"
          + (f" = {args.epochs:g} epoch(s)" if derived else ""))
    model.eval()   # the training loop switches dropout back on
    if args.logprob_feature:
        w = fit_logprob_weight(model, train_items, pad, args.batch_size)
        heads["score_head"]["logprob_weight_fit"] = w
        print(f"confidence feature -log(1 + NLL): weight {w:.3f} (fitted alone on training pairs, before training)")
    before = evaluate_rankings(model, val_items, pad, args.batch_size) if val_items else {}

    t0 = time.time()
    result = train(model, stage, cfg, out, summary_extra={"params": model.gpt.num_params(), "init": str(args.init)})
    # Bias so demonstrations score mean 0, then rewrite the exported weights with it.
    d_prompts, d_responses, what = demonstration_pairs(args.demos, train_r)
    mean = normalise_to_demonstrations(model, tok, d_prompts, d_responses)
    runs.save_tensors(out / runs.MODEL_FILE, runs.gpt_state(model), {"step": str(result.step)})
    heads["score_head"].update(demo_mean_before=mean, bias_shift=-mean, demonstrations=what)
    cfg_json = runs.read_run_config(out)
    cfg_json["heads"] = heads
    from gptlab.io import atomic_write_json
    atomic_write_json(out / runs.CONFIG_FILE, cfg_json)

    model.eval()   # held-out figures without dropout
    after = evaluate_rankings(model, val_items, pad, args.batch_size) if val_items else {}
    extra = {"demo_mean_before_bias": mean}
    print(f"\ndone: {result.step} steps in {result.elapsed_s:.0f}s ({time.time() - t0:.0f}s wall); "
          f"train loss {result.train_loss:.3f}")
    if after:
        extra.update(pairwise_accuracy=after["pairwise_accuracy"], val_loss=after["val_loss"],
                     val_pairs=after["val_pairs"], pairwise_accuracy_before=before["pairwise_accuracy"])
        print(f"held-out pairwise accuracy: {100 * after['pairwise_accuracy']:.1f}% on {after['val_pairs']} pairs "
              f"(untrained head: {100 * before['pairwise_accuracy']:.1f}%); held-out loss {after['val_loss']:.3f}")
    agreement = labeler_agreement(val_r, lambda p, rs: score_responses(model, tok, p, rs))
    if agreement:
        acc, n = agreement["all"]
        extra["labeler_agreement"] = {k: {"accuracy": a, "pairs": m} for k, (a, m) in agreement.items()}
        print(f"against the noise-free labeler (held out): {100 * acc:.1f}% of {n} pairs; "
              + ", ".join(f"{k} {100 * a:.1f}% ({m})" for k, (a, m) in agreement.items() if k != "all"))
    print(f"bias: demonstrations ({what}) scored {mean:+.3f} on average; shifted to mean 0")
    runs.update_summary(out, extra)
    print(f"run folder: {out} (model.safetensors with heads.score_head.*, config.json stage 'reward', "
          "metrics.jsonl, loss.png, curves.png)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "rm", help="train a reward model from rankings or pairs (InstructGPT step 2)",
        description="Train a reward model (the SFT run plus a scalar head at the final token) on rankings "
        "({prompt, responses, ranking}) or pairs ({prompt, chosen, rejected}) with InstructGPT's loss: all "
        "C(K,2) pairs of a prompt in one batch element, -mean log sigmoid(r_w - r_l). One epoch by default; "
        "afterwards the bias is set so demonstrations score 0 on average. Reports held-out pairwise accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", required=True, help="SFT run folder to start from")
    p.add_argument("--data", required=True, help="rankings and/or pairs JSONL (e.g. from `gptlab label`)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--demos", default=None,
                   help="conversations whose final assistant answers should score 0 on average "
                   "(default: the top-ranked responses of the training data); a seeded sample of "
                   f"{MAX_DEMOS:,} when there are more")
    p.add_argument("--reads", choices=READS, default="response_tokens",
                   help="response_tokens: the head scores every token of the response and the scores are summed, "
                   "so a shared prefix cancels out of every pair and the verdict is learnt where two responses "
                   "differ; last_token: the head reads the end-of-turn token only (InstructGPT)")
    p.add_argument("--no-logprob-feature", dest="logprob_feature", action="store_false",
                   help="leave out the answer's confidence feature: by default the score adds a weight x "
                   "-log(1 + the answer's negative log-likelihood under the reward model's own LM head, from the "
                   "SFT run), the weight fitted on the training pairs before training")
    p.add_argument("--families", default=None,
                   help="train on the rankings of these comma-separated task families only (their \"family\" "
                   "field), e.g. decline for a safety reward model")
    p.add_argument("--exclude-families", default=None, help="leave the rankings of these families out "
                   "(e.g. decline for a helpfulness reward model)")
    p.add_argument("--other-fraction", type=float, default=0.0,
                   help="with --families/--exclude-families: also keep this share of the other rankings "
                   "(by prompt hash; Llama 2 mixed 10%% helpfulness data into its safety RM)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of prompts held out (by hash)")
    add_train_args(p, batch_size=8, lr=3e-5, warmup_steps=10, eval_every=100, ckpt_every=100, weight_decay=0.0)
    add_epoch_args(p, epochs=1.0)
    p.set_defaults(func=run)
