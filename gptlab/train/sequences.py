"""Token-sequence plumbing shared by SFT, the reward model, DPO and PPO.

* ``pad_batch``: right-pad variable-length sequences into one tensor (heads read the last real token).
* ``pack``: SFT's sequence packing: whole conversations laid end to end (separated by end-of-text) into
  fixed windows, so a batch wastes few positions on padding; the assistant-only loss mask travels with
  the tokens and becomes the targets (-100 everywhere else).
* ``response_ids`` / ``encode_rankings`` / ``collate_rankings``: a prompt plus each of K ranked
  responses, rendered with the chat template; a batch element is ONE prompt with all its responses and
  all C(K,2) (winner, loser) pairs between them (InstructGPT's batching).
* ``sequence_logprobs`` / ``teacher_forced_logprobs``: teacher-forced log-probabilities in fp32, what DPO and
  PPO compare between the policy and the frozen reference.
* ``EpochSampler``: batches that walk through shuffled epochs, so "one epoch" means each example once.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

from gptlab.errors import GptlabError
from gptlab.tokenizer.chat_template import render, render_prompt
from gptlab.train.rl import token_logprobs


# ----- padding and packing -------------------------------------------------------------------------
def pad_batch(seqs: list[list[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], lengths [B]): each sequence left-aligned, right-padded with ``pad_id``."""
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    T = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) > T:
            raise ValueError(f"sequence of {len(s)} tokens is longer than {T}")
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def pack(seqs_with_masks, block_size: int, sep_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack (ids, mask) conversations into windows: (inputs [N, block_size], targets [N, block_size]).

    Each conversation is followed by ``sep_id`` (end of text; never a target) and placed whole in the
    current window when it fits, else it starts the next one, so a conversation is not cut from its
    own prompt. One longer than a window is split over consecutive windows that overlap by one token,
    which predicts each of its tokens exactly once. ``targets[t]`` is the token after ``inputs[t]``
    where that token's mask is 1, else -100; positions past a window's end hold ``pad_id`` / -100.
    """
    cap = block_size + 1            # a window of cap tokens gives block_size (input, target) pairs
    windows: list[tuple[list[int], list[int]]] = []
    cur_ids: list[int] = []
    cur_mask: list[int] = []

    def flush():
        nonlocal cur_ids, cur_mask
        if len(cur_ids) >= 2:
            windows.append((cur_ids, cur_mask))
        cur_ids, cur_mask = [], []

    for ids, mask in seqs_with_masks:
        if len(ids) != len(mask):
            raise ValueError("ids and mask differ in length")
        ids, mask = list(ids) + [sep_id], [int(bool(m)) for m in mask] + [0]
        if len(ids) > cap:
            flush()
            for start in range(0, len(ids) - 1, block_size):
                windows.append((ids[start:start + cap], mask[start:start + cap]))
            continue
        if len(cur_ids) + len(ids) > cap:
            flush()
        cur_ids += ids
        cur_mask += mask
    flush()
    # A window with nothing to learn (e.g. the user half of a very long conversation) is dropped.
    windows = [w for w in windows if any(w[1][1:])]
    if not windows:
        raise GptlabError("nothing to pack: no conversation has any assistant tokens")
    x = torch.full((len(windows), block_size), pad_id, dtype=torch.long)
    y = torch.full((len(windows), block_size), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(windows):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        tgt = torch.tensor(ids[1:])
        y[i, :n] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), tgt, torch.full_like(tgt, -100))
    return x, y


# ----- log-probabilities -----------------------------------------------------------------------------
def teacher_forced_logprobs(model, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= 1, teacher-forced, in fp32: [B, T-1].

    ``model`` is a GPT (or a DDP wrapper of one): ``model(idx)`` returns (logits, loss); the
    log-probabilities are rl.token_logprobs of those logits (temperature as there).
    """
    logits, _ = model(ids[:, :-1])
    return token_logprobs(logits, ids[:, 1:], temperature)


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sum of log p of the masked tokens of each row: [B] fp32.

    ``mask[b, t] = 1`` marks ``ids[b, t]`` as a scored token (the response); position 0 can never be
    scored (nothing predicts it) and padding must be 0.
    """
    lp = teacher_forced_logprobs(model, ids, temperature)
    return (lp * mask[:, 1:].to(lp.dtype)).sum(-1)


# ----- preference data ------------------------------------------------------------------------------
def response_ids(tok, prompt: list[dict], response: str, block_size: int | None = None) -> tuple[list[int], list[int]]:
    """Prompt + one assistant response rendered with the chat template, and a mask of the response's
    tokens (content and end-of-turn, not earlier assistant turns). Too long for ``block_size``: the
    oldest tokens are cut, since the reward model reads the final token and DPO scores the response."""
    head = render_prompt(tok, prompt)
    ids, _ = render(tok, list(prompt) + [{"role": "assistant", "content": response}])
    if ids[:len(head)] != head:   # the template renders each message on its own, so this always holds
        raise RuntimeError("chat template is not prefix-stable")
    mask = [0] * len(head) + [1] * (len(ids) - len(head))
    if block_size is not None and len(ids) > block_size:
        ids, mask = ids[-block_size:], mask[-block_size:]
        mask[0] = 0   # the first kept token has no context to be predicted from
    return ids, mask


@dataclass
class EncodedRanking:
    """One prompt's K responses as token ids, and every (winner, loser) pair between them."""
    ids: list[list[int]]
    masks: list[list[int]]
    pairs: list[tuple[int, int]]
    ref_logps: list[float] | None = None   # DPO: the frozen reference's log p of each response
    best: int = 0                          # index of the top-ranked response


def encode_rankings(tok, rankings, block_size: int) -> list[EncodedRanking]:
    """gptlab.data.formats.Ranking records -> EncodedRanking (pairs from formats.expand_pairs).

    A pair of two identical responses says nothing about preference (sampled responses often repeat),
    nor does a pair the labeler marked as tied; both are left out, and a prompt left with no pairs is
    left out altogether.
    """
    from gptlab.data.formats import expand_pairs
    out = []
    for r in rankings:
        pairs = [(w, l) for w, l in expand_pairs(r)
                 if r.responses[w] != r.responses[l] and frozenset((w, l)) not in r.ties]
        if not pairs:
            continue
        enc = [response_ids(tok, r.prompt, resp, block_size) for resp in r.responses]
        out.append(EncodedRanking([e[0] for e in enc], [e[1] for e in enc], pairs, best=r.ranking[0]))
    return out


class RankingBatches:
    """The data side the reward model and DPO share: a training batch is ``batch_size`` prompts, each
    with all its ranked responses, drawn epoch by epoch across ranks (the position is stage state, so
    resume continues with the next batch); evaluation walks the whole held-out set itself, so there
    is no "val" batch."""

    def __init__(self, train_items: list[EncodedRanking], val_items: list[EncodedRanking], batch_size: int,
                 seed: int, pad_id: int):
        self.items, self.val_items = train_items, val_items
        self.batch_size, self.pad_id = batch_size, pad_id
        self.sampler = EpochSampler(len(train_items), seed)
        self.counter = 0

    def get_batch(self, split, gen):
        if split != "train":
            return None   # evaluate() goes over the whole held-out set
        rank, world = dist_rank_world()
        idx = self.sampler.batch(self.counter * world + rank, self.batch_size)
        self.counter += 1
        return self.collate([self.items[i] for i in idx], self.pad_id)

    def collate(self, items, pad_id: int) -> dict:
        """One batch of items; the process reward model's stage collates solutions instead."""
        return collate_rankings(items, pad_id)

    def count_tokens(self, batch) -> int:
        return int(batch["lengths"].sum())

    def state(self):
        return {"counter": self.counter}

    def load_state(self, d):
        self.counter = int(d.get("counter", 0))


def require_pairs(items: list[EncodedRanking], data) -> None:
    """A one-line error when encode_rankings left nothing to train on."""
    if not items:
        raise GptlabError(f"--data {data}: no training prompt has two different responses to compare")


def collate_rankings(items: list[EncodedRanking], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of prompts: every response of every prompt is one row (scored once); ``pairs`` index
    rows, and ``group`` says which batch element (prompt) each pair belongs to."""
    seqs, masks, pairs, group, ref = [], [], [], [], []
    for g, item in enumerate(items):
        base = len(seqs)
        seqs += item.ids
        masks += item.masks
        pairs += [(base + w, base + l) for w, l in item.pairs]
        group += [g] * len(item.pairs)
        if item.ref_logps is not None:
            ref += item.ref_logps
    ids, lengths = pad_batch(seqs, pad_id)
    mask, _ = pad_batch(masks, 0, ids.shape[1])
    batch = {"ids": ids, "lengths": lengths, "mask": mask,
             "pairs": torch.tensor(pairs, dtype=torch.long).view(-1, 2),
             "group": torch.tensor(group, dtype=torch.long),
             "n_groups": torch.tensor(len(items))}
    if ref:
        if len(ref) != len(seqs):
            raise ValueError("some rankings in the batch have no reference log-probs")
        batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
    return batch


def group_mean(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of ``values`` within each group, then the mean over groups: each prompt weighs the same
    whatever its K (InstructGPT normalises a prompt's loss by 1/C(K,2))."""
    n = int(n_groups)
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, group, values)
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, group, torch.ones_like(values))
    return (sums / counts.clamp(min=1))[counts > 0].mean()


