"""Hugging Face interop: gptlab run folders <-> `transformers` checkpoint folders.

Export writes the files ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` read, offline
and without importing transformers (we write config.json and safetensors ourselves):

* ``gpt2``   -> GPT2LMHeadModel. GPT-2's original code used Conv1D layers, whose weights are stored
  (in, out): every projection is the transpose of our nn.Linear weight. c_attn holds q, k, v
  concatenated on the output dim, exactly like ours. lm_head is tied to wte and not saved.
* ``modern`` -> LlamaForCausalLM. Our fused c_attn is split into q/k/v_proj (GQA shapes kept), the
  SwiGLU pieces map gate_proj -> gate_proj, c_fc -> up_proj, c_proj -> down_proj. RoPE needs no
  permutation: gptlab rotates (first half, second half) pairs, which is HF Llama's rotate_half layout.
* ``fast``   -> Qwen3ForCausalLM: Llama's layout plus per-head RMSNorms on queries and keys
  (q_norm/k_norm, applied before RoPE, as gptlab's QK-norm), untied head.
* gpt1 (post-LN), gpt3 (banded sparse layers) and bert (bidirectional) have no identical HF class.

The tokenizer goes as tokenizer.json with the chat template in tokenizer_config.json. One difference
remains by design: a transformers tokenizer turns special-token strings typed in text into control
tokens, while gptlab's ``encode`` keeps them literal (see gptlab.tokenizer).

Import reads a local GPT-2-format (or Llama-format) folder into a gptlab run folder. Weights are only
read from safetensors (never pickle). GPT-2's tokenizer lacks gptlab's chat tokens;
``add_chat_tokens=True`` appends them and grows the embedding, new rows set to the mean embedding
(a neutral start that SFT then trains; random rows would give the new tokens arbitrary logits).
"""
from __future__ import annotations

from pathlib import Path

import torch

from gptlab import runs
from gptlab.errors import GptlabError
from gptlab.io import atomic_write_json, atomic_write_text, read_json
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.tokenizer import ASSISTANT_END, EOT, SPECIAL_TOKENS, Tokenizer

EXPORTABLE = {"gpt2": "GPT2LMHeadModel", "modern": "LlamaForCausalLM", "fast": "Qwen3ForCausalLM"}
NO_HF_EQUIVALENT = {
    "gpt1": "post-LayerNorm blocks without a final LayerNorm",
    "gpt3": "locally banded sparse attention layers",
    "bert": "bidirectional attention trained as a masked LM",
}


# ----- export -------------------------------------------------------------------------------------
def _gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    cfg = model.config
    if cfg.n_kv_head != cfg.n_head:
        raise GptlabError("GPT-2 has no grouped-query attention: n_kv_head must equal n_head to export")
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def bias_or_zero(key, n):
        # HF GPT-2 always has biases; a bias-free gptlab model exports exact zeros.
        return sd[key] if key in sd else torch.zeros(n)

    d = cfg.n_embd
    out["transformer.wte.weight"] = sd["transformer.wte.weight"]
    out["transformer.wpe.weight"] = sd["transformer.wpe.weight"]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = sd[p + ln + ".weight"]
            out[p + ln + ".bias"] = bias_or_zero(p + ln + ".bias", d)
        for lin, n_out in (("attn.c_attn", 3 * d), ("attn.c_proj", d), ("mlp.c_fc", cfg.hidden_dim),
                           ("mlp.c_proj", d)):
            out[p + lin + ".weight"] = sd[p + lin + ".weight"].t().contiguous()   # Conv1D: (in, out)
            out[p + lin + ".bias"] = bias_or_zero(p + lin + ".bias", n_out)
    out["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"]
    out["transformer.ln_f.bias"] = bias_or_zero("transformer.ln_f.bias", d)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _gpt2_config(cfg: GPTConfig, tok: Tokenizer) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": cfg.ffn_hidden if cfg.ffn_hidden else None,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id,
        "torch_dtype": "float32", "dtype": "float32",
    }


