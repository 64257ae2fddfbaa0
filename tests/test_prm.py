"""Multi-step problems, the step checker, the process reward model and best-of-N search."""
import json
import random

import pytest
import torch

from gptlab.data.steps import (final_answer, gen_problem, label_steps, outcome_correct, run_plan, split_steps,
                               worked_solution)
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.model.heads import ScalarHeadModel
from gptlab.tokenizer.chat_template import end_of_turn_id
from gptlab.train.loop import TrainConfig, train
from gptlab.train.prm import (PRMStage, aggregate, auc, encode_solutions, evaluate_steps, outcome_rankings,
                              step_ids, step_scores)

CHAIN = {"kind": "chain", "start": 17, "ops": [["+", 6], ["-", 9], ["+", 4]]}
WORDS = {"kind": "string", "start": "garden", "ops": [["reverse"], ["upper"], ["first", 3]]}


def test_worked_solutions_pass_the_checker_and_every_generated_plan_is_consistent():
    rng = random.Random(0)
    for _ in range(300):
        _, plan = gen_problem(rng, ["garden", "window", "notice", "apple"])
        text = worked_solution(plan)
        assert all(label_steps(plan, text)) and len(split_steps(text)) == len(plan["ops"]) + 1
        assert outcome_correct(plan, text) and final_answer(text) == str(run_plan(plan)[-1])
        if plan["kind"] != "string":
            assert all(0 <= v < 30 for v in run_plan(plan))


def test_checker_marks_the_first_wrong_step_and_everything_after_it():
    good = worked_solution(CHAIN)
    assert good == "Step 1: 17 + 6 = 23\nStep 2: 23 - 9 = 14\nStep 3: 14 + 4 = 18\nAnswer: 18"
    planted = good.replace("23 - 9 = 14", "23 - 9 = 15").replace("14 + 4 = 18", "15 + 4 = 19").replace("18", "19")
    assert label_steps(CHAIN, planted) == [True, False, False, False]
    # Right arithmetic on the wrong operand is a wrong step too; so is a right answer reached wrongly.
    assert label_steps(CHAIN, good.replace("23 - 9 = 14", "23 - 8 = 15")) == [True, False, False, False]
    assert label_steps(CHAIN, "Step 1: 6 + 17 = 23\nStep 2: 23 - 9 = 14\nStep 3: 14 + 4 = 18\nAnswer: 18") == [True] * 4
    # Stopping early, answering before the last step, or carrying on past the answer.
    assert label_steps(CHAIN, "Step 1: 17 + 6 = 23\nAnswer: 23") == [True, False]
    assert label_steps(CHAIN, good + "\nStep 4: 18 + 1 = 19") == [True] * 4 + [False]
    assert not outcome_correct(CHAIN, "Step 1: 17 + 6 = 23\nAnswer: 23") and outcome_correct(CHAIN, good)
    words = worked_solution(WORDS)
    assert words.splitlines()[1] == "Step 2: 'nedrag' in uppercase = 'NEDRAG'" and words.endswith("Answer: NED")
    assert label_steps(WORDS, words.replace("'nedrag' in", "'nedarg' in")) == [True, False, False, False]
    assert label_steps(WORDS, words.replace("first 3", "first 2")) == [True, True, False, False]


def test_steps_family_joins_the_curriculum_only_when_asked():
    from gptlab.data.instruct import build_curriculum, check_answer
    plain = build_curriculum(0, 20, works={})
    assert not any(i["family"] == "steps" for s in plain.values() for i in s)
    withs = build_curriculum(0, 20, works={}, steps=True)
    items = [i for s in withs.values() for i in s if i["family"] == "steps"]
    assert len(items) == 20 and all("plan" in i for i in items)
    # The other families' items are unchanged by the opt-in (only the interleaving differs).
    for split in plain:
        key = lambda i: i["id"]  # noqa: E731
        assert sorted((i for i in withs[split] if i["family"] != "steps"), key=key) == sorted(plain[split], key=key)
    it = next(i for i in withs["heldout"] if i["family"] == "steps")
    assert check_answer(it, worked_solution(it["plan"]))
    assert not check_answer(it, worked_solution(it["plan"]) + "\nAnswer: 1000")


