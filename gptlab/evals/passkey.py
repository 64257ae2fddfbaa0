"""Passkey retrieval and loss against position: does a model use a context longer than it trained on?

``gptlab eval RUN --passkey`` builds prompts of exactly ``m x L`` tokens (L = the context the run's
positions were trained at, m = 1, 2, 4, 8): repeated filler with "The pass key is N. Remember it."
at a depth from 0 (the start) to 1 (just before the question), ending "What is the pass key? The
pass key is". The model answers greedily; an answer is right when the first number it writes is
the key. Accuracy per (depth, length) makes the heat map.

Loss against position: the mean next-token loss at each position of ``m_max x L``-token windows of
text (fresh passkey documents, or --text), in buckets. A model that cannot use positions past L
shows it as a rise right after L.
"""
from __future__ import annotations

import math
import random
import re

import torch
import torch.nn.functional as F

from gptlab.data.passkey import FILLER, KEY_DIGITS, QUESTION, document, needle, random_key
from gptlab.device import autocast


def answer_is_right(completion: str, key: str) -> bool:
    """The first number in the completion is the key (no more digits, no fewer)."""
    m = re.match(r"\s*(\d+)", completion)
    return m is not None and m.group(1) == key


def _sentence_ids(tok) -> list[list[int]]:
    return [tok.encode(s + ". ") for s in FILLER.strip().rstrip(".").split(". ")]


def build_prompt(tok, length: int, depth: float, key: str, rng: random.Random) -> list[int]:
    """Exactly ``length`` token ids: <|endoftext|>, filler, the needle at ``depth`` of the filler,
    filler, the question. Filler pieces end at sentence boundaries on both sides of the needle, as
    in the training documents; the text before the needle starts mid-sentence when it must."""
    sents = _sentence_ids(tok)
    need, question = tok.encode(needle(key)), tok.encode(QUESTION.rstrip())
    n_fill = length - 1 - len(need) - len(question)
    if n_fill < 0:
        raise ValueError(f"a passkey prompt needs at least {length - n_fill} tokens")
    after, i = [], rng.randrange(len(sents))
    while len(after) + len(sents[i % len(sents)]) <= round((1.0 - depth) * n_fill):
        after += sents[i % len(sents)]
        i += 1
    before, j = [], rng.randrange(len(sents))
    while len(before) < n_fill - len(after):
        before = sents[j % len(sents)] + before
        j -= 1
    before = before[len(before) - (n_fill - len(after)):]
    return [tok.eot_id] + before + need + after + question


