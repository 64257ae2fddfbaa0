"""FSDP for the training loop: parameters, gradients and optimizer moments sharded across ranks.

``torchrun ... gptlab pretrain --fsdp`` (or sft, rm, dpo, finetune) shards the model with PyTorch's
``fully_shard`` (FSDP2): every transformer block is one unit, the root (embeddings, final norm, heads)
another. Each rank keeps 1/world of every parameter and its Adam moments; a block's weights are
all-gathered just before it runs and freed again after its forward, and gradients are
reduce-scattered, so a model whose weights, gradients and optimizer state do not fit on one device
trains across several. Compared with DDP this costs extra communication per step, so use DDP (the
default under torchrun) when the model fits.

``train()`` trains a sharded copy and loads the result back into the caller's (plain) model at the
end, so what a command does after training (sampling, reward-model normalisation) needs no FSDP
awareness; the caller's copy waits on the CPU meanwhile, keeping device memory for the shards.

The run folder stays the same whatever the parallelism: the weights and optimizer state are gathered
into full tensors for ``model.safetensors`` and ``checkpoint.safetensors`` (optimizer slots in the
same index order a single process uses), so a checkpoint written under FSDP resumes under DDP or on
one process and the other way round.
"""
from __future__ import annotations

import contextlib

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard

from gptlab.model.gpt import Block

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: torch.nn.Module) -> None:
    """Apply ``fully_shard`` to every transformer block, then to the whole model (in place)."""
    for module in list(model.modules()):
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model)


def _units(model: torch.nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Gradient accumulation: skip the reduce-scatter on all but the last micro-batch of a step."""
    model.set_requires_gradient_sync(enabled)


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Full weights on every rank for the duration, with no collective inside (call on all ranks).

    Inside, rank 0 alone may run any forward passes (the stage's generation-based evals), because
    no all-gather is pending: every unit is unsharded up front and stays so until the exit.
    """
    units = _units(model)
    for u in units:
        u.unshard()
        u.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(True)


def full_model_state(model: torch.nn.Module) -> dict:
    """The full weights on every rank, on the model's device (collective: call on all ranks)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer slot, in the optimizer's own (group, position) order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) as full CPU tensors on rank 0 (collective: call on all ranks).

    The optimizer state comes back in ``optimizer.state_dict()``'s layout (slots numbered 0..n-1),
    which is what the checkpoint format stores.
    """
    model_state = get_model_state_dict(model, options=_FULL)
    # Tied weights come back as two gathered copies; keep the first name only, as a plain
    # state_dict's shared storage would be saved.
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            model_state.pop(name, None)
    named = get_optimizer_state_dict(model, optimizer, options=_FULL)
    order = _param_names(model, optimizer)
    index = {n: i for i, n in enumerate(order)}
    state = {index[n]: s for n, s in named.get("state", {}).items() if n in index}
    # The groups' hyper-parameters are the same on every rank (the checkpoint keeps all but "params").
    return model_state, {"state": state, "param_groups": optimizer.param_groups}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         full_state: dict) -> None:
    """Load a full ``optimizer.state_dict()``-layout state into the sharded optimizer (every rank)."""
    order = _param_names(model, optimizer)
    named = {"state": {order[int(i)]: s for i, s in full_state["state"].items()},
             "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                               "params": [order[i] for i in g["params"]]}
                              for g in full_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
