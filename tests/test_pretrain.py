"""Pre-training end to end through the CLI: metrics, plots, exact kill-and-resume, DDP, bad checkpoints."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlab import runs
from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.train.loop import TrainConfig, lr_at

SMALL = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "32",
         "--no-progress", "--no-sample"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, small_tokenizer):
    d = tmp_path_factory.mktemp("tok")
    small_tokenizer.save(d)
    return d


def pretrain_args(corpus, tok_dir, out, *extra):
    return ["pretrain", "--data", str(corpus), "--tokenizer", str(tok_dir), "--out", str(out), *SMALL, *extra]


def rows(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_learns_and_writes_run_folder(tmp_path, corpus_file, tok_dir):
    out = tmp_path / "run"
    assert main(pretrain_args(corpus_file, tok_dir, out, "--max-steps", "120", "--eval-every", "40",
                              "--eval-batches", "4", "--batch-size", "8", "--lr", "3e-3")) == 0
    for name in ["model.safetensors", "config.json", "tokenizer.json", "checkpoint.safetensors",
                 "metrics.jsonl", "loss.png", "summary.json"]:
        assert (out / name).is_file(), name
    evals = [r for r in rows(out) if "val_loss" in r]
    for key in ["step", "tokens", "elapsed_s", "train_loss", "val_loss"]:
        assert all(key in r for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5   # it really learns the corpus
    model, tok, cfg = runs.load_run(out)
    assert cfg["stage"] == "pretrain" and model.config.n_layer == 2


def test_lr_schedule():
    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 100) == pytest.approx(0.1)
    assert 0.1 < lr_at(cfg, 55) < 1.0


def _run_cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "gptlab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_and_resume_is_bit_identical(tmp_path, corpus_file, tok_dir):
    common = ["--max-steps", "120", "--ckpt-every", "10", "--eval-every", "60", "--eval-batches", "2",
              "--batch-size", "4", "--dropout", "0.1", "--seed", "7"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(pretrain_args(corpus_file, tok_dir, full, *common)) == 0

    proc = _run_cli(pretrain_args(corpus_file, tok_dir, killed, *common))
    deadline = time.time() + 120
    while not (killed / runs.CHECKPOINT_FILE).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / runs.SUMMARY_FILE).exists(), "the run finished before it could be killed"
    step_at_kill = int(runs.load_metadata(killed / runs.CHECKPOINT_FILE)["step"])
    assert 0 < step_at_kill < 120

    # Without --resume the folder is protected; with it training continues exactly.
    assert main(pretrain_args(corpus_file, tok_dir, killed, *common)) == 2
    assert main(pretrain_args(corpus_file, tok_dir, killed, *common, "--resume")) == 0
    a = runs.load_tensors(full / runs.MODEL_FILE)
    b = runs.load_tensors(killed / runs.MODEL_FILE)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in rows(killed)]
    assert steps == sorted(set(steps))   # no duplicated log lines after the resume


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(*args, timeout=300):
    """``gptlab ARGS`` in 2 gloo processes under torchrun (one torch thread each); asserts success."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "--master_addr", "127.0.0.1", "-m", "gptlab", *args]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def test_ddp_two_processes_match_one(tmp_path, corpus_file, tok_dir):
    # An unreachable --target-loss runs the near-target rule's collectives on every rank as well.
    common = ["--max-steps", "20", "--eval-every", "10", "--eval-batches", "2", "--seed", "3",
              "--batch-size", "4", "--device", "cpu", "--lr", "1e-3", "--target-loss", "0.01"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(pretrain_args(corpus_file, tok_dir, one, *common, "--grad-accum", "2")) == 0
    run_torchrun(*pretrain_args(corpus_file, tok_dir, two, *common))
    r1, r2 = rows(one), rows(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2]
    # Same data, same global batch: equal up to float summation order (all-reduce vs accumulation),
    # whose differences Adam slowly amplifies over the steps.
    assert r1[0]["train_loss"] == pytest.approx(r2[0]["train_loss"], abs=1e-5)
    for a, b in zip(r1, r2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-3)
        if "val_loss" in a:
            assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-3)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2


