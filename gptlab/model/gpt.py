"""The GPT family in one readable module, each piece named as the papers name it.

Architectures (``GPTConfig.arch``):

* ``gpt1``   Radford et al. 2018: post-LayerNorm blocks ``x = LN(x + Attn(x)); x = LN(x + FFN(x))``,
             learned position embeddings, GELU FFN (4x), dropout, tied input/output embeddings.
* ``gpt2``   Radford et al. 2019: LayerNorm moved to each sub-block's input (pre-LN), a final
             LayerNorm after the last block, residual output projections initialised with std
             0.02/sqrt(2 * n_layer).
* ``gpt3``   Brown et al. 2020: gpt2 with attention alternating between dense (even layers) and
             locally banded sparse (odd layers: each token sees the previous ``sparse_band`` tokens).
* ``modern`` Llama-style: rotary position embeddings (RoPE), RMSNorm, SwiGLU FFN, grouped-query
             attention (``n_kv_head`` < ``n_head``), no biases.
* ``fast``   this project's recipe for learning fast on small budgets (the ``gptlab pretrain``
             default; docs/BENCHMARKS.md has its measurements): ``modern`` with full multi-head
             attention, an RMSNorm on each head's queries and keys (QK-norm, as in Qwen3: attention
             logits stay bounded at high learning rates), an untied LM head, and the residual
             projections initialised to zero (every block starts as the identity).
* ``bert``   Devlin et al. 2018: bidirectional (no causal mask) post-LayerNorm blocks like gpt1; the
             input is token + position + segment (token-type A/B) embeddings, then a LayerNorm.
             Trained with the masked-LM objective (see gptlab.train.pretrain).

Attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
Generation uses a KV cache whose rows can sit at different lengths, so one batch can hold sequences
that started at different times (continuous batching in gptlab.generate.engine).
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.model.fused import linear_cross_entropy
from gptlab.model.rope import SCALINGS, attention_factor, inv_frequencies
from gptlab.model.vision import place_images

ARCHS = ("gpt1", "gpt2", "gpt3", "modern", "fast", "bert")
# Far beyond any real model (GPT-3 175B: vocab 50k, context 2k, width 12k, 96 layers), small enough that
# a typo (a 1e9-token context) is caught before the allocator is asked for terabytes.
SIZE_LIMITS = {"vocab_size": 1 << 22, "block_size": 1 << 20, "n_layer": 1 << 10, "n_head": 1 << 10,
               "n_kv_head": 1 << 10, "n_embd": 1 << 16, "ffn_hidden": 1 << 18, "sparse_band": 1 << 20}


@dataclass
class GPTConfig:
    arch: str = "gpt2"
    vocab_size: int = 4096
    block_size: int = 256          # context window (tokens)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int | None = None   # grouped-query attention (modern); None = n_head
    ffn_hidden: int | None = None  # None: 4*n_embd (GELU) or ~8/3*n_embd rounded to 64 (SwiGLU)
    dropout: float = 0.0
    bias: bool = True
    sparse_band: int = 32          # gpt3: window of the locally banded layers
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qk_norm: bool = False          # RMSNorm on each head's queries and keys (fast)
    # Long context (gptlab/model/rope.py): how RoPE stretches past the length it was trained at.
    rope_scaling: str | None = None       # linear | ntk | yarn; None: plain RoPE
    rope_factor: float = 1.0              # context multiple the scaling is tuned for
    rope_original_context: int | None = None   # the training length the factor refers to (None: block_size)

    def __post_init__(self):
        self._check_types()
        if self.arch not in ARCHS:
            raise GptlabError(f"unknown architecture {self.arch!r} (choose from {', '.join(ARCHS)})")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head"):
            if int(getattr(self, name)) <= 0:
                raise GptlabError(f"{name} must be positive")
        if self.n_embd % self.n_head:
            raise GptlabError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise GptlabError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise GptlabError("RoPE needs an even head dimension (n_embd / n_head)")
        if not 0.0 <= self.dropout < 1.0:
            raise GptlabError("dropout must be in [0, 1)")
        if self.rope_scaling is not None and self.rope_scaling not in SCALINGS:
            raise GptlabError(f"unknown rope_scaling {self.rope_scaling!r} (choose from {', '.join(SCALINGS)})")
        if self.rope_scaling is not None and not self.rope:
            raise GptlabError(f"RoPE scaling needs a RoPE architecture (modern, fast); {self.arch} learns "
                              "its position table (extend it with `gptlab pretrain --init RUN --block-size N`)")
        if self.rope_factor < 1.0:
            raise GptlabError(f"rope_factor must be at least 1 (got {self.rope_factor})")
        if self.rope_original_context is not None and self.rope_original_context <= 0:
            raise GptlabError("rope_original_context must be positive")

    def _check_types(self) -> None:
        """Each field of the type (and size) it must have: a config.json edited by hand fails here with
        one line, not deep inside torch (a string n_layer, a null, or a 1e9 context the allocator refuses)."""
        for f in fields(self):
            v, optional = getattr(self, f.name), "None" in str(f.type)
            if v is None and optional:
                continue
            if f.type.startswith("int"):
                ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
            elif f.type == "float":
                ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            elif f.type == "bool":
                ok = isinstance(v, bool)
            else:
                ok = isinstance(v, str)
            if not ok:
                want = f.type.replace(" | None", " or null")
                raise GptlabError(f"model config: {f.name} must be {want} (got {v!r})")
        for name, most in SIZE_LIMITS.items():
            v = getattr(self, name)
            if v is not None and v > most:
                raise GptlabError(f"model config: {name} = {v} is larger than gptlab supports ({most})")

    # Structural switches derived from the architecture name.
    @property
    def pre_norm(self) -> bool:
        return self.arch not in ("gpt1", "bert")

    @property
    def segments(self) -> bool:
        """BERT's input: segment embeddings and a LayerNorm over the summed embeddings."""
        return self.arch == "bert"

    @property
    def rmsnorm(self) -> bool:
        return self.arch in ("modern", "fast")

    @property
    def rope(self) -> bool:
        return self.arch in ("modern", "fast")

    @property
    def swiglu(self) -> bool:
        return self.arch in ("modern", "fast")

    @property
    def causal(self) -> bool:
        return self.arch != "bert"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.swiglu:  # keep FFN parameters ~ equal to the 4x GELU FFN
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @property
    def trained_context(self) -> int:
        """The length positions were first learned at, which context multiples and scalings refer to."""
        return self.rope_original_context or self.block_size

    def with_context(self, block_size: int | None = None, scaling: str | None = "keep",
                     factor: float | None = None) -> "GPTConfig":
        """This config at another context length and/or RoPE scaling ("none": plain RoPE; "keep":
        as recorded). A scaling without a block size gets factor x the trained context."""
        d = self.to_dict()
        if scaling != "keep":
            d["rope_scaling"] = None if scaling in (None, "none") else scaling
        if factor is not None:
            d["rope_factor"] = float(factor)
        if d["rope_scaling"] is None:
            d["rope_factor"] = 1.0
        if self.rope:
            d["rope_original_context"] = self.trained_context
        if block_size is None and d["rope_scaling"] is not None:
            block_size = max(self.block_size, round(self.trained_context * d["rope_factor"]))
        if block_size is not None:
            d["block_size"] = int(block_size)
        return GPTConfig.from_dict(d)

    def is_sparse_layer(self, layer: int) -> bool:
        return self.arch == "gpt3" and layer % 2 == 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        if not isinstance(d, dict):
            raise GptlabError(f"model config must be an object of settings (got {type(d).__name__})")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise GptlabError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def for_arch(cls, arch: str, **overrides) -> "GPTConfig":
        """Defaults of the named architecture, then any overrides."""
        base: dict = {"arch": arch}
        if arch == "gpt1":
            base.update(dropout=0.1)
        if arch in ("modern", "fast"):
            base.update(bias=False)
        if arch == "fast":
            base.update(qk_norm=True, tie_embeddings=False)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @classmethod
    def preset(cls, name: str, arch: str = "gpt2", **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise GptlabError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
        shape = dict(PRESETS[name])
        if arch == "modern" and "n_kv_head" not in overrides:
            shape["n_kv_head"] = max(1, shape["n_head"] // 2)
        shape.update({k: v for k, v in overrides.items() if v is not None})
        return cls.for_arch(arch, **shape)


N_SEGMENTS = 2   # BERT's token types: sentence A and sentence B

# Shapes from a CPU-sized model that trains in minutes up to the papers' models.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt1": dict(n_layer=12, n_head=12, n_embd=768, block_size=512),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
}


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias), as in Llama."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x if x.dtype == torch.float32 else x.float()   # normalise in fp32 under bf16 autocast
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf if xf.dtype == x.dtype else xf.type_as(x)) * self.weight


