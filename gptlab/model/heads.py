"""Task heads on top of a GPT: what fine-tuning, reward models and PPO's value function read.

Each wrapper keeps the transformer as ``.gpt`` so run folders store it under the usual names and the
head under ``heads.<name>.*`` (see gptlab.runs.gpt_state); any consumer of the run can
still load the bare GPT.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gptlab.model.gpt import GPT


def last_token_index(lengths: torch.Tensor) -> torch.Tensor:
    return (lengths - 1).clamp(min=0)


def gather_last(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Hidden state at each row's last real token (rows are right-padded): [B, T, C] -> [B, C]."""
    idx = last_token_index(lengths).to(h.device)
    return h[torch.arange(h.size(0), device=h.device), idx]


READS = ("last_token", "response_tokens")


class ScalarHeadModel(nn.Module):
    """GPT + a linear scalar head. As PPO's value function it reads every position (``values``). As a
    reward model it reads either

    * ``last_token``: the head at the final token (InstructGPT), or
    * ``response_tokens``: the head at every token of the final assistant response (the tokens after
      the last ``response_start_id``), summed, plus the bias once.

    Why the sum: two responses to one prompt that share a prefix get exactly the same per-token
    scores there (attention is causal), so their score difference, which is all the ranking loss
    sees, comes only from the tokens where they differ. A verdict on "58 + 77 = 134." is then learnt
    at the answer token itself, next to the sum, instead of being carried to the end of the turn.

    ``logprob_feature`` adds a learnt weight x the answer's confidence, -log(1 + NLL) with NLL the
    answer's negative log-likelihood under the model's own LM head (kept from the SFT run), to either
    score. A linear head on h_t cannot compute how likely token t was (that is h_{t-1} . E[x_t]), yet
    on the SFT's own samples that likelihood already agrees with the labeler far more often than a
    trained last-token head does. The log1p squashes the long tail (a
    rambling answer's NLL runs into the hundreds), which would otherwise drive the fitted weight to
    ~0 under label noise; the order of the answers is unchanged. The weight is fitted before
    training (gptlab.train.reward.fit_logprob_weight).
    """

    head_name = "score_head"

    def __init__(self, gpt: GPT, init_zero: bool = True, reads: str = "last_token",
                 response_start_id: int | None = None, logprob_feature: bool = False):
        super().__init__()
        if reads not in READS:
            raise ValueError(f"reads must be one of {READS}, not {reads!r}")
        if (reads == "response_tokens" or logprob_feature) and response_start_id is None:
            raise ValueError("a head that reads the response tokens needs the response start token id")
        self.gpt = gpt
        self.reads, self.response_start_id = reads, response_start_id
        self.score_head = nn.Linear(gpt.config.n_embd, 1)
        if init_zero:
            nn.init.zeros_(self.score_head.weight)
            nn.init.zeros_(self.score_head.bias)
        self.logprob_weight = nn.Parameter(torch.zeros(1)) if logprob_feature else None

    @property
    def config(self):
        return self.gpt.config

    def values(self, idx: torch.Tensor) -> torch.Tensor:
        """Scalar at every position: [B, T]."""
        return self.score_head(self.gpt.hidden(idx)).squeeze(-1).float()

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One score per row (rows are right-padded to ``lengths``): [B]."""
        h = self.gpt.hidden(idx)
        mask = response_mask(idx, lengths, self.response_start_id) if self.response_start_id is not None else None
        if self.reads == "last_token":
            score = self.score_head(gather_last(h, lengths)).squeeze(-1).float()
        else:
            per_token = (h @ self.score_head.weight.squeeze(0)).float()
            score = (per_token * mask).sum(-1) + self.score_head.bias.float()
        if self.logprob_weight is not None:
            score = score + self.logprob_weight.float() * self._confidence(h, idx, mask)
        return score

    def answer_confidence(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """-log(1 + NLL) of each row's final response under the model's own LM head: [B]."""
        return self._confidence(self.gpt.hidden(idx), idx, response_mask(idx, lengths, self.response_start_id))

    def _confidence(self, h: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.gpt.lm_logits(h[:, :-1]).float(), dim=-1)
        logp = logp.gather(-1, idx[:, 1:].unsqueeze(-1)).squeeze(-1)
        return -torch.log1p(-(logp * mask[:, 1:]).sum(-1))

    def load_head(self, heads: dict[str, torch.Tensor]) -> None:
        self.score_head.load_state_dict({"weight": heads["score_head.weight"], "bias": heads["score_head.bias"]})
        if self.logprob_weight is not None:
            with torch.no_grad():
                self.logprob_weight.copy_(heads["logprob_weight"])


def response_mask(idx: torch.Tensor, lengths: torch.Tensor, start_id: int) -> torch.Tensor:
    """[B, T] 1.0 on the tokens after each row's last ``start_id`` and before its length. A row whose
    start token was cut off (a response longer than the context) counts from its first token."""
    pos = torch.arange(idx.size(1), device=idx.device).unsqueeze(0)
    real = pos < lengths.to(idx.device).unsqueeze(1)
    start = torch.where((idx == start_id) & real, pos, torch.full_like(pos, -1)).max(dim=1, keepdim=True).values
    return ((pos > start) & real).float()


class RewardEnsemble(nn.Module):
    """Several reward models read as one: the members' mean score minus ``penalty`` x their spread.

    Over-optimisation climbs where a single learned reward is wrong. Where the members disagree, at
    least one of them is, so the policy is paid less for those answers (uncertainty-weighted
    optimisation, Coste et al. 2023). Members that share an init and rankings tend to err together,
    which the penalty cannot see. ``penalty`` 0 is the plain mean; the
    spread is the population std over members."""

    def __init__(self, members: list[ScalarHeadModel], penalty: float = 1.0):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two reward models")
        self.members = nn.ModuleList(members)
        self.penalty = penalty

    @property
    def config(self):
        return self.members[0].config

    def member_scores(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[M, B]: every member's score of every row."""
        return torch.stack([m(idx, lengths) for m in self.members])

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        s = self.member_scores(idx, lengths)
        return s.mean(0) - self.penalty * s.std(0, correction=0)


class ClassifierModel(nn.Module):
    """GPT-1 fine-tuning: a linear head on the final hidden state of the extract token."""

    def __init__(self, gpt: GPT, n_classes: int, dropout: float = 0.1):
        super().__init__()
        self.gpt = gpt
        self.clf_dropout = nn.Dropout(dropout)
        self.clf_head = nn.Linear(gpt.config.n_embd, n_classes)
        nn.init.normal_(self.clf_head.weight, std=0.02)
        nn.init.zeros_(self.clf_head.bias)

    @property
    def config(self):
        return self.gpt.config

    def features(self, idx: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(extract-token features [B, C], LM logits [B, T, V]) in one forward pass."""
        h = self.gpt.hidden(idx)
        return gather_last(h, lengths), self.gpt.lm_logits(h)

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.clf_head(self.clf_dropout(feats)).float()
