"""Reward model: InstructGPT's ranking loss, pair batching, the demonstrations-mean-zero bias, the API."""
import json
import math

import pytest
import torch

from gptlab import runs
from gptlab.cli import main
from gptlab.data.formats import Ranking, load_preferences
from gptlab.errors import GptlabError
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.model.heads import READS, ScalarHeadModel, response_mask
from gptlab.runs import load_reward_model
from gptlab.tokenizer import ASSISTANT_START
from gptlab.train.reward import fit_pair_weight, normalise_to_demonstrations, ranking_loss, score_responses
from gptlab.train.sequences import collate_rankings, encode_rankings, pad_batch, response_ids, sequence_logprobs


def _nll(d):
    return math.log1p(math.exp(-d))   # -log sigmoid(d)


def test_ranking_loss_hand_computed_k3():
    # One prompt, K=3 responses ranked [2, 0, 1] -> pairs (2,0), (2,1), (0,1).
    scores = torch.tensor([0.5, -1.0, 2.0])
    pairs = torch.tensor([[2, 0], [2, 1], [0, 1]])
    loss, m = ranking_loss(scores, pairs, torch.zeros(3, dtype=torch.long), 1)
    expected = (_nll(1.5) + _nll(3.0) + _nll(1.5)) / 3
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert m["accuracy"] == 1.0
    # A second prompt with K=2 that the model gets wrong: each prompt weighs the same (1/C(K,2) each).
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    pairs = torch.tensor([[2, 0], [2, 1], [0, 1], [3, 4]])
    loss, m = ranking_loss(scores, pairs, torch.tensor([0, 0, 0, 1]), 2)
    assert math.isclose(float(loss), (expected + _nll(-1.0)) / 2, rel_tol=1e-6)
    assert m["accuracy"] == 0.75


def test_all_pairs_of_a_prompt_in_one_batch_element(small_tokenizer):
    tok = small_tokenizer
    prompt = [{"role": "user", "content": "To be?"}]
    r4 = Ranking(prompt, ["a", "bb", "ccc", "dddd"], [2, 0, 3, 1])
    r2 = Ranking(prompt, ["yes", "no"], [0, 1])
    items = encode_rankings(tok, [r4, r2], block_size=64)
    assert items[0].pairs == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]   # C(4,2) from the order
    b = collate_rankings(items, pad_id=1)
    assert b["ids"].shape[0] == 6                      # each response is one row, scored once
    assert b["pairs"].tolist()[:6] == [list(p) for p in items[0].pairs]   # first prompt's rows 0..3
    assert b["pairs"].tolist()[6:] == [[4, 5]]         # second prompt's rows, offset by 4
    assert b["group"].tolist() == [0] * 6 + [1] and int(b["n_groups"]) == 2
    # Row i holds response i of its prompt, and lengths point at the end-of-turn token.
    end = tok.special_id("<|assistant_end|>")
    for row, length in zip(b["ids"], b["lengths"]):
        assert int(row[length - 1]) == end


def _tiny_rm(tok, seed=0):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                               n_embd=32))
    rm = ScalarHeadModel(gpt, init_zero=False)
    return rm.eval()


def test_demonstrations_score_mean_zero_after_bias(small_tokenizer):
    tok = small_tokenizer
    rm = _tiny_rm(tok)
    with torch.no_grad():
        rm.score_head.bias.fill_(0.7)
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
    demos = ["To be.", "Or not to be.", "81", "apple", "The slings and arrows."]
    before = score_responses(rm, tok, prompts, demos)
    mean = normalise_to_demonstrations(rm, tok, prompts, demos)
    after = score_responses(rm, tok, prompts, demos)
    assert math.isclose(mean, sum(before) / 5, rel_tol=1e-5)
    assert abs(sum(after) / 5) < 1e-5
    assert all(math.isclose(a, b - mean, abs_tol=1e-5) for a, b in zip(after, before))   # a pure shift


