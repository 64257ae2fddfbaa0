"""Long context: RoPE scaling formulas, scaled configs through run folders, continued training at a
longer length, passkey documents and scoring, and the passkey eval end to end."""
import json
import math
import random

import pytest
import torch

from conftest import cli, user_error
from gptlab import runs
from gptlab.data import passkey as pk
from gptlab.evals.passkey import answer_is_right, build_prompt, greedy_answers, passkey_grid
from gptlab.model.gpt import GPT, GPTConfig, rope_tables
from gptlab.model.rope import YARN_ALPHA, YARN_BETA, attention_factor, inv_frequencies, stretch_positions

HD, THETA = 32, 10000.0


def small(arch="fast", **kw):
    return GPTConfig.for_arch(arch, vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, **kw)


@pytest.mark.parametrize("scaling", ["linear", "ntk", "yarn"])
def test_every_scaling_at_factor_1_is_plain_rope(scaling):
    plain = rope_tables(HD, 64, THETA)
    scaled = rope_tables(HD, 64, THETA, scaling, 1.0, 32)
    assert torch.equal(plain[0], scaled[0]) and torch.equal(plain[1], scaled[1])
    torch.manual_seed(0)
    a = GPT(small())
    b = GPT(small(rope_scaling=scaling, rope_factor=1.0))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 64, (2, 32))
    assert torch.equal(a(x)[0], b(x)[0])


def test_scaled_positions_map_as_the_formulas_say():
    s, L = 4.0, 256
    plain = inv_frequencies(HD, THETA)
    # Position interpolation: position p under factor s turns like plain RoPE at p / s.
    cos_pi, sin_pi = rope_tables(HD, 4 * L, THETA, "linear", s, L)
    cos, sin = rope_tables(HD, L, THETA)
    assert torch.allclose(cos_pi[::4][:L], cos, atol=1e-4) and torch.allclose(sin_pi[::4][:L], sin, atol=1e-4)
    # NTK-aware: base theta * s^(d/(d-2)); the highest frequency is kept, the lowest divided by s.
    ntk = inv_frequencies(HD, THETA, "ntk", s)
    assert ntk[0] == plain[0]
    assert math.isclose(ntk[-1].item(), plain[-1].item() / s, rel_tol=1e-5)
    assert torch.allclose(ntk, 1.0 / (THETA * s ** (HD / (HD - 2))) ** (torch.arange(0, HD, 2) / HD))
    # YaRN: by turns over the training context, kept above beta, interpolated below alpha, blended between.
    yarn = inv_frequencies(HD, THETA, "yarn", s, L)
    turns = L * plain / (2 * math.pi)
    hi, lo = turns > YARN_BETA, turns < YARN_ALPHA
    mid = ~hi & ~lo
    assert hi.any() and lo.any() and mid.any()
    assert torch.equal(yarn[hi], plain[hi])
    assert torch.allclose(yarn[lo], plain[lo] / s)
    assert ((yarn[mid] < plain[mid]) & (yarn[mid] > plain[mid] / s)).all()
    # ... and its attention temperature: sqrt(1/t) = 0.1 ln(s) + 1 on both tables.
    assert math.isclose(attention_factor("yarn", s), 0.1 * math.log(s) + 1)
    cos_y, _ = rope_tables(HD, 8, THETA, "yarn", s, L)
    assert torch.allclose(cos_y[0], torch.full((HD,), 0.1 * math.log(s) + 1))


def test_with_context_records_the_scaling_and_refuses_learned_positions():
    c = small().with_context(scaling="yarn", factor=4)
    assert (c.block_size, c.rope_scaling, c.rope_factor, c.rope_original_context) == (128, "yarn", 4.0, 32)
    assert GPTConfig.from_dict(c.to_dict()) == c
    longer = c.with_context(block_size=512)   # a later extension still counts from the first length
    assert longer.trained_context == 32 and longer.rope_scaling == "yarn"
    assert c.with_context(scaling="none").rope_scaling is None
    from gptlab.errors import GptlabError
    with pytest.raises(GptlabError, match="RoPE architecture"):
        small("gpt2").with_context(scaling="linear", factor=2)
    with pytest.raises(GptlabError, match="rope_scaling"):
        small(rope_scaling="dynamic")


def test_stretch_positions_keeps_the_ends_and_blends_between():
    t = torch.randn(8, 4)
    s = stretch_positions(t, 15)
    assert s.shape == (15, 4)
    assert torch.allclose(s[0], t[0]) and torch.allclose(s[-1], t[-1])
    assert torch.allclose(s[1], (t[0] + t[1]) / 2, atol=1e-6)


