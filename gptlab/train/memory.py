"""Training memory: activation checkpointing of a GPT's blocks.

A training step holds, for every layer, the activations the backward pass needs: for a GPT-2-124M
shape in fp32 about 100 KB per token per layer (bench/memory.py measures it), which at batch 64 x 512
tokens x 12 layers is most of a 24 GB GPU. Checkpointing keeps only each block's input and runs the
block's forward again during the backward: about one more forward (~1/3 more compute) for a fraction
of the memory. The micro-batch (``--batch-size``) with ``--grad-accum`` is the other knob: the same
optimizer step in smaller pieces.

The blocks are wrapped per instance (their ``forward`` attribute), so parameter names, the state dict,
checkpoints and FSDP's per-block units are untouched, and ``checkpoint_blocks`` returns the function
that undoes it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(model: torch.nn.Module) -> Callable[[], None]:
    """Recompute every transformer block of every GPT inside ``model`` in the backward pass while
    training with gradients; returns a function that restores the plain blocks."""
    from gptlab.model.gpt import GPT
    wrapped = []
    for m in model.modules():
        if not isinstance(m, GPT):
            continue
        for block in m.transformer.h:
            inner = block.forward

            def forward(*args, _inner=inner, _block=block, **kwargs):
                if _block.training and torch.is_grad_enabled():
                    return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                return _inner(*args, **kwargs)   # generation and evaluation: nothing to save

            block.forward = forward
            wrapped.append(block)

    def restore() -> None:
        for block in wrapped:
            del block.forward   # the class's own forward again
    return restore
