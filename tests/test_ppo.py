"""PPO-ptx: the RL arithmetic on hand-computed tensors, and a short end-to-end run through the CLI."""
import json
import math

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.train import rl


# ----- arithmetic ---------------------------------------------------------------------------------------
def test_kl_penalty_rewards_hand_computed():
    lp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-2.0, -2.0, -2.0, -2.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = rl.kl_penalty_rewards(scores, lp, ref, mask, beta=0.1)
    # row 0: kl only at actions 1, 2 -> [0, -1, 0, 0]; -0.1 * kl, score 2 at the last action (t=2)
    assert torch.allclose(kl[0], torch.tensor([0.0, -1.0, 0.0, 0.0]))
    assert torch.allclose(rewards[0], torch.tensor([0.0, 0.1, 2.0, 0.0]))
    # row 1: kl 1 everywhere -> -0.1 per token, score -1 added at t=3
    assert torch.allclose(rewards[1], torch.tensor([-0.1, -0.1, -0.1, -1.1]))


def test_gae_gamma1_lambda095_hand_computed():
    rewards = torch.tensor([[0.0, 0.1, 2.0, 0.0], [1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 1.0, 7.0], [0.5, 1.0, 1.5, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: t=2: delta = 2 + 0 - 1 = 1; t=1: delta = 0.1 + 1 - 0.5 = 0.6, A = 0.6 + 0.95 * 1 = 1.55
    assert torch.allclose(adv[0], torch.tensor([0.0, 1.55, 1.0, 0.0]))
    assert torch.allclose(ret[0], torch.tensor([0.0, 2.05, 2.0, 0.0]))
    # row 1: t=2: 2 - 1.5 = 0.5; t=1: 0 + 1.5 - 1 = 0.5 -> 0.975; t=0: 1 + 1 - 0.5 = 1.5 -> 2.42625
    assert torch.allclose(adv[1], torch.tensor([2.42625, 0.975, 0.5, 0.0]))
    # lambda = 1: the advantage is the Monte-Carlo return minus the value
    adv1, _ = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv1[1, 0], torch.tensor(3.0 - 0.5))


def test_group_advantages_leave_one_out_hand_computed():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])          # two prompts, three samples each
    kl = torch.tensor([[0.5, 0.5, 9.0]] + [[0.0, 0.0, 0.0]] * 5)   # 9.0 is outside the mask
    mask = torch.tensor([[1, 1, 0]] + [[1, 1, 1]] * 5)
    adv = rl.group_advantages(scores, kl, mask, beta=0.2, group=3)
    # prompt 0: returns 1 - 0.2 * 1 = 0.8, 0, 0 -> 0.8 - 0, 0 - 0.4, 0 - 0.4
    assert torch.allclose(adv[:3], torch.tensor([[0.8, 0.8, 0.0], [-0.4] * 3, [-0.4] * 3]))
    assert torch.equal(adv[3:], torch.zeros(3, 3))                 # samples alike: nothing to learn
    # normalize: unit std over the sequences, no shift, so the alike prompt still gets exactly 0.
    # (Token-level whitening would not: lengths differ, so its mean is not 0 and it would move them.)
    norm = rl.group_advantages(scores, kl, mask, beta=0.2, group=3, normalize=True)
    per_seq = torch.tensor([0.8, -0.4, -0.4, 0.0, 0.0, 0.0])
    assert torch.allclose(norm[:, 0], per_seq / per_seq.std(), atol=1e-6)
    assert torch.equal(norm[3:], torch.zeros(3, 3)) and norm[0, 2] == 0
    assert not torch.equal(rl.whiten(adv, mask)[3:], torch.zeros(3, 3))
    with pytest.raises(GptlabError):
        rl.group_advantages(scores[:5], kl[:5], mask[:5], beta=0.2, group=3)


def test_whiten_masked():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = rl.whiten(x, mask)          # mean 2, unbiased var 1; the masked-out 100 plays no part
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    w2 = rl.whiten(x, mask, shift_mean=False)
    assert torch.allclose(w2, torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6)