def test_demonstrations_beyond_the_cap_are_a_fixed_sample(tmp_path):
    from gptlab.train.reward import MAX_DEMOS, demonstration_pairs
    n = MAX_DEMOS + 50
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                       {"role": "assistant", "content": f"a{i}"}]})
                               for i in range(n)) + "\n", encoding="utf-8")
    prompts, responses, what = demonstration_pairs(path, [])
    assert len(prompts) == len(responses) == MAX_DEMOS and f"of the {n} demonstrations" in what
    # each kept answer stays with its own prompt, none twice, and the same ones every time
    assert all(p[-1]["content"][1:] == r[1:] for p, r in zip(prompts, responses))
    assert len(set(responses)) == MAX_DEMOS and demonstration_pairs(path, [])[1] == responses


def test_score_responses_one_prompt_or_many(small_tokenizer):
    tok = small_tokenizer
    rm = _tiny_rm(tok)
    p = [{"role": "user", "content": "To be?"}]
    shared = score_responses(rm, tok, p, ["yes", "no"])
    each = score_responses(rm, tok, [p, p], ["yes", "no"])
    assert len(shared) == 2 and all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(shared, each))
    with pytest.raises(GptlabError):
        score_responses(rm, tok, [p], ["yes", "no"])


def _rankings_file(path, n=16):
    rows = []
    for i in range(n):
        a, b = i % 9, (i * 3) % 7
        right = f"{a} + {b} = {a + b}."
        rows.append({"prompt": f"What is {a} + {b}?", "responses": [f"{a} + {b} = {a + b + 3}.", right, "banana"],
                     "ranking": [1, 0, 2]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rm_command_saves_a_loadable_reward_run(tmp_path, small_tokenizer):
    from test_sft import make_run
    init = make_run(tmp_path / "sft", small_tokenizer)
    data = _rankings_file(tmp_path / "rank.jsonl")
    out = tmp_path / "rm"
    assert main(["rm", "--init", str(init), "--data", str(data), "--out", str(out), "--batch-size", "4",
                 "--no-progress", "--val-fraction", "0.25"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["stage"] == "reward" and "score_head" in cfg["heads"]
    tensors = runs.load_tensors(out / runs.MODEL_FILE)
    assert "heads.score_head.weight" in tensors and "heads.score_head.bias" in tensors
    from gptlab.data.formats import load_preferences
    from gptlab.train.sequences import heldout_by_hash
    train_r, val_r = heldout_by_hash(load_preferences(data), lambda r: r.prompt, 0.25, salt="rm")
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["pairwise_accuracy"] <= 1 and summary["val_pairs"] == 3 * len(val_r)
    assert summary["train_config"]["max_steps"] == math.ceil(len(train_r) / 4)   # one epoch
    rm, tok, _ = load_reward_model(out)
    # The chosen responses of the training data score mean 0 (the bias).
    s = score_responses(rm, tok, [r.prompt for r in train_r], [r.responses[r.ranking[0]] for r in train_r])
    assert abs(sum(s) / len(s)) < 1e-4
    with pytest.raises(GptlabError, match="not a reward model"):
        load_reward_model(init)


def test_response_mask_covers_the_final_answer_only():
    S = 9   # the response start token
    idx = torch.tensor([[1, S, 2, 3, S, 4, 5, 0, 0],     # two assistant turns: only the last counts
                        [2, 3, 4, 5, 6, 7, 8, 9, 9],     # start token cut off: everything up to the length
                        [1, 2, S, 4, 0, 0, 0, 0, 0]])
    mask = response_mask(idx, torch.tensor([7, 6, 4]), S)
    assert mask.tolist() == [[0, 0, 0, 0, 0, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0, 0, 0, 0]]


def test_response_tokens_head_sums_the_answer_and_a_shared_prefix_cancels(small_tokenizer):
    tok = small_tokenizer
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                               n_embd=32))
    start = tok.special_id(ASSISTANT_START)
    rm = ScalarHeadModel(gpt, init_zero=False, reads="response_tokens", response_start_id=start).eval()
    p = [{"role": "user", "content": "What is 5 + 33?"}]
    seqs = [response_ids(tok, p, r)[0] for r in ("5 + 33 = 38.", "5 + 33 = 47.")]
    ids, lengths = pad_batch(seqs, 0)
    with torch.no_grad():
        got = rm(ids, lengths)
        per = gpt.hidden(ids) @ rm.score_head.weight[0]
        bias = float(rm.score_head.bias)
    for row, seq in enumerate(seqs):
        first = len(seq) - seq[::-1].index(start)   # the token after the last start token
        want = float(per[row, first:len(seq)].sum()) + bias
        assert math.isclose(float(got[row]), want, rel_tol=1e-5, abs_tol=1e-5)
    # The two answers share their tokens up to the sum, so the difference is made after it alone.
    shared = next(i for i, (a, b) in enumerate(zip(*seqs)) if a != b)
    assert shared > seqs[0].index(start) + 1
    diff = float(per[0, shared:len(seqs[0])].sum() - per[1, shared:len(seqs[1])].sum())
    assert math.isclose(float(got[0] - got[1]), diff, rel_tol=1e-4, abs_tol=1e-5)
    with pytest.raises(ValueError):
        ScalarHeadModel(gpt, reads="response_tokens")


def test_logprob_feature_adds_the_weighted_log_probability_of_the_answer(small_tokenizer):
    tok = small_tokenizer
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                               n_embd=32)).eval()
    start = tok.special_id(ASSISTANT_START)
    p = [{"role": "user", "content": "What is 5 + 33?"}]
    enc = [response_ids(tok, p, r) for r in ("5 + 33 = 38.", "38")]
    ids, lengths = pad_batch([e[0] for e in enc], 0)
    mask, _ = pad_batch([e[1] for e in enc], 0, ids.shape[1])
    for reads in READS:
        plain = ScalarHeadModel(gpt, init_zero=False, reads=reads, response_start_id=start).eval()
        rm = ScalarHeadModel(gpt, reads=reads, response_start_id=start, logprob_feature=True).eval()
        rm.score_head.load_state_dict(plain.score_head.state_dict())
        with torch.no_grad():
            assert torch.allclose(rm(ids, lengths), plain(ids, lengths))   # weight 0: the plain head
            rm.logprob_weight.fill_(0.5)
            want = plain(ids, lengths) - 0.5 * torch.log1p(-sequence_logprobs(gpt, ids, mask))
            assert torch.allclose(rm(ids, lengths), want, atol=1e-5)


