"""GGUF export: read back with the gguf package's own reader; every tensor, the metadata and the
tokenizer compared against the run. The logits check runs an independent numpy forward pass written
the way llama.cpp computes each architecture (its tensor names and shapes, adjacent-pair RoPE for
llama, half-split RoPE and per-head QK-norm for qwen3, tanh GELU for gpt2), so a wrong reordering or
a missing tensor fails here even where llama.cpp itself is not installed. The slow test loads the file
with llama-cpp-python where that package is installed."""
import json

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXT, cli, user_error
from gptlab.model.gpt import GPTConfig
from gptlab.tokenizer import ASSISTANT_END, EOT, SPECIAL_TOKENS, Tokenizer
from gptlab.tokenizer.chat_template import CHAT_TEMPLATE_JINJA
from test_interop import make_run

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "To be, or not to be: 23 + 58 = 81, and 1234567 apples cost 90.5 dollars.\n  苹果 => apple"


def read(path):
    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        tensors[t.name] = (t.tensor_type.name, data.astype(np.float32))
    return meta, tensors


# ----- llama.cpp's computation, in numpy ----------------------------------------------------------
def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, theta, adjacent):
    """x [T, H, hd]. adjacent: pairs (0,1), (2,3) ... (llama.cpp's NORM mode); else (i, i+hd/2) (NEOX)."""
    T, _, hd = x.shape
    ang = np.arange(T)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None, :]   # [T, hd/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = (x[..., 0::2], x[..., 1::2]) if adjacent else (x[..., :hd // 2], x[..., hd // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if adjacent:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., :hd // 2], out[..., hd // 2:] = ra, rb
    return out


def _attention(q, k, v):
    T, H, hd = q.shape
    rep = H // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(T, H * hd)


def llama_cpp_logits(meta, t, ids):
    arch = meta["general.architecture"]
    W = {k: v for k, (_, v) in t.items()}
    L, H, Hkv = meta[f"{arch}.block_count"], meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    x = W["token_embd.weight"][ids].astype(np.float64)
    T = len(ids)
    if arch == "gpt2":
        eps = meta["gpt2.attention.layer_norm_epsilon"]
        x = x + W["position_embd.weight"][:T]
        for i in range(L):
            b = f"blk.{i}."
            h = _layer_norm(x, W[b + "attn_norm.weight"], W[b + "attn_norm.bias"], eps)
            qkv = h @ W[b + "attn_qkv.weight"].T + W[b + "attn_qkv.bias"]
            q, k, v = np.split(qkv, 3, axis=-1)
            hd = q.shape[-1] // H
            a = _attention(q.reshape(T, H, hd), k.reshape(T, H, hd), v.reshape(T, H, hd))
            x = x + a @ W[b + "attn_output.weight"].T + W[b + "attn_output.bias"]
            h = _layer_norm(x, W[b + "ffn_norm.weight"], W[b + "ffn_norm.bias"], eps)
            u = h @ W[b + "ffn_up.weight"].T + W[b + "ffn_up.bias"]
            u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
            x = x + u @ W[b + "ffn_down.weight"].T + W[b + "ffn_down.bias"]
        x = _layer_norm(x, W["output_norm.weight"], W["output_norm.bias"], eps)
    else:
        eps, theta = meta[f"{arch}.attention.layer_norm_rms_epsilon"], meta[f"{arch}.rope.freq_base"]
        for i in range(L):
            b = f"blk.{i}."
            h = _rms_norm(x, W[b + "attn_norm.weight"], eps)
            q, k, v = (h @ W[b + n + ".weight"].T for n in ("attn_q", "attn_k", "attn_v"))
            hd = q.shape[-1] // H
            q, k, v = q.reshape(T, H, hd), k.reshape(T, Hkv, hd), v.reshape(T, Hkv, hd)
            if arch == "qwen3":
                q, k = _rms_norm(q, W[b + "attn_q_norm.weight"], eps), _rms_norm(k, W[b + "attn_k_norm.weight"], eps)
            q, k = _rope(q, theta, arch == "llama"), _rope(k, theta, arch == "llama")
            x = x + _attention(q, k, v) @ W[b + "attn_output.weight"].T
            h = _rms_norm(x, W[b + "ffn_norm.weight"], eps)
            g = h @ W[b + "ffn_gate.weight"].T
            x = x + (g / (1 + np.exp(-g)) * (h @ W[b + "ffn_up.weight"].T)) @ W[b + "ffn_down.weight"].T
        x = _rms_norm(x, W["output_norm.weight"], eps)
    return x @ W.get("output.weight", W["token_embd.weight"]).T


