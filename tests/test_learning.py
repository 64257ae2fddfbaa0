"""Tests that fail when a learner is broken: each stage must actually learn a small task it can
learn in seconds, measured by the test itself (not by the stage's own logged figures).

The other stage tests check arithmetic on hand-computed tensors and that runs finish and write
their files; a learner whose update pointed the wrong way, or whose reward was zero, still
finished and wrote its files, and all of them passed. Each test here names the broken learner it
catches, and was seen to fail with that break applied to the library code:

* reward model scores replaced by zeros         -> the RM and both PPO tests
* PPO advantages negated                        -> both PPO tests
* RM trained on the reversed preference          -> the RM test
* DPO loss sign flipped                         -> the DPO test

Every run here is seconds: one-layer models of ~28k parameters, a few dozen steps, a
fixed seed. ``slow`` repeats them on other seeds (``pytest -m slow tests/test_learning.py``), the
check that a threshold is a property of the learner and not of one lucky seed.
"""
import json
import random

import pytest
import torch

from gptlab import runs
from gptlab.cli import main
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.model.heads import ScalarHeadModel
from gptlab.tokenizer import ASSISTANT_START
from gptlab.train.sequences import pad_batch, response_ids, sequence_logprobs

SEEDS = [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
FILLER = ("to be or not that is the question whether tis nobler in mind suffer slings arrows outrageous "
          "fortune take arms against sea troubles by opposing end them die sleep no more say we").split()


def _save_run(path, module, tok, stage, **extra):
    runs.write_run_config(path, module.config, tok, stage=stage, extra=extra)
    runs.save_tensors(path / runs.MODEL_FILE, runs.gpt_state(module))
    return path


def _random_gpt(tok, seed, n_layer=1, n_embd=32, block_size=64):
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=tok.vocab_size, block_size=block_size,
                                n_layer=n_layer, n_head=2, n_embd=n_embd))