def test_clipped_policy_loss_and_clipfrac():
    ratio = torch.tensor([[1.5, 0.5, 1.0, 0.5]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, stats = rl.policy_loss(ratio.log(), torch.zeros(1, 4), adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.0, 0.8 (clipped) -> mean 0.025
    assert math.isclose(float(loss), 0.025, abs_tol=1e-6)
    assert math.isclose(float(stats["clipfrac"]), 0.5)
    expected_kl = float((0.5 * ratio.log() ** 2).mean())
    assert math.isclose(float(stats["approx_kl"]), expected_kl, rel_tol=1e-6)
    # padding does not count
    loss_m, stats_m = rl.policy_loss(ratio.log(), torch.zeros(1, 4), adv, torch.tensor([[1, 1, 0, 0]]), 0.2)
    assert math.isclose(float(loss_m), (-1.2 - 0.5) / 2, abs_tol=1e-6)
    assert math.isclose(float(stats_m["clipfrac"]), 0.5)


def test_clipped_value_loss():
    values, old = torch.tensor([[1.0, 2.5]]), torch.tensor([[0.5, 2.0]])
    returns, mask = torch.tensor([[2.0, 3.0]]), torch.ones(1, 2)
    loss, stats = rl.value_loss(values, old, returns, mask, clip=0.2)
    # t0: (1-2)^2 = 1 vs (0.7-2)^2 = 1.69; t1: 0.25 vs (2.2-3)^2 = 0.64 -> 0.5 * mean(1.69, 0.64)
    assert math.isclose(float(loss), 0.5825, abs_tol=1e-6)
    assert math.isclose(float(stats["vf_clipfrac"]), 1.0)
    plain, _ = rl.value_loss(values, old, returns, mask, clip=None)
    assert math.isclose(float(plain), 0.5 * (1.0 + 0.25) / 2, abs_tol=1e-6)


def test_adaptive_kl_controller():
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 100)                 # error 1.0 clipped to 0.2 -> x (1 + 0.2 * 100 / 10000)
    assert math.isclose(ctl.beta, 0.1 * 1.002)
    ctl.update(5.4, 1000)                 # error -0.1 -> x 0.99
    assert math.isclose(ctl.beta, 0.1 * 1.002 * 0.99)
    fixed = rl.FixedKLController(0.02)
    fixed.update(100.0, 100)
    assert fixed.beta == 0.02
    with pytest.raises(GptlabError):
        rl.AdaptiveKLController(0.1, target=0.0)


def test_missing_eos_penalty():
    scores, ended = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True])
    assert rl.apply_missing_eos_penalty(scores, ended, -1.0).tolist() == [1.0, -1.0, 3.0]
    assert rl.apply_missing_eos_penalty(scores, ended, None).tolist() == [1.0, 2.0, 3.0]


def test_ema_update():
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.nn.init.zeros_(ema.weight), torch.nn.init.zeros_(ema.bias)
    torch.nn.init.ones_(model.weight), torch.nn.init.ones_(model.bias)
    rl.ema_update(ema, model, 0.9)
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.1))
    rl.ema_update(ema, model, 0.9)
    assert torch.allclose(ema.bias, torch.full((2,), 0.19))


def test_token_logprobs_use_temperature():
    logits = torch.tensor([[[0.0, math.log(2.0)]]])
    labels = torch.tensor([[1]])
    assert math.isclose(float(rl.token_logprobs(logits, labels).exp()), 2 / 3, rel_tol=1e-6)
    assert math.isclose(float(rl.token_logprobs(logits, labels, temperature=0.5).exp()), 4 / 5, rel_tol=1e-6)
    ent = rl.entropy_from_logits(torch.zeros(1, 1, 4))
    assert math.isclose(float(ent), math.log(4), rel_tol=1e-6)


def test_rollouts_are_on_policy_at_a_rollout_temperature():
    """PPO at --temperature T trains the tempered policy softmax(logits / T): the engine's samples must
    come from exactly the distribution whose log-probs the update uses, or every ratio is off."""
    from gptlab.generate.engine import Engine, SamplingParams
    from gptlab.model.gpt import GPT, GPTConfig
    from gptlab.tokenizer import Tokenizer
    tok = Tokenizer.train(["a b c d e f g h"], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16,
                                 block_size=8)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(12.0)     # peaked: top token 10% at T=1, 43% at T=0.6
    prompt = [tok.eot_id, 5]
    with torch.no_grad():
        logits = model.lm_logits(model.hidden(torch.tensor([prompt])))[:, -1:]
    V = logits.shape[-1]
    # The update's own log-probs (rl.token_logprobs) of every token as the next one.
    p06, p10 = (rl.token_logprobs(logits.expand(1, V, V), torch.arange(V)[None, :], t).exp()[0]
                for t in (0.6, 1.0))

    n = 6000
    comps = Engine(model, tok).generate([prompt] * n, [SamplingParams(max_new_tokens=1, temperature=0.6,
                                                                      seed=i, ignore_eos=True) for i in range(n)])
    freq = torch.bincount(torch.tensor([c.ids[0] for c in comps]), minlength=V).float() / n
    tv = lambda p, q: float(0.5 * (p - q).abs().sum())
    assert tv(p06, p10) > 0.3                   # the two temperatures are far apart here
    assert tv(freq, p06) < 0.08                 # sampling noise alone: 0.045-0.061 (50 multinomial draws)
    assert tv(freq, p10) > 0.25