def test_fit_pair_weight_hand_computed():
    # One prompt, three pairs with d = +1 and one with d = -1: the loss (3 softplus(-w) + softplus(w)) / 4
    # is flat where 3 sigmoid(-w) = sigmoid(w), i.e. w = ln 3.
    d = torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    assert math.isclose(fit_pair_weight(d, torch.zeros(4, dtype=torch.long), 1), math.log(3), abs_tol=1e-6)
    # Each prompt weighs the same: prompt 0 says d = +1 twice, prompt 1 says d = -1 once -> w = 0.
    d = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 1])
    assert fit_pair_weight(d, g, 2) < 1e-6
    assert math.isclose(fit_pair_weight(torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.long), 1, hi=2.5),
                        2.5, abs_tol=1e-6)   # never wrong: as large as allowed


def test_rm_reading_the_response_tokens_round_trips(tmp_path, small_tokenizer):
    from test_sft import make_run
    init = make_run(tmp_path / "sft", small_tokenizer)
    data = _rankings_file(tmp_path / "rank.jsonl")
    out = tmp_path / "rm"
    assert main(["rm", "--init", str(init), "--data", str(data), "--out", str(out), "--batch-size", "4",
                 "--no-progress", "--lr", "1e-3"]) == 0   # the defaults: response tokens + confidence feature
    head = json.loads((out / "config.json").read_text())["heads"]["score_head"]
    assert head["reads"] == "response_tokens" and head["response_start_id"] == small_tokenizer.special_id(ASSISTANT_START)
    rm, tok, _ = load_reward_model(out)
    assert rm.reads == "response_tokens" and head["logprob_feature"] and 0 <= head["logprob_weight_fit"] <= 4
    from gptlab.train.sequences import heldout_by_hash
    rows, _ = heldout_by_hash(load_preferences(data), lambda r: r.prompt, 0.1, salt="rm")
    s = score_responses(rm, tok, [r.prompt for r in rows], [r.responses[r.ranking[0]] for r in rows])
    assert abs(sum(s) / len(s)) < 1e-4   # the bias once per answer still centres the demonstrations
    with pytest.raises(SystemExit):   # argparse: a one-line usage error, exit 2
        main(["rm", "--init", str(init), "--data", str(data), "--out", str(tmp_path / "bad"), "--reads", "middle"])
    # InstructGPT's head, still one flag away: the end-of-turn token alone, no confidence feature.
    assert main(["rm", "--init", str(init), "--data", str(data), "--out", str(tmp_path / "last"), "--batch-size", "4",
                 "--no-progress", "--max-steps", "2", "--reads", "last_token", "--no-logprob-feature"]) == 0
    head = json.loads((tmp_path / "last" / "config.json").read_text())["heads"]["score_head"]
    assert head["reads"] == "last_token" and not head.get("logprob_feature")


