"""GGUF export: one file that llama.cpp, llama-cpp-python and Ollama load and chat with.

Written with the ``gguf`` package (the llama.cpp project's own reader/writer; optional extra
``pip install gptlab[gguf]``). Only models that llama.cpp computes exactly as gptlab does are exported:

* ``gpt2``  -> llama.cpp arch ``gpt2``: pre-LN, learned positions, tanh GELU, fused ``attn_qkv``
  (q, k, v stacked on the output dim, as our c_attn). llama.cpp always reads biases, so a bias-free
  model exports exact zeros.
* ``modern`` -> ``llama``: RMSNorm, SwiGLU, GQA, RoPE. llama.cpp's llama rotates *adjacent* pairs
  (x0, x1), (x2, x3) ... while gptlab rotates (first half, second half) pairs, so the rows of each
  query and key head are reordered (first half to even rows, second half to odd rows); the dot
  products, and so the attention, are unchanged.
* ``fast`` (or any RoPE model with QK-norm) -> ``qwen3``: Llama plus an RMSNorm on each head's
  queries and keys before RoPE, half-split RoPE like ours (no reordering), untied head.
* gpt1 (post-LN), gpt3 (banded sparse layers), bert (bidirectional), biases on a RoPE model and GQA or
  QK-norm on a gpt2 model have no llama.cpp twin: refused with the reason.

The tokenizer travels as llama.cpp's byte-level BPE (``tokenizer.ggml.model = "gpt2"``, pre-tokenizer
``gpt-2``): vocabulary, merges, special tokens as control tokens, and the chat template. gptlab's
default tokenizer splits digits one by one where GPT-2's pattern keeps digit runs; the two give the
same tokens as long as no merge joins a digit to anything but a leading space, which is true of every
tokenizer trained with ``--digits split`` and is checked here. A ``char`` tokenizer (one token per
character, byte fallback) travels as llama.cpp's SentencePiece vocabulary (``tokenizer.ggml.model =
"llama"``): llama.cpp splits text into characters, writes spaces as "▁", merges nothing (no token
is longer than one character) and falls back to ``<0xNN>`` byte tokens, which is what gptlab does. Weight types: f32, f16, and q8_0 (8-bit
blocks of 32 with one f16 scale; matrices whose rows are not a multiple of 32 fall back to f16). Norm
gains and biases stay f32, as llama.cpp's own converter keeps them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from gptlab import runs
from gptlab.errors import GptlabError
from gptlab.io import atomic_path, atomic_write_text
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.tokenizer import ASSISTANT_END, SPECIAL_TOKENS, Tokenizer

TYPES = ("f32", "f16", "q8_0")
UNSUPPORTED_ARCHS = {
    "gpt1": "post-LayerNorm blocks",
    "gpt3": "locally banded sparse attention layers",
    "bert": "bidirectional attention (a masked LM)",
}
# GPT-2's pre-tokenisation pattern as the gptlab tokenizer writes it, with digit runs or single digits.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PATTERNS = {_GPT2_PATTERN, _GPT2_PATTERN.replace(r" ?\p{N}+", r" ?\p{N}")}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GptlabError("GGUF export needs the gguf package: pip install 'gptlab[gguf]' (or pip install gguf)") from None
    return gguf


def gguf_arch(cfg: GPTConfig) -> str:
    """The llama.cpp architecture that computes ``cfg`` exactly, or a one-line error naming what has none."""
    if cfg.arch in UNSUPPORTED_ARCHS:
        raise GptlabError(f"arch {cfg.arch} cannot be exported to GGUF: llama.cpp has no {UNSUPPORTED_ARCHS[cfg.arch]}"
                          " (exportable: gpt2, modern, fast)")
    if cfg.arch == "gpt2":
        if cfg.n_kv_head != cfg.n_head:
            raise GptlabError("cannot export to GGUF: llama.cpp's gpt2 has no grouped-query attention "
                              f"(n_kv_head {cfg.n_kv_head} != n_head {cfg.n_head})")
        if cfg.qk_norm:
            raise GptlabError("cannot export to GGUF: llama.cpp's gpt2 has no QK-norm")
        return "gpt2"
    if cfg.bias:
        raise GptlabError(f"cannot export to GGUF: a {cfg.arch} model with biases (bias=true) has no exact "
                          "llama.cpp twin; export bias-free models")
    return "qwen3" if cfg.qk_norm else "llama"


# ----- tokenizer ----------------------------------------------------------------------------------
def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table): bytes that are printable
    Latin-1 stand for themselves, the rest map to 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


SPM_SPACE = "\u2581"   # SentencePiece's visible space, as llama.cpp's "llama" vocabulary stores " "
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def tokenizer_fields(tok: Tokenizer, n_vocab: int) -> dict:
    """tokens, token types, merges and special ids as llama.cpp's vocabulary reads them: byte-level BPE
    ("gpt2") for a bpe tokenizer, SentencePiece ("llama") for a char tokenizer."""
    spec = json.loads(tok.hf.to_str())
    if tok.kind == "char":
        return _char_fields(tok, spec, n_vocab)
    pre = spec.get("pre_tokenizer") or {}
    pieces = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    gpt2_like = (
        (len(pieces) == 2 and pieces[0].get("type") == "Split"
         and (pieces[0].get("pattern") or {}).get("Regex") in _PATTERNS
         and pieces[1].get("type") == "ByteLevel" and not pieces[1].get("use_regex", True))
        or (len(pieces) == 1 and pieces[0].get("type") == "ByteLevel" and pieces[0].get("use_regex", True)
            and not pieces[0].get("add_prefix_space", False)))
    if not gpt2_like or spec.get("normalizer"):
        raise GptlabError("cannot export this tokenizer to GGUF: its pre-tokenizer is not GPT-2's byte-level "
                          "pattern, which is the one llama.cpp applies")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    byte_of = _byte_level_chars()
    for m in merges:   # digit-by-digit tokenizers: no merge may glue a digit to more than a leading space
        text = bytes(byte_of.get(c, 0) for c in m.replace(" ", "")).decode("utf-8", "replace")
        if re.search(r"[0-9]", text) and not re.fullmatch(r" ?[0-9]", text):
            raise GptlabError(f"cannot export this tokenizer to GGUF: merge {m!r} joins a digit to other text, "
                              "so llama.cpp's GPT-2 pre-tokenizer would split numbers differently")
    fields = _vocab_fields(tok, spec, n_vocab, lambda t: t, lambda t: 1)
    return {**fields, "model": "gpt2", "merges": merges}


def _char_fields(tok: Tokenizer, spec: dict, n_vocab: int) -> dict:
    if tok.hf.token_to_id(SPM_SPACE) is not None:
        raise GptlabError(f"cannot export this char tokenizer to GGUF: it has a token for {SPM_SPACE!r}, the "
                          "character llama.cpp's SentencePiece vocabulary uses for a space")
    # 6 = byte (<0xNN>, llama.cpp's fallback for a character with no token), 1 = normal.
    fields = _vocab_fields(tok, spec, n_vocab, lambda t: t.replace(" ", SPM_SPACE),
                           lambda t: 6 if _BYTE_TOKEN.fullmatch(t) else 1)
    return {**fields, "model": "llama", "merges": None}


def _vocab_fields(tok: Tokenizer, spec: dict, n_vocab: int, spell, kind_of) -> dict:
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_vocab:
        raise GptlabError(f"tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} rows")
    special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]   # rows no token uses (vocab rounded up to 64)
    types = [5] * n_vocab                             # 5 = unused
    for t, i in vocab.items():
        tokens[i] = t if t in special else spell(t)
        types[i] = 3 if t in special else kind_of(t)  # 3 = control
    end = tok.special_id(ASSISTANT_END)
    return {"tokens": tokens, "types": types, "eos": tok.eot_id, "pad": tok.pad_id,
            "eot": end if end is not None else tok.eot_id, "chat": end is not None}


# ----- tensors ------------------------------------------------------------------------------------
def _rope_pairs_adjacent(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from (first half, second half) pairs to adjacent pairs: row i of the
    first half goes to 2i, its partner (i + hd/2) to 2i + 1 (llama.cpp's llama RoPE)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(model: GPT, arch: str) -> dict[str, np.ndarray]:
    """Every weight under its llama.cpp name, float32, in PyTorch's (out, in) order."""
    cfg = model.config
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["transformer.wte.weight"]}

    def bias(key, n):
        return sd[key] if key in sd else np.zeros(n, np.float32)

    if arch == "gpt2":
        d = cfg.n_embd
        out["position_embd.weight"] = sd["transformer.wpe.weight"]
        for i in range(cfg.n_layer):
            p, b = f"transformer.h.{i}.", f"blk.{i}."
            for ours, theirs, n in (("ln_1", "attn_norm", d), ("attn.c_attn", "attn_qkv", 3 * d),
                                    ("attn.c_proj", "attn_output", d), ("ln_2", "ffn_norm", d),
                                    ("mlp.c_fc", "ffn_up", cfg.hidden_dim), ("mlp.c_proj", "ffn_down", d)):
                out[b + theirs + ".weight"] = sd[p + ours + ".weight"]
                out[b + theirs + ".bias"] = bias(p + ours + ".bias", n)
        out["output_norm.weight"] = sd["transformer.ln_f.weight"]
        out["output_norm.bias"] = bias("transformer.ln_f.bias", d)
    else:
        nq, nkv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        for i in range(cfg.n_layer):
            p, b = f"transformer.h.{i}.", f"blk.{i}."
            qkv = sd[p + "attn.c_attn.weight"]
            q, k, v = qkv[:nq], qkv[nq:nq + nkv], qkv[nq + nkv:]
            if arch == "llama":
                q, k = _rope_pairs_adjacent(q, cfg.n_head), _rope_pairs_adjacent(k, cfg.n_kv_head)
            out.update({b + "attn_norm.weight": sd[p + "ln_1.weight"], b + "attn_q.weight": q,
                        b + "attn_k.weight": k, b + "attn_v.weight": v,
                        b + "attn_output.weight": sd[p + "attn.c_proj.weight"],
                        b + "ffn_norm.weight": sd[p + "ln_2.weight"],
                        b + "ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
                        b + "ffn_up.weight": sd[p + "mlp.c_fc.weight"],
                        b + "ffn_down.weight": sd[p + "mlp.c_proj.weight"]})
            if arch == "qwen3":
                out[b + "attn_q_norm.weight"] = sd[p + "attn.q_norm.weight"]
                out[b + "attn_k_norm.weight"] = sd[p + "attn.k_norm.weight"]
        out["output_norm.weight"] = sd["transformer.ln_f.weight"]
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _encode(gguf, name: str, w: np.ndarray, wtype: str):
    """(data, raw type or None) for the writer: matrices in the chosen type, vectors in f32."""
    if w.ndim == 1 or wtype == "f32":
        return w, None
    if wtype == "q8_0" and w.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(w, q), q
    return w.astype(np.float16), None