# ----- end to end ---------------------------------------------------------------------------------------
def _save_run(path, module, tok, stage):
    from gptlab import runs
    runs.write_run_config(path, module.config, tok, stage=stage)
    runs.save_tensors(path / runs.MODEL_FILE, runs.gpt_state(module))


@pytest.fixture
def tiny_runs(tmp_path, small_tokenizer):
    """A random tiny 'SFT' policy, a random tiny reward model and curriculum prompt files."""
    from gptlab.data.instruct import build_curriculum
    from gptlab.io import atomic_write_jsonl
    from gptlab.model.gpt import GPT, GPTConfig
    from gptlab.model.heads import ScalarHeadModel
    torch.manual_seed(0)
    vocab = ((small_tokenizer.vocab_size + 63) // 64) * 64
    sft = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=vocab, block_size=96, n_layer=2, n_embd=64,
                               n_head=2, dropout=0.1))
    _save_run(tmp_path / "sft", sft, small_tokenizer, "sft")
    rm = ScalarHeadModel(GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=vocab, block_size=96, n_layer=1,
                                              n_embd=64, n_head=2)), init_zero=False)
    _save_run(tmp_path / "rm", rm, small_tokenizer, "reward")
    splits = build_curriculum(0, 8, works={})
    atomic_write_jsonl(tmp_path / "prompts.jsonl", splits["prompts"])
    atomic_write_jsonl(tmp_path / "heldout.jsonl", splits["heldout"])
    return tmp_path


def _ppo_args(d, corpus_file, out, steps, *extra):
    return ["ppo", "--init", str(d / "sft"), "--reward-model", str(d / "rm"), "--prompts",
            str(d / "prompts.jsonl"), "--out", str(out), "--max-steps", str(steps), "--rollout-batch", "4",
            "--minibatch", "2", "--ppo-epochs", "1", "--max-new-tokens", "8", "--ptx-data", str(corpus_file),
            "--eval-n", "3", "--eval-every", "2", "--warmup-steps", "1", "--lr", "1e-4", "--no-progress",
            "--baseline", "value", *extra]