def test_rm_bad_input_names_file_and_line(tmp_path, small_tokenizer, capsys):
    from test_sft import make_run
    init = make_run(tmp_path / "sft", small_tokenizer)
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "hi", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}) + "\n")
    assert main(["rm", "--init", str(init), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2" in err and "Traceback" not in err
    data.write_text("{not json\n")
    assert main(["rm", "--init", str(init), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert f"{data}:1" in capsys.readouterr().err


def test_identical_responses_make_no_pairs(small_tokenizer):
    prompt = [{"role": "user", "content": "To be?"}]
    items = encode_rankings(small_tokenizer, [Ranking(prompt, ["yes", "yes", "no"], [0, 1, 2]),
                                              Ranking(prompt, ["no", "no"], [1, 0])], block_size=64)
    assert len(items) == 1 and items[0].pairs == [(0, 2), (1, 2)]


def test_tied_pairs_make_no_pairs(small_tokenizer, tmp_path):
    """A pair the labeler marked as tied is not a comparison: neither training nor the held-out
    pairwise accuracy uses it; the file format carries the ties."""
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "2 + 2?", "responses": ["4.", "5.", "6."], "ranking": [0, 2, 1],
                                "ties": [[1, 2]], "family": "arithmetic"}) + "\n")
    (r,) = load_preferences(path)
    assert r.ties == {frozenset((1, 2))} and "ties" not in r.meta and r.meta["family"] == "arithmetic"
    (item,) = encode_rankings(small_tokenizer, [r], block_size=64)
    assert item.pairs == [(0, 2), (0, 1)]
    untied = encode_rankings(small_tokenizer, [Ranking(r.prompt, r.responses, r.ranking)], block_size=64)
    assert untied[0].pairs == [(0, 2), (0, 1), (2, 1)]


def test_labeler_agreement_scores_the_reward_against_the_noise_free_labeler():
    """The labeler's own score agrees on every pair it separates, its negation on none, a constant on
    half; identical responses, pairs the labeler scores alike and rankings without items are skipped."""
    from gptlab.data.instruct import build_curriculum
    from gptlab.label.labeler import score
    from gptlab.train.reward import labeler_agreement
    items = [it for it in build_curriculum(0, 8, works={})["heldout"] if it["family"] in ("arithmetic", "strings")]
    rankings = []
    for it in items:
        meta = {k: v for k, v in it.items() if k != "messages"}
        # right, wrong, a copy of wrong, and a second wrong answer the labeler scores like the first
        rs = [it["reference"], "I think it is zebra.", "I think it is zebra.", "I think it is tapir."]
        rankings.append(Ranking(it["messages"], rs, [0, 1, 2, 3], meta))
    rankings.append(Ranking([{"role": "user", "content": "hi"}], ["a", "b"], [0, 1]))   # no item: skipped
    by_prompt = {json.dumps(r.prompt): [score({"messages": r.prompt, **r.meta}, x) for x in r.responses]
                 for r in rankings[:-1]}
    oracle = labeler_agreement(rankings, lambda p, rs: by_prompt[json.dumps(p)])
    pairs = oracle["all"][1]
    # each item: the right answer against the 3 wrong ones (two of them alike in text)
    assert pairs == 3 * len(items) and oracle["all"][0] == 1.0
    assert set(oracle) == {"all", "arithmetic", "strings"}
    assert oracle["arithmetic"][1] + oracle["strings"][1] == pairs
    assert labeler_agreement(rankings, lambda p, rs: [-x for x in by_prompt[json.dumps(p)]])["all"] == (0.0, pairs)
    assert labeler_agreement(rankings, lambda p, rs: [0.0] * len(rs))["all"] == (0.5, pairs)
