"""Teacher-forced scoring: THE function every likelihood-based eval goes through, and perplexity.

``score_continuations`` returns, for each (context, continuation) pair of token ids, the sum of
log p(continuation token | everything before it) and the number of continuation tokens. Few-shot
multiple choice (one pair per choice), cloze ranking and the fill command (one pair per candidate
sentence) and perplexity (one pair per sliding window) are all calls to it.

Bits per byte = total NLL in bits / UTF-8 bytes of the text. Unlike perplexity per token it does not
depend on how the tokenizer cuts the text, so models with different tokenizers can be compared.
"""
from __future__ import annotations

import math
import random
import string
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab.device import autocast
from gptlab.errors import GptlabError
from gptlab.io import read_text


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def score_continuations(model, contexts: list[list[int]], continuations: list[list[int]],
                        batch_size: int = 32, progress=None) -> list[tuple[float, int]]:
    """[(sum of log-probs of the continuation tokens, number of continuation tokens)] per pair.

    Each sequence is context + continuation with the oldest context tokens cut off when it is longer
    than the window (block_size + 1 tokens: the last one is only a target). Sequences are sorted by
    length and right-padded inside a batch; with a causal mask, padding after a sequence cannot change
    its scores, so one forward pass scores every pair of the batch.
    """
    if len(contexts) != len(continuations):
        raise ValueError("contexts and continuations differ in length")
    if not getattr(model.config, "causal", True):
        raise GptlabError("likelihood scoring needs a causal (GPT) model; this run is bidirectional "
                          "(bert): use `gptlab fill` for it")
    window = model.config.block_size + 1
    seqs, n_cont = [], []
    for ctx, cont in zip(contexts, continuations):
        if not cont:
            raise ValueError("empty continuation")
        if len(cont) >= window:
            raise GptlabError(f"a continuation of {len(cont)} tokens does not fit the model's "
                              f"{window - 1}-token context")
        seq = (list(ctx) + list(cont))[-window:]
        seqs.append(seq)
        n_cont.append(len(cont))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    device = _device(model)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        T = max(len(seqs[i]) for i in idx) - 1
        x = torch.zeros(len(idx), T, dtype=torch.long)
        y = torch.full((len(idx), T), -100, dtype=torch.long)
        for r, i in enumerate(idx):
            s = seqs[i]
            x[r, :len(s) - 1] = torch.tensor(s[:-1])
            y[r, len(s) - 1 - n_cont[i]:len(s) - 1] = torch.tensor(s[-n_cont[i]:])
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model.lm_logits(model.hidden(x))
        logp = F.log_softmax(logits.float(), dim=-1)
        tok_lp = logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)
        sums = tok_lp.sum(-1).tolist()
        for r, i in enumerate(idx):
            out[i] = (sums[r], n_cont[i])
        if progress is not None:
            progress.update(len(idx))
    return out


def windows(n_targets: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(context_start, first_target, end) triples covering targets 1..n_targets of a sequence.

    Every target is scored exactly once; after the first window each one sees at least
    block_size - stride + 1 tokens of context (a smaller stride costs more compute, gives more context).
    """
    if stride < 1 or stride > block_size:
        raise GptlabError(f"--stride must be between 1 and the context window ({block_size}), got {stride}")
    out = []
    a = 1
    b = min(n_targets + 1, block_size + 1)
    while a <= n_targets:
        out.append((max(0, b - 1 - block_size), a, b))
        a, b = b, min(n_targets + 1, b + stride)
    return out


def perplexity(model, tokenizer, text: str, stride: int | None = None, batch_size: int = 16,
               show_progress: bool = True) -> dict:
    """Perplexity per token and bits per byte of ``text`` (scored from a fresh document start)."""
    if not text:
        raise GptlabError("the text is empty")
    ids = [tokenizer.eot_id] + tokenizer.encode(text)   # the end-of-text token opens a document
    bs = model.config.block_size
    stride = stride or max(1, bs // 2)
    spans = windows(len(ids) - 1, bs, stride)
    ctxs = [ids[c:a] for c, a, _ in spans]
    conts = [ids[a:b] for _, a, b in spans]
    from tqdm import tqdm
    with tqdm(total=len(spans), desc="perplexity", unit="window", disable=not show_progress,
              leave=False) as bar:
        scores = score_continuations(model, ctxs, conts, batch_size=batch_size, progress=bar)
    nll = -sum(s for s, _ in scores)
    n_tok = sum(n for _, n in scores)
    n_bytes = len(text.encode("utf-8"))
    return {"tokens": n_tok, "bytes": n_bytes, "nll_nats": nll, "loss": nll / n_tok,
            "perplexity": math.exp(nll / n_tok), "bits_per_byte": nll / math.log(2) / n_bytes,
            "stride": stride, "block_size": bs}


def copy_losses(model, tokenizer, n: int = 40, words: int = 8, seed: int = 0, batch_size: int = 16) -> dict:
    """In-context copying (the induction test of Olsson et al. 2022): the mean loss per token of a line
    of ``words`` random letter words said the first time, and said again right after.

    Nothing but the first saying predicts the second, so the drop from ``first`` to ``second`` is what
    the model's copying (its induction heads) is worth; a model that cannot copy scores the same twice.
    """
    rng = random.Random(seed)
    newline = tokenizer.encode("\n")
    firsts, seconds = [], []
    for _ in range(n):
        line = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))
                        for _ in range(words))
        ids = tokenizer.encode(line + "\n")
        firsts.append((newline, ids))
        seconds.append((newline + ids, ids))
    scored = score_continuations(model, [c for c, _ in firsts + seconds], [t for _, t in firsts + seconds],
                                 batch_size)
    loss = [-lp / k for lp, k in scored]
    first, second = sum(loss[:n]) / n, sum(loss[n:]) / n
    return {"first": first, "second": second, "drop": first - second, "n": n, "words": words, "seed": seed}


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    text = read_text(path, "--text")
    if not text.strip():
        raise GptlabError(f"--text {path}: the file is empty")
    return text
