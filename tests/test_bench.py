"""`gptlab bench`: the rows docs/BENCHMARKS.md quotes, on a shape small enough for the test suite."""
import json

import pytest

from gptlab.cli import main

SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", "300",
         "--batch-size", "2"]


def test_bench_train_and_generate_report_mfu_speedup_and_the_hardware(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    assert main(["bench", "all", *SMALL, "--steps", "8", "--warmup", "1", "--new-tokens", "24",
                 "--json", str(out)]) == 0
    rows = {r["what"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"peak", "train", "generate"}
    peak, train, gen = rows["peak"], rows["train"], rows["generate"]
    assert peak["flops"] > 1e8 and peak["hardware"] == train["hardware"]
    # MFU is model FLOPs/token x tokens/s over the peak; the row must agree with its own parts.
    assert train["flops_per_token"] > 0 and train["tokens_per_s"] > 0
    assert train["achieved_flops"] == pytest.approx(train["flops_per_token"] * train["tokens_per_s"], rel=1e-3)
    assert 0 < train["mfu"] < 5
    assert gen["new_tokens"] == 24 and gen["tokens_per_s_cache"] > 0 and gen["tokens_per_s_no_cache"] > 0
    assert gen["speedup"] == pytest.approx(gen["tokens_per_s_cache"] / gen["tokens_per_s_no_cache"], rel=0.02)
    printed = capsys.readouterr().out
    assert train["hardware"] in printed and "MFU" in printed and "with KV cache" in printed


def test_hf_generate_script_runs_both_libraries_on_the_same_weights(tmp_path, capsys, one_thread):
    # bench/hf_generate.py is what BENCHMARKS' decode rows quote; it imported a module that had been
    # renamed and nothing noticed. Tiny shape, 8 tokens: both sides must emit the same tokens.
    import importlib.util
    from pathlib import Path
    pytest.importorskip("transformers")
    path = Path(__file__).resolve().parents[1] / "bench" / "hf_generate.py"
    spec = importlib.util.spec_from_file_location("hf_generate", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--presets", "tiny", "--archs", "gpt2", "--new-tokens", "8", "--repeats", "1",
                     "--keep", str(tmp_path)]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny")][0]
    assert row.split()[-1] == "True"   # same tokens
    assert (tmp_path / "tiny-gpt2" / "model.safetensors").is_file()
    # Bytes a decoding step reads: tied gpt2 reads its token table once (as the head), not its
    # position table; untied fast reads the head but not the token table.
    from gptlab.model.gpt import GPT, GPTConfig
    g = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=128))
    m = GPT(GPTConfig.preset("tiny", "fast", vocab_size=128))
    assert mod.weight_bytes_per_token(g) == 4 * (g.num_params() - g.transformer.wpe.weight.numel())
    untied = 4 * (sum(p.numel() for p in m.parameters()) - m.transformer.wte.weight.numel())
    assert mod.weight_bytes_per_token(m) == untied