def test_step_ids_end_each_step_on_its_newline_and_the_last_on_end_of_turn(small_tokenizer):
    tok = small_tokenizer
    prompt = [{"role": "user", "content": "What is 17 + 6 - 9 + 4?"}]
    ids, ends = step_ids(tok, prompt, worked_solution(CHAIN))
    assert len(ends) == 4 and ids[ends[-1]] == end_of_turn_id(tok) and ends[-1] == len(ids) - 1
    for e in ends[:-1]:
        assert tok.decode([ids[e]]).endswith("\n")
    cut, cut_ends = step_ids(tok, prompt, worked_solution(CHAIN), block_size=20)
    assert len(cut) == 20 and cut_ends[-1] == 19 and cut[cut_ends[0]] == ids[ends[0]] if cut_ends[0] >= 0 else True


def test_aggregate_and_auc_hand_computed():
    assert aggregate([0.5, 0.8]) == pytest.approx(0.4) and aggregate([0.5, 0.8], "min") == 0.5 and aggregate([]) == 0
    assert auc([3, 4], [1, 2]) == 1.0 and auc([1], [2]) == 0.0 and auc([1, 2], [1, 2]) == 0.5


def _toy_rows(n, rng, shuffle=False):
    """Solutions whose good steps say 'apple' and bad ones 'banana': the first banana and after are bad."""
    rows = []
    for i in range(n):
        k = rng.randint(1, 4)
        lines = [f"Step {j + 1}: " + ("banana" if rng.random() < 0.3 else "apple") for j in range(k)]
        labels, ok = [], True
        for line in lines:
            ok = ok and "apple" in line
            labels.append(ok)
        rows.append({"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}"}],
                     "response": "\n".join(lines), "labels": labels})
    if shuffle:
        flat = [lab for r in rows for lab in r["labels"]]
        rng.shuffle(flat)
        it = iter(flat)
        rows = [{**r, "labels": [next(it) for _ in r["labels"]]} for r in rows]
    return rows


@pytest.mark.parametrize("shuffle", [False, True])
def test_prm_learns_step_labels_and_not_shuffled_ones(tmp_path, small_tokenizer, one_thread, shuffle):
    tok = small_tokenizer
    rng = random.Random(1)
    train_rows, val_rows = _toy_rows(240, rng, shuffle), _toy_rows(60, rng)   # held out: true labels
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                               n_embd=32, dropout=0.0))
    model = ScalarHeadModel(gpt)
    tr, va = encode_solutions(tok, train_rows, 64), encode_solutions(tok, val_rows, 64)
    before = evaluate_steps(model, va, tok.pad_id)
    stage = PRMStage(tr, va, 16, 0, tok.pad_id)
    train(model, stage, TrainConfig(max_steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=60,
                                    ckpt_every=1000, progress=False, weight_decay=0.0), tmp_path / "prm")
    after = evaluate_steps(model, va, tok.pad_id)
    if shuffle:
        assert after["auc"] < 0.75                       # nothing to learn: no separation
    else:
        assert after["loss"] < before["loss"] - 0.2 and after["auc"] > 0.95
        s = step_scores(model.eval(), tok, val_rows[0]["prompt"], ["Step 1: apple\nStep 2: apple", "Step 1: banana"])
        assert min(s[0]) > max(s[1])


def test_outcome_rankings_put_right_answers_first_with_ties():
    rows = [{"id": "a", "prompt": [{"role": "user", "content": "q"}], "response": r, "correct": c, "family": "steps",
             "answer": "18", "plan": CHAIN, "labels": []}
            for r, c in (("x", False), ("y", True), ("z", False), ("w", True))]
    rows += [{**rows[0], "id": "b", "correct": True}]     # a problem with right answers only says nothing
    (r,) = outcome_rankings(rows)
    assert r["ranking"][:2] == [1, 3] and sorted(map(sorted, r["ties"])) == [[0, 2], [1, 3]]


def test_search_picks_hand_computed():
    from gptlab.evals.search import accuracy_by_n, pick
    right = [False, True, False, False]
    answers = ["3", "5", "3", None]
    scores = {"prm_prod": [0.1, 0.9, 0.2, 0.3], "prm_min": [0.5, 0.1, 0.2, 0.3], "orm": [0.0, 0.0, 1.0, 0.5]}
    assert pick("prm_prod", scores, answers, right) and not pick("prm_min", scores, answers, right)
    assert not pick("orm", scores, answers, right) and not pick("majority", scores, answers, right)
    assert pick("pass", scores, answers, right)
    table = accuracy_by_n([scores], [answers], [right], [1, 2, 4], ("prm_prod", "pass"))
    assert table["prm_prod"][1] == [0.25] and table["pass"][2] == [0.5] and table["prm_prod"][4] == [1.0]


