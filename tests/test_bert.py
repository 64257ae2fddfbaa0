"""BERT: masked-LM masking statistics and loss positions; fill-in-the-blank with BERT and GPT runs."""
import pytest
import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.evals.fill import fill, pseudo_loglik, split_blanks
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.tokenizer import MASK
from gptlab.train.pretrain import MaskedLanguageModeling, mask_tokens


def tiny(tok, arch, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", arch, vocab_size=tok.vocab_size, block_size=64,
                                n_layer=2, n_embd=64)).eval()


def test_mlm_masking_statistics(small_tokenizer):
    tok = small_tokenizer
    mask_id = tok.special_id(MASK)
    special = sorted(tok.special_ids)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(len(special) + 10, tok.vocab_size, (64, 4096), generator=gen)
    x[:, ::97] = tok.eot_id                      # special tokens are never selected
    inputs, targets = mask_tokens(x, gen, mask_id, tok.vocab_size, special)
    selected = targets != -100
    n_sel = int(selected.sum())
    assert abs(n_sel / x.numel() - 0.15) < 0.005
    assert not selected[x == tok.eot_id].any()
    assert torch.equal(targets[selected], x[selected])           # targets are the original tokens
    as_mask = (inputs == mask_id) & selected
    unchanged = (inputs == x) & selected
    randomised = selected & ~as_mask & ~unchanged
    assert abs(int(as_mask.sum()) / n_sel - 0.8) < 0.01
    assert abs(int(unchanged.sum()) / n_sel - 0.1) < 0.01         # (+ random picks of the same id)
    assert abs(int(randomised.sum()) / n_sel - 0.1) < 0.01
    assert torch.equal(inputs[~selected], x[~selected])          # nothing else is touched


class _Data:
    def __init__(self, x):
        self.x = x

    def get_batch(self, split, batch_size, block_size, gen):
        return self.x, self.x


def test_mlm_loss_only_on_selected_positions(small_tokenizer):
    tok = small_tokenizer
    x = torch.tensor([tok.encode("To be, or not to be, that is the question: whether 'tis nobler")] * 8)
    stage = MaskedLanguageModeling(_Data(x), 8, x.shape[1], tok)
    inputs, targets = stage.get_batch("train", torch.Generator().manual_seed(1))
    selected = targets != -100
    assert selected.any() and torch.equal(targets[selected], x[selected])
    model = tiny(tok, "bert")
    with torch.no_grad():
        loss, _ = stage.loss(model, (inputs, targets))
        logits, _ = model(inputs)
    by_hand = F.cross_entropy(logits[selected].float(), x[selected])
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)


