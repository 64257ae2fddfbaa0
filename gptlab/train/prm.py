"""Process reward model ("Let's Verify Step by Step"): a score for every step of a solution.

    gptlab prm --policy runs/sft --problems prompts.jsonl --out runs/prm

1. The policy samples ``--samples`` step-by-step solutions to each multi-step problem (the ``steps``
   family of `gptlab data instruct --steps`) with the generation engine.
2. The programmatic checker (gptlab.data.steps.label_steps) labels every step: good until the first
   wrong step, bad from there on. Lightman et al. had people label PRM800K; here the plan of each
   problem says what every step should compute.
3. The PRM is the --init run plus ONE linear head (ScalarHeadModel's ``score_head``) read at the last
   token of every step (the newline closing a line, the end-of-turn token closing the last one),
   trained with binary cross-entropy on the step labels in the shared training loop.

A solution's score is the product of its steps' probabilities of being right (Lightman et al.) or
their minimum (``aggregate``). The same samples, ranked by their final answers only, are written as
``outcome_rankings.jsonl``: `gptlab rm` trains the outcome reward model on them, so the PRM and the
ORM learn from exactly the same solutions (`gptlab search` compares them).
"""
from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab import runs
from gptlab.data.steps import label_steps, outcome_correct, split_steps
from gptlab.errors import GptlabError
from gptlab.io import atomic_write_jsonl, iter_jsonl
from gptlab.model.heads import ScalarHeadModel
from gptlab.tokenizer.chat_template import end_of_turn_id, render_prompt
from gptlab.train.args import add_train_args, train_config_from_args
from gptlab.train.loop import train
from gptlab.train.sequences import RankingBatches, heldout_by_hash, pad_batch

AGGREGATES = ("prod", "min")