# Decoding one token runs ~100 small ops whose kernels take a few microseconds each, so Python
# overhead is a real share of a step. The helpers below skip nn.Module's call machinery and its slow
# attribute lookup (Module.__getattr__, ~1 us per submodule or parameter access) by reading the
# registries directly. They stay correct when parameters are swapped (load_state_dict, FSDP's
# unsharded views), and FSDP's hooks sit on the blocks and the model, never on single layers.
def _weights(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of an nn.Linear, read from its registry."""
    p = linear._parameters
    return p["weight"], p["bias"]


def _linear(owner: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``owner.<name>(x)`` for an nn.Linear child."""
    return F.linear(x, *_weights(owner._modules[name]))


def _dense(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
           add: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b) + add``. One row ([C]) is a matrix-vector product: addmv/mv take the
    [out, in] weight as stored, where F.linear on [1, C] adds a transpose and a 2-D matmul (~1.5 us
    per call at decoding sizes). Without a bias, ``add`` folds into the same call."""
    if add is not None and b is None:
        return torch.addmv(add, w, x) if x.dim() == 1 else torch.addmm(add, x, w.t())
    if x.dim() == 1:
        y = torch.mv(w, x) if b is None else torch.addmv(b, w, x)
    else:
        y = F.linear(x, w, b)
    return y if add is None else add + y


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a LayerNorm or RMSNorm, through torch.layer_norm / torch.rms_norm: the ops
    behind F.layer_norm and F.rms_norm without their Python wrappers."""
    p = norm._parameters
    if isinstance(norm, nn.LayerNorm):
        return torch.layer_norm(x, norm.normalized_shape, p["weight"], p["bias"], norm.eps)
    if x.dtype == torch.float32:   # the same values as RMSNorm.forward in one call instead of six
        return torch.rms_norm(x, p["weight"].shape, p["weight"], norm.eps)
    return norm.forward(x)


def make_dropout(p: float) -> nn.Module:
    """Dropout, or nothing at all when p is 0 (even a p=0 dropout costs a pass over the tensor)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.rmsnorm:
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, max_len: int, theta: float, scaling: str | None = None, factor: float = 1.0,
                original_context: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position tables [L, hd] for ``apply_rope``: cos of each pair's angle, and its sin signed for
    the first half (-sin) and second half (+sin), so a rotation is two multiplies and one add.
    ``scaling``/``factor`` stretch the frequencies past the training context (gptlab/model/rope.py);
    YaRN's attention temperature rides on the tables (queries and keys both carry its square root)."""
    inv_freq = inv_frequencies(head_dim, theta, scaling, factor, original_context)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [L, hd/2]
    m = attention_factor(scaling, factor)
    cos, sin = angles.cos() * m, angles.sin() * m
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head by position-dependent angles.

    x: [B, H, T, hd]; cos/sin: [B or 1, 1, T, hd] from ``rope_tables``. With x = (x1, x2):
    out = (x1 cos - x2 sin, x2 cos + x1 sin) = x * cos + roll(x, hd/2) * signed sin.
    The half-split layout matches Hugging Face Llama.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    out = xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin
    return out if out.dtype == x.dtype else out.type_as(x)


class KVCache:
    """Keys and values of past tokens, one row per sequence; rows advance independently.

    ``lengths[r]`` is how many tokens row r holds. A forward pass over rows R writes its new keys at
    positions lengths[R] .. lengths[R]+T-1 and attends to everything before them.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # Per-layer views, made once (not unbind(): its multi-output views refuse in-place writes
        # under autograd, and a cache may be filled with gradients on).
        self.layer_k = [self.k[i] for i in range(cfg.n_layer)]
        self.layer_v = [self.v[i] for i in range(cfg.n_layer)]
        # How many tokens each row holds: a Python list, since every step reads it on the host
        # (a tensor would cost a device read per step, and a sync on GPUs).
        self.lengths = [0] * batch_size
        self.max_len = max_len

    def plan(self, rows: list[int], starts: list[int], T: int, device) -> "CacheStep":
        """Everything the layers of one forward pass share: computed once, not once per layer."""
        return CacheStep(self, rows, starts, T, device)

    def reset(self, rows=None):
        for r in range(len(self.lengths)) if rows is None else rows:
            self.lengths[r] = 0


class CacheStep:
    """One forward pass's view of the cache: rows, positions, and how to read and write them.

    Decoding one token costs a few dozen small ops per layer, so per-pass work (positions, masks,
    whether rows can be read as plain slices) is done here once and shared by every layer.
    """

    def __init__(self, cache: KVCache, rows: list[int], starts: list[int], T: int, device):
        self.T, self.device = T, device
        self.row_list, self.starts = rows, starts
        self.n_keys = max(starts) + T
        if self.n_keys > cache.max_len:
            raise ValueError("KV cache is full")
        r0 = rows[0]
        consecutive = rows == list(range(r0, r0 + len(rows)))
        # (first row, end row) when the rows are a block of the cache: views instead of gathers.
        self.block = (r0, r0 + len(rows)) if consecutive else None
        # Rows in lockstep (one sequence, or a batch that started together): writes are slices too.
        self.start = starts[0] if consecutive and len(set(starts)) == 1 else None
        self._masks: dict = {}
        self._rows = self._pos = None

    # Built only when a pass needs them: a lockstep one-token step reads and writes plain slices.
    @property
    def rows(self) -> torch.Tensor:
        if self._rows is None:
            self._rows = torch.tensor(self.row_list, device=self.device)
        return self._rows

    @property
    def pos(self) -> torch.Tensor:
        """[B, T] absolute position of every new token."""
        if self._pos is None:
            steps = torch.arange(self.T, device=self.device)
            self._pos = torch.tensor(self.starts, device=self.device)[:, None] + steps[None, :]
        return self._pos

    def mask(self, band: int | None):
        """[B, 1, T, keys] boolean attention mask, or None when every key is visible."""
        if band not in self._masks:
            if self.start is not None and self.T == 1 and band is None:
                m = None                                   # a single new token sees every key
            else:
                key_pos = torch.arange(self.n_keys, device=self.pos.device)
                m = key_pos[None, None, :] <= self.pos[:, :, None]                       # [B, T, keys]
                if band is not None:
                    m = m & (key_pos[None, None, :] > self.pos[:, :, None] - band)
                m = m[:, None]
            self._masks[band] = m
        return self._masks[band]

    def write_and_read(self, kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store this pass's keys/values ([B, H, T, hd]) and return all keys/values the rows see."""
        T = self.T
        if k.dtype != kc.dtype:   # e.g. bf16 keys under autocast, fp32 cache
            k, v = k.to(kc.dtype), v.to(kc.dtype)
        if self.start is not None:   # narrow() views: the cheapest way to name a block of the cache
            r0, r1 = self.block
            p0 = self.start
            kc, vc = kc.narrow(0, r0, r1 - r0), vc.narrow(0, r0, r1 - r0)
            kc.narrow(2, p0, T).copy_(k)
            vc.narrow(2, p0, T).copy_(v)
            return kc.narrow(2, 0, p0 + T), vc.narrow(2, 0, p0 + T)
        kc[self.rows[:, None], :, self.pos] = k.transpose(1, 2)
        vc[self.rows[:, None], :, self.pos] = v.transpose(1, 2)
        if self.block is not None:
            r0, r1 = self.block
            return kc[r0:r1, :, :self.n_keys], vc[r0:r1, :, :self.n_keys]
        return kc[self.rows, :, :self.n_keys], vc[self.rows, :, :self.n_keys]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # Query, key and value projections in one matmul (keys/values may have fewer heads: GQA).
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_projection = True
        self.resid_dropout = make_dropout(cfg.dropout)
        self.band = cfg.sparse_band if cfg.is_sparse_layer(layer) else None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, rope, cache: KVCache | None, step: CacheStep | None):
        n_q, n_kv, hd = self.n_head, self.n_kv_head, self.head_dim
        B, T, C = x.shape
        heads = _linear(self, "c_attn", x).view(B, T, n_q + 2 * n_kv, hd).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k, v = _qk_norm(self, heads, n_q, n_kv)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        else:
            qk, v = heads.split([n_q + n_kv, n_kv], dim=1)
            if rope is not None:   # queries and keys turn by the same angles: one rotation for both
                qk = apply_rope(qk, *rope)
            q, k = qk.split([n_q, n_kv], dim=1)

        mask, is_causal = None, False
        if cache is None:
            if self.band is not None:   # only the band is computed: time and memory linear in T
                y = banded_attention(q, k, v, self.band, self.cfg.dropout if self.training else 0.0)
                y = _linear(self, "c_proj", y.transpose(1, 2).contiguous().view(B, T, C))
                return self.resid_dropout(y) if self.training else y
            is_causal = self.cfg.causal
        else:
            # Write the new keys/values at each row's own positions, then attend over the filled part.
            k, v = step.write_and_read(cache.layer_k[self.layer], cache.layer_v[self.layer], k, v)
            mask = step.mask(self.band)
        y = attend(q, k, v, mask, is_causal, self.cfg.dropout if self.training else 0.0)
        y = _linear(self, "c_proj", y.transpose(1, 2).contiguous().view(B, T, C))
        return self.resid_dropout(y) if self.training else y