# ----- the file -----------------------------------------------------------------------------------
def modelfile(gguf_name: str) -> str:
    """An Ollama Modelfile for the exported file: gptlab's chat template in Ollama's Go template form."""
    return (f"FROM ./{gguf_name}\n"
            'TEMPLATE """{{- range .Messages }}<|{{ .Role }}_start|>{{ .Content }}<|{{ .Role }}_end|>'
            '{{- end }}<|assistant_start|>"""\n'
            "PARAMETER stop <|assistant_end|>\n"
            "PARAMETER stop <|endoftext|>\n")


def export_gguf(run_dir: str | Path, out_path: str | Path, wtype: str = "f16", progress: bool = False) -> dict:
    """Write ``run_dir``'s model and tokenizer as one GGUF file; returns a short summary."""
    from gptlab.tokenizer.chat_template import CHAT_TEMPLATE_JINJA
    if wtype not in TYPES:
        raise GptlabError(f"unknown GGUF type {wtype!r} (choose {', '.join(TYPES)})")
    out = Path(out_path)
    if out.is_dir():
        raise GptlabError(f"{out}: is a folder; give the .gguf file to write")
    gguf = _gguf()
    model, tok, run_cfg = runs.load_run(run_dir)
    cfg = model.config
    arch = gguf_arch(cfg)
    if cfg.rope_scaling is not None:   # each runtime spells YaRN's ramp and temperature its own way
        raise GptlabError(f"{run_dir}: RoPE scaling ({cfg.rope_scaling} x{cfg.rope_factor:g}) does not "
                          "export yet; export the run before the context extension")
    fields = tokenizer_fields(tok, cfg.vocab_size)
    tensors = gguf_tensors(model, arch)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[wtype]
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(Path(run_dir).resolve().name)
        w.add_file_type(int(file_type))
        if wtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_vocab_size(cfg.vocab_size)
        if arch == "gpt2":
            w.add_layer_norm_eps(cfg.norm_eps)
        else:
            w.add_layer_norm_rms_eps(cfg.norm_eps)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        w.add_string("gptlab.arch", cfg.arch)
        w.add_string("gptlab.stage", str(run_cfg.get("stage", "")))
        w.add_tokenizer_model(fields["model"])
        w.add_token_list(fields["tokens"])
        w.add_token_types(fields["types"])
        if fields["model"] == "gpt2":
            w.add_tokenizer_pre("gpt-2")
            w.add_token_merges(fields["merges"])
        else:   # no merges: every score equal; no space put before the text (gptlab adds none)
            w.add_token_scores([0.0] * len(fields["tokens"]))
            w.add_add_space_prefix(False)
        w.add_bos_token_id(fields["eos"])   # gptlab documents start with end-of-text, never added automatically
        w.add_eos_token_id(fields["eos"])
        w.add_eot_token_id(fields["eot"])
        w.add_pad_token_id(fields["pad"])
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        if fields["chat"]:
            w.add_chat_template(CHAT_TEMPLATE_JINJA)
        for name, t in tensors.items():
            data, raw = _encode(gguf, name, t, wtype)
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
    files = [out.name]
    if fields["chat"]:
        mf = out.with_suffix(".Modelfile")
        atomic_write_text(mf, modelfile(out.name))
        files.append(mf.name)
    return {"arch": cfg.arch, "gguf_arch": arch, "type": wtype, "params": model.num_params(), "context": cfg.block_size,
            "bytes": out.stat().st_size, "tensors": len(tensors), "files": files,
            "specials": [t for t in SPECIAL_TOKENS if tok.special_id(t) is not None]}