# ----- encoding: where each step ends ----------------------------------------------------------------
def step_ids(tok, prompt: list[dict], response: str, block_size: int | None = None) -> tuple[list[int], list[int]]:
    """(ids of prompt + response + end of turn, the position of each step's last token).

    The response is encoded line by line so every step ends on a token of its own: the newline after
    a line, or the end-of-turn token after the last one. Steps are the non-empty lines, as in
    gptlab.data.steps.split_steps, so positions line up with label_steps' labels. A character
    tokenizer gives exactly the chat template's ids; a BPE one may split a newline the policy merged.
    """
    ids = render_prompt(tok, prompt)
    ends: list[int] = []
    lines = response.split("\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        ids += tok.encode(line if last else line + "\n")
        if line.strip():
            ends.append(len(ids) if last else len(ids) - 1)    # the last line ends on the end-of-turn token
    ids.append(end_of_turn_id(tok))
    if block_size is not None and len(ids) > block_size:
        cut = len(ids) - block_size
        ids, ends = ids[cut:], [e - cut for e in ends]
    return ids, ends


@dataclass
class StepExample:
    ids: list[int]
    ends: list[int]        # positions of the steps that survived truncation
    labels: list[float]    # 1 good, 0 bad, one per position


def encode_solutions(tok, rows: list[dict], block_size: int, outcome: bool = False) -> list[StepExample]:
    """``outcome``: one label per solution, its final answer's correctness, read at its last token
    (Lightman et al.'s outcome-supervised reward model, trained like the PRM on the same samples)."""
    out = []
    for r in rows:
        ids, ends = step_ids(tok, r["prompt"], r["response"], block_size)
        if outcome:
            ends = [len(ids) - 1]
        labels = [float(r["correct"])] if outcome else [float(x) for x in r["labels"]]
        if len(ends) != len(labels):
            raise GptlabError(f"solution {r.get('id', '?')}: {len(labels)} labels for {len(ends)} steps")
        keep = [(e, lab) for e, lab in zip(ends, labels) if e >= 0]
        if keep:
            out.append(StepExample(ids, [e for e, _ in keep], [lab for _, lab in keep]))
    return out


def collate_steps(examples: list[StepExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and every step as (row, position, label)."""
    ids, lengths = pad_batch([e.ids for e in examples], pad_id)
    rows = [i for i, e in enumerate(examples) for _ in e.ends]
    return {"ids": ids, "lengths": lengths, "rows": torch.tensor(rows, dtype=torch.long),
            "pos": torch.tensor([p for e in examples for p in e.ends], dtype=torch.long),
            "labels": torch.tensor([lab for e in examples for lab in e.labels], dtype=torch.float32)}


def step_logits(model: ScalarHeadModel, batch: dict) -> torch.Tensor:
    """The head at every step's end: [number of steps in the batch]."""
    return model.values(batch["ids"])[batch["rows"], batch["pos"]]


def step_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
    acc = ((logits > 0).float() == labels).float().mean()
    return loss, {"step_accuracy": float(acc.detach())}


def auc(good: list[float], bad: list[float]) -> float:
    """P(a good step outscores a bad one), ties half: how well the scores separate the two."""
    if not good or not bad:
        return float("nan")
    ranked = sorted([(s, 1) for s in good] + [(s, 0) for s in bad])
    rank_sum, i = 0.0, 0
    while i < len(ranked):     # average ranks over ties
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        rank_sum += sum(lab for _, lab in ranked[i:j]) * (i + j + 1) / 2
        i = j
    n1, n0 = len(good), len(bad)
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0)


class PRMStage(RankingBatches):
    """Batches of labelled solutions for the shared loop (RankingBatches' epochs, ranks and resume
    state, collated as steps); held-out step loss, accuracy and AUC."""

    name = "prm"
    plot_keys = ["train_loss", "val_loss", "step_accuracy", "val_step_accuracy", "val_auc"]

    def __init__(self, train_items: list[StepExample], val_items: list[StepExample], batch_size: int,
                 seed: int, pad_id: int):
        if not train_items:
            raise GptlabError("no labelled solutions to train on")
        super().__init__(train_items, val_items, batch_size, seed, pad_id)

    def collate(self, items, pad_id: int) -> dict:
        return collate_steps(items, pad_id)

    def loss(self, model, batch):
        return step_loss(step_logits(model, batch), batch["labels"])

    def evaluate(self, model) -> dict:
        if not self.val_items:
            return {}
        m = evaluate_steps(model, self.val_items, self.pad_id, self.batch_size)
        return {"val_loss": m["loss"], "val_step_accuracy": m["accuracy"], "val_auc": m["auc"]}


@torch.no_grad()
def evaluate_steps(model, examples: list[StepExample], pad_id: int, batch_size: int = 32) -> dict:
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    logits, labels = [], []
    for i in range(0, len(examples), batch_size):
        b = collate_steps(examples[i:i + batch_size], pad_id)
        b = {k: v.to(device) for k, v in b.items()}
        logits.append(step_logits(model, b).float().cpu())
        labels.append(b["labels"].cpu())
    model.train(was)
    x, y = torch.cat(logits), torch.cat(labels)
    loss, m = step_loss(x, y)
    return {"loss": float(loss), "accuracy": m["step_accuracy"], "steps": len(y),
            "auc": auc(x[y > 0.5].tolist(), x[y < 0.5].tolist())}


# ----- the API for search and RL ----------------------------------------------------------------------
@torch.no_grad()
def step_scores(prm: ScalarHeadModel, tok, prompts, responses: list[str], batch_size: int = 32) -> list[list[float]]:
    """P(step is right) for every step of every response: a list per response (empty: no steps).
    ``prompts``: one messages list shared by all responses, or one per response."""
    if prompts and isinstance(prompts[0], dict):
        prompts = [prompts] * len(responses)
    device = next(prm.parameters()).device
    block = prm.config.block_size
    out: list[list[float]] = []
    for i in range(0, len(responses), batch_size):
        enc = [step_ids(tok, p, r, block) for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        ids, _ = pad_batch([e[0] for e in enc], tok.pad_id)
        probs = torch.sigmoid(prm.values(ids.to(device)).float()).cpu()
        out += [[float(probs[j, p]) for p in ends if p >= 0] for j, (_, ends) in enumerate(enc)]
    return out


def aggregate(scores: list[float], how: str = "prod") -> float:
    """A solution's score from its steps': the product (the chance every step is right, as Lightman
    et al.) or the weakest step. A solution with no steps scores 0."""
    if not scores:
        return 0.0
    if how == "prod":
        return math.prod(scores)
    if how == "min":
        return min(scores)
    raise GptlabError(f"aggregate must be one of {', '.join(AGGREGATES)}")


def load_prm(path: str | Path, flag: str = "--prm"):
    """(PRM, tokenizer, config) of a `gptlab prm` run."""
    cfg = runs.read_run_config(path) if Path(path).is_dir() else {}
    if cfg.get("stage") != "prm":
        raise GptlabError(f"{flag} {path}: not a `gptlab prm` run (config stage is {cfg.get('stage')!r})")
    gpt, tok, cfg, heads = runs.load_run(path, with_heads=True)
    prm = ScalarHeadModel(gpt)
    prm.load_head(heads)
    return prm.eval(), tok, cfg


# ----- sampling and labelling ---------------------------------------------------------------------------
def step_problems(path: str | Path, limit: int | None = None) -> list[dict]:
    """The multi-step items (those carrying a ``plan``) of a curriculum prompts file."""
    from gptlab.data.formats import load_prompt_items
    items = [it for it in load_prompt_items(path) if isinstance(it.get("plan"), dict)]
    if not items:
        raise GptlabError(f"{path}: no multi-step problems (items with a \"plan\"); write them with "
                          "`gptlab data instruct --steps`")
    return items[:limit] if limit else items


def fit_problems(tok, items: list[dict], block_size: int, max_new_tokens: int) -> tuple[list[dict], list[list[int]]]:
    """The problems whose prompt leaves room for a ``max_new_tokens`` solution, and their prompt ids."""
    from gptlab.train.heldout import encode_prompts
    kept, ids = encode_prompts(tok, items, block_size - max_new_tokens - 1)
    if not kept:
        raise GptlabError(f"no problem's prompt fits the {block_size}-token context with --max-new-tokens "
                          f"{max_new_tokens}")
    return kept, ids


def sample_solutions(policy, tok, prompt_ids: list[list[int]], k: int, temperature: float, max_new_tokens: int,
                     seed: int, batch: int = 64, progress: bool = True) -> list[list[str]]:
    """``k`` sampled replies to each prompt (seeded per sample, so a rerun gives the same texts)."""
    from tqdm import tqdm
    from gptlab.train.heldout import generate, reply_text
    jobs = [(i, j) for i in range(len(prompt_ids)) for j in range(k)]
    out: list[list[str]] = [[] for _ in prompt_ids]
    for s in tqdm(range(0, len(jobs), batch), desc="sampling", unit="batch", disable=not progress):
        chunk = jobs[s:s + batch]
        seeds = [(seed * 1_000_003 + i * 1009 + j) % (2 ** 31 - 1) for i, j in chunk]
        comps = generate(policy, tok, [prompt_ids[i] for i, _ in chunk], max_new_tokens, temperature, seeds)
        for (i, _), c in zip(chunk, comps):
            out[i].append(reply_text(tok, c))
    return out


def labelled_rows(items: list[dict], samples: list[list[str]]) -> list[dict]:
    rows = []
    for it, texts in zip(items, samples):
        for t in texts:
            rows.append({"id": it.get("id"), "prompt": it["messages"], "response": t,
                         "labels": label_steps(it["plan"], t), "correct": outcome_correct(it["plan"], t),
                         "family": it.get("family"), "answer": it.get("answer"), "plan": it["plan"]})
    return rows


def outcome_rankings(rows: list[dict]) -> list[dict]:
    """The same samples as rankings by final answer only (right before wrong, ties within each):
    the outcome reward model's training data. Prompts whose samples are all right or all wrong say
    nothing about outcomes and are left out. At most 9 samples per prompt (the rankings format)."""
    from gptlab.data.formats import MAX_K, ranking_row
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    out = []
    for group in by_id.values():
        group = group[:MAX_K]
        right = [i for i, r in enumerate(group) if r["correct"]]
        wrong = [i for i, r in enumerate(group) if not r["correct"]]
        if not right or not wrong:
            continue
        ties = [[a, b] for side in (right, wrong) for x, a in enumerate(side) for b in side[x + 1:]]
        out.append({**ranking_row(group[0]["prompt"], [r["response"] for r in group], right + wrong,
                                  family=group[0]["family"], answer=group[0]["answer"], plan=group[0]["plan"]),
                    "ties": ties})
    return out


# ----- the command ----------------------------------------------------------------------------------------
def run(args) -> int:
    out = Path(args.out)
    if args.samples < 1:
        raise GptlabError("--samples must be at least 1")
    if not args.temperature > 0:
        raise GptlabError("--temperature must be > 0 (the samples must differ)")
    policy_path = args.policy or args.init
    if not policy_path:
        raise GptlabError("give --policy (the run to sample from) or --solutions (labelled samples)")
    init = args.init or policy_path
    torch.manual_seed(args.seed)
    gpt, tok, _ = runs.load_run(init)
    if args.solutions:
        rows = [r for _, r in iter_jsonl(args.solutions)]
        if not rows or not all(isinstance(r, dict) and {"prompt", "response", "labels"} <= set(r) for r in rows):
            raise GptlabError(f"--solutions {args.solutions}: expected rows with prompt, response and labels "
                              "(a solutions.jsonl written by `gptlab prm`)")
        print(f"solutions: {len(rows)} labelled samples from {args.solutions}")
    else:
        if not args.problems:
            raise GptlabError("give --problems (multi-step prompts) or --solutions (labelled samples)")
        policy, ptok, _ = runs.load_run(policy_path)
        if not tok.same_as(ptok):
            raise GptlabError(f"--policy {policy_path} uses a different tokenizer than --init {init}")
        items, prompt_ids = fit_problems(ptok, step_problems(args.problems, args.max_problems),
                                         policy.config.block_size, args.max_new_tokens)
        t0 = time.time()
        samples = sample_solutions(policy, ptok, prompt_ids, args.samples, args.temperature, args.max_new_tokens,
                                   args.seed, progress=not args.no_progress)
        rows = labelled_rows(items, samples)
        print(f"sampled {len(rows)} solutions to {len(items)} problems in {time.time() - t0:.0f}s "
              f"(temperature {args.temperature})")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / "solutions.jsonl", rows)
    ranks = outcome_rankings(rows)
    atomic_write_jsonl(out / "outcome_rankings.jsonl", ranks)
    if args.shuffle_labels:
        # A control: the same steps with their labels permuted across the data set. A PRM that then
        # still separates good from bad held-out steps would be reading something other than the labels.
        flat = [lab for r in rows for lab in r["labels"]]
        random.Random(args.seed).shuffle(flat)
        it = iter(flat)
        rows = [{**r, "labels": [next(it) for _ in r["labels"]]} for r in rows]
    steps = [lab for r in rows for lab in r["labels"]]
    print(f"labels: {len(steps)} steps, {100 * sum(steps) / max(1, len(steps)):.1f}% good; "
          f"{100 * sum(r.get('correct', False) for r in rows) / max(1, len(rows)):.1f}% of solutions answer right; "
          f"{len(ranks)} problems with right and wrong answers -> outcome_rankings.jsonl")

    train_rows, val_rows = heldout_by_hash(rows, lambda r: r["prompt"], args.val_fraction, salt="prm")
    block = gpt.config.block_size
    train_items = encode_solutions(tok, train_rows, block, args.outcome)
    val_items = encode_solutions(tok, val_rows, block, args.outcome)
    model = ScalarHeadModel(gpt, reads="last_token")
    stage = PRMStage(train_items, val_items, args.batch_size, args.seed, tok.pad_id)
    if getattr(args, "max_steps", None) is None:
        args.max_steps = max(1, math.ceil(args.epochs * len(train_items) / args.batch_size))
    cfg = train_config_from_args(args)
    heads = {"score_head": {"kind": "step", "reads": "end_of_turn" if args.outcome else "step_ends", "init": "zeros",
                            "outcome": args.outcome}}
    runs.write_run_config(out, gpt.config, tok, stage="prm", extra={
        "init": str(init), "policy": str(policy_path) if not args.solutions else None, "heads": heads,
        "problems": str(args.problems) if args.problems else None, "solutions": args.solutions,
        "prm": {"samples": args.samples, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
                "val_fraction": args.val_fraction, "shuffle_labels": args.shuffle_labels, "outcome": args.outcome},
        "train": asdict(cfg)})
    print(f"init: {init} ({gpt.config.arch} {gpt.config.n_layer}x{gpt.config.n_embd}) + one scalar head at each "
          f"step's last token; train {len(train_items)} solutions, held out {len(val_items)}; {cfg.max_steps} steps "
          f"of {args.batch_size}")
    model.eval()
    before = evaluate_steps(model, val_items, tok.pad_id) if val_items else {}
    result = train(model, stage, cfg, out, summary_extra={"params": gpt.num_params(), "init": str(init)})
    after = evaluate_steps(model, val_items, tok.pad_id) if val_items else {}
    extra = {"solutions": len(rows), "steps": len(steps), "good_step_share": sum(steps) / max(1, len(steps))}
    if after:
        extra.update(val_step_loss=after["loss"], val_step_accuracy=after["accuracy"], val_auc=after["auc"],
                     val_steps=after["steps"], val_auc_before=before["auc"])
        print(f"held out: step loss {before['loss']:.3f} -> {after['loss']:.3f}, step accuracy "
              f"{100 * after['accuracy']:.1f}%, AUC good vs bad steps {before['auc']:.3f} -> {after['auc']:.3f} "
              f"({after['steps']} steps)")
    runs.update_summary(out, extra)
    print(f"\ndone: {result.step} steps in {result.elapsed_s:.0f}s; run folder: {out} (model.safetensors with "
          "heads.score_head.*, config.json stage 'prm', solutions.jsonl, outcome_rankings.jsonl, metrics.jsonl)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "prm", help="train a process reward model: step-by-step samples labelled by the checker",
        description="Sample --samples step-by-step solutions per multi-step problem from --policy (the "
        "generation engine), label every step with the programmatic checker (good until the first wrong "
        "step, bad from there on) and train a process reward model: --init plus one scalar head read at "
        "each step's last token, binary cross-entropy on the step labels. Also writes the same samples, "
        "ranked by final answer only, as outcome_rankings.jsonl for `gptlab rm` (the outcome RM).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", default=None, help="run to sample solutions from (default: --init)")
    p.add_argument("--init", default=None, help="run the PRM starts from (default: --policy)")
    p.add_argument("--problems", default=None,
                   help="prompts JSONL with multi-step items (`gptlab data instruct --steps`: prompts.jsonl)")
    p.add_argument("--solutions", default=None,
                   help="labelled solutions from an earlier `gptlab prm` (its solutions.jsonl) instead of sampling")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--max-problems", type=int, default=600, help="problems to sample (0 = all)")
    p.add_argument("--samples", type=int, default=8, help="solutions sampled per problem")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest solution in tokens")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of problems held out (by hash)")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the solutions when --max-steps is not given")
    p.add_argument("--outcome", action="store_true",
                   help="train an outcome-supervised model instead (Lightman et al.'s ORM): one label per solution, "
                   "whether its final answer is right, read at its end-of-turn token; same samples, head and loop")
    p.add_argument("--shuffle-labels", action="store_true",
                   help="control run: permute the step labels across the data set before training")
    add_train_args(p, batch_size=16, lr=1e-4, warmup_steps=20, eval_every=100, ckpt_every=200, weight_decay=0.0)
    for action in p._actions:
        if action.dest == "max_steps":
            action.default = None
            action.help = "optimizer steps (default: as many as --epochs takes)"
    p.set_defaults(func=run)