def _fruit_pairs(n, seed):
    """Pairs whose chosen answer names an apple and whose rejected answer names a banana, at a random
    place among random filler words shared by both: the only difference is the fruit."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(FILLER, rng.randint(2, 5))
        at = rng.randint(0, len(words))
        answer = lambda fruit: " ".join(words[:at] + [fruit] + words[at:])
        rows.append({"prompt": f"{' '.join(rng.sample(FILLER, 3))} {i}?", "chosen": answer("apple"),
                     "rejected": answer("banana")})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----- reward model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_reward_model_learns_a_preference_it_is_shown(tmp_path, small_tokenizer, one_thread, seed):
    """`gptlab rm` on 160 pairs that differ only in one word (apple preferred to banana, anywhere in
    the answer) must rank fresh pairs it never saw correctly >= 90% of the time (an untrained head:
    50%, ties count half).

    Catches: scores replaced by zeros (every pair a tie: 50%), and the loss swapping winner and
    loser (the reversed preference: ~0%). Before this test the only end-to-end check of a trained
    reward model was 0 <= accuracy <= 1."""
    from gptlab.runs import load_reward_model
    from gptlab.train.reward import score_responses
    tok = small_tokenizer
    init = _save_run(tmp_path / "init", _random_gpt(tok, seed), tok, "sft")
    data = _write_jsonl(tmp_path / "pairs.jsonl", _fruit_pairs(160, seed))
    out = tmp_path / "rm"
    assert main(["rm", "--init", str(init), "--data", str(data), "--out", str(out), "--val-fraction", "0",
                 "--batch-size", "8", "--epochs", "2", "--lr", "3e-3", "--warmup-steps", "5",
                 "--seed", str(seed), "--no-progress"]) == 0
    rm, tok, _ = load_reward_model(out)
    fresh = _fruit_pairs(60, seed + 1000)
    right = 0.0
    for r in fresh:
        prompt = [{"role": "user", "content": r["prompt"]}]
        chosen, rejected = score_responses(rm, tok, prompt, [r["chosen"], r["rejected"]])
        right += 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
    accuracy = right / len(fresh)
    assert accuracy >= 0.9, f"held-out pairwise accuracy {accuracy:.2f}"


# ----- DPO ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_dpo_raises_the_chosen_over_rejected_margin(tmp_path, small_tokenizer, one_thread, seed):
    """`gptlab dpo` on the apple-over-banana pairs must move the policy so that, against the frozen
    start, the implicit reward beta * (log pi/pi_ref(chosen) - log pi/pi_ref(rejected)) is positive on
    >= 90% of fresh pairs and clearly positive on average (at the start it is exactly 0).

    Catches: the DPO loss with its sign flipped (the margin then falls below 0)."""
    tok = small_tokenizer
    init = _save_run(tmp_path / "init", _random_gpt(tok, seed), tok, "sft")
    data = _write_jsonl(tmp_path / "pairs.jsonl", _fruit_pairs(160, seed))
    out, beta = tmp_path / "dpo", 0.1
    assert main(["dpo", "--init", str(init), "--data", str(data), "--out", str(out), "--val-fraction", "0",
                 "--beta", str(beta), "--batch-size", "8", "--epochs", "2", "--lr", "3e-3",
                 "--warmup-steps", "5", "--seed", str(seed), "--no-progress"]) == 0
    policy, tok, _ = runs.load_run(out)
    ref, _, _ = runs.load_run(init)
    fresh = _fruit_pairs(60, seed + 1000)
    seqs = [response_ids(tok, [{"role": "user", "content": r["prompt"]}], r[side])
            for r in fresh for side in ("chosen", "rejected")]
    ids, _ = pad_batch([s[0] for s in seqs], 0)
    mask, _ = pad_batch([s[1] for s in seqs], 0, ids.shape[1])
    with torch.no_grad():
        reward = beta * (sequence_logprobs(policy, ids, mask) - sequence_logprobs(ref, ids, mask))
    margin = reward[0::2] - reward[1::2]
    accuracy, mean = float((margin > 0).float().mean()), float(margin.mean())
    assert accuracy >= 0.9 and mean > 0.5, f"implicit reward accuracy {accuracy:.2f}, mean margin {mean:+.3f}"


# ----- PPO ------------------------------------------------------------------------------------------
def _token_reward_model(tok, seed):
    """A reward model whose score is a fixed reward per answer token, summed: the one-layer GPT's
    blocks and position embeddings are zeroed, so the hidden state of a token is a function of that
    token alone, and the head reads the answer's tokens (``--reads response_tokens``). Random per-token
    rewards (std ~1) make the best answers plain: the tokens with the highest reward."""
    rm = ScalarHeadModel(_random_gpt(tok, seed + 100), init_zero=False, reads="response_tokens",
                         response_start_id=tok.special_id(ASSISTANT_START))
    with torch.no_grad():
        for block in rm.gpt.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        rm.gpt.transformer.wpe.weight.zero_()
        rm.score_head.weight.normal_(0.0, rm.config.n_embd ** -0.5)
        rm.score_head.bias.zero_()
    return rm.eval()


@pytest.fixture
def ppo_task(tmp_path, small_tokenizer):
    """A random tiny policy, the per-token reward model as a `gptlab rm` run, and 16 prompts."""
    def make(seed):
        tok = small_tokenizer
        d = tmp_path / f"task{seed}"
        _save_run(d / "sft", _random_gpt(tok, seed), tok, "sft")
        rm = _token_reward_model(tok, seed)
        _save_run(d / "rm", rm, tok, "reward", heads={"score_head": {
            "kind": "scalar", "reads": "response_tokens", "response_start_id": rm.response_start_id}})
        rng = random.Random(seed)
        _write_jsonl(d / "prompts.jsonl", [{"prompt": " ".join(rng.sample(FILLER, 4))} for _ in range(16)])
        return d
    return make


@torch.no_grad()
def _mean_reward(run_dir, rm_dir, prompts_file, samples=8, max_new_tokens=8, seed=0):
    """The reward model's mean score of sampled answers (temperature 1) to every prompt, ``samples``
    each: what PPO is meant to raise, measured here with the engine and the RM alone."""
    from gptlab.generate.engine import Engine, SamplingParams
    from gptlab.runs import load_reward_model
    from gptlab.tokenizer.chat_template import end_of_turn_id, render_prompt
    policy, tok, _ = runs.load_run(run_dir)
    rm, _, _ = load_reward_model(rm_dir)
    prompts = [render_prompt(tok, [{"role": "user", "content": json.loads(line)["prompt"]}])
               for line in prompts_file.read_text().splitlines()] * samples
    comps = Engine(policy, tok).generate(prompts, [SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0,
                                                                  seed=seed + i) for i in range(len(prompts))])
    ids, lengths = pad_batch([p + c.ids + [end_of_turn_id(tok)] for p, c in zip(prompts, comps)], 0)
    return float(rm(ids, lengths).mean())


def _ppo(d, out, seed, *extra):
    return main(["ppo", "--init", str(d / "sft"), "--reward-model", str(d / "rm"), "--prompts",
                 str(d / "prompts.jsonl"), "--out", str(out), "--rollout-batch", "16", "--minibatch", "8",
                 "--ppo-epochs", "2", "--max-new-tokens", "8", "--temperature", "1", "--lr", "3e-2",
                 "--warmup-steps", "1", "--ptx-coef", "0", "--missing-eos-penalty", "off", "--eval-n", "0",
                 "--seed", str(seed), "--no-progress", *extra])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("baseline", [["--baseline", "value"], ["--baseline", "rloo", "--samples", "4"]],
                         ids=["value", "rloo"])
def test_ppo_raises_the_reward(ppo_task, one_thread, seed, baseline):
    """`gptlab ppo` against a reward model that pays each answer token a fixed amount must raise the
    mean reward of the policy's sampled answers, with the value-model baseline (GAE) and with the
    leave-one-out group baseline, by a margin far outside sampling noise.

    Catches: the reward model's score replaced by zeros (nothing to climb: the reward stays put),
    and the advantages negated (the policy climbs down instead)."""
    d = ppo_task(seed)
    out = d / "ppo"
    assert _ppo(d, out, seed, "--max-steps", "40", *baseline) == 0
    before = _mean_reward(d / "sft", d / "rm", d / "prompts.jsonl")
    after = _mean_reward(out, d / "rm", d / "prompts.jsonl")
    assert after > before + 3.0, f"mean reward {before:+.3f} -> {after:+.3f}"
