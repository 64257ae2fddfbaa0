"""The GPT family: structure of each architecture, causality, sparse bands, KV cache, accounting."""
import math

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.model.gpt import GPT, GPTConfig, band_mask

CAUSAL = ["gpt1", "gpt2", "gpt3", "modern", "fast"]


def tiny(arch, **kw):
    base = dict(vocab_size=300, block_size=48, sparse_band=8)
    base.update(kw)
    return GPTConfig.preset("tiny", arch, **base)


def built(arch, **kw) -> GPT:
    """A model whose every weight is non-zero: ``fast`` starts its output projections at zero, which
    would let a cache test pass with the cached paths ignored."""
    model = GPT(tiny(arch, **kw)).eval()
    if arch == "fast":
        with torch.no_grad():
            for p in model.parameters():
                if not p.abs().sum():
                    p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("arch", CAUSAL + ["bert"])
def test_forward_shapes_and_loss(arch):
    torch.manual_seed(0)
    model = GPT(tiny(arch))
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        logits, loss = model(x, torch.randint(0, 300, (2, 20)))
    assert logits.shape == (2, 20, 300)
    # An untrained model is close to uniform: loss near ln(vocab).
    assert abs(loss.item() - math.log(300)) < 1.5


@pytest.mark.parametrize("arch", ["gpt2", "modern", "bert"])
def test_fused_lm_loss_matches_plain_cross_entropy(arch, monkeypatch):
    """Training on CPU fuses the LM head and the loss (model/fused.py): same loss, same gradients."""
    torch.manual_seed(0)
    model = GPT(tiny(arch))
    x = torch.randint(0, 300, (3, 40))
    y = torch.randint(0, 300, (3, 40))
    y[:, ::4] = -100    # ignored positions (SFT masks, BERT's unselected tokens)

    def loss_and_grads(fused):
        monkeypatch.setattr(GPT, "fused_loss", fused)
        model.zero_grad(set_to_none=True)
        logits, loss = model(x, y)
        assert (logits is None) == fused    # the fused path never builds [tokens, vocab] logits
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_f, grads_f = loss_and_grads(True)
    loss_p, grads_p = loss_and_grads(False)
    assert torch.allclose(loss_f, loss_p, atol=1e-6)
    for name in grads_p:
        assert torch.allclose(grads_f[name], grads_p[name], atol=1e-6, rtol=1e-4), name


def test_fused_cross_entropy_exact_when_probabilities_underflow():
    """Rows whose target probability underflows to 0 in fp32 still get the exact loss."""
    import torch.nn.functional as F
    from gptlab.model.fused import linear_cross_entropy
    torch.manual_seed(0)
    h = (torch.randn(70, 16) * 80).requires_grad_()    # logit gaps in the hundreds
    w = torch.randn(200, 16).requires_grad_()
    t = torch.randint(0, 200, (70,))
    ref = F.cross_entropy(h @ w.t(), t)
    got = linear_cross_entropy(h, w, t)
    assert ref.item() > 100 and torch.allclose(got, ref, rtol=1e-5)
    g_ref = torch.autograd.grad(ref * 3, (h, w))
    g_got = torch.autograd.grad(linear_cross_entropy(h, w, t) * 3, (h, w))
    for a, b in zip(g_got, g_ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_architecture_structure():
    g1, g2, mod = GPT(tiny("gpt1")), GPT(tiny("gpt2")), GPT(tiny("modern"))
    assert "ln_f" not in g1.transformer and "ln_f" in g2.transformer     # final LN only pre-LN
    assert g1.config.dropout == 0.1 and g1.lm_head.weight is g1.transformer.wte.weight
    assert "wpe" in g2.transformer and "wpe" not in mod.transformer      # learned positions vs RoPE
    assert all(p.dim() > 1 or "weight" in n for n, p in mod.named_parameters())  # no biases
    assert not any(n.endswith(".bias") for n, _ in mod.named_parameters())
    assert mod.config.n_kv_head == 2 and mod.config.n_head == 4          # grouped-query attention
    assert mod.transformer.h[0].attn.c_attn.out_features == (4 + 2 * 2) * 32
    assert hasattr(mod.transformer.h[0].mlp, "gate_proj")                 # SwiGLU


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", "gpt2", vocab_size=300, n_layer=8, n_embd=256)
    model = GPT(cfg)
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 8)) < 0.001
    other = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(other - 0.02) < 0.002
    g1 = GPT(GPTConfig.preset("tiny", "gpt1", vocab_size=300, n_layer=8, n_embd=256))
    assert abs(g1.transformer.h[0].attn.c_proj.weight.std().item() - 0.02) < 0.002


