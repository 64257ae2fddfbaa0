"""DPO: the loss on fixed log-probs, and the SFT -> RM -> DPO chain on generated curriculum data."""
import json
import math
import random

import torch

from gptlab import runs
from gptlab.cli import main
from gptlab.train.dpo import dpo_loss


def test_dpo_loss_hand_computed():
    # Two responses: winner row 0, loser row 1.
    policy = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.5])
    loss, m = dpo_loss(policy, ref, torch.tensor([[0, 1]]), torch.tensor([0]), 1, beta=0.1)
    # rewards: 0.1 * (0.5) = 0.05 and 0.1 * (-0.5) = -0.05 -> margin 0.1
    assert math.isclose(float(loss), math.log1p(math.exp(-0.1)), rel_tol=1e-6)
    assert math.isclose(m["chosen_reward"], 0.05, rel_tol=1e-5)
    assert math.isclose(m["rejected_reward"], -0.05, rel_tol=1e-5)
    assert math.isclose(m["reward_margin"], 0.1, rel_tol=1e-5) and m["reward_accuracy"] == 1.0
    # Policy == reference: every pair's loss is log 2, whatever beta.
    loss, m = dpo_loss(ref, ref, torch.tensor([[0, 1]]), torch.tensor([0]), 1, beta=0.5)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6) and m["reward_accuracy"] == 0.5


def test_dpo_positive_penalises_a_falling_winner():
    """DPO-Positive: lowering both sides raises plain DPO's margin for free; DPOP charges the winner's
    fall below the reference inside the margin, and is plain DPO while the winner has not fallen."""
    pairs, group = torch.tensor([[0, 1]]), torch.tensor([0])
    ref = torch.tensor([-1.0, -1.0])
    both_down = torch.tensor([-2.0, -4.0])           # winner -1 nat, loser -3 nats
    plain, _ = dpo_loss(both_down, ref, pairs, group, 1, beta=0.1)
    dpop, m = dpo_loss(both_down, ref, pairs, group, 1, beta=0.1, positive=5.0)
    # margin 0.1 * (-1 - -3) = 0.2; penalty 0.1 * 5 * max(0, 1) = 0.5 -> -0.3
    assert math.isclose(float(plain), math.log1p(math.exp(-0.2)), rel_tol=1e-6)
    assert math.isclose(float(dpop), math.log1p(math.exp(0.3)), rel_tol=1e-6)
    assert math.isclose(m["reward_margin"], 0.2, rel_tol=1e-5)      # the logged margin is DPO's own
    winner_up = torch.tensor([-0.5, -3.0])
    a, _ = dpo_loss(winner_up, ref, pairs, group, 1, beta=0.1)
    b, _ = dpo_loss(winner_up, ref, pairs, group, 1, beta=0.1, positive=5.0)
    assert math.isclose(float(a), float(b), rel_tol=1e-7)


def test_dpo_loss_k3_ranking_averages_its_pairs():
    policy = torch.tensor([0.0, -1.0, -3.0])
    ref = torch.zeros(3)
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])
    loss, _ = dpo_loss(policy, ref, pairs, torch.zeros(3, dtype=torch.long), 1, beta=1.0)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(-3)) + math.log1p(math.exp(-2))) / 3
    assert math.isclose(float(loss), expected, rel_tol=1e-6)