CASES = [("gpt2", {}, "gpt2"), ("modern", {"n_kv_head": 2}, "llama"), ("fast", {}, "qwen3"),
         ("modern", {"tie_embeddings": False, "n_kv_head": 1}, "llama"),
         ("gpt2", {"tie_embeddings": False, "ffn_hidden": 96}, "gpt2")]


@pytest.mark.parametrize("arch,kw,want", CASES)
def test_gguf_round_trip_and_llama_cpp_logits(tmp_path, capsys, small_tokenizer, arch, kw, want):
    model = make_run(tmp_path / "run", small_tokenizer, arch, **kw)
    rc, out, _ = cli(capsys, "export", tmp_path / "run", "--format", "gguf", tmp_path / "m.gguf", "--type", "f32")
    assert rc == 0 and f"as llama.cpp {want}" in out
    assert ("within 64 tokens" in out) == (want == "gpt2")
    meta, t = read(tmp_path / "m.gguf")
    cfg = model.config

    # Metadata llama.cpp reads to build the graph and the vocabulary.
    assert meta["general.architecture"] == want and meta["general.file_type"] == 0
    assert meta[f"{want}.context_length"] == cfg.block_size and meta[f"{want}.block_count"] == cfg.n_layer
    assert meta[f"{want}.embedding_length"] == cfg.n_embd
    assert meta[f"{want}.feed_forward_length"] == cfg.hidden_dim
    assert meta[f"{want}.attention.head_count_kv"] == cfg.n_kv_head
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == cfg.vocab_size == len(types)
    vocab = small_tokenizer.hf.get_vocab(with_added_tokens=True)
    assert all(tokens[i] == s for s, i in vocab.items())
    assert {tokens[i] for i, ty in enumerate(types) if ty == 3} == set(SPECIAL_TOKENS)
    assert all(types[i] == 5 for i in range(small_tokenizer.vocab_size, cfg.vocab_size))
    spec = json.loads(small_tokenizer.hf.to_str())
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert meta["tokenizer.ggml.eos_token_id"] == small_tokenizer.special_id(EOT)
    assert meta["tokenizer.ggml.eot_token_id"] == small_tokenizer.special_id(ASSISTANT_END)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE_JINJA
    assert "<|assistant_start|>" in (tmp_path / "m.Modelfile").read_text()

    # Every tensor: present once, f32, the model's numbers (an untied head is its own tensor).
    assert all(ty == "F32" for ty, _ in t.values())
    assert np.array_equal(t["token_embd.weight"][1], model.transformer.wte.weight.detach().numpy())
    assert ("output.weight" in t) == (not cfg.tie_embeddings)
    n_params = sum(v.size for _, v in t.values())
    expected = sum(p.numel() for p in model.parameters())
    if arch == "gpt2" and not cfg.bias:
        expected = n_params   # zero biases added
    assert n_params == expected

    # llama.cpp's computation over the file gives gptlab's logits.
    ids = small_tokenizer.encode(TEXT)[:40]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].double().numpy()
    theirs = llama_cpp_logits(meta, t, ids)
    assert np.abs(ours - theirs).max() < 1e-4