def test_fast_starts_blocks_as_identity_but_not_the_head():
    """Residual projections at zero (each block starts as the identity); the LM head random like the
    embeddings: with both at zero the first step moves nothing but the head, and the model
    reaches a given loss later (docs/BENCHMARKS.md)."""
    torch.manual_seed(0)
    model = GPT(tiny("fast"))
    block = model.transformer.h[0]
    assert not block.attn.c_proj.weight.abs().sum() and not block.mlp.c_proj.weight.abs().sum()
    assert abs(model.lm_head.weight.std().item() - 0.02) < 0.002
    assert model.lm_head.weight is not model.transformer.wte.weight


def test_gpt1_is_post_ln():
    """GPT-1: the block output is a LayerNorm output (unit variance per token), pre-LN's is not."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 128) * 5
    for arch, expect_normed in [("gpt1", True), ("gpt2", False)]:
        block = GPT(tiny(arch, dropout=0.0)).transformer.h[0].eval()
        y = block(x)
        normed = torch.allclose(y.std(-1, unbiased=False), torch.ones(2, 10), atol=1e-3)
        assert normed == expect_normed


@pytest.mark.parametrize("arch", CAUSAL)
def test_causal(arch):
    torch.manual_seed(0)
    model = GPT(tiny(arch)).eval()
    x = torch.randint(0, 300, (1, 20))
    y = x.clone()
    y[0, 15] = (y[0, 15] + 1) % 300
    a, b = model.hidden(x), model.hidden(y)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_bert_is_bidirectional():
    torch.manual_seed(0)
    model = GPT(tiny("bert")).eval()
    x = torch.randint(0, 300, (1, 20))
    y = x.clone()
    y[0, 15] = (y[0, 15] + 1) % 300
    assert not torch.allclose(model.hidden(x)[:, :15], model.hidden(y)[:, :15])


def test_gpt3_alternates_dense_and_banded_layers():
    cfg = tiny("gpt3", n_layer=4, sparse_band=4)
    assert [cfg.is_sparse_layer(i) for i in range(4)] == [False, True, False, True]
    m = band_mask(6, 6, 3, "cpu")
    assert m[5].tolist() == [False, False, False, True, True, True]
    # A banded layer ignores tokens further back than the band.
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    attn = model.transformer.h[1].attn
    x = torch.randn(1, 12, 128)
    y = x.clone()
    y[0, 2] += 1.0
    out_x, out_y = attn(x, None, None, None), attn(y, None, None, None)
    assert torch.allclose(out_x[0, 6:], out_y[0, 6:], atol=1e-6)   # position 2 is > 4 back
    assert not torch.allclose(out_x[0, 2:6], out_y[0, 2:6])
    dense = model.transformer.h[0].attn
    assert not torch.allclose(dense(x, None, None, None)[0, 6:], dense(y, None, None, None)[0, 6:])


@pytest.mark.parametrize("arch", CAUSAL)
def test_kv_cache_matches_full_forward(arch):
    torch.manual_seed(0)
    model = built(arch)
    x = torch.randint(0, 300, (3, 40))
    full = model.hidden(x)
    cache = model.new_cache(3)
    parts = [model.hidden(x[:, :17], cache=cache), model.hidden(x[:, 17:18], cache=cache),
             model.hidden(x[:, 18:], cache=cache)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    # Rows at different lengths decode together.
    cache = model.new_cache(4)
    model.hidden(x[1:2, :10], cache=cache, rows=torch.tensor([3]))
    model.hidden(x[0:1, :30], cache=cache, rows=torch.tensor([0]))
    step = model.hidden(torch.stack([x[0, 30], x[1, 10]])[:, None], cache=cache, rows=torch.tensor([0, 3]))
    assert torch.allclose(step[0, 0], full[0, 30], atol=1e-5)
    assert torch.allclose(step[1, 0], full[1, 10], atol=1e-5)
    assert cache.lengths == [31, 0, 0, 11]


@pytest.mark.parametrize("arch", CAUSAL)
def test_decode_logits_match_full_forward(arch):
    """GPT.decode (the one-token fast path) in every cache layout it handles: one row, rows that are
    not consecutive, consecutive rows at different lengths, rows in lockstep; past gpt3's band
    (8 keys) and with GQA for modern (4 query heads, 2 key/value heads)."""
    torch.manual_seed(0)
    model = built(arch)
    assert arch != "modern" or model.config.n_kv_head < model.config.n_head
    x = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        full = model.lm_logits(model.hidden(x))

        def check(tokens, rows, want):   # want: (sequence, position) of each row's new token
            got = model.lm_logits(model.decode(tokens, cache, rows)).view(len(rows), -1)
            for g, (s, t) in zip(got, want):
                assert (g - full[s, t]).abs().max() < 1e-5, (rows, s, t)

        cache = model.new_cache(5)
        model.hidden(x[0:1, :20], cache=cache, rows=[4])
        model.hidden(x[1:2, :10], cache=cache, rows=[1])
        model.hidden(x[2:3, :9], cache=cache, rows=[2])
        for t in range(20, 24):                            # one row, Python ints
            check([int(x[0, t])], [4], [(0, t)])
        check([int(x[0, 24]), int(x[1, 10])], [4, 1], [(0, 24), (1, 10)])    # not consecutive
        check([int(x[1, 11]), int(x[2, 9])], [1, 2], [(1, 11), (2, 9)])   # consecutive, unequal
        check(x[2, 10:11], [2], [(2, 10)])                  # one row, a token tensor
        check(torch.stack([x[1, 12], x[2, 11]]), [1, 2], [(1, 12), (2, 11)])  # a tensor of tokens
        assert cache.lengths[1:3] == [13, 12]
        check(x[2, 12:13], [2], [(2, 12)])
        for t in range(13, 16):                            # consecutive rows in lockstep
            check([int(x[1, t]), int(x[2, t])], [1, 2], [(1, t), (2, t)])
        assert cache.lengths == [0, 16, 16, 0, 25]

        # Weights changed in place (PPO's optimizer, load_state_dict): decode follows at once.
        model.load_state_dict(built(arch).state_dict())
        full = model.lm_logits(model.hidden(x))
        cache = model.new_cache(2)
        model.hidden(x[:2, :25], cache=cache)
        check(x[:2, 25], [0, 1], [(0, 25), (1, 25)])


@pytest.mark.parametrize("arch", ["gpt2", "modern", "fast"])
def test_decode_under_autocast_and_with_a_bf16_cache(arch):
    """The dtype seams of decoding (on GPUs it runs under bf16 autocast over an fp32 cache): bf16 keys
    into an fp32 cache, and an fp32 model over a bf16 cache, both stay close to the full forward."""
    torch.manual_seed(0)
    model = built(arch)
    x = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        want = model.lm_logits(model.hidden(x))[:, 24:]
        for dtype, amp in ((torch.float32, True), (torch.bfloat16, False)):
            cache = model.new_cache(2, dtype=dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                model.hidden(x[:, :24], cache=cache)
                got = torch.stack([model.lm_logits(model.decode(x[:, t], cache, [0, 1])).float()
                                   for t in range(24, 30)], 1)
            assert (got - want).abs().max() < 0.05, (dtype, amp)


def test_accounting_and_config_errors():
    model = GPT(tiny("gpt2"))
    n = model.num_params()
    assert n == sum(p.numel() for p in set(model.parameters()))
    cfg = model.config
    assert model.flops_per_token() == 6 * model.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    with pytest.raises(GptlabError):
        GPTConfig(arch="gpt5")
    with pytest.raises(GptlabError):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(GptlabError):
        GPTConfig.preset("huge")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_presets_reach_paper_shapes():
    g = GPTConfig.preset("gpt2-124m", "gpt2", vocab_size=50257)
    assert (g.n_layer, g.n_embd, g.n_head, g.block_size) == (12, 768, 12, 1024)
    one = GPTConfig.preset("gpt1", "gpt1", vocab_size=40478)
    assert (one.n_layer, one.n_embd, one.block_size, one.hidden_dim) == (12, 768, 512, 3072)

