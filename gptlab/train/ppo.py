"""PPO against a reward model with a per-token KL penalty and the pre-training mix (InstructGPT's PPO-ptx).

    gptlab ppo --init SFT_RUN --reward-model RM_RUN --prompts prompts.jsonl --out runs/ppo

Up to four models: the policy (initialised from SFT, trained), the reference policy (SFT, frozen), the
reward model (frozen) and, with ``--baseline value``, a value model (initialised from the reward model). One optimizer step of
the shared training loop is one PPO minibatch; when the rollout buffer's ``ppo_epochs x minibatches``
are used up, ``get_batch`` samples a fresh buffer of ``rollout_batch`` prompts with the generation
engine (KV cache) on the current policy, scores it, and computes advantages:

    reward_t = -beta * (log pi(a_t) - log pi_ref(a_t)) + [t is last] * RM(prompt, response)
    --baseline rloo (default): each prompt is sampled --samples G times; A = return - mean return of
    the prompt's other G-1 samples, divided by its std over the buffer's sequences, never shifted; only
    groups whose samples scored differently are kept, and more prompts are sampled to fill the buffer
    --baseline value (InstructGPT): A = GAE(gamma=1, lambda=0.95) against a value model started from
    the reward model, whitened over the buffer; returns = A + V_old
    loss = clipped policy loss + vf_coef * clipped value loss + ptx_coef * LM loss on pre-training text
    (by default the corpora the --init chain was pre-trained on)

Dropout is switched off in all four models (it would make log pi differ between rollout and update).
The output folder is an ordinary GPT run (config stage "ppo") holding the policy, or its EMA.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from gptlab import runs
from gptlab.device import autocast
from gptlab.errors import GptlabError
from gptlab.io import atomic_write_json, read_json
from gptlab.model.gpt import GPT
from gptlab.model.heads import RewardEnsemble, ScalarHeadModel
from gptlab.train import rl
from gptlab.train.args import add_ptx_data_arg, add_train_args, ptx_sources, train_config_from_args
from gptlab.train.heldout import encode_prompts, generate, heldout_metrics, score_sequences
from gptlab.train.loop import train

PLOT_KEYS = ["reward", "kl", "beta", "entropy", "clipfrac", "approx_kl", "value_loss", "policy_loss",
             "ptx_loss", "response_len", "eos_rate", "mixed_groups", "heldout_accuracy", "heldout_label_score"]


BASELINES = ("rloo", "value")


@dataclass
class PPOOptions:
    rollout_batch: int = 32
    ppo_epochs: int = 2
    minibatch: int = 8
    clip: float = 0.2
    vf_clip: float | None = 0.2
    vf_coef: float = 0.1
    gae_lambda: float = 0.95
    gamma: float = 1.0
    beta: float = 0.02
    kl_target: float | None = None
    kl_horizon: int = 10000
    ptx_coef: float = 1.0
    ptx_batch: int = 8
    temperature: float = 0.4
    max_new_tokens: int = 48
    missing_eos_penalty: float | None = -1.0
    ema: float | None = None
    normalize_reward: bool = True
    eval_n: int = 100
    oracle_reward: bool = False     # score with the programmatic labeler instead of the reward model
    baseline: str = "rloo"          # rloo: leave-one-out over `samples` per prompt; value: a value model + GAE
    samples: int = 8                # rloo: samples per prompt
    combine: str | None = None      # "llama2": a helpfulness and a safety RM (--reward-models help=,safety=)
    safety_threshold: float = 0.15  # llama2: below this sigmoid(safety score) the safety score is used
    safety_families: tuple = ("decline",)   # llama2: prompts of these curriculum families are flagged unsafe

    @property
    def group(self) -> int:
        """Samples per prompt in a rollout: ``samples`` with the leave-one-out baseline, else one."""
        return self.samples if self.baseline == "rloo" else 1

    @property
    def filter_groups(self) -> bool:
        """The leave-one-out baseline trains only on groups whose samples scored differently: a group
        that scored alike has zero advantage everywhere and would only dilute the update."""
        return self.baseline == "rloo"

    def check(self) -> None:
        for name in ("rollout_batch", "ppo_epochs", "minibatch", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise GptlabError(f"--{name.replace('_', '-')} must be at least 1")
        if self.baseline not in BASELINES:
            raise GptlabError(f"--baseline must be one of {', '.join(BASELINES)}")
        if self.baseline == "rloo" and self.samples < 2:
            raise GptlabError("--samples must be at least 2 with --baseline rloo (the baseline is the other samples)")
        if self.rollout_batch % self.group:
            raise GptlabError(f"--rollout-batch ({self.rollout_batch}) must be a multiple of --samples ({self.group})")
        if self.minibatch > self.rollout_batch:
            raise GptlabError(f"--minibatch ({self.minibatch}) is larger than --rollout-batch ({self.rollout_batch})")
        if not self.temperature > 0:
            raise GptlabError("--temperature must be > 0 (PPO needs a stochastic policy)")
        if not 0 < self.clip < 1:
            raise GptlabError("--clip must be in (0, 1)")
        if not 0 <= self.gae_lambda <= 1:
            raise GptlabError("--gae-lambda must be in [0, 1]")
        if self.ema is not None and not 0 < self.ema < 1:
            raise GptlabError("--ema must be in (0, 1)")
        if self.ptx_coef < 0 or self.vf_coef < 0:
            raise GptlabError("--ptx-coef and --vf-coef must be >= 0")


# ----- models ---------------------------------------------------------------------------------------------
def disable_dropout(module: nn.Module) -> None:
    """Dropout off for good, whatever train()/eval() the loop calls later: every nn.Dropout gets p=0 and
    every GPT config dropout=0 (attention dropout reads the config while training)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, GPT):
            m.config.dropout = 0.0