def _qk_norm(attn: nn.Module, heads: torch.Tensor, n_q: int, n_kv: int):
    """Split [B, q+k+v heads, T, hd] into q, k, v; with QK-norm, each query and key is RMS-normalised
    over its head dimension (separate gains for queries and keys, as Qwen3)."""
    q, k, v = heads.split_with_sizes([n_q, n_kv, n_kv], 1)
    m = attn._modules
    if "q_norm" in m:
        q, k = _norm(m["q_norm"], q), _norm(m["k_norm"], k)
    return q, k, v


def attend(q, k, v, mask=None, is_causal: bool = False, dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention of q [B, Hq, T, hd] over k/v [B, Hkv, S, hd], Hkv dividing Hq
    (grouped-query attention); keys/values stored in another dtype (a cache) are cast to q's."""
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if k.size(-3) == q.size(-3):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)
    if q.device.type == "cpu":   # the CPU kernel shares each key/value head itself (3x faster)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=dropout, enable_gqa=True)
    rep = q.size(-3) // k.size(-3)   # GPU kernels are safest with explicit copies
    k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)


_BAND_MASKS: dict = {}


def band_mask(Tq: int, Tk: int, band: int, device) -> torch.Tensor:
    """Locally banded causal mask: query i sees keys i-band+1 .. i (GPT-3's sparse layers)."""
    key = (Tq, Tk, band, str(device))
    if key not in _BAND_MASKS:
        i = torch.arange(Tq, device=device)[:, None]
        j = torch.arange(Tk, device=device)[None, :]
        _BAND_MASKS[key] = (j <= i) & (j > i - band)
    return _BAND_MASKS[key]


