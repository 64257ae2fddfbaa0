"""`gptlab export` and `gptlab import`: move models between gptlab run folders and Hugging Face.

    gptlab export runs/tiny --format hf hf/tiny     # then AutoModelForCausalLM.from_pretrained("hf/tiny")
    gptlab export runs/tiny --format gguf tiny.gguf --type q8_0   # llama.cpp, llama-cpp-python, Ollama
    gptlab import hf/gpt2 --out runs/gpt2 --add-chat-tokens
"""
from __future__ import annotations

import argparse
from pathlib import Path

from gptlab.errors import GptlabError


def run_export(args) -> int:
    if args.format == "gguf":
        return run_export_gguf(args)
    if args.type is not None:
        raise GptlabError("--type is for --format gguf (the Hugging Face export is float32)")
    from gptlab.interop.hf import export_hf
    s = export_hf(args.run_dir, args.out_dir)
    print(f"exported {args.run_dir} ({s['arch']}, {s['params'] / 1e6:.2f}M parameters) as {s['hf_class']} "
          f"to {args.out_dir}: {', '.join(s['files'])}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(args.out_dir)!r}); "
          f"AutoTokenizer.from_pretrained({str(args.out_dir)!r})")
    return 0


def run_export_gguf(args) -> int:
    from gptlab.interop.gguf_export import export_gguf
    s = export_gguf(args.run_dir, args.out_dir, args.type or "f16", progress=True)
    print(f"exported {args.run_dir} ({s['arch']} as llama.cpp {s['gguf_arch']}, {s['params'] / 1e6:.2f}M parameters, "
          f"{s['type']}, {s['bytes'] / 1e6:.1f} MB, {s['tensors']} tensors) to {args.out_dir}")
    print(f"run it with: python -c \"from llama_cpp import Llama; print(Llama({str(args.out_dir)!r})"
          "('Hello', max_tokens=32)['choices'][0]['text'])\"")
    if s["gguf_arch"] == "gpt2":   # learned positions end there, but llama.cpp pads its context to 256
        print(f"note: keep prompt plus max_tokens within {s['context']} tokens: llama.cpp aborts the process "
              "past a gpt2 model's last learned position")
    if len(s["files"]) > 1:
        print(f"Ollama: ollama create NAME -f {Path(args.out_dir).with_suffix('.Modelfile')} && ollama run NAME")
    return 0


def run_import(args) -> int:
    from gptlab.interop.hf import import_hf
    s = import_hf(args.hf_dir, args.out, with_chat_tokens=args.add_chat_tokens)
    print(f"imported {args.hf_dir} as a gptlab {s['arch']} run in {args.out}: {s['params'] / 1e6:.2f}M parameters, "
          f"vocab {s['vocab_size']} (tokenizer {s['tokenizer_size']} tokens)")
    if s["added_tokens"]:
        print(f"added {len(s['added_tokens'])} special tokens (chat roles etc.), embeddings initialised to the "
              "mean embedding: fine-tune with `gptlab sft` before chatting")
    print(f"next: gptlab sample {args.out} --prompt 'Hello'")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export a run as a Hugging Face transformers checkpoint or a GGUF file (llama.cpp, Ollama)",
        description="Write RUN_DIR's model as a folder that transformers loads offline with "
        "AutoModelForCausalLM.from_pretrained(OUT_DIR) and AutoTokenizer.from_pretrained(OUT_DIR): "
        "config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json "
        "(with the chat template) and special_tokens_map.json. arch gpt2 becomes GPT2LMHeadModel, modern "
        "becomes LlamaForCausalLM; gpt1, gpt3 and bert have no identical Hugging Face class. "
        "--format gguf writes one OUT.gguf file for llama.cpp / llama-cpp-python / Ollama (gpt2 as gpt2, "
        "modern as llama, fast as qwen3; tokenizer, special tokens and chat template included) and, for a "
        "tokenizer with chat tokens, OUT.Modelfile for `ollama create`; needs pip install 'gptlab[gguf]'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="gptlab run folder (model.safetensors + config.json)")
    p.add_argument("out_dir", metavar="OUT", help="folder to write (hf) or .gguf file to write (gguf)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="output format: Hugging Face transformers folder, or one GGUF file")
    p.add_argument("--type", choices=["f32", "f16", "q8_0"], default=None,
                   help="GGUF weight type (default f16; q8_0: 8-bit blocks, about half of f16's size)")
    p.set_defaults(func=run_export)

    p = sub.add_parser(
        "import", help="import a local Hugging Face GPT-2 (or Llama) checkpoint as a gptlab run",
        description="Read a local transformers folder (config.json, model.safetensors or a sharded index, "
        "tokenizer.json or GPT-2's vocab.json + merges.txt) and write a gptlab run folder (stage 'import') "
        "that sample, chat, serve, finetune and sft accept. GPT-2 checkpoints with or without the "
        "'transformer.' key prefix are read; attn.bias mask buffers are ignored. Pickle weights "
        "(pytorch_model.bin) are refused. GPT-2's tokenizer has no chat tokens: --add-chat-tokens appends "
        "gptlab's reserved special tokens and grows the embedding (new rows = mean embedding).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("hf_dir", metavar="HF_DIR", help="local transformers checkpoint folder")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write")
    p.add_argument("--add-chat-tokens", action="store_true",
                   help="append gptlab's chat/special tokens to the tokenizer and resize the embedding")
    p.set_defaults(func=run_import)