def test_passkey_documents(tmp_path, capsys):
    rc, out, _ = cli(capsys, "data", "passkey", "--out", tmp_path / "pk.jsonl", "--n", "50", "--seed", "3")
    assert rc == 0
    docs = [json.loads(line)["text"] for line in (tmp_path / "pk.jsonl").read_text().splitlines()]
    assert len(docs) == 50
    for d in docs:
        key = d.rsplit(pk.QUESTION, 1)[1][:pk.KEY_DIGITS]
        assert pk.needle(key) in d and d.endswith(pk.QUESTION + key + ".\n")
        assert 100 - 20 <= len(d) <= 250 + 40
    assert "--min-chars/--max-chars" in user_error(capsys, "data", "passkey", "--out", tmp_path / "x.jsonl",
                                                   "--min-chars", "10")


def test_answer_scoring_takes_exactly_the_key():
    assert answer_is_right(" 71432.", "71432") and answer_is_right("71432\n", "71432")
    for wrong in [" 71433.", " 7143.", " 714321", " the key", "", "x 71432"]:
        assert not answer_is_right(wrong, "71432"), wrong


def test_passkey_prompt_has_the_exact_length_and_the_needle_at_its_depth(small_tokenizer):
    tok = small_tokenizer
    longest = max(len(s) for s in pk.FILLER.split(". ")) + 2   # the filler is cut at sentence ends
    for length in (120, 600):
        spots = []
        for depth in (0.0, 0.5, 1.0):
            ids = build_prompt(tok, length, depth, "12345", random.Random(0))
            assert len(ids) == length and ids[0] == tok.eot_id
            text = tok.decode(ids[1:])
            assert text.endswith(pk.QUESTION.rstrip()) and text.count("12345") == 1
            at = text.index(pk.needle("12345"))
            filler = len(text) - len(pk.needle("12345")) - len(pk.QUESTION.rstrip())
            spots.append(at)
            assert abs(at - depth * filler) <= longest, (length, depth, at, filler)
        assert spots[0] < spots[1] < spots[2]


def test_passkey_grid_scores_a_planted_right_and_wrong_answer(small_tokenizer, monkeypatch):
    """A stand-in that answers with the key it finds in its prompt scores 100%; one off by a digit 0%."""
    import gptlab.evals.passkey as ev
    tok = small_tokenizer

    def oracle(delta):
        def answers(model, prompts, new):
            out = []
            for p in prompts:
                key = tok.decode(p).split("The pass key is ")[1][:5]
                out.append(tok.encode(f" {int(key) + delta}."))
            return out
        return answers
    monkeypatch.setattr(ev, "greedy_answers", oracle(0))
    grid = passkey_grid(None, tok, 100, [1, 2], [0.0, 1.0], n=3)
    assert grid["acc"] == [[1.0, 1.0], [1.0, 1.0]] and grid["lengths"] == [100, 200]
    monkeypatch.setattr(ev, "greedy_answers", oracle(1))
    assert passkey_grid(None, tok, 100, [1], [0.5], n=3)["acc"] == [[0.0]]


def test_greedy_answers_match_the_uncached_argmax():
    torch.manual_seed(0)
    m = GPT(small(rope_scaling="yarn", rope_factor=2.0, rope_original_context=16)).eval()
    torch.nn.init.normal_(m.lm_head.weight, std=0.5)
    prompts = torch.randint(0, 64, (2, 10)).tolist()
    got = greedy_answers(m, prompts, 4)
    for p, g in zip(prompts, got):
        seq = list(p)
        for _ in range(4):
            seq.append(m(torch.tensor([seq]))[0][0, -1].argmax().item())
        assert seq[10:] == g


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, small_tokenizer):
    """A fast (RoPE) and a gpt2 (learned positions) run saved untrained: the CLI paths need weights, not skill."""
    d = tmp_path_factory.mktemp("longctx")
    out = {}
    for arch in ("fast", "gpt2"):
        cfg = GPTConfig.for_arch(arch, vocab_size=448, block_size=64, n_layer=1, n_head=2, n_embd=32)
        torch.manual_seed(0)
        model = GPT(cfg)
        runs.write_run_config(d / arch, cfg, small_tokenizer, stage="pretrain", extra={"data": ["x"]})
        runs.save_tensors(d / arch / runs.MODEL_FILE, runs.gpt_state(model))
        out[arch] = d / arch
    return out