def load_reward(paths: list[str], tok, init: str, penalty: float):
    """The reward PPO optimises: one `gptlab rm` run, or several read as a RewardEnsemble."""
    if penalty < 0:
        raise GptlabError("--ensemble-penalty must be >= 0")
    members = []
    for path in paths:
        rm, rm_tok, _ = runs.load_reward_model(path, flag="--reward-model")
        if not tok.same_as(rm_tok):
            raise GptlabError(f"--reward-model {path} uses a different tokenizer than --init {init}")
        members.append(rm)
    return members[0] if len(members) == 1 else RewardEnsemble(members, penalty)


class PPOModel(nn.Module):
    """What the training loop trains: the policy as ``.gpt`` (so run folders export it under the usual
    names), the value model (None with a group baseline), and optionally an EMA copy of the policy
    (not trained: no gradients)."""

    def __init__(self, policy: GPT, value: ScalarHeadModel | None, ema_decay: float | None = None):
        super().__init__()
        self.gpt = policy
        self.value = value
        self.ema = copy.deepcopy(policy).requires_grad_(False) if ema_decay else None

    def forward(self, idx, ptx_x=None, ptx_y=None):
        """(policy logits [B,T,V], values [B,T] or None, pre-training LM loss or None): one call, so
        DDP and torch.compile see every parameter that gets a gradient."""
        logits = self.gpt.lm_logits(self.gpt.hidden(idx))
        values = self.value.values(idx) if self.value is not None else None
        ptx = None
        if ptx_x is not None:
            _, ptx = self.gpt(ptx_x, ptx_y)
        return logits, values, ptx

    def exported(self) -> GPT:
        return self.ema if self.ema is not None else self.gpt


def _unwrap(model):
    model = getattr(model, "module", model)        # DDP
    return getattr(model, "_orig_mod", model)      # torch.compile


