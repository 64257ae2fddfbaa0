"""Muon + AdamW, the warmup-stable-decay schedule, --target-loss and --eval-every-s."""
import json
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.model.gpt import GPT, GPTConfig
from gptlab import runs
from gptlab.train.loop import TrainConfig, lr_at
from gptlab.train.optim import MuonAdamW, hidden_matrices, make_optimizer, orthogonalize

SMALL = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "32",
         "--no-progress", "--no-sample", "--batch-size", "8", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, small_tokenizer):
    d = tmp_path_factory.mktemp("tok")
    small_tokenizer.save(d)
    return d


def _pretrain(corpus, tok, out, *extra):
    return main(["pretrain", "--data", str(corpus), "--tokenizer", str(tok), "--out", str(out), *SMALL, *extra])


def _rows(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_orthogonalize_flattens_the_spectrum():
    torch.manual_seed(0)
    # A badly conditioned batch, wide and (transposed) tall: singular values spread over 1e3.
    g = torch.randn(3, 32, 96) * torch.logspace(0, 3, 96)
    for x in (g, g.mT, g[0]):
        s = torch.linalg.svdvals(orthogonalize(x))
        assert x.shape == orthogonalize(x).shape
        assert s.max() < 1.25 and s.min() > 0.5, (s.min(), s.max())   # Newton-Schulz: ~[0.7, 1.2]


def test_muon_owns_hidden_matrices_only():
    model = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=128, n_layer=2))
    hidden = hidden_matrices(model)
    names = {n for n, p in model.named_parameters() if id(p) in hidden}
    assert names == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    by_kind = {g["muon"]: g for g in opt.param_groups if g["params"]}
    assert by_kind[True]["base_lr"] == 0.05 and by_kind[False]["base_lr"] == 1e-3
    # Every trainable parameter is in exactly one group (the tied head/embedding once).
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})


def test_muon_step_is_an_orthogonal_update():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 48))
    b = torch.nn.Parameter(torch.zeros(16))
    opt = MuonAdamW([{"params": [w], "muon": True, "lr": 0.1, "base_lr": 0.1},
                     {"params": [b], "lr": 0.1, "base_lr": 0.1}])
    before = w.detach().clone()
    w.grad = torch.randn(16, 48) * torch.logspace(0, 2, 48)
    b.grad = torch.randn(16)
    opt.step()
    s = torch.linalg.svdvals((before - w.detach()) / 0.1)
    assert s.min() > 0.5 and s.max() < 1.25     # every direction moved by about the same amount
    assert torch.allclose(b.detach().abs(), torch.full((16,), 0.1), atol=1e-3)   # Adam's first step: lr*sign


def test_wsd_schedule():
    cfg = TrainConfig(max_steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", cooldown_frac=0.4)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 10) == lr_at(cfg, 69) == pytest.approx(1.0)   # stable until the last 40 steps
    assert lr_at(cfg, 90) == pytest.approx(0.5)
    assert lr_at(cfg, 110) == pytest.approx(0.0)


def test_target_loss_stops_and_records_time(tmp_path, corpus_file, tok_dir):
    out = tmp_path / "run"
    assert _pretrain(corpus_file, tok_dir, out, "--max-steps", "300", "--eval-every", "10", "--lr", "3e-3",
                     "--optimizer", "muon", "--target-loss", "4.0") == 0
    s = json.loads((out / "summary.json").read_text())
    rows = _rows(out)
    evals = [r for r in rows if "val_loss" in r]
    assert s["target_loss"] == 4.0 and 0 < s["steps_to_target"] < 300 and s["step"] == s["steps_to_target"]
    assert evals[-1]["val_loss"] <= 4.0 < min(r["val_loss"] for r in evals[:-1])   # stopped at the first hit
    assert evals[-1]["time_to_target_s"] == s["time_to_target_s"] >= evals[-1]["elapsed_s"]
    runs.load_run(out)   # the stopped run is a complete run folder


def test_target_evaluates_often_only_near_it(tmp_path, corpus_file, tok_dir):
    # No regular evaluation before step 1000: every evaluation comes from the near-target rule, which
    # must start late (not at step 10) and then catch the first crossing within 10 steps.
    out = tmp_path / "run"
    assert _pretrain(corpus_file, tok_dir, out, "--max-steps", "300", "--eval-every", "1000", "--lr", "3e-3",
                     "--optimizer", "muon", "--target-loss", "4.0") == 0
    s = json.loads((out / "summary.json").read_text())
    steps = [r["step"] for r in _rows(out) if "val_loss" in r]
    assert s["steps_to_target"] == steps[-1] and all(t % 10 == 0 for t in steps)
    assert steps[0] > 10 and len(steps) < s["steps_to_target"] // 10


def test_target_not_reached_and_eval_every_seconds(tmp_path, corpus_file, tok_dir):
    out = tmp_path / "run"
    assert _pretrain(corpus_file, tok_dir, out, "--max-steps", "12", "--eval-every", "1000",
                     "--eval-every-s", "1e-6", "--target-loss", "0.01", "--optimizer", "adamw") == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == 12 and s["time_to_target_s"] is None and s["steps_to_target"] is None
    assert [r["step"] for r in _rows(out) if "val_loss" in r] == list(range(1, 13))   # due after every step


@pytest.mark.parametrize("flags, msg", [(["--target-loss", "nan"], "--target-loss"),
                                        (["--eval-every-s", "0"], "--eval-every"),
                                        (["--muon-lr", "-1"], "--muon-lr")])
def test_bad_flags_are_one_line_errors(tmp_path, corpus_file, tok_dir, capsys, flags, msg):
    assert _pretrain(corpus_file, tok_dir, tmp_path / "r", "--max-steps", "2", *flags) == 2
    assert msg in capsys.readouterr().err


def test_muon_state_survives_a_checkpoint(tmp_path):
    """Momentum buffers and Adam moments go through checkpoint.safetensors: resumed == uninterrupted."""
    cfg = TrainConfig(optimizer="muon", lr=3e-3)
    torch.manual_seed(0)
    x = torch.randint(0, 64, (4, 16))

    def steps(model, opt, n):
        for _ in range(n):
            model(x, x)[1].backward()
            opt.step()
            opt.zero_grad()

    def fresh():
        torch.manual_seed(1)
        m = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=64, n_layer=1, n_embd=32, n_head=2, block_size=16))
        return m, make_optimizer(m, cfg, torch.device("cpu"))

    a, opt_a = fresh()
    steps(a, opt_a, 3)
    runs.save_checkpoint(tmp_path, a, opt_a, 3, {})
    b, opt_b = fresh()
    assert runs.load_checkpoint(tmp_path, b, opt_b)[0] == 3
    steps(a, opt_a, 2)
    steps(b, opt_b, 2)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), k


def test_schedule_follows_the_clock_when_the_time_budget_ends_first():
    cfg = TrainConfig(max_steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", cooldown_frac=0.4,
                      time_budget_s=100.0)
    assert lr_at(cfg, 20, elapsed_s=10.0) == pytest.approx(1.0)    # steps ahead of the clock: steps rule
    assert lr_at(cfg, 20, elapsed_s=82.0) == pytest.approx(0.5)    # the clock says step 90: half cooled
    assert lr_at(cfg, 30, elapsed_s=100.0) == pytest.approx(0.0)   # out of time: fully cooled
    assert lr_at(cfg, 90, elapsed_s=None) == pytest.approx(0.5)    # no clock given: steps only
    cos = TrainConfig(max_steps=100, lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="cosine", time_budget_s=10.0)
    assert lr_at(cos, 10, elapsed_s=5.0) == pytest.approx(0.5)