def test_ppo_end_to_end(tiny_runs, corpus_file, capsys):
    from gptlab.cli import main
    from gptlab.generate.engine import Engine, SamplingParams
    from gptlab.plots import read_metrics
    from gptlab import runs
    from gptlab.train.ppo import PLOT_KEYS
    out = tiny_runs / "ppo"
    rc = main(_ppo_args(tiny_runs, corpus_file, out, 4, "--ema", "0.9",
                        "--kl-target", "2.0"))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "held-out after" in printed and "rollouts: reward" in printed
    model, tok, cfg = runs.load_run(out)           # a plain GPT run
    assert cfg["stage"] == "ppo" and cfg["ppo"]["ema"] == 0.9 and cfg["model"]["dropout"] == 0.1
    assert Engine(model, tok).generate([[tok.eot_id]], SamplingParams(max_new_tokens=3, temperature=0))[0]
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) >= 4
    for key in [k for k in PLOT_KEYS if k != "mixed_groups"] + ["vf_clipfrac", "approx_kl", "train_loss"]:
        assert any(key in r for r in rows), key     # (mixed_groups: only with --baseline rloo)
    assert all(math.isfinite(r["kl"]) and r["response_len"] > 0 for r in rows if "kl" in r)
    assert (out / "curves.png").is_file() and (out / "summary.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert "heldout_accuracy" in summary["initial"] and summary["episodes"] >= 8
    # the exported weights are the EMA, not the raw policy
    tensors = runs.load_tensors(out / runs.CHECKPOINT_FILE)
    raw = tensors["module.gpt.transformer.wte.weight"]
    ema = tensors["module.ema.transformer.wte.weight"]
    assert torch.equal(model.transformer.wte.weight, ema) and not torch.equal(raw, ema)
    # head-to-head against the SFT start: a win rate with its interval, and both sides' figures
    capsys.readouterr()
    assert main(["compare", str(out), str(tiny_runs / "sft"), "--prompts", str(tiny_runs / "heldout.jsonl"),
                 "--n", "3", "--max-new-tokens", "8", "--reward-model", str(tiny_runs / "rm"),
                 "--out", str(tiny_runs / "cmp.json")]) == 0
    assert "labeler win rate of A over B" in capsys.readouterr().out
    res = json.loads((tiny_runs / "cmp.json").read_text())
    assert res["n"] == 3 and 0 <= res["win_rate_ci95"][0] <= res["win_rate_a"] <= res["win_rate_ci95"][1] <= 1
    assert "heldout_rm_score" in res["a"] and "heldout_accuracy" in res["b"]
    # the paired accuracy difference agrees with the two sides' accuracies and its own counts
    diff = res["a"]["heldout_accuracy"] - res["b"]["heldout_accuracy"]
    assert res["accuracy_diff"] == pytest.approx(diff)
    assert res["accuracy_diff"] == pytest.approx((res["only_a_right"] - res["only_b_right"]) / 3)
    lo, hi = res["accuracy_diff_ci95"]
    assert lo <= res["accuracy_diff"] <= hi
    for fam in res["per_family_accuracy"].values():     # per family: the same paired figure
        assert fam["diff"] == pytest.approx(fam["a"] - fam["b"]) and fam["diff_ci95"][0] <= fam["diff"]
    assert sum(f["n"] for f in res["per_family_accuracy"].values()) == 3
    # --resume continues from the checkpoint (beta and counters restored)
    assert main(_ppo_args(tiny_runs, corpus_file, out, 6, "--ema", "0.9", "--kl-target", "2.0",
                          "--resume")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["step"] == 6 and rows[-1]["episodes"] >= 12


def test_compare_asks_a_pretrained_only_run_with_a_fewshot_transcript(tiny_runs, capsys):
    from gptlab.cli import main
    from gptlab.data.instruct import build_curriculum
    from gptlab.io import atomic_write_jsonl
    from gptlab.evals.compare import fewshot_demos
    demos = build_curriculum(1, 40, works={})["sft"]
    items = [json.loads(line) for line in (tiny_runs / "heldout.jsonl").read_text().splitlines()][:4]
    chosen = fewshot_demos(items, demos, 2)
    assert chosen == fewshot_demos(items, demos, 2)                 # reproducible
    for it, shots in zip(items, chosen):                            # two of the item's own family
        fams = {d["family"] for d in demos if d["messages"] in shots}
        assert len(shots) == 2 and fams == {it["family"]}
    with pytest.raises(GptlabError, match="demonstrations of family"):
        fewshot_demos(items, demos, 10_000)
    atomic_write_jsonl(tiny_runs / "sft.jsonl", demos)             # the default --demos: beside --prompts
    out = tiny_runs / "cmp_fewshot.json"
    assert main(["compare", str(tiny_runs / "sft"), str(tiny_runs / "sft"), "--prompts",
                 str(tiny_runs / "heldout.jsonl"), "--n", "4", "--max-new-tokens", "6", "--shots-b", "2",
                 "--out", str(out)]) == 0
    assert "2-shot" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["a"]["shots"] == 0 and res["b"]["shots"] == 2
    assert res["b"]["heldout_len"] <= 6 and 0 <= res["b"]["heldout_accuracy"] <= 1
    assert main(["compare", str(tiny_runs / "sft"), str(tiny_runs / "sft"), "--prompts",
                 str(tiny_runs / "heldout.jsonl"), "--shots-a", "2", "--demos", str(tiny_runs / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    # several results as one forest plot
    png = tiny_runs / "cmp.png"
    assert main(["plot-compare", str(out), str(out), "--labels", "one", "two", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "2 comparisons" in capsys.readouterr().out
    assert main(["plot-compare", str(out), "--labels", "one", "two", "--out", str(png)]) == 2
    assert "2 labels for 1 results" in capsys.readouterr().err
    assert main(["plot-compare", str(tiny_runs / "sft" / "config.json"), "--out", str(png)]) == 2
    assert "not a `gptlab compare --out` result" in capsys.readouterr().err


def test_ppo_rejects_non_reward_run(tiny_runs, corpus_file, capsys):
    from gptlab.cli import main
    args = _ppo_args(tiny_runs, corpus_file, tiny_runs / "bad", 2)
    args[args.index("--reward-model") + 1] = str(tiny_runs / "sft")
    assert main(args) == 2
    assert "not a reward model run" in capsys.readouterr().err


def test_ppo_oracle_reward_scores_with_the_labeler(tiny_runs, corpus_file, capsys, monkeypatch):
    """--oracle-reward: every sampled answer is scored by the labeler's rules, not the reward model."""
    from gptlab.cli import main
    from gptlab.label import labeler
    from gptlab.plots import read_metrics
    seen = []
    real_score = labeler.score

    def spy(item, response):
        seen.append((item["family"], response))
        return real_score(item, response)
    monkeypatch.setattr(labeler, "score", spy)
    out = tiny_runs / "oracle"
    assert main(_ppo_args(tiny_runs, corpus_file, out, 2, "--oracle-reward", "--eval-n", "0")) == 0
    assert len(seen) >= 4 and all(fam for fam, _ in seen)          # one call per sampled answer
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert rows and all(labeler.EMPTY <= r["reward"] <= labeler.CORRECT + labeler.CONCISE + labeler.ENDS
                        for r in rows)
    # prompts without curriculum fields cannot be scored by the rules: a one-line error
    bare = tiny_runs / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "hello"}) + "\n")
    args = _ppo_args(tiny_runs, corpus_file, tiny_runs / "o2", 2, "--oracle-reward")
    args[args.index("--prompts") + 1] = str(bare)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--oracle-reward" in err and "family" in err and "Traceback" not in err
    # the labeler with a group baseline needs no reward model at all (held-out eval included) ...
    def without_rm(out, *extra):
        args = _ppo_args(tiny_runs, corpus_file, out, 2, *extra)
        i = args.index("--reward-model")
        return args[:i] + args[i + 2:]
    assert main(without_rm(tiny_runs / "o3", "--oracle-reward", "--baseline", "rloo", "--samples", "2")) == 0
    assert "no RM" in capsys.readouterr().out
    assert json.loads((tiny_runs / "o3" / "config.json").read_text())["reward_model"] == []
    # ... but a learned reward, or a value model, does
    for extra in ([], ["--oracle-reward"]):
        assert main(without_rm(tiny_runs / "o4", *extra)) == 2
        assert "--reward-model is required" in capsys.readouterr().err


def test_ppo_group_baseline_runs_without_a_value_model(tiny_runs, corpus_file, capsys):
    """--baseline rloo --samples G: each prompt sampled G times, leave-one-out baseline, no value model in the checkpoint."""
    from gptlab.cli import main
    from gptlab.plots import read_metrics
    from gptlab import runs
    out = tiny_runs / "rloo"
    assert main(_ppo_args(tiny_runs, corpus_file, out, 2, "--baseline", "rloo", "--samples", "2", "--eval-n", "0")) == 0
    assert "leave-one-out baseline over 2 samples" in capsys.readouterr().out
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert rows and all(r["value_loss"] == 0 and math.isfinite(r["policy_loss"]) for r in rows)
    tensors = runs.load_tensors(out / runs.CHECKPOINT_FILE)
    assert not any(".value." in k for k in tensors) and any(".gpt." in k for k in tensors)
    assert main(_ppo_args(tiny_runs, corpus_file, tiny_runs / "bad", 2, "--baseline", "rloo", "--samples", "3")) == 2
    assert "multiple of --samples" in capsys.readouterr().err


def test_filter_groups_keeps_only_groups_whose_samples_differ():
    """The rloo baseline's filter: alike groups are dropped and fresh ones sampled until the buffer is full; the
    logged reward and episode count cover everything sampled, kept or not."""
    from types import SimpleNamespace
    from gptlab.train.ppo import PPOOptions, PPOStage
    rounds = iter([torch.tensor([2.0, 3.0, 5.0, 5.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])])
    fake = SimpleNamespace(
        opts=PPOOptions(rollout_batch=4, minibatch=2, baseline="rloo", samples=2),
        model=SimpleNamespace(gpt=None),
        _pick=lambda n, gen: torch.tensor([7, 8])[:n],
        _generate=lambda policy, which, gen: ([[int(w)] for w in which], [f"r{int(w)}" for w in which]),
        _scores=lambda which, prompts, comps, chunk=32: next(rounds))
    which = torch.tensor([0, 0, 1, 1])
    first = torch.tensor([1.0, 1.0, 0.0, 4.0])            # prompt 0 alike (dropped), prompt 1 mixed
    kept = PPOStage._mixed_groups(fake, None, which, [[0], [0], [1], [1]], ["a", "b", "c", "d"], first)
    w, prompts, comps, raw, reward, sampled, share = kept
    assert w.tolist() == [1, 1, 7, 7] and comps == ["c", "d", "r7", "r7"]
    assert raw.tolist() == [0.0, 4.0, 2.0, 3.0]
    assert sampled == 8 and reward == pytest.approx((1 + 1 + 0 + 4 + 2 + 3 + 5 + 5) / 8)
    assert share == pytest.approx(2 / 4)
    # Nothing mixed in any round: the last round is used as sampled, and the share says 0.
    rounds = iter([torch.ones(4)] * 3)
    fake._scores = lambda which, prompts, comps, chunk=32: next(rounds)
    w, _, comps, raw, _, sampled, share = PPOStage._mixed_groups(fake, None, which, [[0]] * 4, list("abcd"),
                                                                 torch.ones(4), max_rounds=3)
    assert share == 0 and sampled == 12 and len(comps) == 4 and raw.tolist() == [1.0] * 4


def test_ppo_rloo_filters_groups_and_needs_two_samples(tiny_runs, corpus_file, capsys):
    from gptlab.cli import main
    from gptlab.plots import read_metrics
    out = tiny_runs / "filtered"
    assert main(_ppo_args(tiny_runs, corpus_file, out, 2, "--baseline", "rloo", "--samples", "2", "--eval-n", "0")) == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert rows and all(0.0 <= r["mixed_groups"] <= 1.0 for r in rows)
    assert main(_ppo_args(tiny_runs, corpus_file, tiny_runs / "bad2", 2, "--baseline", "rloo", "--samples", "1")) == 2
    assert "--samples must be at least 2" in capsys.readouterr().err


def test_reward_ensemble_pays_the_mean_minus_the_members_disagreement():
    """Three members scoring two rows [1, 2, 6] and [3, 3, 3]: mean 3 and 3, population std sqrt(14/3)
    and 0, so with penalty 0.5 the disputed row earns 3 - 0.5 * 2.160 and the agreed one 3."""
    from gptlab.model.heads import RewardEnsemble

    class Fixed(torch.nn.Module):
        def __init__(self, scores):
            super().__init__()
            self.scores = torch.tensor(scores)
            self.config = "cfg"

        def forward(self, idx, lengths):
            return self.scores

    members = [Fixed([1.0, 3.0]), Fixed([2.0, 3.0]), Fixed([6.0, 3.0])]
    ens = RewardEnsemble(members, penalty=0.5)
    out = ens(torch.zeros(2, 4, dtype=torch.long), torch.tensor([4, 4]))
    assert out.tolist() == pytest.approx([3 - 0.5 * math.sqrt(14 / 3), 3.0])
    assert ens.config == "cfg" and ens.member_scores(None, None).shape == (3, 2)
    assert RewardEnsemble(members, penalty=0.0)(None, None).tolist() == pytest.approx([3.0, 3.0])
    with pytest.raises(ValueError):
        RewardEnsemble(members[:1])


def test_ppo_with_a_reward_ensemble(tiny_runs, corpus_file, capsys):
    """Two --reward-model runs: PPO optimises their penalised mean and records both in its config."""
    import shutil
    from gptlab.cli import main
    from gptlab import runs
    shutil.copytree(tiny_runs / "rm", tiny_runs / "rm2")
    args = _ppo_args(tiny_runs, corpus_file, tiny_runs / "ens", 2, "--baseline", "rloo", "--samples", "2", "--eval-n", "0",
                     "--ensemble-penalty", "0.5")
    i = args.index("--reward-model") + 2
    assert main(args[:i] + [str(tiny_runs / "rm2")] + args[i:]) == 0
    assert "ensemble of 2: mean - 0.5 x std" in capsys.readouterr().out
    cfg = runs.read_run_config(tiny_runs / "ens")
    assert cfg["reward_model"] == [str(tiny_runs / "rm"), str(tiny_runs / "rm2")] and cfg["ensemble_penalty"] == 0.5
    assert main(args[:i] + [str(tiny_runs / "sft")] + args[i:]) == 2     # an SFT run is no reward model
    assert "--reward-model" in capsys.readouterr().err
    assert main(args + ["--ensemble-penalty", "-1"]) == 2
    assert "--ensemble-penalty must be >= 0" in capsys.readouterr().err