# ----- splitting and sampling -----------------------------------------------------------------------
def heldout_by_hash(items: list, key, fraction: float, salt: str = "") -> tuple[list, list]:
    """(train, held-out): an item is held out by a hash of ``key(item)`` (e.g. its prompt), so the same
    prompt never lands on both sides and the split does not move when the file grows."""
    if not 0 <= fraction < 1:
        raise GptlabError("--val-fraction must be in [0, 1)")
    train, val = [], []
    for it in items:
        h = int(hashlib.sha256((salt + json.dumps(key(it), sort_keys=True)).encode()).hexdigest()[:12], 16)
        (val if h / 16 ** 12 < fraction else train).append(it)
    if fraction > 0 and not val and len(train) >= 2:
        val.append(train.pop())   # tiny files: keep at least one held-out item
    return train, val


class EpochSampler:
    """Batches of indices walking through a fresh shuffle of range(n) per epoch.

    Batch number g covers positions g*B .. g*B+B-1 of the endless sequence perm(epoch 0), perm(epoch 1),
    ...; each permutation is seeded by (seed, epoch). The stage keeps the counter g in its checkpoint
    state, so a resumed run continues with the very next batch.
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise GptlabError("no training examples")
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def batch(self, g: int, batch_size: int) -> list[int]:
        out = []
        for pos in range(g * batch_size, (g + 1) * batch_size):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out


def steps_for_epochs(epochs: float, n_examples: int, batch_size: int, grad_accum: int, world: int = 1) -> int:
    """Optimizer steps that show each example ``epochs`` times."""
    return max(1, math.ceil(epochs * n_examples / (batch_size * grad_accum * world)))


def dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
