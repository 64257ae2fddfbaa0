"""The arithmetic of PPO for RLHF, as small pure functions on tensors (tested on hand-computed examples).

Conventions: every per-token tensor is [B, T] over positions of one right-padded batch; ``mask`` is 1
where position t is an *action* (a response token the policy chose) and 0 elsewhere (prompt, padding).
Each row's actions are one contiguous run, which is what GAE's backward recursion assumes.

References: Ziegler et al. 2019 / Stiennon et al. 2020 / Ouyang et al. 2022 (per-token KL penalty, the
adaptive controller), Schulman et al. 2017 (clipped surrogate), Schulman et al. 2016 (GAE), Huang et al.
"The N Implementation Details of RLHF with PPO" (whitening, value clipping, EOS penalty, temperature).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError


# ----- masked statistics -----------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries of the whole batch; positions outside the mask -> 0.

    ``shift_mean=False`` only rescales (what rewards get in some implementations: keeps their sign).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ----- log-probabilities -------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(labels | ...) from logits [B, T, V] -> [B, T]. Logits are divided by the sampling
    temperature first: the rollout sampled from softmax(logits / T), so that is the policy whose
    probabilities PPO's ratio and the KL must use (else the KL is biased, even negative)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) at every position: [B, T, V] -> [B, T]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----- rewards -------------------------------------------------------------------------------------------
def last_action_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last action (0 for a row without any)."""
    T = mask.size(1)
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.zeros_like(pos)).max(dim=1).values


def kl_penalty_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                       mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * (log pi - log pi_ref) at every action, plus the sequence's score
    (reward model, or the EOS penalty) at its last action. Returns (rewards, kl) both [B, T]."""
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = last_action_index(mask)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    has_action = mask.sum(1) > 0
    rewards[rows[has_action], last[has_action]] += scores[has_action].to(rewards.dtype)
    return rewards, kl


def apply_missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Responses that never emitted end-of-turn get ``penalty`` instead of their score (the "EOS trick":
    a truncated answer must never look good to the reward model). ``penalty=None`` leaves scores alone."""
    if penalty is None:
        return scores
    return torch.where(ended.bool(), scores, torch.full_like(scores, float(penalty)))


def llama2_combine(helpful: torch.Tensor, safety: torch.Tensor, flagged: torch.Tensor,
                   threshold: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 2's reward from a helpfulness and a safety reward model (Touvron et al. 2023, eq. 1-2):
    the safety score where the prompt is flagged unsafe or the safety model's probability that the
    answer is safe, sigmoid(R_s), is below ``threshold``; the helpfulness score everywhere else.

    Scores are the models' logits, so Llama 2's logit(R_c) is the chosen logit itself; whitening
    follows in PPO's reward normalisation. Returns (combined score, 1 where safety was used)."""
    use_safety = flagged.bool() | (torch.sigmoid(safety.float()) < threshold)
    return torch.where(use_safety, safety.float(), helpful.float()), use_safety.float()


# ----- advantages --------------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's actions; (advantages, returns) [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last action is 0: the episode ends),
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V (the value function's regression target).
    """
    mask = mask.to(values.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in range(T - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # Outside the actions nothing carries back: the next action run (if any) starts fresh.
        next_value = values[:, t] * m
        next_adv = a * m
    returns = (adv + values) * mask
    return adv, returns


def group_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                     group: int, normalize: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE leave-one-out (RLOO, Ahmadian et al. 2024): rows come in runs of ``group`` samples of
    the same prompt; each sample's return is its score minus beta x its summed KL, and its advantage is
    that return minus the mean return of the other ``group - 1`` samples, given to every action.

    A per-prompt baseline needs no value model: on a checkable task most prompts are answered alike
    by every sample, so their advantages are 0 and only the prompts where samples differ teach.

    ``normalize`` divides by the std over the batch's sequences and does not shift: the advantages
    already sum to 0 within every group. Token-level whitening (``whiten``) must not be used here:
    its mean is weighted by length, so subtracting it gives every prompt whose samples all scored
    alike the same nonzero advantage, pushing whole rollouts up or down at random.
    """
    if group < 2 or scores.numel() % group:
        raise GptlabError(f"group_advantages needs rows in groups of >= 2 (got {scores.numel()} rows, group {group})")
    ret = (scores.to(kl.dtype) - beta * (kl * mask).sum(1)).view(-1, group)
    baseline = (ret.sum(1, keepdim=True) - ret) / (group - 1)
    adv = (ret - baseline).reshape(-1, 1)
    if normalize and adv.numel() > 1:
        adv = adv / (adv.std() + eps)
    return adv * mask.to(kl.dtype)


def process_advantages(step_rewards: list[list[float]], step_ends: list[list[int]], mask: torch.Tensor,
                       group: int, eps: float = 1e-8) -> torch.Tensor:
    """Process supervision with a group baseline (DeepSeekMath's GRPO, section 4.1.3): every step
    reward is normalised by the mean and std of all step rewards of its group (the samples of one
    prompt), and an action's advantage is the sum of the normalised rewards of the steps that end at
    or after it. A step ends at token index ``e`` of the row; the action choosing that token sits at
    mask position e - 1, so the step's reward reaches actions 0 .. e - 1.

    With one step per row at its final token this is outcome supervision (the normalised score at
    every action): the two differ only in where credit goes."""
    B, T = mask.shape
    if group < 2 or B % group:
        raise GptlabError(f"process_advantages needs rows in groups of >= 2 (got {B} rows, group {group})")
    adv = torch.zeros(B, T, dtype=torch.float32)
    for g in range(0, B, group):
        flat = [r for i in range(g, g + group) for r in step_rewards[i]]
        if len(flat) < 2:
            continue
        mean = sum(flat) / len(flat)
        std = (sum((r - mean) ** 2 for r in flat) / len(flat)) ** 0.5
        for i in range(g, g + group):
            for r, e in zip(step_rewards[i], step_ends[i]):
                adv[i, :max(0, min(e, T))] += (r - mean) / (std + eps)
    return adv * mask.to(adv.dtype)


# ----- losses --------------------------------------------------------------------------------------------
def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate: mean over actions of max(-A * r, -A * clip(r, 1-eps, 1+eps)),
    r = pi / pi_old. Also returns the clip fraction and two estimates of KL(pi_old || pi)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),        # Schulman's k2 estimator
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None) -> tuple[torch.Tensor, dict]:
    """0.5 * mean over actions of max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old)."""
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(err, mask), {"vf_clipfrac": torch.zeros(())}
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, {"vf_clipfrac": masked_mean((err_clipped > err).float(), mask).detach()}


# ----- KL coefficient ------------------------------------------------------------------------------------
class FixedKLController:
    def __init__(self, beta: float):
        if beta < 0:
            raise GptlabError("--beta must be >= 0")
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon,
    where ``n`` is the number of episodes since the last update. Raises beta when the policy drifts past
    the target KL, lowers it when the policy stays closer."""

    def __init__(self, init_beta: float, target: float, horizon: int = 10000, max_error: float = 0.2):
        if target <= 0:
            raise GptlabError("--kl-target must be positive")
        if horizon < 1:
            raise GptlabError("--kl-horizon must be at least 1")
        self.beta, self.target, self.horizon, self.max_error = float(init_beta), float(target), horizon, max_error

    def update(self, current_kl: float, n_steps: int) -> None:
        error = max(-self.max_error, min(self.max_error, current_kl / self.target - 1.0))
        self.beta *= 1.0 + error * n_steps / self.horizon


# ----- EMA of weights --------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)