def test_fsdp_matches_one_process_and_its_checkpoint_resumes_anywhere(tmp_path, corpus_file, tok_dir):
    # Constant lr after warm-up, so a run cut at step 4 and resumed follows the same schedule. AdamW on both
    # sides: FSDP shards AdamW (Muon orthogonalises whole matrices, so it runs in one process only).
    common = ["--eval-every", "4", "--eval-batches", "3", "--seed", "3", "--batch-size", "4",
              "--device", "cpu", "--lr", "1e-3", "--schedule", "constant", "--warmup-steps", "2",
              "--ckpt-every", "4", "--no-sample", "--optimizer", "adamw"]
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    assert main(pretrain_args(corpus_file, tok_dir, one, *common, "--max-steps", "8", "--grad-accum", "2")) == 0
    run_torchrun(*pretrain_args(corpus_file, tok_dir, two, *common, "--max-steps", "8", "--fsdp"))
    r1, r2 = rows(one), rows(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2]
    for a, b in zip(r1, r2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-3)
        if "val_loss" in a:
            assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-3)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "fsdp"
    w1, w2 = runs.load_tensors(one / runs.MODEL_FILE), runs.load_tensors(two / runs.MODEL_FILE)
    assert w1.keys() == w2.keys()
    for k in w1:   # gathered full tensors, not one rank's shard
        assert w1[k].shape == w2[k].shape and torch.allclose(w1[k], w2[k], atol=1e-4), k

    # A checkpoint written under FSDP (4 steps) resumes in one process (optimizer moments included):
    # the result matches the uninterrupted single-process run.
    run_torchrun(*pretrain_args(corpus_file, tok_dir, cut, *common, "--max-steps", "4", "--fsdp"))
    assert main(pretrain_args(corpus_file, tok_dir, cut, *common, "--max-steps", "8", "--grad-accum", "2",
                              "--resume")) == 0
    w3 = runs.load_tensors(cut / runs.MODEL_FILE)
    for k in w1:
        assert torch.allclose(w1[k], w3[k], atol=1e-4), k


def test_bad_checkpoints_give_clear_errors(tmp_path, corpus_file, tok_dir, capsys):
    out = tmp_path / "run"
    assert main(pretrain_args(corpus_file, tok_dir, out, "--max-steps", "5", "--eval-batches", "1")) == 0
    # Truncated weights.
    data = (out / runs.MODEL_FILE).read_bytes()
    (out / runs.MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(GptlabError, match="truncated or corrupted"):
        runs.load_run(out)
    # Truncated resume state: the CLI prints one line and exits 2.
    state = (out / runs.CHECKPOINT_FILE).read_bytes()
    (out / runs.CHECKPOINT_FILE).write_bytes(state[:100])
    capsys.readouterr()
    assert main(pretrain_args(corpus_file, tok_dir, out, "--max-steps", "10", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "corrupted" in err[0]
    # Shapes that do not match the config.
    (out / runs.MODEL_FILE).write_bytes(data)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"]["n_embd"] = 96
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GptlabError, match="shape"):
        runs.load_run(out)


def test_bad_input_is_one_line(tmp_path, tok_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    for data in [str(tmp_path / "missing.txt"), str(empty), str(short)]:
        capsys.readouterr()
        assert main(pretrain_args(data, tok_dir, tmp_path / "x", "--max-steps", "2")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err


def test_mfu_never_reads_over_100_percent_after_a_peak_read_under_load(tmp_path, corpus_file, tok_dir,
                                                                        gptlab_home):
    # A fresh machine showed mfu=163%: its cached matmul peak had been read while other work held the
    # CPU. A training rate above the cached peak proves the peak wrong; it must be read again and never
    # kept below what training achieved.
    key = f"cpu-threads{torch.get_num_threads()}"
    (gptlab_home / "matmul_peak.json").write_text(json.dumps({key: 1000.0}))   # 1 kFLOP/s: far too low
    out = tmp_path / "run"
    assert main(pretrain_args(corpus_file, tok_dir, out, "--max-steps", "4", "--eval-every", "4",
                              "--eval-batches", "1", "--batch-size", "2", "--log-every", "1")) == 0
    mfus = [r["mfu"] for r in rows(out) if "mfu" in r]
    assert mfus and all(0 < m <= 1 for m in mfus)
    assert json.loads((gptlab_home / "matmul_peak.json").read_text())[key] > 1e6


def test_matmul_peak_rises_to_an_achieved_rate(gptlab_home, monkeypatch):
    from gptlab import device
    readings = iter([5e9, 2e9, 3e9])   # a good first reading, then two taken under load
    monkeypatch.setattr(device, "measure_matmul_peak", lambda dev: next(readings))
    cpu = torch.device("cpu")
    assert device.matmul_peak(cpu) == 5e9
    assert device.matmul_peak(cpu, refresh=True) == 5e9          # a low reading never lowers it
    assert device.matmul_peak(cpu, at_least=8e9) == 8e9          # re-read (3e9), kept at the achieved rate
    assert device.matmul_peak(cpu) == 8e9                        # and cached for later runs
    (gptlab_home / "matmul_peak.json").write_text("{\"cpu-threads1\": \"junk\"")
    monkeypatch.setattr(device, "measure_matmul_peak", lambda dev: 4e9)
    assert device.matmul_peak(cpu) > 0                           # a corrupt cache is measured afresh
