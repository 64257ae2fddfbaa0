"""The serving load benchmark on a tiny random-weights model: sane rows, counted tokens, bad input."""
import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.generate.engine import SamplingParams, sample_token, sample_tokens
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.runs import MODEL_FILE, gpt_state, save_tensors, write_run_config
from gptlab.serve.loadtest import format_table, percentile, run_load
from gptlab.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tok = Tokenizer.train(["Hello there! How are you today? The quick brown fox jumps over the lazy dog. " * 30],
                          vocab_size=300)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    out = tmp_path_factory.mktemp("tiny_run")
    write_run_config(out, cfg, tok, "random")
    save_tensors(out / MODEL_FILE, gpt_state(GPT(cfg)))
    return out


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0


def test_quick_load_run(run_dir, capsys):
    threads = torch.get_num_threads()
    rows = run_load(run_dir, clients=(1, 4), max_tokens=6, requests_per_client=2, max_batch=4,
                    time_limit=60)
    assert torch.get_num_threads() == threads   # the caller's torch settings are restored
    assert [r["clients"] for r in rows] == [1, 4]
    for r in rows:
        assert r["errors"] == 0 and not r["timed_out"]
        assert r["requests"] == 2 * r["clients"]
        # ignore_eos: every answer is exactly max_tokens long, as the server's usage counts them.
        assert r["short_answers"] == 0 and r["tokens"] == 6 * r["requests"]
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p95_ms"]
        assert r["ttft_p50_ms"] <= r["latency_p50_ms"]
        assert r["tok_s"] == pytest.approx(r["tokens"] / r["seconds"], rel=0.05)
        # Served here: the scheduler's decode steps are counted; rows per step never exceed the clients.
        assert r["decode_steps"] > 0 and 0 < r["mean_batch"] <= r["clients"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0
    table = capsys.readouterr().out
    assert "tok/s" in table and "TTFT p95 ms" in table
    assert format_table(rows).count("\n") == 3   # header, rule, two rows


def test_in_process_clients(run_dir):
    rows = run_load(run_dir, clients=(2,), max_tokens=3, requests_per_client=1, max_batch=2,
                    client_process=False, show=False)
    assert rows[0]["requests"] == 2 and rows[0]["tokens"] == 6 and rows[0]["speedup"] is None


def test_batched_sampling_matches_one_row_at_a_time():
    # The scheduler samples all rows at once; each row must get what it would get alone (same seed).
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(temperature=1.3),
              SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=1.0, top_p=0.8)]
    for seed in range(20):
        batched = sample_tokens(logits, params, [torch.Generator().manual_seed(seed + i) for i in range(5)])
        alone = [sample_token(logits[i], p, torch.Generator().manual_seed(seed + i)) for i, p in enumerate(params)]
        assert batched == alone
    # Inverse-CDF draws follow the distribution: a 3:1 split lands near 75%.
    gen = torch.Generator().manual_seed(1)
    two = torch.log(torch.tensor([[3.0, 1.0, 0.0]]))
    picks = [sample_tokens(two, [SamplingParams(temperature=1.0)], [gen])[0] for _ in range(2000)]
    assert set(picks) <= {0, 1} and 0.71 < picks.count(0) / 2000 < 0.79


def test_bad_input(run_dir, tmp_path):
    with pytest.raises(GptlabError):
        run_load(run_dir, clients=())
    with pytest.raises(GptlabError):
        run_load(run_dir, clients=(0,))
    with pytest.raises(GptlabError):
        run_load(run_dir, max_tokens=0)
    with pytest.raises(GptlabError):
        run_load(tmp_path / "missing")
    with pytest.raises(GptlabError):
        run_load("http://127.0.0.1:9", clients=(1,))   # nothing listens there