def test_continued_training_at_a_longer_context(tmp_path, capsys, tiny_runs, corpus_file, one_thread):
    common = ["--data", corpus_file, "--max-steps", "2", "--batch-size", "2", "--eval-every", "2",
              "--eval-batches", "1", "--no-progress", "--no-sample"]
    rc, _, err = cli(capsys, "pretrain", "--init", tiny_runs["fast"], "--block-size", "256",
                     "--rope-scaling", "yarn", "--out", tmp_path / "yarn", *common)
    assert rc == 0, err
    model, _, cfg = runs.load_run(tmp_path / "yarn")
    c = model.config
    assert (c.block_size, c.rope_scaling, c.rope_factor, c.rope_original_context) == (256, "yarn", 4.0, 64)
    assert cfg["model"]["rope_scaling"] == "yarn"
    # learned positions: the table is interpolated to the new length, then trained
    rc, _, err = cli(capsys, "pretrain", "--init", tiny_runs["gpt2"], "--block-size", "128",
                     "--out", tmp_path / "g2", *common)
    assert rc == 0, err
    assert runs.load_run(tmp_path / "g2")[0].transformer.wpe.weight.shape == (128, 32)
    assert "RoPE architecture" in user_error(capsys, "pretrain", "--init", tiny_runs["gpt2"], "--block-size",
                                             "128", "--rope-scaling", "linear", "--out", tmp_path / "bad", *common)


def test_eval_passkey_end_to_end(tmp_path, capsys, tiny_runs, one_thread):
    rc, out, err = cli(capsys, "eval", tiny_runs["fast"], "--passkey", "--keys", "2", "--lengths", "1,2",
                       "--depths", "0,1", "--windows", "1", "--rope-scaling", "none", "yarn",
                       "--rope-factor", "2", "--out", tmp_path / "pk")
    assert rc == 0, err
    res = json.loads((tmp_path / "pk" / "results.json").read_text())
    assert res["train_len"] == 64 and res["lengths"] == [64, 128]
    assert len(res["variants"]) == 2
    for v in res["variants"].values():
        assert len(v["passkey"]["acc"]) == 2 and len(v["passkey"]["acc"][0]) == 2
        assert v["position_loss"]["window"] == 128
    for name in ("results.md", "passkey_heatmap.png", "loss_vs_position.png"):
        assert (tmp_path / "pk" / name).is_file()
    assert "--rope-factor" in user_error(capsys, "eval", tiny_runs["fast"], "--passkey", "--rope-scaling",
                                         "ntk", "--out", tmp_path / "pk2")
    assert "--depths" in user_error(capsys, "eval", tiny_runs["fast"], "--passkey", "--depths", "2",
                                    "--out", tmp_path / "pk3")
    rc, out, err = cli(capsys, "sample", tiny_runs["fast"], "--rope-scaling", "ntk", "--rope-factor", "2",
                       "--prompt", "To be", "--max-new-tokens", "3", "--seed", "0")
    assert rc == 0, err


@pytest.mark.parametrize("T,band,kv", [(5, 2, 3), (100, 8, 3), (129, 32, 1), (300, 16, 3), (64, 32, 3)])
def test_banded_attention_equals_masked_dense(T, band, kv):
    from gptlab.model.gpt import attend, band_mask, banded_attention
    torch.manual_seed(T)
    q = torch.randn(2, 3, T, 16, requires_grad=True)
    k, v = (torch.randn(2, kv, T, 16, requires_grad=True) for _ in range(2))
    got = banded_attention(q, k, v, band)
    want = attend(q, k, v, band_mask(T, T, band, "cpu"))
    assert torch.allclose(got, want, atol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad((got * g).sum(), (q, k, v))
    ref = torch.autograd.grad((want * g).sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref))


def test_gpt3_banded_layers_give_the_masked_reference_loss(monkeypatch):
    import gptlab.model.gpt as g
    torch.manual_seed(0)
    m = GPT(GPTConfig.for_arch("gpt3", vocab_size=64, block_size=200, n_layer=2, n_head=2, n_embd=32, sparse_band=16))
    x = torch.randint(0, 64, (2, 200))
    _, loss = m(x, x)
    monkeypatch.setattr(g, "banded_attention",
                        lambda q, k, v, band, dropout=0.0: g.attend(q, k, v, g.band_mask(q.size(2), q.size(2), band, "cpu")))
    _, ref = m(x, x)
    assert abs(loss.item() - ref.item()) < 1e-5
    # and the banded layer really is banded: a token beyond the band does not reach it
    with torch.no_grad():
        h1 = m.transformer.h[1].attn
        y = torch.randn(1, 200, 32)
        y2 = y.clone()
        y2[0, 0] += 1.0
        a, b = h1(y, None, None, None), h1(y2, None, None, None)
        assert torch.equal(a[0, 16:], b[0, 16:]) and not torch.equal(a[0, :16], b[0, :16])
