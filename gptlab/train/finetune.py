"""GPT-1 supervised fine-tuning: a linear head on the extract token, plus the auxiliary LM loss.

    gptlab finetune --init runs/tiny --task play --out runs/tiny-play
    gptlab finetune --init runs/tiny --task data.csv --out runs/mine      # text,label columns
    gptlab predict runs/tiny-play "To be, or not to be: that is the question:"

Input transformations (Radford et al. 2018, section 3.3), with the tokenizer's reserved tokens
<|start|>, <|delim|> (the paper's $) and <|extract|>:

    classification   <start> text <extract>                           -> head over the classes
    entailment       <start> premise <delim> hypothesis <extract>     -> head over the classes
    similarity       <start> a <delim> b <extract>  and  <start> b <delim> a <extract>; the two
                     extract activations are ADDED element-wise, then the head
    multiple choice  <start> context <delim> answer_k <extract> for each k; a head with ONE output
                     scores each answer, softmax across the answers

Inputs longer than the context window lose tokens from the left of the text part (the first part of
a pair first), so the tokens next to <extract> survive. Loss = cross-entropy of the task + lm_coef x
next-token loss on the same sequences (lm_coef 0.5 as in the paper; 0 turns it off).

Datasets: a built-in Shakespeare task (play, next-line, continuation, same-play) or a CSV/JSONL file;
the columns are documented in gptlab.data.finetune_tasks and docs/FINETUNE.md.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab import runs
from gptlab.data.finetune_tasks import BUILTIN_TASKS, TASK_TYPES, Example, TaskData, load_task
from gptlab.errors import GptlabError
from gptlab.io import atomic_write_json, read_json
from gptlab.model.gpt import GPT
from gptlab.model.heads import ClassifierModel, gather_last
from gptlab.tokenizer import DELIM, EXTRACT, START, Tokenizer
from gptlab.train.args import add_train_args, train_config_from_args
from gptlab.train.loop import train

PAIR_SEP = "|||"  # `gptlab predict RUN "premise ||| hypothesis"` for pair tasks


# ----- input transformations -----------------------------------------------------------------------
def fit_parts(parts: list[list[int]], budget: int) -> list[list[int]]:
    """Shorten parts from their left until they fit ``budget`` tokens together.

    One part: keep its last ``budget`` tokens. Two parts: the first (text/premise/context) gives up
    tokens first, but keeps at least half the budget when the second is long too."""
    if sum(len(p) for p in parts) <= budget:
        return parts
    if len(parts) == 1:
        return [parts[0][-budget:] if budget > 0 else []]
    first, second = parts
    keep_second = min(len(second), budget - min(len(first), budget // 2))
    keep_first = budget - keep_second
    return [first[len(first) - keep_first:], second[len(second) - keep_second:]]


class TaskEncoder:
    """Turns examples into the token sequences of GPT-1's input transformations."""

    def __init__(self, tok: Tokenizer, task_type: str, block_size: int):
        ids = {t: tok.special_id(t) for t in (START, DELIM, EXTRACT)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise GptlabError(f"this run's tokenizer lacks the task tokens {missing}; fine-tuning needs a "
                              "gptlab tokenizer (gptlab tokenizer train)")
        if task_type not in TASK_TYPES:
            raise GptlabError(f"unknown task type {task_type!r}")
        self.tok, self.task_type, self.block_size = tok, task_type, block_size
        self.start, self.delim, self.extract = ids[START], ids[DELIM], ids[EXTRACT]
        self.pad = tok.pad_id

    def layout(self, parts: list[list[int]]) -> list[int]:
        """<start> a [<delim> b] <extract>, truncated to the context window."""
        a_b = fit_parts(parts, self.block_size - 1 - len(parts))
        seq = [self.start] + a_b[0]
        if len(a_b) == 2:
            seq += [self.delim] + a_b[1]
        return seq + [self.extract]

    def sequences(self, ex: Example) -> list[list[int]]:
        """All sequences of one example: 1 (classification, entailment), 2 (similarity), k (choices)."""
        enc = self.tok.encode
        if self.task_type == "classification":
            return [self.layout([enc(ex.texts[0])])]
        if self.task_type == "entailment":
            return [self.layout([enc(ex.texts[0]), enc(ex.texts[1])])]
        if self.task_type == "similarity":
            a, b = enc(ex.texts[0]), enc(ex.texts[1])
            return [self.layout([a, b]), self.layout([b, a])]
        context = enc(ex.texts[0])
        return [self.layout([context, enc(c)]) for c in ex.choices]

    def encode_all(self, examples: list[Example]) -> list[tuple[list[list[int]], int]]:
        return [(self.sequences(ex), ex.label) for ex in examples]


def collate(items: list[tuple[list[list[int]], int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded [N, T] ids of every sequence (examples' sequences consecutive), their lengths,
    the LM targets (next token; -100 on padding) and one label per example."""
    seqs = [s for seq_list, _ in items for s in seq_list]
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad, dtype=torch.long)
    for r, s in enumerate(seqs):
        idx[r, :len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    targets = idx[:, 1:].clone()
    targets[torch.arange(1, T)[None, :] >= lengths[:, None]] = -100
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return {"idx": idx, "lengths": lengths, "targets": targets, "labels": labels}


# ----- model ---------------------------------------------------------------------------------------
class FineTuneModel(ClassifierModel):
    """ClassifierModel plus the way each task type turns extract features into logits. Keeps the
    parameter names of ClassifierModel (gpt.*, clf_head.*), so runs store heads.clf_head.*.

    A bert model also gets BERT's segment ids: the tokens after the first ``segment_token`` (the
    <delim> between a pair's two texts) are sentence B."""

    def __init__(self, gpt: GPT, task_type: str, n_outputs: int, dropout: float = 0.1,
                 segment_token: int | None = None):
        super().__init__(gpt, n_outputs, dropout)
        self.task_type = task_type
        self.segment_token = segment_token if gpt.config.segments else None

    def task_logits(self, feats: torch.Tensor, per_example: int) -> torch.Tensor:
        if self.task_type == "similarity":
            # Both orders' final extract activations, added element-wise before the head.
            return self.classify(feats.view(-1, 2, feats.size(-1)).sum(1))
        if self.task_type == "multiple_choice":
            # One scalar per answer; the cross-entropy over these is the softmax across answers.
            return self.classify(feats).view(-1, per_example)
        return self.classify(feats)

    def segments(self, idx: torch.Tensor) -> torch.Tensor | None:
        if self.segment_token is None:
            return None
        sep = (idx == self.segment_token).long()
        return (sep.cumsum(1) - sep).clamp(max=1)   # 0 up to and including the first <delim>, then 1

    def forward(self, idx, lengths, per_example: int = 1, with_lm: bool = False):
        h = self.gpt.hidden(idx, segments=self.segments(idx))
        logits = self.task_logits(gather_last(h, lengths), per_example)
        return logits, (self.gpt.lm_logits(h) if with_lm else None)


def per_example(task_type: str, n_choices: int) -> int:
    return {"similarity": 2, "multiple_choice": n_choices}.get(task_type, 1)


def lm_loss(lm_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_logits[:, :-1].reshape(-1, lm_logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=-100)


def finetune_loss(model, batch: dict, lm_coef: float, k: int):
    """L = L_task + lm_coef * L_LM (the LM term is not even computed when lm_coef is 0)."""
    logits, lm = model(batch["idx"], batch["lengths"], k, lm_coef > 0)
    task = F.cross_entropy(logits, batch["labels"])
    metrics = {"task_loss": float(task.detach()),
               "train_acc": float((logits.argmax(-1) == batch["labels"]).float().mean())}
    loss = task
    if lm is not None:
        aux = lm_loss(lm, batch["targets"])
        metrics["lm_loss"] = float(aux.detach())
        loss = task + lm_coef * aux
    return loss, metrics


@torch.no_grad()
def predict_probs(model: FineTuneModel, items, pad: int, k: int, batch_size: int = 64) -> torch.Tensor:
    """Class (or answer) probabilities [n, n_classes] for encoded items, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(items), batch_size):
        b = collate(items[i:i + batch_size], pad)
        logits, _ = model(b["idx"].to(device), b["lengths"].to(device), k)
        out.append(logits.float().softmax(-1).cpu())
    model.train(was_training)
    return torch.cat(out)


# ----- the stage -----------------------------------------------------------------------------------
class FineTuning:
    name = "finetune"
    plot_keys = ["task_loss", "lm_loss", "train_acc", "val_loss", "heldout_accuracy"]

    def __init__(self, task: TaskData, encoder: TaskEncoder, batch_size: int, lm_coef: float):
        self.task, self.encoder, self.batch_size, self.lm_coef = task, encoder, batch_size, lm_coef
        self.k = per_example(task.task_type, task.n_choices)
        self.data = {"train": encoder.encode_all(task.train), "val": encoder.encode_all(task.heldout)}

    def get_batch(self, split, gen):
        rows = self.data[split]
        pick = torch.randint(0, len(rows), (self.batch_size,), generator=gen).tolist()
        return collate([rows[i] for i in pick], self.encoder.pad)

    def loss(self, model, batch):
        return finetune_loss(model, batch, self.lm_coef, self.k)

    def count_tokens(self, batch) -> int:
        return int(batch["lengths"].sum())

    def evaluate(self, model) -> dict:
        """Accuracy on the whole held-out split (the number the run reports)."""
        rows = self.data["val"]
        probs = predict_probs(model, rows, self.encoder.pad, self.k)
        labels = torch.tensor([label for _, label in rows])
        nll = -torch.log(probs[torch.arange(len(rows)), labels].clamp_min(1e-12)).mean()
        return {"heldout_accuracy": float((probs.argmax(-1) == labels).float().mean()),
                "heldout_task_loss": float(nll)}


def baselines(task: TaskData) -> dict:
    counts = [0] * len(task.labels)
    for ex in task.heldout:
        counts[ex.label] += 1
    return {"chance": 1.0 / len(task.labels), "majority": max(counts) / len(task.heldout)}


# ----- commands ------------------------------------------------------------------------------------
def run(args) -> int:
    if args.lm_coef < 0 or not math.isfinite(args.lm_coef):
        raise GptlabError("--lm-coef must be a non-negative number")
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    task = load_task(args.task, args.task_type, labels, args.heldout, args.heldout_fraction,
                     args.data_seed, n_train=args.max_train or 4000)
    if args.max_train:
        task.train = task.train[:args.max_train]
    gpt, tok, init_cfg = runs.load_run(args.init)
    model_cfg = gpt.config
    if model_cfg.arch == "bert" and args.lm_coef > 0:
        raise GptlabError("a bert run has no next-token objective: pass --lm-coef 0")
    torch.manual_seed(args.seed)
    if args.from_scratch:  # the paper's baseline: same architecture and tokenizer, no pre-training
        gpt = GPT(model_cfg)
    encoder = TaskEncoder(tok, task.task_type, model_cfg.block_size)
    model = FineTuneModel(gpt, task.task_type, task.n_outputs, args.clf_dropout, segment_token=encoder.delim)
    if args.max_steps is None:  # GPT-1 fine-tuned for 3 epochs
        args.max_steps = max(1, math.ceil(args.epochs * len(task.train) / (args.batch_size * args.grad_accum)))
    cfg = train_config_from_args(args)
    stage = FineTuning(task, encoder, cfg.batch_size, args.lm_coef)
    base = baselines(task)

    out = Path(args.out)
    section = {"task": task.name, "task_type": task.task_type, "labels": task.labels,
               "n_choices": task.n_choices, "lm_coef": args.lm_coef, "from_scratch": args.from_scratch,
               "clf_dropout": args.clf_dropout, "source": task.source, "init": str(args.init),
               "n_train": len(task.train), "n_heldout": len(task.heldout)}
    runs.write_run_config(out, model_cfg, tok, stage="finetune", extra={
        "finetune": section, "heads": {"clf_head": {"outputs": task.n_outputs}}, "train": asdict(cfg)})
    print(f"task: {task.name} ({task.task_type}, {task.source}): labels {task.labels}")
    print(f"data: {len(task.train):,} training / {len(task.heldout):,} held-out examples; chance "
          f"{base['chance']:.3f}, majority class {base['majority']:.3f}")
    print(f"model: {'fresh weights (--from-scratch)' if args.from_scratch else 'pre-trained ' + str(args.init)}"
          f", {model_cfg.arch} {model_cfg.n_layer}x{model_cfg.n_embd}; lm_coef {args.lm_coef}; "
          f"{cfg.max_steps} steps of {cfg.batch_size * cfg.grad_accum}")
    t0 = time.time()
    result = train(model, stage, cfg, out, summary_extra={"finetune": section, "baselines": base})
    acc = result.metrics.get("heldout_accuracy")
    summary_path = out / runs.SUMMARY_FILE
    summary = read_json(summary_path)
    summary["heldout_accuracy"] = acc
    atomic_write_json(summary_path, summary)
    print(f"\ndone: {result.step} steps in {time.time() - t0:.0f}s; train loss {result.train_loss:.3f}")
    if acc is not None:
        print(f"held-out accuracy: {acc:.3f} on {len(task.heldout)} examples "
              f"(chance {base['chance']:.3f}, majority {base['majority']:.3f})")
    print(f"run folder: {out} (model.safetensors with heads.clf_head.*, config.json, metrics.jsonl, "
          "summary.json, loss.png, curves.png)")
    return 0


def load_finetuned(run_dir: str | Path, device: str = "cpu"):
    """(FineTuneModel in eval mode, TaskEncoder, finetune config section) of a fine-tuned run."""
    gpt, tok, cfg, heads = runs.load_run(run_dir, device, with_heads=True)
    section = cfg.get("finetune")
    if not isinstance(section, dict) or "clf_head.weight" not in heads:
        raise GptlabError(f"{run_dir}: not a fine-tuned run (train one with gptlab finetune)")
    n_out = heads["clf_head.weight"].shape[0]
    encoder = TaskEncoder(tok, section["task_type"], gpt.config.block_size)
    model = FineTuneModel(gpt, section["task_type"], n_out, section.get("clf_dropout", 0.1),
                          segment_token=encoder.delim)
    model.clf_head.load_state_dict({"weight": heads["clf_head.weight"], "bias": heads["clf_head.bias"]})
    model.to(device).eval()
    return model, encoder, section


def predict_run(args) -> int:
    model, encoder, section = load_finetuned(args.run_dir, args.device)
    task_type = section["task_type"]
    examples: list[Example] = []
    if task_type == "multiple_choice":
        if not args.choices or len(args.choices) < 2:
            raise GptlabError("this run answers multiple choice: pass the context as TEXT and --choices A B ...")
        examples = [Example((t,), 0, tuple(args.choices)) for t in args.text]
        names = args.choices
    elif task_type in ("entailment", "similarity"):
        for t in args.text:
            parts = t.split(PAIR_SEP)
            if len(parts) != 2:
                raise GptlabError(f"pair task: give --pair A B, or TEXT as 'A {PAIR_SEP} B' (got {t!r})")
            examples.append(Example((parts[0].strip(), parts[1].strip()), 0))
        examples += [Example(tuple(p), 0) for p in args.pair or []]
        names = section["labels"]
    else:
        if args.pair or args.choices:
            raise GptlabError("this run classifies single texts: pass them as TEXT (no --pair/--choices)")
        examples = [Example((t,), 0) for t in args.text]
        names = section["labels"]
    if not examples:
        raise GptlabError("nothing to classify: pass TEXT" + (" or --pair A B" if task_type in
                                                              ("entailment", "similarity") else ""))
    k = per_example(task_type, len(args.choices or []))
    probs = predict_probs(model, encoder.encode_all(examples), encoder.pad, k)
    for ex, p in zip(examples, probs):
        best = int(p.argmax())
        shown = f" {PAIR_SEP} ".join(ex.texts)
        print(f"{names[best]}\t{float(p[best]):.3f}\t{shown}")
        if args.all:
            for j in p.argsort(descending=True).tolist():
                print(f"    {names[j]}\t{float(p[j]):.3f}")
    return 0


def _default_max_steps_from_epochs(p: argparse.ArgumentParser) -> None:
    for action in p._actions:
        if action.dest == "max_steps":
            action.default = None
            action.help = "optimizer steps (default: --epochs passes over the training examples)"


def register(sub) -> None:
    p = sub.add_parser(
        "finetune", help="GPT-1 fine-tuning: a linear head on the extract token (+ auxiliary LM loss)",
        description="Fine-tune a pre-trained run on a labelled task with GPT-1's input transformations and "
        "a linear head on the final hidden state of the <|extract|> token. --task is a built-in "
        f"Shakespeare task ({', '.join(BUILTIN_TASKS)}) or a CSV/JSONL file with columns text,label "
        "(classification) | premise,hypothesis,label (entailment) | text_a,text_b,label (similarity) | "
        "context,choices,label or context,choice_0..choice_N,label (multiple choice; label = index of "
        "the right choice). Reports held-out accuracy; see docs/FINETUNE.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", required=True, help="pre-trained run folder (gptlab pretrain)")
    p.add_argument("--task", required=True, help="built-in task name or a .csv/.jsonl file")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--lm-coef", type=float, default=0.5, help="weight of the auxiliary LM loss (0 = off)")
    p.add_argument("--from-scratch", action="store_true",
                   help="same architecture and tokenizer as --init but freshly initialised weights (baseline)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training set when --max-steps is not given")
    p.add_argument("--clf-dropout", type=float, default=0.1, help="dropout on the extract features")
    p.add_argument("--task-type", choices=TASK_TYPES, default=None, help="force the type of a file task "
                   "(default: read from its columns)")
    p.add_argument("--labels", default=None, help="comma-separated label set of a file task, in head order "
                   "(default: the labels seen in training rows, sorted)")
    p.add_argument("--heldout", default=None, help="held-out file (default: hold out --heldout-fraction rows)")
    p.add_argument("--heldout-fraction", type=float, default=0.2, help="rows of a file task held out")
    p.add_argument("--max-train", type=int, default=None, help="use at most this many training examples")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the built-in tasks and the held-out split")
    add_train_args(p, batch_size=32, lr=3e-4, warmup_steps=20, schedule="linear", min_lr_ratio=0.0,
                   weight_decay=0.01, eval_every=100, eval_batches=4, ckpt_every=100, log_every=10)
    _default_max_steps_from_epochs(p)
    p.set_defaults(func=run)

    q = sub.add_parser(
        "predict", help="classify new inputs with a fine-tuned run",
        description="Print the predicted label and its probability for each input of a run made by "
        f"gptlab finetune. Pair tasks take --pair A B (repeatable) or TEXT written 'A {PAIR_SEP} B'; "
        "multiple-choice runs take the context as TEXT and the answers as --choices.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("run_dir", metavar="RUN_DIR", help="fine-tuned run folder")
    q.add_argument("text", metavar="TEXT", nargs="*", help="inputs to classify")
    q.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"), help="a pair input (pair tasks)")
    q.add_argument("--choices", nargs="+", default=None, help="candidate answers (multiple choice)")
    q.add_argument("--all", action="store_true", help="also print every label's probability")
    q.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    q.set_defaults(func=predict_run)
