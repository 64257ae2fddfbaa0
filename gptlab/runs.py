"""Run folders: weights in safetensors, config as JSON, a tokenizer copy, and resume state.

Every stage writes one and every consumer (sample, chat, serve, evals, label, the next stage) reads
one through here, so this module sits below all of them (see docs/ARCHITECTURE.md).

``model.safetensors`` holds what consumers load: the GPT's weights under their usual names
(``transformer.*``, ``lm_head.weight`` when untied) plus any task heads under ``heads.<name>.*``.
``checkpoint.safetensors`` holds everything needed to resume exactly (the trained module, optimizer
moments, RNG state, step) in ONE file written atomically, so a kill at any instant leaves either the
previous checkpoint or the new one, never a mix. Nothing here unpickles anything.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from gptlab.errors import GptlabError
from gptlab.io import atomic_write_bytes, atomic_write_json, read_json
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.model.heads import ScalarHeadModel
from gptlab.model.rope import stretch_positions
from gptlab.tokenizer import Tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
SUMMARY_FILE = "summary.json"


# ----- tensors <-> files ---------------------------------------------------------------------------
def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases (tied embeddings) and make tensors contiguous CPU copies safetensors accepts."""
    out, seen = {}, {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.detach().to("cpu").contiguous()
    return out


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    meta = {"format": "pt"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, st_save(_unshare(tensors), metadata=meta))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"{path}: no such file")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise GptlabError(f"{path}: truncated or corrupted safetensors file ({str(e).splitlines()[0]})") from None


def load_metadata(path: str | Path) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise GptlabError(f"{path}: truncated or corrupted safetensors file ({e})") from None