_BLOCK_MASKS: dict = {}


def banded_attention(q, k, v, band: int, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention of each query over the ``band`` keys ending at its own position (query i
    sees keys i-band+1 .. i), computing only those: the sequence is cut into blocks of ``band``
    tokens and each block attends to itself and the block before it, which holds every key any of
    its queries may see. 2 * band scores per query instead of T, so a long sequence costs time and
    memory linear in its length (masking a full T x T product, as ``band_mask`` does, saves nothing).
    The result equals masked dense attention with ``band_mask``."""
    B, H, T, hd = q.shape
    if T <= 2 * band:   # the whole sequence is within two blocks: nothing to skip
        return attend(q, k, v, band_mask(T, T, band, q.device), dropout=dropout)
    if k.size(1) != H:   # grouped keys/values: one per query head for the blocked layout
        k, v = k.repeat_interleave(H // k.size(1), dim=1), v.repeat_interleave(H // v.size(1), dim=1)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    n = -(-T // band)
    pad = n * band - T
    if pad:   # padded queries are dropped at the end; padded keys sit after every real query
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qb = q.view(B, H, n, band, hd)

    def with_previous(t):   # [B, H, n, 2 * band, hd]: block j-1 then block j (zeros before block 0)
        t = t.view(B, H, n, band, hd)
        return torch.cat([F.pad(t, (0, 0, 0, 0, 1, 0))[:, :, :-1], t], dim=3)
    key = (n, band, str(q.device))
    if key not in _BLOCK_MASKS:
        i = torch.arange(band, device=q.device)[:, None]
        r = torch.arange(2 * band, device=q.device)[None, :]
        m = ((r > i) & (r <= band + i)).expand(n, band, 2 * band).clone()   # key r of [prev, own]
        m[0, :, :band] = False   # block 0 has no previous block
        _BLOCK_MASKS[key] = m
    y = F.scaled_dot_product_attention(qb, with_previous(k), with_previous(v), attn_mask=_BLOCK_MASKS[key],
                                       dropout_p=dropout)
    return y.reshape(B, H, n * band, hd)[:, :, :T]


class MLP(nn.Module):
    """The position-wise feed-forward network: GELU (GPT) or SwiGLU (modern)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.swiglu
        hidden = cfg.hidden_dim
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_projection = True
        self.dropout = make_dropout(cfg.dropout)

    def forward(self, x):
        if self.swiglu:
            h = F.silu(_linear(self, "gate_proj", x)) * _linear(self, "c_fc", x)
        else:
            h = F.gelu(_linear(self, "c_fc", x), approximate="tanh")  # GPT-2's "gelu_new"
        y = _linear(self, "c_proj", h)
        return self.dropout(y) if self.training else y


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache=None, step=None):
        if self.pre_norm:   # GPT-2 and later: normalise each sub-block's input
            x = x + self.attn(self.ln_1(x), rope, cache, step)
            x = x + self.mlp(self.ln_2(x))
        else:               # GPT-1 and BERT: normalise after each residual addition
            x = self.ln_1(x + self.attn(x, rope, cache, step))
            x = self.ln_2(x + self.mlp(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=make_dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
        ))
        if not cfg.rope:
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.segments:
            self.transformer["wse"] = nn.Embedding(N_SEGMENTS, cfg.n_embd)
            self.transformer["ln_e"] = make_norm(cfg)
        if cfg.pre_norm:
            self.transformer["ln_f"] = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.vision = None   # an image encoder (model/vision.py) when the run was trained to see
        if cfg.rope:
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg.rope_scaling,
                                   cfg.rope_factor, cfg.trained_context)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            if self.config.arch == "fast" and getattr(module, "residual_projection", False):
                nn.init.zeros_(module.weight)   # blocks start as the identity
                return
            std = 0.02
            # GPT-2: scale residual projections by 1/sqrt(N), N = 2 residual layers per block (a
            # pre-LN stream adds every block's output; post-LN blocks renormalise it instead).
            if getattr(module, "residual_projection", False) and self.config.pre_norm:
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ----- forward ------------------------------------------------------------------------------
    def hidden(self, idx: torch.Tensor, pos: torch.Tensor | None = None, cache: KVCache | None = None,
               rows: torch.Tensor | None = None, segments: torch.Tensor | None = None,
               images: torch.Tensor | None = None) -> torch.Tensor:
        """Final (normed) hidden states [B, T, n_embd]; heads and the LM head read these.

        With a cache, ``rows`` picks the cache rows of this batch (default: the first B rows) and
        positions continue from each row's length; the cache lengths are advanced by T.
        ``segments`` ([B, T] of 0/1, bert only) marks sentence A and B; default: all A.
        ``images`` ([N, 3, S, S] pixels) replace the embeddings of the ``<|image|>`` tokens, in reading
        order (model/vision.py); a text-only model refuses them.
        """
        B, T = idx.shape
        cfg = self.config
        step = None
        if cache is not None:
            rows = list(range(B)) if rows is None else (rows.tolist() if torch.is_tensor(rows) else list(rows))
            if T == 1 and images is None and not (self.training and cfg.dropout > 0):   # the fast path
                return self.decode(idx[:, 0], cache, rows).view(B, 1, -1)
            lengths = cache.lengths
            step = cache.plan(rows, [lengths[r] for r in rows], T, idx.device)
        elif pos is None:
            if T > cfg.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the context window {cfg.block_size}")
            pos = torch.arange(T, device=idx.device)[None, :].expand(B, T)
        x = self.transformer.wte(idx)
        if images is not None:
            x = place_images(self.vision, x, idx, images)
        rope = None
        if cfg.rope:
            if step is not None and step.start is not None:   # rows in lockstep: slices, no gathers
                rope = (self.rope_cos[step.start:step.start + T][None, None],
                        self.rope_sin[step.start:step.start + T][None, None])
            else:
                p = step.pos if step is not None else pos
                rope = (self.rope_cos[p][:, None], self.rope_sin[p][:, None])
        elif step is not None and step.start is not None:   # rows in lockstep: one slice of the table
            x = x + self.transformer.wpe.weight[step.start:step.start + T]
        else:
            x = x + self.transformer.wpe(step.pos if step is not None else pos)
        if cfg.segments:
            x = x + (self.transformer.wse.weight[0] if segments is None else self.transformer.wse(segments))
            x = self.transformer.ln_e(x)
        elif segments is not None:
            raise ValueError(f"a {cfg.arch} model has no segment embeddings")
        if self.training:
            x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, cache, step)
        if cache is not None:
            for r in rows:
                cache.lengths[r] += T
        if cfg.pre_norm:
            x = self.transformer.ln_f(x)
        return x

    def decode(self, tokens: list[int] | torch.Tensor, cache: KVCache, rows: list[int]) -> torch.Tensor:
        """Final hidden states of one new token per cache row: [B, C], or [C] for a single row.

        What ``hidden`` computes for T == 1 with a cache, written for speed. A decoding step of a small
        model is a few hundred tiny ops, so per-call overhead, not arithmetic, sets its time. Here each
        layer's parameters are read straight from the registries and used with plain torch calls (no
        nn.Module calls, no [B, T, C] reshapes, config properties read once); one row is a vector, so
        the linears are matrix-vector products; rows in lockstep (always so for one row) write and read
        the cache through views made once per step, and banded layers slice their window instead of
        masking; bias-free output projections fold the residual add into the matmul. Inference only:
        no dropout, no module hooks.
        """
        cfg = self.config
        nq, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        pre_norm, rope, swiglu, qk_norm = cfg.pre_norm, cfg.rope, cfg.swiglu, cfg.qk_norm
        tr = self._modules["transformer"]._modules
        wte = tr["wte"]._parameters["weight"]
        B = len(rows)
        lengths = cache.lengths
        step = cache.plan(rows, [lengths[r] for r in rows], 1, wte.device)
        if torch.is_tensor(tokens):
            x = F.embedding(tokens, wte)
            x = x[0] if B == 1 else x
        else:   # one row: a plain select of the embedding row, no index tensor
            x = wte[tokens[0]] if B == 1 else F.embedding(torch.tensor(tokens, device=wte.device), wte)
        p = step.start   # the position of every row, when they are in lockstep
        if rope:
            cos, sin = self._buffers["rope_cos"], self._buffers["rope_sin"]
            cos, sin = (cos[p], sin[p]) if p is not None else (cos[step.pos][:, None], sin[step.pos][:, None])
        else:
            wpe = tr["wpe"]._parameters["weight"]
            x = x + (wpe[p] if p is not None else F.embedding(step.pos[:, 0], wpe))
        if p is not None:   # views of every layer's cache at once: [layers, B, Hkv, L, hd]
            r0, r1 = step.block
            k_all, v_all = cache.k.narrow(1, r0, r1 - r0), cache.v.narrow(1, r0, r1 - r0)
            k_new, v_new = k_all.narrow(3, p, 1), v_all.narrow(3, p, 1)
            k_all, v_all = k_all.narrow(3, 0, p + 1), v_all.narrow(3, 0, p + 1)
        # Under autocast a residual folded into addmv/addmm would be cast to bf16 with the matmul's
        # inputs; the residual stream stays fp32 there, as in ``hidden``.
        fold = not torch.is_autocast_enabled(wte.device.type)
        for i, block in enumerate(tr["h"]._modules.values()):
            m = block._modules
            attn, mlp = m["attn"], m["mlp"]._modules
            h = _norm(m["ln_1"], x) if pre_norm else x
            # [B, heads * hd] is laid out as [B, heads, 1, hd]: views only, no transposes or copies.
            heads = _dense(h, *_weights(attn._modules["c_attn"])).view(B, nq + 2 * nkv, 1, hd)
            if qk_norm:
                q, k, v = _qk_norm(attn, heads, nq, nkv)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            elif rope:   # queries and keys turn by the same angles: one rotation for both
                qk, v = heads.split_with_sizes([nq + nkv, nkv], 1)
                q, k = apply_rope(qk, cos, sin).split_with_sizes([nq, nkv], 1)
            else:
                q, k, v = heads.split_with_sizes([nq, nkv, nkv], 1)
            if p is not None:
                k_new[i].copy_(k)
                v_new[i].copy_(v)
                keys, values, mask = k_all[i], v_all[i], None
                band = attn.band
                if band is not None and p >= band:   # a banded layer's window: the last `band` keys
                    keys, values = keys.narrow(2, p + 1 - band, band), values.narrow(2, p + 1 - band, band)
            else:
                keys, values = step.write_and_read(cache.layer_k[i], cache.layer_v[i], k, v)
                mask = step.mask(attn.band)
            y = attend(q, keys, values, mask).view(x.shape)   # [B, heads, 1, hd] is laid out as [B, C]
            w, b = _weights(attn._modules["c_proj"])
            x = _dense(y, w, b, x) if fold else x + _dense(y, w, b)
            if not pre_norm:
                x = _norm(m["ln_1"], x)
            h = _norm(m["ln_2"], x) if pre_norm else x
            if swiglu:
                h = F.silu(_dense(h, *_weights(mlp["gate_proj"]))) * _dense(h, *_weights(mlp["c_fc"]))
            else:
                h = F.gelu(_dense(h, *_weights(mlp["c_fc"])), approximate="tanh")
            w, b = _weights(mlp["c_proj"])
            x = _dense(h, w, b, x) if fold else x + _dense(h, w, b)
            if not pre_norm:
                x = _norm(m["ln_2"], x)
        for r in rows:
            lengths[r] += 1
        return _norm(tr["ln_f"], x) if pre_norm else x

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        return _dense(h, self._modules["lm_head"]._parameters["weight"])

    def forward(self, idx, targets=None, ignore_index: int = -100, segments=None, images=None):
        """Logits for every position, and the mean cross-entropy against ``targets`` when given."""
        h = self.hidden(idx, segments=segments, images=images)
        if targets is not None and self._fused_loss(h):
            # Training on CPU: LM head and loss fused, no [tokens, vocab] logits (model/fused.py).
            flat = h.reshape(-1, h.size(-1))
            return None, linear_cross_entropy(flat, self.lm_head.weight, targets.reshape(-1), ignore_index)
        logits = self.lm_logits(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=ignore_index)
        return logits, loss

    fused_loss = os.environ.get("GPTLAB_FUSED_LOSS", "1") != "0"

    def _fused_loss(self, h: torch.Tensor) -> bool:
        # Not under torch.compile: its rows are handled data-dependently, and the compiler fuses the
        # plain path itself. (Checked here rather than with torch.compiler.disable on the kernel,
        # whose decoration imports the compiler: 1.3 s at start-up of every command.)
        return (self.fused_loss and h.device.type == "cpu" and h.dtype == torch.float32
                and torch.is_grad_enabled() and h.requires_grad and self.lm_head.bias is None
                and not torch.compiler.is_compiling())

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        if not self.config.causal:   # the cached paths attend causally and skip the segment embeddings
            raise GptlabError(f"a {self.config.arch} model is bidirectional: it has no KV cache")
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, dtype or p.dtype)

    # ----- accounting ---------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the weights plus the attention score/value matmuls
        (12 * layers * width * context, PaLM appendix B), counting only dense attention for sparse layers
        as an upper bound."""
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params(non_embedding=True)
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T