def _llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    hd = cfg.head_dim
    nq, nkv = cfg.n_head * hd, cfg.n_kv_head * hd
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"]}
    for i in range(cfg.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = sd[p + "ln_1.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "ln_2.weight"]
        for suffix in (("weight", "bias") if cfg.bias else ("weight",)):
            w = sd[p + "attn.c_attn." + suffix]
            out[q + "self_attn.q_proj." + suffix] = w[:nq].contiguous()
            out[q + "self_attn.k_proj." + suffix] = w[nq:nq + nkv].contiguous()
            out[q + "self_attn.v_proj." + suffix] = w[nq + nkv:].contiguous()
            out[q + "self_attn.o_proj." + suffix] = sd[p + "attn.c_proj." + suffix]
            out[q + "mlp.gate_proj." + suffix] = sd[p + "mlp.gate_proj." + suffix]
            out[q + "mlp.up_proj." + suffix] = sd[p + "mlp.c_fc." + suffix]
            out[q + "mlp.down_proj." + suffix] = sd[p + "mlp.c_proj." + suffix]
        if cfg.qk_norm:
            out[q + "self_attn.q_norm.weight"] = sd[p + "attn.q_norm.weight"]
            out[q + "self_attn.k_norm.weight"] = sd[p + "attn.k_norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _llama_config(cfg: GPTConfig, tok: Tokenizer) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        # Older transformers read rope_theta, newer ones rope_parameters: write both.
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02, "use_cache": True,
        "pretraining_tp": 1,
        "bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id,
        "torch_dtype": "float32", "dtype": "float32",
    }


def stop_token_ids(tok: Tokenizer) -> list[int]:
    """What ends a generation: end of text, and end of an assistant turn when the tokenizer has it."""
    ids = [tok.eot_id]
    end = tok.special_id(ASSISTANT_END)
    if end is not None:
        ids.append(end)
    return ids


def _write_tokenizer(out: Path, tok: Tokenizer, block_size: int) -> None:
    from gptlab.tokenizer.chat_template import CHAT_TEMPLATE_JINJA
    atomic_write_text(out / "tokenizer.json", tok.hf.to_str(pretty=True))
    pad = tok.id_to_token(tok.pad_id)
    has_chat = tok.special_id(ASSISTANT_END) is not None
    specials = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": pad}
    cfg = {
        # The generic fast tokenizer: it reads tokenizer.json as it is (no slow-tokenizer files needed).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False,
        **specials,
    }
    if has_chat:
        cfg["chat_template"] = CHAT_TEMPLATE_JINJA
        cfg["additional_special_tokens"] = [t for t in SPECIAL_TOKENS
                                            if tok.special_id(t) is not None and t not in (EOT, pad)]
    atomic_write_json(out / "tokenizer_config.json", cfg)
    atomic_write_json(out / "special_tokens_map.json", specials)


def export_hf(run_dir: str | Path, out_dir: str | Path) -> dict:
    """Write ``run_dir``'s model as a transformers checkpoint folder; returns a short summary."""
    model, tok, run_cfg = runs.load_run(run_dir)
    cfg = model.config
    if cfg.rope_scaling is not None:   # each runtime spells YaRN's ramp and temperature its own way
        raise GptlabError(f"{run_dir}: RoPE scaling ({cfg.rope_scaling} x{cfg.rope_factor:g}) does not "
                          "export yet; export the run before the context extension")
    if cfg.arch in NO_HF_EQUIVALENT:
        raise GptlabError(f"arch {cfg.arch} has no Hugging Face equivalent ({NO_HF_EQUIVALENT[cfg.arch]}); "
                          f"only {', '.join(EXPORTABLE)} models can be exported")
    if cfg.arch == "gpt2":
        tensors, config = _gpt2_tensors(model), _gpt2_config(cfg, tok)
    else:
        tensors, config = _llama_tensors(model), _llama_config(cfg, tok)
        if cfg.qk_norm:   # Qwen3 is Llama with QK-norm
            config.update(architectures=[EXPORTABLE[cfg.arch]], model_type="qwen3", use_sliding_window=False,
                          sliding_window=None, max_window_layers=cfg.n_layer,
                          layer_types=["full_attention"] * cfg.n_layer)
    config["gptlab"] = {"arch": cfg.arch, "source_stage": run_cfg.get("stage")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.vision is not None:
        # No transformers class reads a from-scratch ViT + projector that writes into a decoder's token
        # embeddings, so the encoder goes beside the decoder in a file of its own: transformers loads
        # the decoder (text in, text out), `gptlab import` loads both.
        config["gptlab"]["vision"] = run_cfg["vision"]
        runs.save_tensors(out / VISION_FILE, {k: v for k, v in model.state_dict().items() if k.startswith("vision.")})
    runs.save_tensors(out / "model.safetensors", tensors)
    atomic_write_json(out / "config.json", config)
    stops = stop_token_ids(tok)
    atomic_write_json(out / "generation_config.json", {
        "bos_token_id": tok.eot_id, "eos_token_id": stops if len(stops) > 1 else stops[0],
        "pad_token_id": tok.pad_id,
    })
    _write_tokenizer(out, tok, cfg.block_size)
    return {"arch": cfg.arch, "hf_class": EXPORTABLE[cfg.arch], "params": model.num_params(),
            "files": sorted(p.name for p in out.iterdir() if not p.name.startswith("."))}


VISION_FILE = "vision.safetensors"


# ----- import -------------------------------------------------------------------------------------
def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return runs.load_tensors(single)
    if index.is_file():   # sharded checkpoints: the index maps each tensor to its shard file
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise GptlabError(f"{index}: empty weight_map")
        tensors: dict[str, torch.Tensor] = {}
        for s in shards:
            tensors.update(runs.load_tensors(folder / s))
        return tensors
    if any((folder / n).is_file() for n in ("pytorch_model.bin", "model.pt")):
        raise GptlabError(f"{folder}: only pickle weights (pytorch_model.bin) found; gptlab reads safetensors "
                          "only (convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise GptlabError(f"{folder}: no model.safetensors found")


def _take(tensors: dict, key: str, source: Path) -> torch.Tensor:
    if key not in tensors:
        raise GptlabError(f"{source}: missing tensor {key}")
    return tensors.pop(key)


def _import_gpt2(hf: dict, tensors: dict, source: Path) -> tuple[GPTConfig, dict]:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise GptlabError(f"{source}: activation_function {act!r} is not supported (gptlab's GPT-2 uses "
                          "the tanh GELU, gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise GptlabError(f"{source}: non-standard attention scaling is not supported")
    # Older checkpoints have no "transformer." prefix; causal-mask buffers are not weights.
    t = {}
    for k, v in tensors.items():
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue
        t[k] = v
    n_layer, n_embd = hf["n_layer"], hf["n_embd"]
    wte = _take(t, "wte.weight", source)
    tied = hf.get("tie_word_embeddings", True) and "lm_head.weight" not in t
    if "lm_head.weight" in t and torch.equal(t["lm_head.weight"], wte):
        t.pop("lm_head.weight")  # saved although tied
        tied = True
    cfg = GPTConfig(arch="gpt2", vocab_size=wte.shape[0], block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
                    n_layer=n_layer, n_head=hf["n_head"], n_embd=n_embd, ffn_hidden=hf.get("n_inner") or None,
                    dropout=0.0, bias=True, norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=tied)
    sd = {"transformer.wte.weight": wte, "transformer.wpe.weight": _take(t, "wpe.weight", source)}
    for i in range(n_layer):
        p = f"h.{i}."
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            sd["transformer." + p + name] = _take(t, p + name, source)
        for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            sd[f"transformer.{p}{lin}.weight"] = _take(t, f"{p}{lin}.weight", source).t().contiguous()
            sd[f"transformer.{p}{lin}.bias"] = _take(t, f"{p}{lin}.bias", source)
    for name in ("ln_f.weight", "ln_f.bias"):
        sd["transformer." + name] = _take(t, name, source)
    if not tied:
        sd["lm_head.weight"] = _take(t, "lm_head.weight", source)
    if t:
        raise GptlabError(f"{source}: unexpected tensors for GPT-2: {sorted(t)[:3]}")
    return cfg, sd


def _import_llama(hf: dict, tensors: dict, source: Path) -> tuple[GPTConfig, dict]:
    if hf.get("hidden_act", "silu") != "silu":
        raise GptlabError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU uses silu)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")) or \
            rope.get("rope_type", "default") != "default":
        raise GptlabError(f"{source}: scaled RoPE (rope_scaling) is not supported")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise GptlabError(f"{source}: attention_bias and mlp_bias differ; gptlab has one bias switch")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd // n_head):
        raise GptlabError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    bias = bool(hf.get("attention_bias", False))
    t = dict(tensors)
    wte = _take(t, "model.embed_tokens.weight", source)
    tied = hf.get("tie_word_embeddings", False) and "lm_head.weight" not in t
    if "lm_head.weight" in t and torch.equal(t["lm_head.weight"], wte):
        t.pop("lm_head.weight")
        tied = True
    cfg = GPTConfig(arch="modern", vocab_size=wte.shape[0], block_size=hf.get("max_position_embeddings", 2048),
                    n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
                    n_kv_head=hf.get("num_key_value_heads") or n_head, ffn_hidden=hf["intermediate_size"],
                    dropout=0.0, bias=bias, norm_eps=hf.get("rms_norm_eps", 1e-6),
                    rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), tie_embeddings=tied)
    sd = {"transformer.wte.weight": wte, "transformer.ln_f.weight": _take(t, "model.norm.weight", source)}
    for i in range(cfg.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        sd[p + "ln_1.weight"] = _take(t, q + "input_layernorm.weight", source)
        sd[p + "ln_2.weight"] = _take(t, q + "post_attention_layernorm.weight", source)
        for suffix in (("weight", "bias") if bias else ("weight",)):
            sd[p + "attn.c_attn." + suffix] = torch.cat(
                [_take(t, f"{q}self_attn.{n}_proj.{suffix}", source) for n in ("q", "k", "v")], dim=0)
            sd[p + "attn.c_proj." + suffix] = _take(t, q + "self_attn.o_proj." + suffix, source)
            sd[p + "mlp.gate_proj." + suffix] = _take(t, q + "mlp.gate_proj." + suffix, source)
            sd[p + "mlp.c_fc." + suffix] = _take(t, q + "mlp.up_proj." + suffix, source)
            sd[p + "mlp.c_proj." + suffix] = _take(t, q + "mlp.down_proj." + suffix, source)
    if not tied:
        sd["lm_head.weight"] = _take(t, "lm_head.weight", source)
    t = {k: v for k, v in t.items() if not k.endswith("rotary_emb.inv_freq")}
    if t:
        raise GptlabError(f"{source}: unexpected tensors for Llama: {sorted(t)[:3]}")
    return cfg, sd


def add_chat_tokens(model: GPT, tok: Tokenizer) -> tuple[GPT, Tokenizer, list[str]]:
    """Append gptlab's reserved special tokens the tokenizer lacks; grow the embedding to fit.

    New rows (and any padding rows the new ids land on) start at the mean of the existing token
    embeddings, so the new tokens begin as an "average token" instead of random noise.
    """
    from tokenizers import AddedToken
    missing = [t for t in SPECIAL_TOKENS if tok.special_id(t) is None]
    if not missing:
        return model, tok, []
    old_ids = sorted(tok.hf.get_vocab(with_added_tokens=True).values())
    tok.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    tok = Tokenizer(tok.hf)
    new_ids = [tok.special_id(t) for t in missing]
    cfg = model.config
    need = max(cfg.vocab_size, max(new_ids) + 1)
    if need > cfg.vocab_size:
        need = ((need + 63) // 64) * 64   # keep the table a multiple of 64 like gptlab's own runs
    new_cfg = GPTConfig.from_dict({**cfg.to_dict(), "vocab_size": need})
    grown = GPT(new_cfg)
    sd = model.state_dict()
    new_sd = grown.state_dict()
    for k, v in sd.items():
        if k in ("transformer.wte.weight", "lm_head.weight"):
            w = new_sd[k].clone()
            w[:v.shape[0]] = v
            mean = v[[i for i in old_ids if i < v.shape[0]]].float().mean(0).to(v.dtype)
            w[new_ids] = mean
            new_sd[k] = w
        else:
            new_sd[k] = v
    grown.load_state_dict(new_sd)
    return grown, tok, missing


def import_hf(hf_dir: str | Path, out_dir: str | Path, with_chat_tokens: bool = False) -> dict:
    """Convert a local transformers folder (GPT-2 or Llama format) into a gptlab run folder."""
    src = Path(hf_dir)
    if not src.is_dir():
        raise GptlabError(f"{src}: no such folder")
    hf = read_json(src / "config.json")
    model_type = hf.get("model_type") or ""
    archs = hf.get("architectures") or []
    tensors = _read_hf_tensors(src)
    if model_type == "gpt2" or any(a.startswith("GPT2") for a in archs):
        cfg, sd = _import_gpt2(hf, tensors, src)
    elif model_type == "llama" or any(a.startswith("Llama") for a in archs):
        cfg, sd = _import_llama(hf, tensors, src)
    else:
        raise GptlabError(f"{src}: model_type {model_type or '?'!r} is not supported (gpt2 or llama)")
    tok = Tokenizer.load(src)
    model = GPT(cfg)
    vision = (hf.get("gptlab") or {}).get("vision") if isinstance(hf.get("gptlab"), dict) else None
    if vision is not None:   # a gptlab vision run's export: its encoder travels in vision.safetensors
        from gptlab.model.vision import VisionConfig, attach_vision
        attach_vision(model, VisionConfig.from_dict(vision))
        sd = {**sd, **runs.load_tensors(src / VISION_FILE)}
    runs.load_gpt_weights(model, sd, str(src))
    if tok.vocab_size > cfg.vocab_size:
        raise GptlabError(f"{src}: tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size} rows")
    added: list[str] = []
    if with_chat_tokens:
        model, tok, added = add_chat_tokens(model, tok)
        cfg = model.config
    out = Path(out_dir)
    extra = {"source": str(src.resolve()), "hf_model_type": model_type, "added_tokens": added}
    if vision is not None:
        extra["vision"] = vision
    runs.write_run_config(out, cfg, tok, stage="import", extra=extra)
    runs.save_tensors(out / runs.MODEL_FILE, runs.gpt_state(model))
    summary = {"stage": "import", "arch": cfg.arch, "params": model.num_params(), "vocab_size": cfg.vocab_size,
               "tokenizer_size": tok.vocab_size, "added_tokens": added, "source": str(src)}
    atomic_write_json(out / runs.SUMMARY_FILE, summary)   # written last: the import finished
    return summary
