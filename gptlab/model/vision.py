"""The image path of a vision-language GPT: a ViT trained from scratch and a projector (LLaVA's layout).

    pixels [N, 3, S, S] -> P x P patches -> linear patch embedding + learned positions
      -> pre-LN transformer encoder -> LayerNorm -> k x k average pooling of the patch grid
      -> MLP projector to the decoder's width -> [N, n_tokens, n_embd]

The decoder reads these where its prompt holds ``n_tokens`` consecutive ``<|image|>`` tokens: their
token embeddings are replaced by the picture's (``place_images``), so every decoder arch (learned
positions or RoPE, any norm) takes pictures without a change to its blocks. Pooling keeps the decoder's
share short (a 48-pixel picture in 6-pixel patches is an 8 x 8 grid; pooled 2 x 2 it is 16 tokens) while
the encoder still sees every patch.

The encoder is a submodule of the GPT (``GPT.vision``), so its weights sit in the run's
model.safetensors under ``vision.*`` and the run config records its shape in a ``vision`` section.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError


@dataclass
class VisionConfig:
    image_size: int = 48
    patch: int = 6
    width: int = 128
    layers: int = 3
    heads: int = 4
    pool: int = 2               # k x k neighbouring patches are averaged into one decoder token
    stem: str = "patch"         # patch: ViT's linear patch embedding; conv: two small convolutions first
    image_token_id: int = -1    # the tokenizer's <|image|> id

    def __post_init__(self):
        if self.stem not in ("patch", "conv"):
            raise GptlabError(f"vision config: stem must be patch or conv (got {self.stem!r})")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "stem" and (not isinstance(v, int) or isinstance(v, bool)):
                raise GptlabError(f"vision config: {f.name} must be an integer (got {v!r})")
        if min(self.image_size, self.patch, self.width, self.layers, self.heads, self.pool) < 1:
            raise GptlabError("vision config: sizes must be positive")
        if self.image_size % self.patch or (self.image_size // self.patch) % self.pool:
            raise GptlabError("vision config: image_size must be a multiple of patch * pool")
        if self.width % self.heads:
            raise GptlabError("vision config: width must be divisible by heads")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def n_tokens(self) -> int:
        """Decoder positions one picture takes."""
        return (self.grid // self.pool) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "VisionConfig":
        if not isinstance(d, dict):
            raise GptlabError("vision config must be a JSON object")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, n_embd: int):
        super().__init__()
        self.config = cfg
        # A P x P convolution with stride P is exactly ViT's linear embedding of flattened patches. The
        # conv stem first looks at 3 x 3 neighbourhoods (edges, strokes) at full resolution, then halves it.
        if cfg.stem == "conv":
            if cfg.patch % 4:
                raise GptlabError("vision config: a conv stem needs a patch size that is a multiple of 4")
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
                                      nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU())
            self.patch_embed = nn.Conv2d(64, cfg.width, cfg.patch // 4, stride=cfg.patch // 4)
        else:
            self.stem = nn.Identity()
            self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.randn(cfg.grid * cfg.grid, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Sequential(nn.Linear(cfg.width, n_embd), nn.GELU(), nn.Linear(n_embd, n_embd))
        # ViT's init (normal, std 0.02). With torch's default (~4x larger for these widths) a trained
        # encoder's outputs had ~20x the norm of the decoder's token embeddings (11 vs 0.54), and in
        # a 50-step probe on colour questions the decoder began to use the picture later.
        # The stem's convolutions keep torch's default (fan-in scaled) init: at std 0.02 each of them
        # shrank the signal ~3x and the stem learned shapes several times slower.
        stem = set(self.stem.modules())
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod not in stem:
                nn.init.normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or float pixels [N, 3, S, S] (0-255) -> decoder embeddings [N, n_tokens, n_embd]."""
        cfg = self.config
        w = self.patch_embed.weight
        x = (pixels.to(w.dtype) / 255.0 - 0.5) / 0.25        # roughly zero mean, unit spread
        x = self.patch_embed(self.stem(x)).flatten(2).transpose(1, 2) + self.pos   # [N, grid*grid, width]
        x = self.norm(self.blocks(x))
        if cfg.pool > 1:
            g = cfg.grid
            x = x.transpose(1, 2).reshape(len(x), cfg.width, g, g)
            x = F.avg_pool2d(x, cfg.pool).flatten(2).transpose(1, 2)
        return self.proj(x)


def attach_vision(model: nn.Module, cfg: VisionConfig) -> VisionEncoder:
    """Give a GPT an image encoder (fresh weights): ``model.vision``, saved under ``vision.*``."""
    model.vision = VisionEncoder(cfg, model.config.n_embd).to(next(model.parameters()).device)
    return model.vision


def place_images(vision: VisionEncoder | None, x: torch.Tensor, idx: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Token embeddings ``x`` [B, T, C] with the ``<|image|>`` positions of ``idx`` replaced by the
    encoded ``images`` [N, 3, S, S], taken in reading order (row by row, left to right)."""
    if vision is None:
        raise GptlabError("this model is text-only (it has no vision encoder), so it cannot take images; "
                          "train one with `gptlab vision`")
    cfg = vision.config
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, cfg.image_size, cfg.image_size):
        raise GptlabError(f"images must be [N, 3, {cfg.image_size}, {cfg.image_size}]")
    slots = idx == cfg.image_token_id
    if int(slots.sum()) != len(images) * cfg.n_tokens:
        raise GptlabError(f"{len(images)} image(s) need {len(images) * cfg.n_tokens} <|image|> tokens in the "
                          f"prompt; it has {int(slots.sum())}")
    if not len(images):
        return x
    feats = vision(images).to(x.dtype)
    return x.masked_scatter(slots.unsqueeze(-1), feats.reshape(-1, x.size(-1)))


def stack_pictures(messages: list[dict]) -> torch.Tensor | None:
    """The pixels of every picture part ({"type": "image", "pixels": [3, S, S]}) of ``messages`` in
    order, as [n, 3, S, S]: what goes with the prompt the chat template makes of them. None without."""
    pics = [p["pixels"] for m in messages if isinstance(m["content"], list) for p in m["content"]
            if p.get("type") == "image"]
    return torch.stack(pics) if pics else None


def image_tokens(model) -> int:
    """Prompt positions one picture takes in ``model`` (0: a text-only model)."""
    vision = getattr(model, "vision", None)
    return vision.config.n_tokens if vision is not None else 0
