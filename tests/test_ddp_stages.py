"""A post-training stage under torchrun: 2 gloo processes give the losses of 1 process with the same
global batch (the pre-training DDP test is in test_pretrain.py)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from gptlab.cli import main
from gptlab.data.instruct import build_curriculum
from gptlab.io import atomic_write_jsonl
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.train import checkpoint as ckpt


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_two_processes_match_one(tmp_path, small_tokenizer):
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", "gpt2", vocab_size=small_tokenizer.vocab_size, n_layer=2, n_head=2,
                           n_embd=64, block_size=128)
    base = tmp_path / "base"
    ckpt.write_run_config(base, cfg, small_tokenizer, stage="pretrain")
    ckpt.save_tensors(base / ckpt.MODEL_FILE, GPT(cfg).state_dict())
    items = build_curriculum(seed=0, n_per_family=20, works={})["sft"]
    data = tmp_path / "sft.jsonl"
    atomic_write_jsonl(data, [{"messages": it["messages"]} for it in items])
    common = ["sft", "--init", str(base), "--data", str(data), "--max-steps", "6", "--batch-size", "4",
              "--eval-every", "3", "--seed", "1", "--device", "cpu", "--no-progress", "--no-task-eval"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--out", str(one), "--grad-accum", "2"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "gptlab", *common, "--out", str(two)]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    r1, r2 = _rows(one), _rows(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2] and r1
    for a, b in zip(r1, r2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
    w1, w2 = ckpt.load_tensors(one / ckpt.MODEL_FILE), ckpt.load_tensors(two / ckpt.MODEL_FILE)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
