"""Rotary position frequencies, and the ways to stretch them past the training context.

A RoPE model trained on L tokens has only ever seen rotation angles ``pos * inv_freq`` for pos < L;
at longer lengths the low frequencies turn to angles it never saw and attention breaks down. Each
scaling maps a longer context of ``factor * L`` tokens back into the familiar range:

* ``linear`` position interpolation (Chen et al. 2023): every position is divided by the factor,
  i.e. every frequency is. Nothing is out of range, but neighbouring tokens move closer together.
* ``ntk``    NTK-aware scaling: the base grows to ``theta * factor ** (d / (d - 2))``, which leaves the
  highest frequency (local order) alone and stretches the lowest one by the full factor.
* ``yarn``   YaRN (Peng et al. 2023): per frequency, by how many full turns it makes over the
  training context ``r = L / wavelength``: below ``alpha`` = 1 turn it is interpolated (divided by
  the factor), above ``beta`` = 32 turns it is kept (extrapolated), linearly blended between; and the
  attention logits are multiplied by ``(0.1 ln(factor) + 1) ** 2`` (a cooler softmax over the longer
  context), applied as that square root on both the queries' and the keys' rotation tables.

At factor 1 every scaling is plain RoPE.
"""
from __future__ import annotations

import math

import torch

SCALINGS = ("linear", "ntk", "yarn")
YARN_ALPHA, YARN_BETA = 1.0, 32.0


def inv_frequencies(head_dim: int, theta: float, scaling: str | None = None, factor: float = 1.0,
                    original_context: int | None = None) -> torch.Tensor:
    """[head_dim / 2] angular frequency of each rotated pair, after the scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    if scaling == "ntk":
        theta = theta * factor ** (head_dim / (head_dim - 2))
    inv = 1.0 / theta ** exponents
    if scaling == "linear":
        inv = inv / factor
    elif scaling == "yarn":
        if not original_context:
            raise ValueError("yarn needs the original (training) context length")
        turns = original_context * inv / (2 * math.pi)   # full rotations over the training context
        keep = ((turns - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)
        inv = keep * inv + (1.0 - keep) * inv / factor
    elif scaling not in (None, "ntk"):
        raise ValueError(f"unknown RoPE scaling {scaling!r} (choose from {', '.join(SCALINGS)})")
    return inv


def attention_factor(scaling: str | None, factor: float) -> float:
    """What the rotation tables are multiplied by: YaRN's sqrt(1/t) = 0.1 ln(s) + 1, else 1."""
    return 0.1 * math.log(factor) + 1.0 if scaling == "yarn" and factor > 1 else 1.0


def scaled_positions(positions: torch.Tensor, scaling: str | None, factor: float) -> torch.Tensor:
    """Where position interpolation puts each position (the other scalings change frequencies)."""
    return positions / factor if scaling == "linear" else positions


def stretch_positions(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """A learned position table [L, C] interpolated to [new_len, C]: position p of the longer
    context gets the embedding of p * (L - 1) / (new_len - 1), so the first and last rows stay and
    every row in between is a blend of its two neighbours (position interpolation for gpt1/2/3;
    continued training at the longer length then sharpens it)."""
    if new_len == table.shape[0]:
        return table.clone()
    t = table.detach().float().t()[None]   # [1, C, L]
    out = torch.nn.functional.interpolate(t, size=new_len, mode="linear", align_corners=True)
    return out[0].t().contiguous().to(table.dtype)