# ----- the stage ----------------------------------------------------------------------------------------
class PPOStage:
    """Rollouts + PPO minibatches for the shared loop (see the module docstring)."""

    name = "ppo"
    plot_keys = PLOT_KEYS

    def __init__(self, model: PPOModel, ref: GPT, rm: ScalarHeadModel, tok, prompt_ids: list[list[int]],
                 opts: PPOOptions, ptx_data=None, eval_items: list[dict] | None = None,
                 eval_ids: list[list[int]] | None = None, prompt_items: list[dict] | None = None,
                 safety_rm: ScalarHeadModel | None = None, prm: ScalarHeadModel | None = None):
        from gptlab.tokenizer.chat_template import end_of_turn_id
        if not prompt_ids:
            raise GptlabError("no usable prompts (every prompt is longer than the context allows)")
        self.model, self.ref, self.rm, self.tok = model, ref, rm, tok
        self.safety_rm, self.safety_share = safety_rm, 0.0
        self.prm = prm          # process supervision: step rewards from a `gptlab prm` run
        if prm is not None and opts.group < 2:
            raise GptlabError("--prm needs --baseline rloo (step rewards are normalised within each prompt's group)")
        if opts.combine == "llama2":
            if safety_rm is None or rm is None:
                raise GptlabError("--combine llama2 needs --reward-models help=RUN,safety=RUN")
            if prompt_items is None or len(prompt_items) != len(prompt_ids):
                raise GptlabError("--combine llama2 needs the prompts' curriculum items (their family flags "
                                  "the unsafe ones)")
            self.flagged = torch.tensor([it.get("family") in opts.safety_families or bool(it.get("unsafe"))
                                         for it in prompt_items])
        self.prompt_ids, self.opts = prompt_ids, opts
        self.prompt_items = prompt_items
        if opts.oracle_reward:
            from gptlab.label.commands import check_auto_items
            if prompt_items is None or len(prompt_items) != len(prompt_ids):
                raise GptlabError("--oracle-reward needs the prompts' curriculum items")
            check_auto_items(prompt_items, "--oracle-reward")
        self.ptx_data = ptx_data if opts.ptx_coef > 0 else None
        self.eval_items, self.eval_ids = eval_items or [], eval_ids or []
        self.end_id = end_of_turn_id(tok)
        self.pad_id = tok.pad_id
        if opts.kl_target is not None:
            self.kl_ctl = rl.AdaptiveKLController(opts.beta, opts.kl_target, opts.kl_horizon)
        else:
            self.kl_ctl = rl.FixedKLController(opts.beta)
        self.reward_mean, self.reward_std = 0.0, 1.0
        self.buffer: dict | None = None
        self.queue: list[list[int]] = []
        self.rollouts = 0
        self.episodes = 0
        self.last_stats: dict = {}
        for m in (model, ref, rm, safety_rm, prm):
            if m is not None:     # rm None: --oracle-reward with a group baseline needs no reward model
                disable_dropout(m)
        ref.requires_grad_(False).eval()
        for m in (rm, safety_rm, prm):
            if m is not None:
                m.requires_grad_(False).eval()

    @property
    def steps_per_rollout(self) -> int:
        return self.opts.ppo_epochs * math.ceil(self.opts.rollout_batch / self.opts.minibatch)

    def _device(self):
        device = next(self.model.gpt.parameters()).device
        self.ref.to(device)
        for m in (self.rm, self.safety_rm, self.prm):
            if m is not None:
                m.to(device)
        return device

    # ----- rollouts ---------------------------------------------------------------------------------
    def _generate(self, policy: GPT, which: torch.Tensor, gen: torch.Generator):
        seeds = torch.randint(0, 2 ** 31 - 1, (len(which),), generator=gen).tolist()
        prompts = [self.prompt_ids[i] for i in which.tolist()]
        comps = generate(policy, self.tok, prompts, self.opts.max_new_tokens, self.opts.temperature, seeds)
        return prompts, comps

    def _scores(self, which: torch.Tensor, prompts, comps, chunk: int = 32) -> torch.Tensor:
        """Raw scores of the sampled answers: the reward model's, or with --oracle-reward the
        labeler's own (the rules the rankings came from: what PPO could reach with a perfect RM)."""
        if self.opts.oracle_reward:
            from gptlab.label.labeler import score
            return torch.tensor([score(self.prompt_items[i], c.text) for i, c in zip(which.tolist(), comps)])
        seqs = [p + c.ids + [self.end_id] for p, c in zip(prompts, comps)]
        if self.prm is not None:
            # The mean step P(right): what the reward curve shows and what tells a group's samples apart
            # for --baseline rloo's filter (a product of many small P(right) is ~0 for every sample).
            return torch.tensor([sum(r) / len(r) if r else 0.0 for r in self._step_rewards(prompts, comps)[1]])
        helpful = score_sequences(self.rm, seqs, self.pad_id, chunk=chunk)
        if self.opts.combine != "llama2":
            return helpful
        safety = score_sequences(self.safety_rm, seqs, self.pad_id, chunk=chunk)
        combined, used = rl.llama2_combine(helpful, safety, self.flagged[which], self.opts.safety_threshold)
        self.safety_share = float(used.mean())
        return combined

    def _step_ends(self, prompt: list[int], comp) -> list[int]:
        """Token index (in prompt + response + end of turn) of the last token of every non-empty line."""
        ends, has_text = [], False
        for j, t in enumerate(comp.ids):
            piece = self.tok.decode([t])
            if "\n" in piece:
                if has_text or piece.split("\n")[0].strip():
                    ends.append(len(prompt) + j)
                has_text = bool(piece.split("\n")[-1].strip())
            elif piece.strip():
                has_text = True
        if has_text:
            ends.append(len(prompt) + len(comp.ids) - (0 if comp.finish_reason == "stop" else 1))
        return ends

    @torch.no_grad()
    def _step_rewards(self, prompts, comps, chunk: int = 32) -> tuple[list[list[int]], list[list[float]]]:
        """(step ends, P(step right) from the PRM) per sample. An answer cut off before its end of turn
        gets 0 for its unfinished last step: it never reached an answer."""
        from gptlab.train.sequences import pad_batch
        device = next(self.prm.parameters()).device
        seqs = [p + c.ids + [self.end_id] for p, c in zip(prompts, comps)]
        ends = [self._step_ends(p, c) for p, c in zip(prompts, comps)]
        rewards = []
        for i in range(0, len(seqs), chunk):
            ids, _ = pad_batch(seqs[i:i + chunk], self.pad_id)
            probs = torch.sigmoid(self.prm.values(ids.to(device)).float()).cpu()
            for j, e in enumerate(ends[i:i + chunk]):
                r = [float(probs[j, k]) for k in e]
                if r and comps[i + j].finish_reason != "stop":
                    r[-1] = 0.0
                rewards.append(r)
        return ends, rewards

    def _pick(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if n <= len(self.prompt_ids):
            return torch.randperm(len(self.prompt_ids), generator=gen)[:n]
        return torch.randint(0, len(self.prompt_ids), (n,), generator=gen)

    @torch.no_grad()
    def calibrate_reward(self, n: int, seed: int) -> tuple[float, float]:
        """Mean and std of RM scores on the reference (SFT) policy's samples: what the reward normalisation
        subtracts and divides by, so the RL reward starts at mean 0, std 1."""
        self._device()
        gen = torch.Generator().manual_seed(seed)
        which = self._pick(n, gen)
        prompts, comps = self._generate(self.ref, which, gen)
        scores = self._scores(which, prompts, comps)
        std = float(scores.std()) if len(scores) > 1 else 1.0
        self.reward_mean, self.reward_std = float(scores.mean()), max(std, 1e-3)
        return self.reward_mean, self.reward_std

    def _mixed_groups(self, gen: torch.Generator, which, prompts, comps, raw, max_rounds: int = 8):
        """--baseline rloo: keep only the groups whose samples scored differently, sampling fresh
        groups (up to ``max_rounds`` rollouts' worth) until a rollout buffer is full.

        Where all G samples of a prompt score alike, leave-one-out advantages are 0 up to the KL term:
        those rows cost a forward and backward pass and teach nothing, and the few prompts that do
        teach end up as a small share of each minibatch. Filling the buffer with mixed groups only
        (DAPO's dynamic sampling, Yu et al. 2025) puts many prompts' signal in every update.
        Returns the kept rows plus the mean reward, count and mixed share over everything sampled.
        """
        o = self.opts
        keep_w, keep_p, keep_c, keep_r = [], [], [], []
        all_raw, n_groups, n_mixed = [raw], 0, 0
        for r in range(max_rounds):
            if r:
                which = self._pick(o.rollout_batch // o.group, gen).repeat_interleave(o.group)
                prompts, comps = self._generate(self.model.gpt, which, gen)
                raw = self._scores(which, prompts, comps, chunk=o.minibatch)
                all_raw.append(raw)
            g = raw.view(-1, o.group)
            mixed = (g.max(1).values - g.min(1).values) > 1e-6
            n_groups, n_mixed = n_groups + len(mixed), n_mixed + int(mixed.sum())
            for i in mixed.nonzero().flatten().tolist():
                rows = range(i * o.group, (i + 1) * o.group)
                keep_w += [int(which[j]) for j in rows]
                keep_p += [prompts[j] for j in rows]
                keep_c += [comps[j] for j in rows]
                keep_r.append(raw[rows.start:rows.stop])
            if len(keep_c) >= o.rollout_batch:
                break
        sampled = torch.cat(all_raw)
        if not keep_c:      # nothing teaches in any round: train on the last round as sampled
            keep_w, keep_p, keep_c, keep_r = which.tolist(), prompts, comps, [raw]
        n = min(len(keep_c), o.rollout_batch)
        return (torch.tensor(keep_w[:n]), keep_p[:n], keep_c[:n], torch.cat(keep_r)[:n],
                float(sampled.mean()), len(sampled), n_mixed / max(1, n_groups))

    @torch.no_grad()
    def rollout(self, gen: torch.Generator) -> None:
        """Sample rollout_batch responses with the current policy; fill the buffer and the minibatch queue."""
        from gptlab.train.sequences import pad_batch
        o = self.opts
        device = self._device()
        model = self.model
        # With a group baseline each prompt is sampled `group` times (different seeds), side by side.
        which = self._pick(o.rollout_batch // o.group, gen).repeat_interleave(o.group)
        prompts, comps = self._generate(model.gpt, which, gen)
        raw = self._scores(which, prompts, comps, chunk=o.minibatch)
        sampled_reward, sampled, mixed_share = float(raw.mean()), len(comps), 1.0
        if o.filter_groups:
            which, prompts, comps, raw, sampled_reward, sampled, mixed_share = \
                self._mixed_groups(gen, which, prompts, comps, raw)
        ended = torch.tensor([c.finish_reason == "stop" for c in comps])
        # The end-of-turn token is an action the policy took, so it is part of the trained sequence.
        seqs = [p + c.ids + ([self.end_id] if c.finish_reason == "stop" else []) for p, c in zip(prompts, comps)]
        idx, lengths = pad_batch(seqs, self.pad_id)
        T = idx.shape[1]
        pos = torch.arange(T - 1)[None, :]
        plen = torch.tensor([len(p) for p in prompts])[:, None]
        # mask[t] = 1 when token t+1 is a response token: logits at t chose it.
        mask = ((pos >= plen - 1) & (pos < lengths[:, None] - 1)).float()

        old_lp, ref_lp, values = [], [], []
        for i in range(0, len(seqs), o.minibatch):
            x = idx[i:i + o.minibatch].to(device)
            with autocast(device):      # the same precision as the update, so the first ratio is 1
                logits, v, _ = model(x)
                ref_logits = self.ref.lm_logits(self.ref.hidden(x))
            old_lp.append(rl.token_logprobs(logits[:, :-1], x[:, 1:], o.temperature).cpu())
            values.append(v[:, :-1].float().cpu() if v is not None else torch.zeros(x.shape[0], T - 1))
            ref_lp.append(rl.token_logprobs(ref_logits[:, :-1], x[:, 1:], o.temperature).cpu())
        old_lp, ref_lp, values = torch.cat(old_lp), torch.cat(ref_lp), torch.cat(values) * mask
        scores = (raw - self.reward_mean) / self.reward_std
        scores = rl.apply_missing_eos_penalty(scores, ended, o.missing_eos_penalty)
        beta = self.kl_ctl.beta
        rewards, kl = rl.kl_penalty_rewards(scores, old_lp, ref_lp, mask, beta)
        if self.prm is not None:    # step rewards: credit goes to the steps before each judged step
            ends, step_r = self._step_rewards(prompts, comps, chunk=o.minibatch)
            adv = rl.process_advantages(step_r, ends, mask, o.group)
            returns = torch.zeros_like(values)
        elif o.group > 1:     # scaled per sequence, not whitened per token (see group_advantages)
            adv = rl.group_advantages(scores, kl, mask, beta, o.group, normalize=True)
            returns = torch.zeros_like(values)
        else:
            adv, returns = rl.gae(rewards, values, mask, o.gamma, o.gae_lambda)
            adv = rl.whiten(adv, mask)
        kl_seq = kl.sum(1)
        self.kl_ctl.update(float(kl_seq.mean()), len(seqs))
        self.buffer = {"idx": idx, "lengths": lengths, "mask": mask, "old_logprobs": old_lp,
                       "old_values": values, "advantages": adv, "returns": returns}
        self.last_stats = {
            "reward": sampled_reward, "score": float(scores.mean()), "kl": float(kl_seq.mean()),
            "nonscore_reward": float((-beta * kl_seq).mean()), "beta": beta,
            "response_len": float(mask.sum(1).mean()), "eos_rate": float(ended.float().mean()),
            "episodes": float(self.episodes + sampled),
        }
        if o.combine == "llama2":
            self.last_stats["safety_share"] = self.safety_share
        if o.filter_groups:
            self.last_stats["mixed_groups"] = mixed_share
        self.rollouts += 1
        self.episodes += sampled
        n = len(seqs)
        self.queue = []
        for _ in range(o.ppo_epochs):
            perm = torch.randperm(n, generator=gen).tolist()
            self.queue += [perm[j:j + o.minibatch] for j in range(0, n, o.minibatch)]

    # ----- the loop's interface ----------------------------------------------------------------------
    def get_batch(self, split, gen):
        if split != "train":
            return None      # no validation loss: PPO is judged by evaluate() on held-out prompts
        if not self.queue:
            self.rollout(gen)
        rows = torch.tensor(self.queue.pop(0))
        b = self.buffer
        T = int(b["lengths"][rows].max())
        batch = {"idx": b["idx"][rows, :T]}
        for k in ("mask", "old_logprobs", "old_values", "advantages", "returns"):
            batch[k] = b[k][rows, :T - 1]
        if self.ptx_data is not None:
            block = self.model.gpt.config.block_size
            batch["ptx_x"], batch["ptx_y"] = self.ptx_data.get_batch("train", self.opts.ptx_batch, block, gen)
        batch["stats"] = {k: torch.tensor(v) for k, v in self.last_stats.items()}
        return batch

    def loss(self, model, batch):
        o = self.opts
        idx, mask = batch["idx"], batch["mask"]
        logits, values, ptx = model(idx, batch.get("ptx_x"), batch.get("ptx_y"))
        logits = logits[:, :-1]
        logprobs = rl.token_logprobs(logits, idx[:, 1:], o.temperature)
        pg_loss, pg_stats = rl.policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, o.clip)
        if values is not None:
            vf_loss, vf_stats = rl.value_loss(values[:, :-1].float(), batch["old_values"], batch["returns"],
                                              mask, o.vf_clip)
        else:       # group baseline: no value model to fit
            vf_loss, vf_stats = torch.zeros((), device=logits.device), {}
        loss = pg_loss + o.vf_coef * vf_loss
        with torch.no_grad():
            entropy = rl.masked_mean(rl.entropy_from_logits(logits.detach(), o.temperature), mask)
        metrics = {"policy_loss": float(pg_loss.detach()), "value_loss": float(vf_loss.detach()), "entropy": float(entropy),
                   **{k: float(v) for k, v in pg_stats.items()}, **{k: float(v) for k, v in vf_stats.items()}}
        if ptx is not None:
            loss = loss + o.ptx_coef * ptx
            metrics["ptx_loss"] = float(ptx.detach())
        metrics.update({k: float(v) for k, v in batch["stats"].items()})
        return loss, metrics

    def count_tokens(self, batch) -> int:
        n = batch["idx"].numel()
        return n + (batch["ptx_x"].numel() if "ptx_x" in batch else 0)

    def on_step_end(self, model, step):
        m = _unwrap(model)
        if m.ema is not None:
            rl.ema_update(m.ema, m.gpt, self.opts.ema)

    def evaluate(self, model) -> dict:
        if not self.eval_ids:
            return {}
        self._device()
        out, _ = heldout_metrics(_unwrap(model).exported(), self.tok, self.eval_items, self.eval_ids,
                                 self.opts.max_new_tokens, self.rm, self.pad_id)
        return out

    def export_state(self, model) -> dict:
        """model.safetensors holds the policy (its EMA when enabled) as a plain GPT: chat/sample/serve
        load it like any other run; the value model lives only in the resume checkpoint."""
        return _unwrap(model).exported().state_dict()

    # Resume: the KL coefficient, reward normalisation and counters travel in the checkpoint. The rollout
    # buffer does not (it is large); a resumed run starts a fresh buffer, which is exactly what an
    # uninterrupted run does when checkpoints fall on buffer boundaries (run() arranges that).
    def state(self) -> dict:
        return {"beta": self.kl_ctl.beta, "reward_mean": self.reward_mean, "reward_std": self.reward_std,
                "rollouts": self.rollouts, "episodes": self.episodes}

    def load_state(self, d: dict) -> None:
        self.kl_ctl.beta = float(d.get("beta", self.kl_ctl.beta))
        self.reward_mean = float(d.get("reward_mean", 0.0))
        self.reward_std = float(d.get("reward_std", 1.0))
        self.rollouts, self.episodes = int(d.get("rollouts", 0)), int(d.get("episodes", 0))
        self.queue = []


# ----- the command ----------------------------------------------------------------------------------------
def _default_eval_file(prompts: Path) -> Path | None:
    cand = prompts.parent / "heldout.jsonl"
    return cand if cand.is_file() and cand.resolve() != prompts.resolve() else None


def options_from_args(args) -> PPOOptions:
    return PPOOptions(
        rollout_batch=args.rollout_batch, ppo_epochs=args.ppo_epochs,
        minibatch=args.minibatch or args.batch_size, clip=args.clip, vf_clip=args.vf_clip,
        vf_coef=args.vf_coef, gae_lambda=args.gae_lambda, beta=args.beta, kl_target=args.kl_target,
        kl_horizon=args.kl_horizon, ptx_coef=args.ptx_coef, ptx_batch=args.ptx_batch or args.batch_size,
        temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        missing_eos_penalty=args.missing_eos_penalty, ema=args.ema, normalize_reward=not args.raw_reward,
        eval_n=args.eval_n, oracle_reward=args.oracle_reward, baseline=args.baseline, samples=args.samples,
        combine=args.combine, safety_threshold=args.safety_threshold,
        safety_families=tuple(f for f in args.safety_families.split(",") if f))


def run(args) -> int:
    from gptlab.data.formats import load_prompt_items
    from gptlab.device import pick_device

    out = Path(args.out)
    opts = options_from_args(args)
    opts.check()
    cfg = train_config_from_args(args)
    cfg.log_every = 1          # every step is a PPO update worth seeing (reward, KL, clip fraction)
    episodes = cfg.max_steps * opts.minibatch // max(1, opts.ppo_epochs)
    if opts.kl_target is not None and opts.kl_horizon > 4 * episodes:
        # beta moves by at most 20% x episodes / horizon over the run: a horizon far beyond the run's
        # length makes the "adaptive" beta a constant, and the KL then ran to 26x its target.
        print(f"note: --kl-horizon {opts.kl_horizon} episodes is far longer than this run (~{episodes} episodes), "
              f"so beta can change by at most {20 * episodes / opts.kl_horizon:.1f}%; a horizon of a few "
              f"rollouts (e.g. --kl-horizon {2 * opts.rollout_batch}) lets it hold the KL target", flush=True)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)

    policy, tok, sft_cfg = runs.load_run(args.init)
    ref, _, _ = runs.load_run(args.init)
    safety_rm = None
    if args.reward_models:
        named = parse_reward_models(args.reward_models)
        if args.reward_model:
            raise GptlabError("give --reward-model or --reward-models, not both")
        if opts.combine != "llama2":
            raise GptlabError("--reward-models needs --combine llama2 (how to combine them)")
        args.reward_model = [named["help"]]
        safety_rm = load_reward([named["safety"]], tok, args.init, 0.0)
    elif opts.combine:
        raise GptlabError("--combine llama2 needs --reward-models help=RUN,safety=RUN")
    prm = None
    if args.prm:
        from gptlab.train.prm import load_prm
        if args.reward_model or args.reward_models or opts.oracle_reward:
            raise GptlabError("--prm is the reward: give it without --reward-model(s) or --oracle-reward")
        prm, prm_tok, _ = load_prm(args.prm)
        if not tok.same_as(prm_tok):
            raise GptlabError(f"--prm {args.prm} uses a different tokenizer than --init {args.init}")
    elif not args.reward_model and not (opts.oracle_reward and opts.group > 1):
        raise GptlabError("--reward-model is required (only --oracle-reward with --baseline rloo needs none: "
                          "the value model starts from the reward model)")
    rm = load_reward(args.reward_model, tok, args.init, args.ensemble_penalty) if args.reward_model else None
    value = runs.load_reward_model(args.reward_model[0], flag="--reward-model")[0] if opts.group == 1 else None
    if policy.config.arch == "bert":
        raise GptlabError(f"--init {args.init}: a BERT run cannot generate; PPO needs a GPT policy")
    model_cfg_dict = policy.config.to_dict()

    block = min([policy.config.block_size] + [m.config.block_size for m in (rm, prm) if m is not None])
    max_prompt = block - opts.max_new_tokens - 1     # prompt + response + end-of-turn fit every model
    if max_prompt < 8:
        raise GptlabError(f"--max-new-tokens {opts.max_new_tokens} leaves no room for prompts in a "
                          f"{block}-token context")
    items, prompt_ids = encode_prompts(tok, load_prompt_items(args.prompts), max_prompt)
    eval_file = Path(args.eval_prompts) if args.eval_prompts else _default_eval_file(Path(args.prompts))
    eval_items, eval_ids = [], []
    if eval_file is not None and opts.eval_n > 0:
        eval_items, eval_ids = encode_prompts(tok, load_prompt_items(eval_file)[:opts.eval_n], max_prompt)

    ptx_data = None
    if opts.ptx_coef > 0:
        from gptlab.data.tokens import TokenDataset
        args.ptx_data = ptx_sources(args)
        ptx_data = TokenDataset.prepare(args.ptx_data, tok, val_fraction=0.1, progress=not args.no_progress)
        ptx_data.check_fits(policy.config.block_size)

    model = PPOModel(policy, value, opts.ema).to(device)
    ref.to(device)
    if rm is not None:
        rm.to(device)
    for m in (safety_rm, prm):
        if m is not None:
            m.to(device)
    stage = PPOStage(model, ref, rm, tok, prompt_ids, opts, ptx_data, eval_items, eval_ids, prompt_items=items,
                     safety_rm=safety_rm, prm=prm)
    # Checkpoints on rollout boundaries make --resume exact (the buffer is not saved).
    spr = stage.steps_per_rollout
    cfg.ckpt_every = max(spr, (cfg.ckpt_every // spr) * spr)

    resuming = cfg.resume and (out / runs.CHECKPOINT_FILE).is_file()
    t0 = time.time()
    initial = {}
    if not resuming:
        if opts.normalize_reward:
            mean, std = stage.calibrate_reward(max(opts.rollout_batch, 64), cfg.seed + 7)
            if value is not None:   # the value model starts as the RM; put it on the normalised scale too
                with torch.no_grad():
                    value.score_head.weight /= std
                    value.score_head.bias.sub_(mean).div_(std)
            print(f"reward normalisation on {max(opts.rollout_batch, 64)} SFT samples: mean {mean:.3f}, std {std:.3f}")
        if eval_ids:
            initial = stage.evaluate(model)
    runs.write_run_config(out, policy.config, tok, stage="ppo", extra={
        "init": str(args.init), "reward_model": [str(r) for r in args.reward_model],
        "reward_models": args.reward_models, "prm": args.prm,
        "ensemble_penalty": args.ensemble_penalty if len(args.reward_model) > 1 else None, "prompts": str(args.prompts),
        "ppo": asdict(opts), "ptx_data": args.ptx_data, "train": asdict(cfg)})
    # write_run_config stored the dropout-free config; keep the SFT run's value for later fine-tuning.
    saved = runs.read_run_config(out)
    saved["model"] = model_cfg_dict
    atomic_write_json(out / runs.CONFIG_FILE, saved)

    n = policy.num_params()
    print(f"policy {policy.config.arch} {policy.config.n_layer}x{policy.config.n_embd} ({n / 1e6:.2f}M), "
          + (f"{'value/' if value is not None else ''}RM {rm.config.n_layer}x{rm.config.n_embd}" if rm is not None
             else f"step rewards from the PRM {args.prm}" if prm is not None
             else "reward: the labeler (--oracle-reward), no RM")
          + (f" (ensemble of {len(rm.members)}: mean - {rm.penalty} x std)" if isinstance(rm, RewardEnsemble) else "")
          + (f" + safety RM, combined as Llama 2 (safety where the prompt is one of {opts.safety_families} or "
             f"sigmoid(safety) < {opts.safety_threshold})" if safety_rm is not None else "")
          + (f" (leave-one-out baseline over {opts.group} samples per prompt)" if value is None else "")
          + f"; {len(prompt_ids)} prompts, "
          f"{len(eval_ids)} held-out; {spr} steps per rollout of {opts.rollout_batch}; "
          + (f"KL target {opts.kl_target}" if opts.kl_target else f"beta {opts.beta}")
          + (f"; ptx {opts.ptx_coef} x {args.ptx_data}" if ptx_data else "; no ptx"))
    if initial:
        print("before PPO (SFT policy, greedy): " + _fmt(initial))
    result = train(model, stage, cfg, out, summary_extra={"initial": initial, "params": n})
    summary_path = out / runs.SUMMARY_FILE
    if summary_path.is_file():   # what is only known after training
        summary = read_json(summary_path)
        summary.update({"episodes": stage.episodes, "rollouts": stage.rollouts, "beta": stage.kl_ctl.beta,
                        "wall_s": round(time.time() - t0, 1)})
        atomic_write_json(summary_path, summary)
    rows = [r for r in _read(out) if "reward" in r]
    print(f"\ndone: {result.step} steps, {stage.episodes} episodes in {result.elapsed_s:.0f}s "
          f"({time.time() - t0:.0f}s wall)")
    if rows:
        a, b = rows[0], rows[-1]
        print(f"rollouts: reward {a['reward']:+.3f} -> {b['reward']:+.3f}, KL {a['kl']:.3f} -> {b['kl']:.3f}, "
              f"length {a['response_len']:.1f} -> {b['response_len']:.1f} tokens, beta {b['beta']:.4f}")
    if initial:
        print("held-out before: " + _fmt(initial))
    if result.metrics:
        print("held-out after:  " + _fmt(result.metrics))
    print(f"run folder: {out} (model.safetensors = {'EMA of the ' if opts.ema else ''}policy; "
          f"metrics.jsonl, curves.png)")
    return 0


def parse_reward_models(spec: str) -> dict[str, str]:
    """--reward-models help=RUN,safety=RUN -> {"help": RUN, "safety": RUN}."""
    named = {}
    for part in spec.split(","):
        name, sep, path = part.partition("=")
        if not sep or not path.strip() or name.strip() not in ("help", "safety"):
            raise GptlabError(f"--reward-models {spec}: expected help=RUN,safety=RUN")
        named[name.strip()] = path.strip()
    if set(named) != {"help", "safety"}:
        raise GptlabError(f"--reward-models {spec}: needs both help=RUN and safety=RUN")
    return named


def _read(out: Path) -> list[dict]:
    from gptlab.plots import read_metrics
    return read_metrics(out / "metrics.jsonl")


def _fmt(m: dict) -> str:
    keys = [("heldout_accuracy", "accuracy {:.1%}"), ("heldout_label_score", "labeler {:.2f}"),
            ("heldout_rm_score", "RM {:+.3f}"), ("heldout_len", "length {:.1f}"), ("heldout_ended", "ended {:.0%}")]
    return ", ".join(f.format(m[k]) for k, f in keys if k in m)


def _float_or_off(s: str):
    if s.lower() in ("off", "none"):
        return None
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {s!r}") from None


def register(sub) -> None:
    p = sub.add_parser(
        "ppo", help="RLHF: PPO against a reward model with a KL penalty and the pre-training mix (PPO-ptx)",
        description="InstructGPT's third step. The policy starts from --init (an SFT run) and is trained "
        "with PPO to maximise the --reward-model score of its answers to --prompts, minus beta x the "
        "per-token KL to the frozen SFT policy, plus --ptx-coef x the language-modelling loss on "
        "--ptx-data. The value model starts from the reward model. Writes a GPT run (stage 'ppo') that "
        "sample, chat and serve load. Held-out evaluation (greedy: task accuracy, labeler score, RM "
        "score, length) uses --eval-prompts, by default heldout.jsonl next to --prompts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", required=True, help="SFT run: the initial policy and the frozen reference")
    p.add_argument("--reward-model", nargs="+", default=[],
                   help="reward-model run (gptlab rm): the reward, and the value model's init (optional with "
                   "--oracle-reward --baseline rloo, which need neither); several runs "
                   "make an ensemble whose reward is their mean score minus --ensemble-penalty x their std "
                   "(the first one initialises the value model)")
    p.add_argument("--ensemble-penalty", type=float, default=1.0,
                   help="with several --reward-model runs: weight of their disagreement (std) subtracted "
                   "from the mean score; 0 = plain mean")
    p.add_argument("--reward-models", default=None, metavar="help=RUN,safety=RUN",
                   help="a helpfulness and a safety reward model (`gptlab rm` runs on their own preference data), "
                   "combined as --combine says, instead of --reward-model")
    p.add_argument("--combine", choices=["llama2"], default=None,
                   help="llama2: the safety score where the prompt is flagged unsafe (--safety-families) or "
                   "sigmoid(safety score) < --safety-threshold, else the helpfulness score; whitened by the "
                   "reward normalisation (Touvron et al. 2023)")
    p.add_argument("--safety-threshold", type=float, default=0.15, help="llama2: the safety score's threshold")
    p.add_argument("--safety-families", default="decline",
                   help="llama2: comma-separated curriculum families whose prompts are flagged unsafe (items "
                   "with \"unsafe\": true are flagged too)")
    p.add_argument("--prm", default=None, metavar="RUN",
                   help="process supervision: step rewards from a process reward model (`gptlab prm`) instead "
                   "of one reward per answer; each step's P(right) is normalised within its prompt's group and "
                   "credited to the tokens up to that step (needs --baseline rloo)")
    p.add_argument("--prompts", required=True, help="prompts JSONL ({'prompt': ...} or messages ending with a user turn)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--eval-prompts", default=None, help="held-out prompts JSONL (default: heldout.jsonl beside --prompts)")
    p.add_argument("--eval-n", type=int, default=100, help="held-out prompts per evaluation (0 = none)")
    g = p.add_argument_group("PPO")
    g.add_argument("--rollout-batch", type=int, default=32, help="prompts (episodes) per rollout buffer")
    g.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout buffer")
    g.add_argument("--minibatch", type=int, default=None,
                   help="episodes per PPO minibatch = per optimizer step (default: --batch-size)")
    g.add_argument("--clip", type=float, default=0.2, help="policy ratio clip epsilon")
    g.add_argument("--vf-clip", type=_float_or_off, default=0.2, help="value clip range around the old value ('off' = none)")
    g.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss")
    g.add_argument("--gae-lambda", type=float, default=0.95, help="GAE lambda (discount gamma is 1)")
    g.add_argument("--beta", type=float, default=0.02, help="KL penalty coefficient (initial value with --kl-target)")
    g.add_argument("--kl-target", type=float, default=None,
                   help="adapt beta towards this per-sequence KL (nats); default: fixed --beta")
    g.add_argument("--kl-horizon", type=int, default=10000, help="adaptive controller horizon in episodes")
    g.add_argument("--ptx-coef", type=float, default=1.0,
                   help="gamma: weight of the pre-training LM loss (InstructGPT: 27.8; 0 = plain PPO)")
    add_ptx_data_arg(g, "the ptx loss")
    g.add_argument("--ptx-batch", type=int, default=None, help="pre-training windows per step (default: --batch-size)")
    g.add_argument("--baseline", choices=BASELINES, default="rloo",
                   help="rloo: sample each prompt --samples times and use the other samples' mean return as the "
                   "baseline (Ahmadian et al. 2024), training only on groups whose samples scored differently "
                   "(DAPO's dynamic sampling); value: a value model started from the reward model, with GAE "
                   "(InstructGPT)")
    g.add_argument("--samples", type=int, default=8, metavar="G", help="rloo: samples per prompt")
    g.add_argument("--temperature", type=float, default=0.4,
                   help="rollout sampling temperature; ratios, KL and entropy use the same tempered policy. "
                   "Below 1 the updates focus on prompts whose greedy answer is a close call")
    g.add_argument("--max-new-tokens", type=int, default=48, help="longest response in tokens")
    g.add_argument("--missing-eos-penalty", type=_float_or_off, default=-1.0,
                   help="score of a response that never ends its turn, replacing the RM score ('off' = none)")
    g.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an EMA of the policy weights (InstructGPT: 0.992) and save it as the model")
    g.add_argument("--raw-reward", action="store_true",
                   help="use the RM's raw scores; by default they are normalised to mean 0, std 1 on SFT samples "
                   "before RL, so one set of PPO settings fits any reward model's scale")
    g.add_argument("--oracle-reward", action="store_true",
                   help="reward = the programmatic labeler's score of each answer instead of the reward "
                        "model's (prompts from `gptlab data instruct`): PPO with a perfect reward model, "
                        "the upper bound an RM is measured against")
    add_train_args(p, max_steps=200, batch_size=8, lr=2e-5, warmup_steps=10, eval_every=50, ckpt_every=50,
                   weight_decay=0.0, schedule="constant")
    p.set_defaults(func=run)
