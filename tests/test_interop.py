"""Hugging Face interop: export loads in transformers with equal logits and greedy generations; GPT-2
and Llama checkpoints built by transformers import with equal logits (key prefix, mask buffers,
vocab.json + merges.txt variants); unsupported archs and pickle weights are refused clearly."""
import json

import pytest
import torch

from gptlab import runs
from gptlab.cli import main
from gptlab.interop.hf import EXPORTABLE
from gptlab.generate.engine import Engine, SamplingParams
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.tokenizer import ASSISTANT_END, USER_START, Tokenizer

transformers = pytest.importorskip("transformers")

PROMPT = "To be, or not to be, that is the question"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def make_run(path, tok, arch, **kw):
    """A tiny random gptlab run; weights perturbed so norms and biases are not at their init values."""
    torch.manual_seed(0)
    base = dict(vocab_size=448, block_size=64, n_layer=2, n_embd=64)
    base.update(kw)
    cfg = GPTConfig.preset("tiny", arch, **base)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    runs.write_run_config(path, cfg, tok, "pretrain")
    runs.save_tensors(path / runs.MODEL_FILE, runs.gpt_state(model))
    return model.eval()


def hf_load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("arch,kw", [("gpt2", {}), ("modern", {}), ("fast", {}),
                                     ("modern", {"tie_embeddings": False, "n_kv_head": 1}),
                                     ("gpt2", {"tie_embeddings": False, "ffn_hidden": 96})])
def test_export_matches_transformers(tmp_path, small_tokenizer, arch, kw):
    model = make_run(tmp_path / "run", small_tokenizer, arch, **kw)
    assert main(["export", str(tmp_path / "run"), "--format", "hf", str(tmp_path / "hf")]) == 0
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= files
    assert runs.load_metadata(tmp_path / "hf" / "model.safetensors")["format"] == "pt"
    hf_model, hf_tok = hf_load(tmp_path / "hf")
    assert type(hf_model).__name__ == EXPORTABLE[arch]

    ids = small_tokenizer.encode(PROMPT)
    assert hf_tok(PROMPT)["input_ids"] == ids                      # same tokenizer
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x)[0], hf_model(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    # Greedy decoding: gptlab's KV-cache engine and transformers' generate() pick the same tokens.
    engine_ids = Engine(model, small_tokenizer).generate(
        [ids], SamplingParams(max_new_tokens=20, temperature=0))[0].ids
    out = hf_model.generate(x, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(x))
    hf_ids = out[0, len(ids):].tolist()
    stops = {small_tokenizer.eot_id, small_tokenizer.special_id(ASSISTANT_END)}
    while hf_ids and hf_ids[-1] in stops:       # HF keeps the stop token; the engine drops it
        hf_ids.pop()
    assert hf_ids == engine_ids and len(engine_ids) > 0

    # The chat template travels with the tokenizer.
    text = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True)
    assert text == "<|user_start|>hi<|user_end|><|assistant_start|>"


def test_export_then_import_is_lossless(tmp_path, small_tokenizer):
    for arch in ("gpt2", "modern"):
        model = make_run(tmp_path / arch, small_tokenizer, arch)
        main(["export", str(tmp_path / arch), str(tmp_path / f"hf_{arch}")])
        assert main(["import", str(tmp_path / f"hf_{arch}"), "--out", str(tmp_path / f"back_{arch}")]) == 0
        back, tok, cfg = runs.load_run(tmp_path / f"back_{arch}")
        assert cfg["stage"] == "import" and back.config.arch == arch
        assert tok.vocab_size == small_tokenizer.vocab_size
        for k, v in model.state_dict().items():
            assert torch.equal(v, back.state_dict()[k]), k


def hf_gpt2(vocab_size=448, tie=True):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                     tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def compare_logits(hf_model, run_dir, ids):
    model, _, _ = runs.load_run(run_dir)
    x = torch.tensor([ids])
    with torch.no_grad():
        return (model(x)[0] - hf_model(x).logits).abs().max().item()