@torch.inference_mode()
def greedy_answers(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of equal-length prompts, all rows in one KV cache, in lockstep."""
    device = next(model.parameters()).device
    x = torch.tensor(prompts, device=device)
    cache = model.new_cache(len(prompts), x.shape[1] + new_tokens)
    out = []
    with autocast(device):
        h = model.hidden(x, cache=cache)[:, -1]
        for _ in range(new_tokens):
            nxt = model.lm_logits(h).float().argmax(-1)
            out.append(nxt)
            h = model.hidden(nxt[:, None], cache=cache)[:, -1]
    return torch.stack(out, 1).tolist()


def passkey_grid(model, tok, train_len: int, multiples: list[float], depths: list[float], n: int,
                 seed: int = 0, batch_size: int = 8, progress=None) -> dict:
    """Accuracy per (depth, length): {"lengths": [...], "depths": [...], "acc": [[...] per depth],
    "examples": a few (length, depth, key, answer) rows}. The same keys and filler for every model
    (they depend on the seed and the cell only)."""
    acc, examples = [], []
    lengths = [int(round(m * train_len)) for m in multiples]
    new = KEY_DIGITS + 2   # room for a space (char tokenizers) and one token past the key
    for di, d in enumerate(depths):
        row = []
        for li, length in enumerate(lengths):
            rng = random.Random(f"{seed}/{li}/{di}")
            keys = [random_key(rng) for _ in range(n)]
            prompts = [build_prompt(tok, length, d, k, rng) for k in keys]
            right = 0
            for s in range(0, n, batch_size):
                answers = greedy_answers(model, prompts[s:s + batch_size], new)
                for k, a in zip(keys[s:s + batch_size], answers):
                    text = tok.decode(a, skip_special=True)
                    ok = answer_is_right(text, k)
                    right += ok
                    if len(examples) < 40 and s == 0 and k == keys[0]:
                        examples.append({"length": length, "depth": d, "key": k, "answer": text, "right": ok})
            row.append(right / n)
            if progress is not None:
                progress(length, d, right / n)
        acc.append(row)
    return {"lengths": lengths, "multiples": multiples, "depths": depths, "n": n, "acc": acc,
            "examples": examples}


def eval_text_ids(tok, n_tokens: int, seed: int, text: str | None = None) -> list[int]:
    """Token ids to measure loss against position on: ``text`` or fresh passkey documents (a seed
    no training file uses by default), at least ``n_tokens`` of them."""
    if text is not None:
        return [tok.eot_id] + tok.encode(text)
    rng = random.Random(f"ppl/{seed}")
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += [tok.eot_id] + tok.encode(document(rng, rng.randint(100, 250)))
    return ids


@torch.inference_mode()
def loss_by_position(model, ids: list[int], window: int, n_windows: int, buckets: int = 32) -> dict:
    """Mean next-token loss per position bucket over up to ``n_windows`` disjoint windows."""
    device = next(model.parameters()).device
    n = min(n_windows, (len(ids) - 1) // window)
    if n < 1:
        raise ValueError(f"the text has fewer than {window + 1} tokens")
    total = torch.zeros(window)
    for w in range(n):
        seq = torch.tensor(ids[w * window:(w + 1) * window + 1], device=device)
        with autocast(device):
            logits = model.lm_logits(model.hidden(seq[None, :-1]))[0]
        total += F.cross_entropy(logits.float(), seq[1:], reduction="none").cpu()
    mean = total / n
    width = math.ceil(window / buckets)
    centers, losses = [], []
    for b in range(0, window, width):
        centers.append(b + min(width, window - b) / 2)
        losses.append(mean[b:b + width].mean().item())
    return {"positions": centers, "loss": losses, "windows": n, "window": window}


def results_markdown(res: dict) -> str:
    lines = ["# Passkey retrieval", "",
             f"Training context L = {res['train_len']} tokens; {res['n']} keys per cell; greedy answers; a "
             "cell is the share whose first number is the key. Mean over depths "
             f"{', '.join(f'{d:g}' for d in res['depths'])}.", "",
             "| model | " + " | ".join(f"{m:g}x ({n} tok)" for m, n in zip(res["multiples"], res["lengths"]))
             + " |", "|---|" + "---|" * len(res["lengths"])]
    for name, v in res["variants"].items():
        means = [sum(col) / len(col) for col in zip(*v["passkey"]["acc"])]
        lines.append(f"| {name} | " + " | ".join(f"{100 * a:.0f}%" for a in means) + " |")
    lines += ["", "Mean loss (nats/token) inside the training context and beyond it:", "",
              "| model | positions < L | positions >= L |", "|---|---|---|"]
    for name, v in res["variants"].items():
        p = v.get("position_loss")
        if p:
            lines.append(f"| {name} | {p['inside']:.3f} | {p['beyond']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_heatmaps(res: dict, out) -> None:
    """One panel per model: depth (rows) x context length (columns), accuracy as colour and figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from gptlab.plots import save_figure
    names = list(res["variants"])
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        acc = res["variants"][name]["passkey"]["acc"]
        ax.imshow([[100 * a for a in r] for r in acc], vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for i, r in enumerate(acc):
            for j, a in enumerate(r):
                ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(res["lengths"])))
        ax.set_xticklabels([f"{m:g}x\n{n}" for m, n in zip(res["multiples"], res["lengths"])], fontsize=8)
        ax.set_yticks(range(len(res["depths"])))
        ax.set_yticklabels([f"{d:g}" for d in res["depths"]], fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("context (x training length, tokens)", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("passkey retrieval accuracy (%)")
    fig.tight_layout()
    save_figure(fig, out)


def plot_position_loss(res: dict, out) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from gptlab.plots import save_figure
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, v in res["variants"].items():
        p = v.get("position_loss")
        if p:
            ax.plot(p["positions"], p["loss"], marker=".", label=name)
    ax.axvline(res["train_len"], color="gray", ls="--", lw=1, label="training context")
    ax.set_yscale("log")
    ax.set_xlabel("position in the window (tokens)")
    ax.set_ylabel("mean next-token loss (nats, log scale)")
    ax.set_title("loss against position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out)