def test_pseudo_loglik_single_token_is_masked_prediction(small_tokenizer):
    tok = small_tokenizer
    model = tiny(tok, "bert")
    mask = tok.special_id(MASK)
    ids = [tok.eot_id] + tok.encode("To be, or not to be")
    got = pseudo_loglik(model, mask, [(ids, [3])])[0]
    masked = list(ids)
    masked[3] = mask
    with torch.no_grad():
        logits, _ = model(torch.tensor([masked]))
    assert got == pytest.approx(float(F.log_softmax(logits[0, 3], -1)[ids[3]]), abs=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_fill_returns_candidates_with_probabilities(arch, small_tokenizer):
    model = tiny(small_tokenizer, arch)
    res = fill(model, small_tokenizer, "To be, or not to ___, that is the question", top_k=5)
    assert len(res["blanks"]) == 1
    ranked = res["blanks"][0]
    assert 1 <= len(ranked) <= 5 and all(r["text"].strip() for r in ranked)
    probs = [r["prob"] for r in ranked]
    assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-9
    assert probs == sorted(probs, reverse=True)
    assert res["filled"].startswith("To be, or not to ") and "___" not in res["filled"]
    two = fill(model, small_tokenizer, "___和阿里 ___ 一起", top_k=3)
    assert len(two["blanks"]) == 2 and "___" not in two["filled"]
    given = fill(model, small_tokenizer, "The slings and ___ of fortune", candidates=["arrows", "apple", "sea"])
    assert sorted(r["text"] for r in given["blanks"][0]) == ["apple", "arrows", "sea"]
    assert sum(r["prob"] for r in given["blanks"][0]) == pytest.approx(1.0)


def test_fill_errors(small_tokenizer, tmp_path, capsys):
    with pytest.raises(GptlabError):
        split_blanks("no blank here")
    from gptlab.cli import main
    from gptlab import runs
    model = tiny(small_tokenizer, "bert")
    runs.write_run_config(tmp_path / "r", model.config, small_tokenizer, stage="pretrain")
    runs.save_tensors(tmp_path / "r" / "model.safetensors", runs.gpt_state(model))
    assert main(["fill", str(tmp_path / "r"), "nothing to fill"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["fill", str(tmp_path / "r"), "To be or not to ___", "--top-k", "2"]) == 0
    assert "blank 1:" in capsys.readouterr().out


def test_bert_is_post_ln_with_an_embedding_layernorm(small_tokenizer):
    # BERT (Devlin et al. 2018) normalises after each residual add and after summing the embeddings;
    # there is no final LayerNorm. Checked by the function the blocks compute, not only their names.
    model = tiny(small_tokenizer, "bert")
    assert not model.config.pre_norm and "ln_f" not in model.transformer and "ln_e" in model.transformer
    block = model.transformer.h[0]
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        a = block.ln_1(x + block.attn(x, None, None, None))
        want = block.ln_2(a + block.mlp(a))
        assert torch.allclose(block(x), want, atol=1e-6)
        # Every token's output is normalised: mean 0, variance 1 over the features (LN at init).
        h = model.hidden(torch.tensor([small_tokenizer.encode("To be, or not to be")]))
        assert h.mean(-1).abs().max() < 1e-4 and (h.var(-1, unbiased=False) - 1).abs().max() < 1e-3
        ids = torch.tensor([small_tokenizer.encode("To be")])
        emb = model.transformer.wte(ids) + model.transformer.wpe.weight[:ids.shape[1]] + model.transformer.wse.weight[0]
        blocks_only = model.transformer.ln_e(emb)
        for b in model.transformer.h:
            blocks_only = b(blocks_only)
        assert torch.allclose(model.hidden(ids), blocks_only, atol=1e-6)
    with pytest.raises(GptlabError, match="bidirectional"):
        model.new_cache(1)


def test_bert_segment_embeddings_change_the_output_and_learn(small_tokenizer):
    model = tiny(small_tokenizer, "bert")
    assert model.transformer.wse.weight.shape == (2, 64)
    ids = torch.tensor([small_tokenizer.encode("To be, or not to be")])
    seg_b = torch.zeros_like(ids)
    seg_b[:, 3:] = 1
    with torch.no_grad():
        all_a, _ = model(ids)
        assert torch.equal(all_a, model(ids, segments=torch.zeros_like(ids))[0])   # default: sentence A
        mixed, _ = model(ids, segments=seg_b)
    assert not torch.allclose(mixed, all_a, atol=1e-4)
    model.train()
    _, loss = model(ids, ids, segments=seg_b)
    loss.backward()
    assert model.transformer.wse.weight.grad[1].abs().sum() > 0
    with pytest.raises(ValueError, match="no segment embeddings"):
        tiny(small_tokenizer, "gpt2")(ids, segments=seg_b)


def test_finetuned_bert_reads_pairs_as_two_segments(small_tokenizer):
    from gptlab.tokenizer import DELIM
    from gptlab.train.finetune import FineTuneModel
    tok = small_tokenizer
    delim = tok.special_id(DELIM)
    model = FineTuneModel(tiny(tok, "bert"), "entailment", 2, segment_token=delim)
    idx = torch.tensor([[1, 30, 31, delim, 40, 41, delim, 42]])
    assert model.segments(idx).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    assert FineTuneModel(tiny(tok, "gpt2"), "entailment", 2, segment_token=delim).segments(idx) is None


def test_mlm_random_replacements_are_never_special_tokens(small_tokenizer):
    tok = small_tokenizer
    special = sorted(tok.special_ids)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(len(special), tok.vocab_size, (64, 4096), generator=gen)
    inputs, targets = mask_tokens(x, gen, tok.special_id(MASK), tok.vocab_size, special, rate=1.0)
    replaced = (inputs != x) & (inputs != tok.special_id(MASK))
    assert int(replaced.sum()) > 20_000                   # ~10% of 262,144 draws
    assert not torch.isin(inputs[replaced], torch.tensor(special)).any()
    assert int(inputs[replaced].max()) < tok.vocab_size
    # Every ordinary id can be drawn (the pool is the whole vocabulary minus the specials).
    assert len(torch.unique(inputs[replaced])) > 0.95 * (tok.vocab_size - len(special))
