"""Fill in the blank(s) of a sentence with a BERT (masked LM) or a GPT (decoder) run.

    gptlab fill RUN_DIR "___和阿里、腾讯一起并称为中国互联网 BAT 三巨头。"

A blank is ``___`` (three or more underscores); several are allowed and are filled left to right,
each later blank seeing the earlier ones filled with their best candidate.

BERT (bidirectional): a blank becomes n mask tokens, n = 1..3 (a word may be several tokens). For
each n, a beam search fills the masks left to right: the first mask's top tokens given every other
mask, then the next mask's given those, ... Every string found is then re-scored by its
pseudo-log-likelihood (PLL, Salazar et al. 2020): mask each of its tokens in turn and add
log p(token | all other tokens). PLL is comparable across n (it is one log-probability per token of
the candidate), so candidates of 1, 2 and 3 tokens are ranked together by it.

GPT (left to right): candidates are the model's most likely 1-3 token continuations of the left
context (a small beam search) plus the tokenizer's most frequent whole-word tokens; each is put in
the blank and the decoder's log-likelihood of the whole sentence (up to the next blank) ranks them.
The right context thus decides as much as the left one.

``--candidates a,b,c`` ranks exactly the given strings (BERT: PLL of their tokens in place; GPT:
sentence likelihood).

Probabilities: a softmax of the scores over every candidate considered, i.e. the model's posterior
over that candidate set. The printed top-k therefore sum to at most 1. For BERT single-token blanks
with --candidates over the whole set this equals the masked-LM distribution restricted to the set.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptlab.device import autocast
from gptlab.errors import GptlabError
from gptlab.tokenizer import MASK

BLANK = re.compile(r"_{3,}")
_WORDLIKE = re.compile(r"^ ?(?:[A-Za-z][A-Za-z']*|[\u3400-\u9fff]+)$")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _mask_id(tok) -> int:
    m = tok.special_id(MASK)
    if m is None:
        raise GptlabError("this run's tokenizer has no <|mask|> token; BERT fill needs one")
    return m


def _invalid_ids(tok, vocab: int) -> torch.Tensor:
    """Ids a blank may never be filled with: special tokens and the padding rows of the embedding."""
    bad = torch.zeros(vocab, dtype=torch.bool)
    bad[list(tok.special_ids)] = True
    bad[tok.vocab_size:] = True
    return bad


# ----- BERT: masked prediction and pseudo-likelihood ------------------------------------------------
def _crop(ids: list[int], positions: list[int], block: int) -> tuple[list[int], list[int]]:
    """Cut ``ids`` to the window, keeping ``positions`` inside and centred where possible."""
    if len(ids) <= block:
        return ids, positions
    lo, hi = min(positions), max(positions) + 1
    spare = block - (hi - lo)
    if spare < 0:
        raise GptlabError("the blank does not fit the model's context window")
    start = max(0, min(lo - spare // 2, len(ids) - block))
    return ids[start:start + block], [p - start for p in positions]


@torch.inference_mode()
def masked_logprobs(model, seqs: list[list[int]], positions: list[int], batch_size: int = 64) -> torch.Tensor:
    """log p(. | seq) at one position per sequence, [N, V]. Bidirectional attention means padding would
    change the result, so sequences are batched only with others of the same length."""
    out = torch.empty(len(seqs), model.config.vocab_size)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(len(s), []).append(i)
    device = _device(model)
    for _, idx in sorted(groups.items()):
        for a in range(0, len(idx), batch_size):
            chunk = idx[a:a + batch_size]
            x = torch.tensor([seqs[i] for i in chunk], dtype=torch.long, device=device)
            with autocast(device):
                h = model.hidden(x)
            pos = torch.tensor([positions[i] for i in chunk], device=device)
            h = h[torch.arange(len(chunk), device=device), pos]
            out[chunk] = F.log_softmax(model.lm_logits(h).float(), dim=-1).cpu()
    return out


def pseudo_loglik(model, mask_id: int, requests: list[tuple[list[int], list[int]]],
                  batch_size: int = 64) -> list[float]:
    """PLL of the tokens at ``positions`` of each ``ids``: sum over them of log p(token | the rest),
    each scored with only itself masked. One masked copy per scored token, all batched."""
    block = model.config.block_size
    seqs, pos, owner, target = [], [], [], []
    for r, (ids, positions) in enumerate(requests):
        ids, positions = _crop(list(ids), list(positions), block)
        for p in positions:
            s = list(ids)
            target.append(s[p])
            s[p] = mask_id
            seqs.append(s)
            pos.append(p)
            owner.append(r)
    lp = masked_logprobs(model, seqs, pos, batch_size)
    scores = [0.0] * len(requests)
    for j, r in enumerate(owner):
        scores[r] += float(lp[j, target[j]])
    return scores


# ----- sentences with blanks ---------------------------------------------------------------------
@dataclass
class Slot:
    """A blank and its surroundings: ``left`` + [space] + candidate + ``right``."""
    left: str
    right: str
    space: bool      # the blank followed a space: candidates are words that carry their own space

    def text(self, cand: str) -> str:
        return self.left + (" " if self.space else "") + cand + self.right

    def cand_ids(self, tok, cand: str) -> list[int]:
        return tok.encode((" " if self.space else "") + cand)


def split_blanks(text: str) -> list[str]:
    """Segments around the blanks: N blanks -> N + 1 segments."""
    parts = BLANK.split(text)
    if len(parts) < 2:
        raise GptlabError("the sentence has no blank: write ___ (three underscores) where a word is missing")
    return parts


def _slot(filled_left: str, right: str) -> Slot:
    space = filled_left.endswith(" ")
    return Slot(filled_left.rstrip(" ") if space else filled_left, right, space)


def _start_filter(tok, vocab: int, space: bool) -> torch.Tensor:
    """First-token rule: after a space the word must start with one (as in training), else not."""
    bad = _invalid_ids(tok, vocab)
    for i in range(min(vocab, tok.vocab_size)):
        if not bad[i]:
            starts = tok.decode([i]).startswith(" ")
            if starts != space:
                bad[i] = True
    return bad


def _clean(cand: str) -> str | None:
    c = cand.strip()
    if not c or "\ufffd" in c or "\n" in c or "___" in c:
        return None
    return c


def _softmax_rank(scored: dict[str, float], k: int) -> list[dict]:
    if not scored:
        return []
    names = list(scored)
    s = torch.tensor([scored[n] for n in names], dtype=torch.float64)
    p = torch.softmax(s, 0)
    order = torch.argsort(s, descending=True)[:k].tolist()
    return [{"text": names[i], "prob": float(p[i]), "score": float(s[i])} for i in order]


def _extend_beams(beams: list[tuple[list[int], float]], logprobs: torch.Tensor,
                  beam: int) -> list[tuple[list[int], float]]:
    """One beam-search step: each (ids, score) beam grows by its ``beam`` likeliest next tokens
    (row i of ``logprobs`` belongs to beam i); the ``beam`` best sums survive."""
    nxt = []
    for (b, s), row in zip(beams, logprobs):
        top = torch.topk(row, beam)
        nxt.extend((b + [int(t)], s + float(v)) for v, t in zip(top.values, top.indices))
    return sorted(nxt, key=lambda x: -x[1])[:beam]


def right_ids(tok, parts_after: list[str], mask: int) -> list[int]:
    """Tokens after a blank: its right segment, then each later blank as ONE mask and its segment."""
    ids = tok.encode(parts_after[0])
    for seg in parts_after[1:]:
        ids += [mask] + tok.encode(seg)
    return ids


@torch.inference_mode()
def bert_candidates(model, tok, slot: Slot, right: list[int], beam: int = 8,
                    max_masks: int = 3) -> dict[str, float]:
    """{candidate: PLL} for one blank from 1..max_masks mask tokens (see the module doc)."""
    mask = _mask_id(tok)
    V = model.config.vocab_size
    left = [tok.eot_id] + tok.encode(slot.left)
    first_bad = _start_filter(tok, V, slot.space)
    any_bad = _invalid_ids(tok, V)
    found: dict[tuple[int, ...], float] = {}
    for n in range(1, max_masks + 1):
        beams: list[tuple[list[int], float]] = [([], 0.0)]
        for i in range(n):
            seqs = [left + b + [mask] * (n - i) + right for b, _ in beams]
            seqs_pos = [_crop(sq, [len(left) + i], model.config.block_size) for sq in seqs]
            lp = masked_logprobs(model, [a for a, _ in seqs_pos], [p[0] for _, p in seqs_pos])
            lp[:, first_bad if i == 0 else any_bad] = -math.inf
            beams = _extend_beams(beams, lp, beam)
        for b, _ in beams:
            found.setdefault(tuple(b), 0.0)
    keys = list(found)
    reqs = [(left + list(b) + right, list(range(len(left), len(left) + len(b)))) for b in keys]
    pll = pseudo_loglik(model, mask, reqs)
    out: dict[str, float] = {}
    for b, s in zip(keys, pll):
        c = _clean(tok.decode(list(b)))
        if c is not None and (c not in out or s > out[c]):
            out[c] = s
    return out


def bert_rank_given(model, tok, slot: Slot, right_ids: list[int], cands: list[str]) -> dict[str, float]:
    mask = _mask_id(tok)
    left = [tok.eot_id] + tok.encode(slot.left)
    reqs = []
    for c in cands:
        ids = slot.cand_ids(tok, c)
        reqs.append((left + ids + right_ids, list(range(len(left), len(left) + len(ids)))))
    return dict(zip(cands, pseudo_loglik(model, mask, reqs)))


# ----- GPT: candidates from the left context, ranked by sentence likelihood --------------------------
def frequent_words(tok, space: bool, limit: int = 200) -> list[str]:
    """Whole-word tokens in merge order (BPE learns frequent strings first)."""
    out = []
    for i in range(tok.vocab_size):
        if i in tok.special_ids:
            continue
        s = tok.decode([i])
        if _WORDLIKE.match(s) and s.startswith(" ") == space:
            w = s.strip()
            if len(w) >= 2 or not w.isascii():
                out.append(w)
        if len(out) >= limit:
            break
    return out


@torch.inference_mode()
def gpt_left_candidates(model, tok, slot: Slot, beam: int = 20, max_tokens: int = 3) -> list[str]:
    """Every 1..max_tokens-token prefix kept by a beam search from the left context."""
    V = model.config.vocab_size
    first_bad = _start_filter(tok, V, slot.space)
    any_bad = _invalid_ids(tok, V)
    left = ([tok.eot_id] + tok.encode(slot.left))[-(model.config.block_size - max_tokens):]
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    found: list[str] = []
    device = _device(model)
    for i in range(max_tokens):
        x = torch.tensor([left + b for b, _ in beams], dtype=torch.long, device=device)
        with autocast(device):
            lp = F.log_softmax(model.lm_logits(model.hidden(x)[:, -1]).float(), -1).cpu()
        lp[:, first_bad if i == 0 else any_bad] = -math.inf
        beams = _extend_beams(beams, lp, beam)
        for b, _ in beams:
            c = _clean(tok.decode(b))
            if c is not None and c not in found:
                found.append(c)
    return found


def gpt_rank(model, tok, slot: Slot, cands: list[str]) -> dict[str, float]:
    """{candidate: log p(whole sentence with the candidate in the blank)}."""
    from gptlab.evals.perplexity import score_continuations
    conts, keep = [], []
    for c in cands:
        ids = tok.encode(slot.text(c))
        if ids:
            conts.append(ids[-model.config.block_size:])
            keep.append(c)
    scores = score_continuations(model, [[tok.eot_id]] * len(conts), conts)
    return {c: s for c, (s, _) in zip(keep, scores)}


# ----- the command's work -------------------------------------------------------------------------
@torch.inference_mode()
def fill(model, tok, text: str, top_k: int = 5, candidates: list[str] | None = None) -> dict:
    """{"blanks": [[{"text", "prob", "score"}, ...] per blank], "filled": best sentence, "method"}."""
    is_bert = not model.config.causal
    parts = split_blanks(text)
    if candidates is not None:
        candidates = [c.strip() for c in candidates if c.strip()]
        if not candidates:
            raise GptlabError("--candidates: give at least one non-empty candidate")
    filled_left = parts[0]
    blanks = []
    for j in range(1, len(parts)):
        slot = _slot(filled_left, parts[j])
        if is_bert:
            right = right_ids(tok, parts[j:], _mask_id(tok))
            if candidates is not None:
                scored = bert_rank_given(model, tok, slot, right, candidates)
            else:
                scored = bert_candidates(model, tok, slot, right)
        else:
            # The sentence is scored up to the next blank: later blanks are still unknown.
            if candidates is not None:
                cands = candidates
            else:
                cands = gpt_left_candidates(model, tok, slot)
                cands += [w for w in frequent_words(tok, slot.space) if w not in cands]
            scored = gpt_rank(model, tok, slot, cands)
        ranked = _softmax_rank(scored, top_k)
        blanks.append(ranked)
        best = ranked[0]["text"] if ranked else ""
        filled_left = slot.text(best)
    method = ("bert: 1-3 mask tokens per blank, ranked by pseudo-log-likelihood" if is_bert else
              "gpt: candidates ranked by the log-likelihood of the sentence")
    return {"blanks": blanks, "filled": filled_left, "method": method}