def gpt_state(module: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """What consumers load: a bare GPT's state, or a wrapper's ``.gpt`` plus its other parts as heads.

    ``state`` is the module's state dict when it was gathered elsewhere (FSDP); default: its own.
    """
    state = module.state_dict() if state is None else state
    if isinstance(module, GPT):
        return state
    out = {}
    for k, v in state.items():
        out[k[len("gpt."):] if k.startswith("gpt.") else f"heads.{k}"] = v
    return out


def load_gpt_weights(model: GPT, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Load the GPT part of ``tensors`` into ``model`` with clear errors; return the head tensors."""
    heads = {k[len("heads."):]: v for k, v in tensors.items() if k.startswith("heads.")}
    own = {k: v for k, v in tensors.items() if not k.startswith("heads.")}
    expected = model.state_dict()
    tied = model.config.tie_embeddings
    missing = [k for k in expected if k not in own and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in own if k not in expected]
    if any(k.startswith("vision.") for k in unexpected) and model.vision is None:
        raise GptlabError(f"{source}: holds a vision encoder (vision.*) but the run config has no 'vision' "
                          "section")
    if missing or unexpected:
        raise GptlabError(f"{source}: weights do not match the config (missing: {missing[:3]}, "
                          f"unexpected: {unexpected[:3]})")
    for k, v in own.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise GptlabError(f"{source}: {k} has shape {tuple(v.shape)} but the config expects "
                              f"{tuple(expected[k].shape)}")
    model.load_state_dict(own, strict=False)
    return heads


# ----- run folders ---------------------------------------------------------------------------------
def write_run_config(run_dir: str | Path, model_config: GPTConfig, tokenizer: Tokenizer, stage: str,
                     extra: dict | None = None) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir)
    cfg = {"model": model_config.to_dict(), "stage": stage}
    cfg.update(extra or {})
    atomic_write_json(run_dir / CONFIG_FILE, cfg)


def read_run_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GptlabError(f"{run_dir}: no such run folder")
    cfg = read_json(run_dir / CONFIG_FILE)
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise GptlabError(f"{run_dir / CONFIG_FILE}: not a gptlab run config (no 'model' section)")
    return cfg


def pretraining_sources(run_dir: str | Path, max_hops: int = 8) -> list[str] | None:
    """The corpora (``SOURCE:WEIGHT`` specs) the run at ``run_dir`` descends from: its own ``data``
    if it is a pre-training run, else those of its ``init`` chain (SFT -> pretrain, PPO -> SFT -> ...).
    None when the chain is broken or records no pre-training data. The ptx losses of SFT and PPO
    default to these: a mix drawn from another corpus pulls the model toward that corpus instead of
    holding it where pre-training left it."""
    run = Path(run_dir)
    for _ in range(max_hops):
        try:
            cfg = read_json(run / CONFIG_FILE)
        except GptlabError:
            return None
        if not isinstance(cfg, dict):
            return None
        data = cfg.get("data")
        if cfg.get("stage") == "pretrain" and isinstance(data, list) and data and all(isinstance(s, str) for s in data):
            return list(data)
        init = cfg.get("init")
        if not isinstance(init, str):
            return None
        run = Path(init)
    return None


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", with_heads: bool = False,
             context: dict | None = None):
    """(model, tokenizer, config) of a finished or in-progress run; ``with_heads`` adds the head tensors.

    ``context`` ({"block_size", "scaling", "factor"}, any of them) loads the model at another context
    length or RoPE scaling than recorded (``GPTConfig.with_context``); a learned position table is
    interpolated to the new length (``stretch_positions``)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    model_cfg = GPTConfig.from_dict(cfg["model"])
    if context:
        model_cfg = model_cfg.with_context(**context)
    tok = Tokenizer.load(run_dir)
    model = GPT(model_cfg)
    if cfg.get("vision") is not None:   # a vision-language run: its encoder's weights are vision.*
        from gptlab.model.vision import VisionConfig, attach_vision
        attach_vision(model, VisionConfig.from_dict(cfg["vision"]))
    tensors = load_tensors(run_dir / MODEL_FILE)
    wpe = tensors.get("transformer.wpe.weight")
    if wpe is not None and wpe.shape[0] != model_cfg.block_size:
        tensors["transformer.wpe.weight"] = stretch_positions(wpe, model_cfg.block_size)
    heads = load_gpt_weights(model, tensors, str(run_dir / MODEL_FILE))
    model.to(device).eval()
    if with_heads:
        return model, tok, cfg, heads
    return model, tok, cfg


def add_context_args(p, several: bool = False) -> None:
    """--context / --rope-scaling / --rope-factor: load a run at another context than it was trained at.
    ``several``: --rope-scaling takes a list (the passkey eval compares scalings side by side)."""
    from gptlab.model.rope import SCALINGS
    g = p.add_argument_group("context (long-context inference)")
    g.add_argument("--context", type=int, default=None, metavar="N",
                   help="context window in tokens (default: the run's, or --rope-factor x its training context)")
    g.add_argument("--rope-scaling", choices=("none",) + SCALINGS, default=None,
                   nargs="+" if several else None,
                   help="RoPE scaling to apply instead of the run's own (modern/fast): none = plain RoPE; "
                   "linear = position interpolation; ntk = NTK-aware base change; yarn = YaRN"
                   + ("; several compare side by side" if several else ""))
    g.add_argument("--rope-factor", type=float, default=None, metavar="F",
                   help="context multiple the scaling is tuned for (with --rope-scaling)")


def context_from_args(args, scaling: str | None = "keep") -> dict | None:
    """The ``context`` argument of load_run for these flags (``scaling``: one of a --rope-scaling list)."""
    if scaling == "keep" and not isinstance(args.rope_scaling, list):
        scaling = args.rope_scaling or "keep"
    if args.context is not None and args.context < 1:
        raise GptlabError("--context must be positive")
    if args.rope_factor is not None and not args.rope_factor >= 1:
        raise GptlabError("--rope-factor must be at least 1")
    if scaling not in ("keep", "none") and args.rope_factor is None:
        raise GptlabError(f"--rope-scaling {scaling} needs --rope-factor F (the context multiple, e.g. 4)")
    if args.context is None and scaling == "keep" and args.rope_factor is None:
        return None
    return {"block_size": args.context, "scaling": scaling, "factor": args.rope_factor}


def load_reward_model(run_dir: str | Path, device: str | torch.device = "cpu", flag: str | None = None):
    """(ScalarHeadModel in eval mode, tokenizer, run config) of a `gptlab rm` run; ``flag`` (e.g.
    "--reward-model") starts any error message, naming the option the path came from."""
    try:
        gpt, tok, cfg, heads = load_run(run_dir, device, with_heads=True)
        if "score_head.weight" not in heads or "score_head.bias" not in heads:
            raise GptlabError(f"{run_dir}: not a reward model run (no score head in "
                              f"{MODEL_FILE}); train one with `gptlab rm`")
    except GptlabError as e:
        if flag is None:
            raise
        raise GptlabError(f"{flag} {e}") from None
    head = (cfg.get("heads") or {}).get("score_head") or {}
    if head.get("kind") == "step":
        raise GptlabError(f"{flag + ' ' if flag else ''}{run_dir}: a process reward model (one score per step, "
                          "`gptlab prm`), not a reward model of whole answers")
    rm = ScalarHeadModel(gpt, reads=head.get("reads", "last_token"), response_start_id=head.get("response_start_id"),
                         logprob_feature=bool(head.get("logprob_feature")))
    rm.load_head(heads)
    return rm.to(device).eval(), tok, cfg


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / SUMMARY_FILE).is_file()


def update_summary(run_dir: str | Path, extra: dict) -> None:
    """Add figures computed after training to summary.json (still one atomic write)."""
    path = Path(run_dir) / SUMMARY_FILE
    summary = read_json(path) if path.is_file() else {}
    summary.update(extra)
    atomic_write_json(path, summary)


# ----- resume state --------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, state: dict, module_state: dict | None = None,
                    optim_state: dict | None = None) -> None:
    """``module_state``/``optim_state``: full states gathered elsewhere (FSDP); default: their own."""
    module_state = module.state_dict() if module_state is None else module_state
    tensors = {f"module.{k}": v for k, v in module_state.items()}
    opt = optimizer.state_dict() if optim_state is None else optim_state
    for idx, s in opt["state"].items():
        for name, t in s.items():
            if isinstance(t, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = t
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    meta = {"step": str(step), "param_groups": groups, "state": state}
    save_tensors(Path(run_dir) / CHECKPOINT_FILE, tensors, meta)


def load_checkpoint(run_dir: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Restore module, optimizer and RNG; return (step, state dict saved with it)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    tensors = load_tensors(path)
    meta = load_metadata(path)
    try:
        step = int(meta["step"])
        groups = json.loads(meta["param_groups"])
        state = json.loads(meta.get("state", "{}"))
    except (KeyError, ValueError) as e:
        raise GptlabError(f"{path}: checkpoint metadata is damaged ({e})") from None
    own = module.state_dict()
    mod = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
    for k, v in own.items():
        if k not in mod and not k.endswith("lm_head.weight"):
            raise GptlabError(f"{path}: checkpoint has no tensor {k}; it belongs to a different model")
        if k in mod and mod[k].shape != v.shape:
            raise GptlabError(f"{path}: {k} has shape {tuple(mod[k].shape)}, the model expects {tuple(v.shape)}")
    module.load_state_dict(mod, strict=False)
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    sd = optimizer.state_dict()
    if len(groups) != len(sd["param_groups"]):
        raise GptlabError(f"{path}: optimizer state does not match this model")
    for g, saved in zip(sd["param_groups"], groups):
        g.update(saved)
    sd["state"] = opt_state
    optimizer.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return step, state