def test_prm_command_samples_labels_and_writes_a_run(tmp_path, small_tokenizer, one_thread):
    from test_sft import make_run
    from gptlab.cli import main
    from gptlab.data.instruct import build_curriculum
    from gptlab.errors import GptlabError
    from gptlab.runs import load_reward_model
    from gptlab.train.prm import load_prm
    init = make_run(tmp_path / "sft", small_tokenizer, block_size=96)
    items = [i for i in build_curriculum(0, 12, works={}, steps=True)["prompts"] if i["family"] == "steps"]
    problems = tmp_path / "prompts.jsonl"
    problems.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = tmp_path / "prm"
    assert main(["prm", "--policy", str(init), "--problems", str(problems), "--samples", "2", "--max-new-tokens",
                 "12", "--max-steps", "2", "--no-progress", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "solutions.jsonl").read_text().splitlines()]
    assert rows and all(r["labels"] == label_steps(r["plan"], r["response"]) for r in rows)
    assert json.loads((out / "config.json").read_text())["stage"] == "prm"
    prm, _, _ = load_prm(out)
    assert prm.score_head.weight.shape[1] == 32
    with pytest.raises(GptlabError, match="process reward model"):
        load_reward_model(out)      # PPO's --reward-model takes whole-answer scores only
    out2 = tmp_path / "prm2"     # retraining from the labelled file needs no sampling
    assert main(["prm", "--init", str(init), "--solutions", str(out / "solutions.jsonl"), "--max-steps", "1",
                 "--no-progress", "--out", str(out2)]) == 0


def test_prm_and_search_bad_input_is_one_line(tmp_path, small_tokenizer, capsys):
    from conftest import user_error
    from test_sft import make_run
    init = make_run(tmp_path / "sft", small_tokenizer)
    plain = tmp_path / "p.jsonl"
    plain.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert "no multi-step problems" in user_error(capsys, "prm", "--policy", init, "--problems", plain,
                                                  "--out", tmp_path / "o")
    assert "not a `gptlab prm` run" in user_error(capsys, "search", "--policy", init, "--prm", init, "--orm", init,
                                                  "--problems", plain, "--out", tmp_path / "s")


def test_process_advantages_credit_each_step_to_the_tokens_before_it():
    from gptlab.train.rl import process_advantages
    mask = torch.ones(2, 6)
    # Row 0: steps end at tokens 2 and 5 with rewards 1 and 0; row 1: one step at token 5, reward 0.5.
    adv = process_advantages([[1.0, 0.0], [0.5]], [[2, 5], [5]], mask, group=2)
    mean = 0.5
    std = (((1 - mean) ** 2 + (0 - mean) ** 2 + 0) / 3) ** 0.5
    z1, z0 = (1 - mean) / std, (0 - mean) / std
    assert adv[0].tolist() == pytest.approx([z1 + z0, z1 + z0, z0, z0, z0, 0.0], abs=1e-5)
    assert adv[1].tolist() == pytest.approx([0.0] * 6, abs=1e-5)
    # One step at the end of each row: outcome supervision, the normalised score at every action.
    out = process_advantages([[1.0], [0.0]], [[6], [6]], mask, group=2)
    assert out[0].tolist() == pytest.approx([1.0] * 6, abs=1e-5) and out[1].tolist() == pytest.approx([-1.0] * 6, abs=1e-5)


def test_ppo_step_ends_are_read_off_the_policy_tokens(small_tokenizer):
    from types import SimpleNamespace
    from gptlab.train.ppo import PPOStage
    stage = PPOStage.__new__(PPOStage)      # only the tokenizer is needed to find where steps end
    stage.tok = small_tokenizer
    ids = small_tokenizer.encode(worked_solution(CHAIN))
    prompt = [1, 2, 3]
    ends = stage._step_ends(prompt, SimpleNamespace(ids=ids, finish_reason="stop"))
    assert len(ends) == 4 and ends[-1] == len(prompt) + len(ids)          # the last step ends on end-of-turn
    assert all("\n" in small_tokenizer.decode([ids[e - len(prompt)]]) for e in ends[:-1])
    cut = stage._step_ends(prompt, SimpleNamespace(ids=ids, finish_reason="length"))
    assert cut[-1] == len(prompt) + len(ids) - 1                           # no end-of-turn token was written