def test_gguf_vocabulary_tokenizes_like_gptlab(tmp_path, small_tokenizer):
    """llama.cpp applies GPT-2's pattern (digit runs) and then the merges; gptlab's tokenizer splits
    digits one by one. Rebuilt from the file with GPT-2's pre-tokenizer, the ids are the same."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    from gptlab.interop.gguf_export import tokenizer_fields
    f = tokenizer_fields(small_tokenizer, 448)
    vocab = {s: i for i, s in enumerate(f["tokens"])}
    bpe = HFTokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in f["merges"]]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in (TEXT, SAMPLE_TEXT[:400], "x=12345, y= 678\n\n  z 9"):
        assert bpe.encode(text).ids == small_tokenizer.encode(text)


@pytest.mark.parametrize("wtype,file_type", [("f16", 1), ("q8_0", 7)])
def test_gguf_f16_and_q8_0(tmp_path, small_tokenizer, wtype, file_type):
    from gptlab.interop.gguf_export import export_gguf
    model = make_run(tmp_path / "run", small_tokenizer, "fast")
    export_gguf(tmp_path / "run", tmp_path / "f32.gguf", "f32")
    s = export_gguf(tmp_path / "run", tmp_path / "q.gguf", wtype)
    meta, t = read(tmp_path / "q.gguf")
    _, full = read(tmp_path / "f32.gguf")
    assert meta["general.file_type"] == file_type
    assert s["bytes"] < (tmp_path / "f32.gguf").stat().st_size * (0.55 if wtype == "f16" else 0.35)
    for name, (ty, w) in t.items():
        ref = full[name][1]
        if ref.ndim == 1:
            assert ty == "F32" and np.array_equal(w, ref), name
            continue
        assert ty == {"f16": "F16", "q8_0": "Q8_0"}[wtype], name
        if wtype == "f16":
            assert np.array_equal(w, ref.astype(np.float16).astype(np.float32)), name
        else:   # each block of 32: int8 steps of max|x|/127, so off by at most half a step, plus 127 times the
            # f16 rounding of the scale (2^-11 relative)
            blocks = ref.reshape(-1, 32)
            step = np.abs(blocks).max(1, keepdims=True) / 127
            assert (np.abs(w.reshape(-1, 32) - blocks) <= step * (0.5 + 127 * 2 ** -11) + 1e-7).all(), name
    ids = small_tokenizer.encode(TEXT)[:40]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].double().numpy()
    theirs = llama_cpp_logits(meta, t, ids)
    assert np.abs(ours - theirs).max() < (0.01 if wtype == "f16" else 0.05)
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("arch,kw,needle", [
    ("bert", {}, "arch bert cannot be exported to GGUF"),
    ("gpt1", {}, "post-LayerNorm"),
    ("gpt2", {"n_kv_head": 2}, "grouped-query attention"),
    ("modern", {"bias": True}, "biases"),
])
def test_gguf_refuses_what_llama_cpp_cannot_run(tmp_path, capsys, small_tokenizer, arch, kw, needle):
    make_run(tmp_path / "run", small_tokenizer, arch, **kw)
    err = user_error(capsys, "export", tmp_path / "run", "--format", "gguf", tmp_path / "m.gguf")
    assert needle in err
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))


def spm_tokenize(tokens, types, text):
    """llama.cpp's SentencePiece ("llama") tokenisation as it runs on a vocabulary without multi-character
    tokens: spaces become "▁", each character is looked up, a character with no token is spelled as its
    UTF-8 bytes' <0xNN> tokens."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (1, 6)}
    out = []
    for ch in text.replace(" ", "\u2581"):
        out += [ids[ch]] if ch in ids else [ids[f"<0x{b:02X}>"] for b in ch.encode()]
    return out


def test_gguf_char_tokenizer_as_sentencepiece(tmp_path, capsys):
    """A char tokenizer (the speedrun's) travels as llama.cpp's SentencePiece vocabulary: spaces as "▁",
    byte tokens typed as bytes, no merges; llama.cpp's tokenisation of the file gives gptlab's ids, a
    character never seen included, and the model's logits come out the same."""
    char = Tokenizer.train([SAMPLE_TEXT, TEXT], kind="char")
    model = make_run(tmp_path / "run", char, "fast", vocab_size=512)
    rc, out, _ = cli(capsys, "export", tmp_path / "run", "--format", "gguf", tmp_path / "m.gguf", "--type", "f32")
    assert rc == 0 and "as llama.cpp qwen3" in out
    meta, t = read(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    assert meta["tokenizer.ggml.add_space_prefix"] is False
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = char.hf.get_vocab(with_added_tokens=True)
    assert tokens[vocab[" "]] == "\u2581" and types[vocab["<0xE2>"]] == 6 and types[vocab["a"]] == 1
    assert {tokens[i] for i, ty in enumerate(types) if ty == 3} == set(SPECIAL_TOKENS)
    for text in (TEXT, SAMPLE_TEXT[:300], "naïve 😀 x  y"):
        assert spm_tokenize(tokens, types, text) == char.encode(text)
    ids = char.encode(TEXT)[:40]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].double().numpy()
    assert np.abs(ours - llama_cpp_logits(meta, t, ids)).max() < 1e-4


