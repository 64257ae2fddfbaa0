"""A post-training stage under torchrun: 2 gloo processes give the losses of 1 process with the same
global batch (the pre-training DDP test is in test_pretrain.py)."""
import json

import pytest
import torch

from gptlab import runs
from gptlab.cli import main
from gptlab.data.instruct import build_curriculum
from gptlab.io import atomic_write_jsonl
from gptlab.model.gpt import GPT, GPTConfig
from test_pretrain import run_torchrun


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_two_processes_match_one(tmp_path, small_tokenizer):
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", "gpt2", vocab_size=small_tokenizer.vocab_size, n_layer=2, n_head=2,
                           n_embd=64, block_size=128)
    base = tmp_path / "base"
    runs.write_run_config(base, cfg, small_tokenizer, stage="pretrain")
    runs.save_tensors(base / runs.MODEL_FILE, GPT(cfg).state_dict())
    items = build_curriculum(seed=0, n_per_family=20, works={})["sft"]
    data = tmp_path / "sft.jsonl"
    atomic_write_jsonl(data, [{"messages": it["messages"]} for it in items])
    common = ["sft", "--init", str(base), "--data", str(data), "--max-steps", "6", "--batch-size", "4",
              "--eval-every", "3", "--seed", "1", "--device", "cpu", "--no-progress", "--no-task-eval"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--out", str(one), "--grad-accum", "2"]) == 0
    run_torchrun(*common, "--out", str(two))
    r1, r2 = _rows(one), _rows(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2] and r1
    for a, b in zip(r1, r2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
    w1, w2 = runs.load_tensors(one / runs.MODEL_FILE), runs.load_tensors(two / runs.MODEL_FILE)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


def test_rm_under_fsdp_matches_one_process(tmp_path, small_tokenizer):
    """A wrapper model (GPT + score head) sharded with FSDP: the held-out evaluation on rank 0 sees
    gathered weights, and the code after training (demonstration bias, final accuracy) a plain model."""
    from test_reward import _rankings_file
    from test_sft import make_run
    init = make_run(tmp_path / "sft", small_tokenizer)
    data = _rankings_file(tmp_path / "rank.jsonl", n=24)
    common = ["rm", "--init", str(init), "--data", str(data), "--batch-size", "2", "--max-steps", "4",
              "--eval-every", "2", "--val-fraction", "0.25", "--seed", "1", "--device", "cpu", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--out", str(one), "--grad-accum", "2"]) == 0
    run_torchrun(*common, "--out", str(two), "--fsdp")
    r1, r2 = _rows(one), _rows(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2] and r1
    for a, b in zip(r1, r2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        if "pairwise_accuracy" in a:
            assert a["pairwise_accuracy"] == pytest.approx(b["pairwise_accuracy"])
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["parallel"] == "fsdp"
    for key in ("pairwise_accuracy", "val_loss", "demo_mean_before_bias"):
        assert s1[key] == pytest.approx(s2[key], abs=1e-4), key
    w1, w2 = runs.load_tensors(one / runs.MODEL_FILE), runs.load_tensors(two / runs.MODEL_FILE)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


def test_ppo_refuses_fsdp_clearly(tmp_path):
    from gptlab.errors import GptlabError
    from gptlab.train.loop import TrainConfig, train

    class PolicyAndValue:   # a stage exporting its own state (PPO's policy/value pair)
        name = "ppo"

        def export_state(self, model):
            return {}

    with pytest.raises(GptlabError, match="ppo does not support --fsdp"):
        train(torch.nn.Linear(2, 2), PolicyAndValue(), TrainConfig(fsdp=True, device="cpu"), tmp_path)
    assert not list(tmp_path.iterdir())   # refused before writing anything