@pytest.mark.parametrize("tie", [True, False])
def test_import_transformers_gpt2(tmp_path, small_tokenizer, tie):
    hf_model = hf_gpt2(tie=tie)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    small_tokenizer.save(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert compare_logits(hf_model, tmp_path / "run", small_tokenizer.encode(PROMPT)) < 1e-4
    assert (tmp_path / "run" / "summary.json").is_file()


def write_gpt2_tokenizer_files(tok: Tokenizer, folder) -> Tokenizer:
    """GPT-2's original tokenizer files (vocab.json + merges.txt) made from a trained byte-level BPE:
    ordinary tokens numbered from 0 and <|endoftext|> last, the only special token, as in GPT-2."""
    spec = json.loads(tok.hf.to_str())["model"]
    words = [w for w, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1]) if not w.startswith("<|")]
    vocab = {w: i for i, w in enumerate(words + ["<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return Tokenizer.load(folder)


def test_import_old_layout_and_vocab_merges(tmp_path, small_tokenizer):
    """No 'transformer.' prefix, attn.bias / masked_bias buffers present, vocab.json + merges.txt."""
    from safetensors.torch import save_file
    (tmp_path / "hf").mkdir()
    gpt2_tok = write_gpt2_tokenizer_files(small_tokenizer, tmp_path / "hf")
    hf_model = hf_gpt2(vocab_size=gpt2_tok.vocab_size)
    hf_model.config.save_pretrained(tmp_path / "hf")
    tensors = {k[len("transformer."):]: v.contiguous() for k, v in hf_model.state_dict().items()
               if k.startswith("transformer.")}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    tok = Tokenizer.load(tmp_path / "run")
    ids = tok.encode(PROMPT)
    assert tok.decode(ids) == PROMPT and ids == gpt2_tok.encode(PROMPT) and len(ids) < len(PROMPT) // 2
    assert compare_logits(hf_model, tmp_path / "run", ids) < 1e-4


def test_import_transformers_llama(tmp_path, small_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=448, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    hf_model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    small_tokenizer.save(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    run_cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_cfg["model"]["arch"] == "modern" and run_cfg["model"]["rope_theta"] == 500.0
    assert compare_logits(hf_model, tmp_path / "run", small_tokenizer.encode(PROMPT)) < 1e-4


def test_add_chat_tokens(tmp_path, small_tokenizer, capsys):
    """A GPT-2 tokenizer has no chat tokens: chat refuses clearly; --add-chat-tokens appends them and
    grows the embedding (rows = mean embedding) while the old tokens keep their logits."""
    (tmp_path / "hf").mkdir()
    gpt2_tok = write_gpt2_tokenizer_files(small_tokenizer, tmp_path / "hf")
    hf_model = hf_gpt2(vocab_size=gpt2_tok.vocab_size)      # no spare rows, like GPT-2's 50257
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "plain")]) == 2
    assert "--add-chat-tokens" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "plain"), "--chat", "--prompt", "hi"]) == 2

    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "chat"), "--add-chat-tokens"]) == 0
    model, tok, cfg = runs.load_run(tmp_path / "chat")
    n_old = gpt2_tok.vocab_size
    uid = tok.special_id(USER_START)
    assert len(cfg["added_tokens"]) == 19 and uid >= n_old            # everything but <|endoftext|>
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= tok.vocab_size > n_old
    mean = hf_model.transformer.wte.weight[:n_old].mean(0)
    assert torch.allclose(model.transformer.wte.weight[uid], mean, atol=1e-6)
    ids = tok.encode(PROMPT)
    assert ids == gpt2_tok.encode(PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][..., :n_old]
        theirs = hf_model(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert main(["sample", str(tmp_path / "chat"), "--chat", "--prompt", "hi", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0


def test_unsupported_arch_and_bad_inputs(tmp_path, small_tokenizer, capsys):
    for arch in ("gpt1", "gpt3", "bert"):
        make_run(tmp_path / arch, small_tokenizer, arch)
        assert main(["export", str(tmp_path / arch), str(tmp_path / f"hf_{arch}")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "no Hugging Face equivalent" in err and "\n" not in err
    (tmp_path / "pkl").mkdir()
    (tmp_path / "pkl" / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "pkl" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert main(["import", str(tmp_path / "pkl"), "--out", str(tmp_path / "x")]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "y")]) == 2
