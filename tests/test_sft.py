"""SFT: padding, packing, assistant-only targets, sequence log-probs, the command and its bad input."""
import json
import math

import torch

from gptlab import runs
from gptlab.cli import main
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.tokenizer import ASSISTANT_END
from gptlab.tokenizer.chat_template import render
from gptlab.train.sequences import (EpochSampler, pack, pad_batch, response_ids, sequence_logprobs,
                                    teacher_forced_logprobs)

PAD, SEP = 1, 0


def make_run(path, tok, n_layer=1, n_embd=32, block_size=64, seed=0):
    """A small 'pre-trained' run folder (random weights) to fine-tune from."""
    torch.manual_seed(seed)
    cfg = GPTConfig.preset("tiny", "gpt2", vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer,
                           n_head=2, n_embd=n_embd)
    runs.write_run_config(path, cfg, tok, "pretrain")
    runs.save_tensors(path / runs.MODEL_FILE, runs.gpt_state(GPT(cfg)))
    return path


def test_pad_batch():
    ids, lengths = pad_batch([[5, 6, 7], [8]], pad_id=PAD)
    assert ids.tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert lengths.tolist() == [3, 1]


def test_pack_targets_each_masked_token_once():
    seqs = [([10, 11, 12, 13], [0, 0, 1, 1]), ([20, 21, 22], [0, 1, 1]), ([30, 31], [0, 1]),
            (list(range(40, 60)), [0] * 5 + [1] * 15)]          # longer than a window: split
    x, y = pack(seqs, block_size=8, sep_id=SEP, pad_id=PAD)
    assert x.shape[1] == y.shape[1] == 8
    # Whole conversations share a window, separated by SEP, which is never a target.
    assert x[0].tolist()[:8] == [10, 11, 12, 13, SEP, 20, 21, 22]
    assert y[0].tolist()[:8] == [-100, 12, 13, -100, -100, 21, 22, -100]
    # Every target is the next input token, and every masked token is a target exactly once.
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        for t in range(7):
            if row_y[t] != -100 and row_x[t + 1] != PAD:
                assert row_y[t] == row_x[t + 1]
    targets = sorted(v for v in y.flatten().tolist() if v != -100)
    expected = sorted(tok for ids, mask in seqs for tok, m in zip(ids, mask) if m)
    assert targets == expected
    assert SEP not in targets


def test_pack_drops_windows_without_targets():
    x, y = pack([([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0] * 10 + [1])], block_size=4, sep_id=SEP, pad_id=PAD)
    assert all((row != -100).any() for row in y)
    assert sorted(v for v in y.flatten().tolist() if v != -100) == [11]


def test_assistant_only_targets(small_tokenizer):
    tok = small_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"},
                {"role": "assistant", "content": "Or not to be."}, {"role": "user", "content": "23 + 58"},
                {"role": "assistant", "content": "81"}]
    ids, mask = render(tok, messages)
    x, y = pack([(ids, mask)], block_size=len(ids) + 4, sep_id=tok.eot_id, pad_id=PAD)
    end = tok.special_id(ASSISTANT_END)
    expected = [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100] * 5
    assert y[0].tolist() == expected
    # The targets are exactly the assistant contents, each followed by the end-of-turn token.
    want = tok.encode("Or not to be.") + [end] + tok.encode("81") + [end]
    assert [v for v in y[0].tolist() if v != -100] == want


def test_sequence_logprobs_matches_manual(small_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=small_tokenizer.vocab_size, block_size=32,
                                 n_layer=1, n_head=2, n_embd=32)).eval()
    ids = torch.randint(0, 300, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]])
    with torch.no_grad():
        got = sequence_logprobs(model, ids, mask)
        logits, _ = model(ids)
        logp = torch.log_softmax(logits.float(), -1)
        for b in range(2):
            manual = sum(float(logp[b, t - 1, ids[b, t]]) for t in range(1, 6) if mask[b, t])
            assert math.isclose(float(got[b]), manual, rel_tol=1e-5, abs_tol=1e-5)
        assert teacher_forced_logprobs(model, ids).shape == (2, 5)
        assert got.dtype == torch.float32


def test_response_ids_masks_only_the_final_answer(small_tokenizer):
    tok = small_tokenizer
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    ids, mask = response_ids(tok, prompt, "to be")
    n = sum(mask)
    assert n == len(tok.encode("to be")) + 1 and mask[-n:] == [1] * n and ids[-1] == tok.special_id(ASSISTANT_END)
    short, smask = response_ids(tok, prompt, "to be", block_size=5)   # cut from the left
    assert short == ids[-5:] and len(smask) == 5 and smask[0] == 0


