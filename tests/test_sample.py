"""`gptlab sample`: streaming, batches, cache vs no cache, stop strings, seeds, bad input."""
import sys

import pytest
import torch

from conftest import SAMPLE_TEXT
from gptlab import runs
from gptlab.cli import main
from gptlab.generate.engine import Engine, SamplingParams
from gptlab.model.gpt import GPT, GPTConfig


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_tokenizer):
    path = tmp_path_factory.mktemp("sample_run")
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", "modern", vocab_size=448, block_size=64, n_layer=2, n_embd=64)
    model = GPT(cfg)
    # A few optimizer steps on the sample text: real tokens come out (not stray bytes held back as
    # unfinished characters), so streaming and stop strings have something to work on.
    ids = torch.tensor(small_tokenizer.encode(SAMPLE_TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=gen)
        x = torch.stack([ids[s:s + 32] for s in starts])
        y = torch.stack([ids[s + 1:s + 33] for s in starts])
        opt.zero_grad()
        model(x, y)[1].backward()
        opt.step()
    model.eval()
    runs.write_run_config(path, cfg, small_tokenizer, "pretrain")
    runs.save_tensors(path / runs.MODEL_FILE, runs.gpt_state(model))
    return path


class Recorder:
    """stdout stand-in that records each write, to see text arrive in pieces."""

    def __init__(self):
        self.writes = []

    def write(self, s):
        self.writes.append(s)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.writes)


def sample(args, monkeypatch, capsys=None):
    rec = Recorder()
    monkeypatch.setattr(sys, "stdout", rec)
    rc = main(["sample", *map(str, args)])
    monkeypatch.undo()
    return rc, rec


def test_single_prompt_streams(run_dir, monkeypatch, capsys):
    rc, rec = sample([run_dir, "--prompt", "To be", "--max-new-tokens", 12, "--temperature", 0], monkeypatch)
    assert rc == 0
    assert rec.writes[0] == "To be" and len([w for w in rec.writes if w]) > 3   # token by token
    err = capsys.readouterr().err
    assert "tokens/s" in err and "12 tokens" in err
    model, tok, _ = runs.load_run(run_dir)
    expect = Engine(model, tok).generate([tok.encode("To be")], SamplingParams(max_new_tokens=12, temperature=0))
    assert rec.text == "To be" + expect[0].text + "\n"
    # The same text without streaming, and without the KV cache (the reference path).
    for flag in ("--no-stream", "--no-cache"):
        rc, other = sample([run_dir, "--prompt", "To be", "--max-new-tokens", 12, "--temperature", 0, flag],
                           monkeypatch)
        # Byte for byte: one sequence gets no "===== prompt 1 =====" header on any path.
        assert rc == 0 and other.text == rec.text


def test_batch_cache_equals_no_cache(run_dir, monkeypatch, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Or not to be\n\nWhether 'tis nobler\\nin the mind\n", encoding="utf-8")
    base = [run_dir, "--prompt", "To be", "--prompts-file", prompts, "--max-new-tokens", 10, "--temperature", 0]
    rc, cached = sample(base, monkeypatch)
    assert rc == 0
    assert cached.text.count("===== prompt") == 3 and "nobler\nin the mind" in cached.text
    assert "3 sequence(s)" in capsys.readouterr().err
    rc, uncached = sample(base + ["--no-cache"], monkeypatch)
    assert rc == 0 and uncached.text == cached.text


def test_seeds_samples_and_stop(run_dir, monkeypatch):
    args = [run_dir, "--prompt", "To be", "--max-new-tokens", 10, "--num-samples", 3, "--seed", 7,
            "--temperature", 1.0]
    _, a = sample(args, monkeypatch)
    _, b = sample(args, monkeypatch)
    assert a.text == b.text and a.text.count("sample ") == 3
    outs = [part.split("\n", 1)[1] for part in a.text.split("=====")[2::2]]
    assert len(set(outs)) > 1                       # seed + i: different samples
    # A stop string cuts the text before it (and is not printed).
    _, full = sample([run_dir, "--prompt", "To be", "--max-new-tokens", 12, "--temperature", 0], monkeypatch)
    body = full.text[len("To be"):].rstrip("\n")
    stop = body[len(body) // 2:len(body) // 2 + 2]
    _, cut = sample([run_dir, "--prompt", "To be", "--max-new-tokens", 12, "--temperature", 0, "--stop", stop],
                    monkeypatch)
    assert cut.text == "To be" + body[:body.index(stop)] + "\n"


def test_bad_inputs(run_dir, tmp_path, monkeypatch, capsys, small_tokenizer):
    assert sample([tmp_path / "nope", "--prompt", "x"], monkeypatch)[0] == 2
    assert "no such run folder" in capsys.readouterr().err
    assert sample([run_dir, "--prompts-file", tmp_path / "missing.txt"], monkeypatch)[0] == 2
    assert sample([run_dir, "--temperature", -1], monkeypatch)[0] == 2
    assert sample([run_dir, "--num-samples", 0], monkeypatch)[0] == 2
    bert = tmp_path / "bert"
    cfg = GPTConfig.preset("tiny", "bert", vocab_size=448, block_size=32, n_layer=1, n_embd=32)
    runs.write_run_config(bert, cfg, small_tokenizer, "pretrain")
    runs.save_tensors(bert / runs.MODEL_FILE, runs.gpt_state(GPT(cfg)))
    capsys.readouterr()
    assert sample([bert, "--prompt", "x"], monkeypatch)[0] == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "bidirectional" in err and err.count("\n") == 1


def test_chat_flag_wraps_user_turn(run_dir, monkeypatch):
    from gptlab.tokenizer.chat_template import render_prompt
    rc, rec = sample([run_dir, "--chat", "--prompt", "hi", "--max-new-tokens", 6, "--temperature", 0], monkeypatch)
    assert rc == 0
    model, tok, _ = runs.load_run(run_dir)
    expect = Engine(model, tok).generate([render_prompt(tok, [{"role": "user", "content": "hi"}])],
                                         SamplingParams(max_new_tokens=6, temperature=0))[0].text
    assert rec.text == expect + "\n"