def test_dpo_gradient_prefers_the_winner(small_tokenizer):
    """One step of DPO raises log p(winner) - log p(loser) relative to the reference."""
    from gptlab.data.formats import Ranking
    from gptlab.model.gpt import GPT, GPTConfig
    from gptlab.train.dpo import attach_reference_logprobs
    from gptlab.train.sequences import collate_rankings, encode_rankings, sequence_logprobs
    tok = small_tokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    items = encode_rankings(tok, [Ranking([{"role": "user", "content": "23 + 58"}], ["81", "To be"], [0, 1])], 64)
    attach_reference_logprobs(model, items, 1, progress=False)
    b = collate_rankings(items, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(3):
        loss, _ = dpo_loss(sequence_logprobs(model, b["ids"], b["mask"]), b["ref_logps"], b["pairs"], b["group"],
                           b["n_groups"], 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        lp = sequence_logprobs(model, b["ids"], b["mask"])
    ref = b["ref_logps"]
    assert float((lp[0] - ref[0]) - (lp[1] - ref[1])) > 0


def _curriculum(tmp_path):
    """Generated curriculum files plus auto-labelled rankings built from references and corruptions."""
    from gptlab.data.formats import ranking_row
    from gptlab.data.instruct import build_curriculum
    from gptlab.io import atomic_write_json, atomic_write_jsonl
    from gptlab.label.labeler import rank
    splits = build_curriculum(0, 5, works={})
    folder = tmp_path / "instruct"
    for split, items in splits.items():
        atomic_write_jsonl(folder / f"{split}.jsonl", items)
    atomic_write_json(folder / "curriculum.json", {"seed": 0})
    rng, rows = random.Random(0), []
    for it in splits["prompts"]:
        ref = it["reference"]
        responses = [ref, ref.replace(str(it["answer"]), "apple"), (ref + " ") * 3, ref[: len(ref) // 2]]
        rng.shuffle(responses)
        rows.append(ranking_row(it["messages"], responses, rank(it, responses, noise=0.1, rng=rng)))
    atomic_write_jsonl(tmp_path / "rankings.jsonl", rows)
    return folder, tmp_path / "rankings.jsonl"


def test_sft_rm_dpo_chain_produces_loadable_runs(tmp_path, small_tokenizer):
    from test_sft import make_run
    from gptlab.runs import load_reward_model
    from gptlab.train.reward import score_responses
    folder, rankings = _curriculum(tmp_path)
    pt = make_run(tmp_path / "pt", small_tokenizer)
    common = ["--no-progress", "--batch-size", "4", "--warmup-steps", "1"]
    sft, rm, dpo = tmp_path / "sft", tmp_path / "rm", tmp_path / "dpo"
    # SFT on the curriculum's sft.jsonl: task eval defaults to the heldout.jsonl beside it.
    assert main(["sft", "--init", str(pt), "--data", str(folder / "sft.jsonl"), "--out", str(sft),
                 "--max-steps", "3", "--eval-max-items", "3", "--eval-max-new-tokens", "4"] + common) == 0
    assert "task_accuracy" in json.loads((sft / "summary.json").read_text())
    assert main(["rm", "--init", str(sft), "--data", str(rankings), "--out", str(rm), "--max-steps", "2"] + common) == 0
    assert main(["dpo", "--init", str(sft), "--data", str(rankings), "--out", str(dpo), "--max-steps", "2",
                 "--eval-items", str(folder / "heldout.jsonl"), "--eval-max-items", "2",
                 "--eval-max-new-tokens", "4"] + common) == 0
    for run, stage in ((sft, "sft"), (rm, "reward"), (dpo, "dpo")):
        assert json.loads((run / "config.json").read_text())["stage"] == stage
        assert (run / "metrics.jsonl").is_file() and (run / "loss.png").is_file() and (run / "summary.json").is_file()
        model, tok, _ = runs.load_run(run)       # every run loads as a GPT
    reward, tok, _ = load_reward_model(rm)
    scores = score_responses(reward, tok, [{"role": "user", "content": "What is 2 + 2?"}], ["2 + 2 = 4.", "apple"])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    dpo_rows = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"} <= set(dpo_rows[-1])
    assert "val_reward_accuracy" in dpo_rows[-1] and (dpo / "curves.png").is_file()
    win = json.loads((dpo / "summary.json").read_text())["win_rate_vs_init"]
    assert 0 <= win["lo95"] <= win["rate"] <= win["hi95"] <= 1 and win["n"] == 2


def test_dpo_bad_input_names_file_and_line(tmp_path, small_tokenizer, capsys):
    from test_sft import make_run
    init = make_run(tmp_path / "sft", small_tokenizer)
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "hi", "chosen": "a"}) + "\n")
    assert main(["dpo", "--init", str(init), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2" in err and "Traceback" not in err
    assert main(["dpo", "--init", str(init), "--data", str(data), "--out", str(tmp_path / "o"), "--beta", "0"]) == 2
    assert main(["dpo", "--init", str(init), "--data", str(data), "--out", str(tmp_path / "o"), "--dpop", "-1"]) == 2
    assert "--dpop" in capsys.readouterr().err