def test_gguf_refuses_bad_flags(tmp_path, capsys, small_tokenizer):
    make_run(tmp_path / "run", small_tokenizer, "gpt2")
    assert "--type is for --format gguf" in user_error(capsys, "export", tmp_path / "run", tmp_path / "hf",
                                                       "--type", "q8_0")
    assert "is a folder" in user_error(capsys, "export", tmp_path / "run", "--format", "gguf", tmp_path)


# llama.cpp itself: every architecture in f32, and the reduced types on one model of each llama.cpp arch.
LLAMA_CPP_CASES = [(*c, "f32") for c in CASES] + [(*c, wt) for c in CASES[:3] for wt in ("f16", "q8_0")]
# Max |logit difference| allowed against gptlab. The KV cache is kept in f32 so that what is measured is
# the file: f32 files then differ only by float32 summation order (and, for gpt2, llama.cpp's GELU,
# read from an f16 lookup table); f16/q8_0 files by their weight rounding (q8_0 also rounds activations
# to 8 bits before each product).
LOGIT_TOL = {"f32": 1e-3, "f16": 0.02, "q8_0": 0.1}


@pytest.mark.slow
@pytest.mark.parametrize("arch,kw,want,wtype", LLAMA_CPP_CASES)
def test_llama_cpp_python_matches_gptlab(tmp_path, small_tokenizer, arch, kw, want, wtype):
    """llama.cpp itself (through llama-cpp-python) loads the file: same token ids, same logits, same
    16 greedy tokens (past end-of-text too: a random model may pick it first)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from gptlab.generate.engine import Engine, SamplingParams
    from gptlab.interop.gguf_export import export_gguf
    model = make_run(tmp_path / "run", small_tokenizer, arch, **kw)
    assert export_gguf(tmp_path / "run", tmp_path / "m.gguf", wtype)["gguf_arch"] == want
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    ids = small_tokenizer.encode(TEXT)[:30]
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False)[:30] == ids
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    diff = float(np.abs(ours - theirs).max())
    want_ids = Engine(model, small_tokenizer).generate(
        [ids], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))[0].ids
    got = []
    for tok_id in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        got.append(tok_id)
        if len(got) == 16:
            break
    # gptlab's logits along llama.cpp's continuation: how far each token llama.cpp picked is below
    # gptlab's own best there (0 where they agree).
    with torch.no_grad():
        along = model(torch.tensor([ids + got]))[0][0, len(ids) - 1:-1].numpy()
    gap = float((along.max(-1) - along[np.arange(len(got)), got]).max())
    first = next((i for i, (a, b) in enumerate(zip(got, want_ids)) if a != b), None)
    print(f"\nllama.cpp {want} {wtype}: max |logit diff| {diff:.2e}, 16 greedy tokens "
          f"{'equal' if first is None else f'equal up to token {first}'}, largest gap {gap:.2e}")
    assert diff < LOGIT_TOL[wtype]
    if wtype == "f32":
        assert got == want_ids
    else:   # rounded weights may flip a near tie; each pick must still be within the logit tolerance of the best
        assert got[:3] == want_ids[:3] and gap < LOGIT_TOL[wtype]


@pytest.mark.slow
def test_llama_cpp_python_reads_a_char_tokenizer(tmp_path):
    """llama.cpp's own SentencePiece tokeniser over the exported char vocabulary gives gptlab's ids,
    and its logits are gptlab's."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from gptlab.interop.gguf_export import export_gguf
    char = Tokenizer.train([SAMPLE_TEXT, TEXT], kind="char")
    model = make_run(tmp_path / "run", char, "fast", vocab_size=512)
    export_gguf(tmp_path / "run", tmp_path / "c.gguf", "f32")
    llm = llama_cpp.Llama(str(tmp_path / "c.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    for text in (TEXT, "naïve 😀 x  y"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == char.encode(text)
    ids = char.encode(TEXT)[:40]
    llm.reset()
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(ours - np.array(llm.scores[:len(ids)])).max() < 1e-3