def test_epoch_sampler_covers_each_example_once_per_epoch():
    s = EpochSampler(10, seed=3)
    first = [i for g in range(5) for i in s.batch(g, 2)]
    assert sorted(first) == list(range(10))
    assert s.batch(7, 2) == EpochSampler(10, seed=3).batch(7, 2)


def _conversations(path, n=24):
    rows = []
    for i in range(n):
        a, b = i % 7, i % 5
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_command_trains_and_learns(tmp_path, small_tokenizer, capsys):
    init = make_run(tmp_path / "pt", small_tokenizer)
    data = _conversations(tmp_path / "sft.jsonl")
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(init), "--data", str(data), "--out", str(out), "--max-steps", "12",
                 "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2", "--no-progress", "--val-fraction", "0.2"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["stage"] == "sft"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "val_loss" in rows[-1] and (out / "loss.png").is_file()
    model, tok, _ = runs.load_run(out)
    assert model.config.block_size == 64


def test_sft_ptx_mix_and_task_eval(tmp_path, small_tokenizer, corpus_file):
    from gptlab.data.instruct import build_curriculum
    from gptlab.io import atomic_write_jsonl
    init = make_run(tmp_path / "pt", small_tokenizer)
    splits = build_curriculum(0, 4, works={})
    atomic_write_jsonl(tmp_path / "sft.jsonl", splits["sft"])
    atomic_write_jsonl(tmp_path / "heldout.jsonl", splits["heldout"])
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(init), "--data", str(tmp_path / "sft.jsonl"), "--out", str(out),
                 "--max-steps", "3", "--batch-size", "4", "--ptx-fraction", "0.25", "--ptx-data", str(corpus_file),
                 "--eval-items", str(tmp_path / "heldout.jsonl"), "--eval-max-items", "4",
                 "--eval-max-new-tokens", "6", "--no-progress"]) == 0
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert "ptx_loss" in last and "sft_loss" in last and "accuracy" in last
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["task_accuracy"] <= 1.0 and summary["per_family"]


def test_ptx_defaults_to_the_init_chains_pretraining_corpora(tmp_path, small_tokenizer, corpus_file):
    """Without --ptx-data, SFT's ptx rows come from what --init was pre-trained on, and a run made from
    that SFT run (PPO's --init) finds the same corpora two hops up the chain."""
    from gptlab.data.instruct import build_curriculum
    from gptlab.io import atomic_write_json, atomic_write_jsonl
    init = make_run(tmp_path / "pt", small_tokenizer)
    cfg = runs.read_run_config(init)
    cfg["data"] = [f"{corpus_file}:2"]
    atomic_write_json(init / runs.CONFIG_FILE, cfg)
    assert runs.pretraining_sources(init) == [f"{corpus_file}:2"]
    atomic_write_jsonl(tmp_path / "sft.jsonl", build_curriculum(0, 4, works={})["sft"])
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(init), "--data", str(tmp_path / "sft.jsonl"), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--ptx-fraction", "0.25", "--no-task-eval",
                 "--no-progress"]) == 0
    assert runs.read_run_config(out)["sft"]["ptx_data"] == [f"{corpus_file}:2"]
    assert runs.pretraining_sources(out) == [f"{corpus_file}:2"]      # SFT -> pretrain
    # A broken chain (the init folder is gone) or a chain without data gives None, not an error.
    atomic_write_json(tmp_path / "orphan" / runs.CONFIG_FILE, {"model": {}, "stage": "sft",
                                                                "init": str(tmp_path / "missing")})
    assert runs.pretraining_sources(tmp_path / "orphan") is None
    atomic_write_json(init / runs.CONFIG_FILE, {**cfg, "data": None})
    assert runs.pretraining_sources(out) is None


def test_sft_bad_input_names_file_and_line(tmp_path, small_tokenizer, capsys):
    init = make_run(tmp_path / "pt", small_tokenizer)
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    data.write_text(good + "\n" + '{"messages": [{"role": "user", "content": "no answer"}' + "\n")
    assert main(["sft", "--init", str(init), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2" in err and "Traceback" not in err
    data.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    assert main(["sft", "--init", str(init), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert f"{data}:2" in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoint.safetensors").exists()
