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
