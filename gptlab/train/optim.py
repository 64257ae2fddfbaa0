"""Optimizers: AdamW, and Muon for the hidden matrices with AdamW for everything else.

Muon (Jordan et al. 2024) is SGD with Nesterov momentum whose update for each 2-D weight is replaced
by the nearest semi-orthogonal matrix (all singular values ~1), computed with a few Newton-Schulz
iterations. Every direction of the update then moves the weight by about the same amount, where
Adam's per-element scaling lets a few dominant directions take most of the step; on small GPTs this
reaches a given loss in markedly fewer steps. It is meant for the matrices inside the transformer
blocks only: embeddings and the LM head are lookups/read-outs rather than linear maps between hidden
spaces, and gains/biases are vectors, so those stay with AdamW (the usual split).

Both halves live in one torch Optimizer (groups flagged ``muon``), so checkpoints, resume and the
learning-rate schedule treat it like AdamW: every group carries ``base_lr`` and the loop scales it.
"""
from __future__ import annotations

import torch
from torch.optim.adam import adam as _adam_step

from gptlab.errors import GptlabError

OPTIMIZERS = ("muon", "adamw")
# Quintic Newton-Schulz coefficients (Jordan et al.): they push singular values in (0, 1] towards ~1
# in five steps; the result is not exactly orthogonal (values land in ~[0.7, 1.2]), which is enough.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate U V^T of each matrix's SVD U S V^T for g [..., rows, cols] (a batch of matrices)."""
    a, b, c = NS_COEFFS
    single = g.dim() == 2
    x = g[None] if single else g
    wide = x.size(-2) <= x.size(-1)
    x = x if wide else x.mT                 # iterate on the smaller Gram matrix x x^T
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)   # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        # x <- a x + (b gram + c gram^2) x, two fused multiply-adds per step
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x if wide else x.mT
    return x[0] if single else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups with ``muon=True``, AdamW (decoupled weight decay) on the others."""

    def __init__(self, groups: list[dict], betas=(0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95,
                 ns_steps: int = 5, fused: bool = True):
        defaults = dict(lr=1e-3, base_lr=1e-3, weight_decay=0.0, muon=False, betas=betas, eps=eps,
                        momentum=momentum, ns_steps=ns_steps)
        self.fused = fused
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)

    def _adamw(self, group, params):
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
        st = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        _adam_step(params, [p.grad for p in params], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                   [], [s["step"] for s in st], fused=self.fused and params[0].device.type != "mps",
                   decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                   weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _muon(self, group, params):
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        # Matrices of one shape (or its transpose) are orthogonalised together, as one batched matmul
        # chain: a 4-layer model has four shapes, so 5 x 3 matmuls per shape instead of per matrix.
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buf.mul_(mu).add_(p.grad)
            by_shape.setdefault(tuple(sorted(p.shape)), []).append(p)
        for ps in by_shape.values():
            # Nesterov: step along the gradient plus the momentum it is about to add.
            g = torch.stack([(p.grad.add(self.state[p]["momentum_buffer"], alpha=mu)
                              if p.size(0) <= p.size(1) else
                              p.grad.add(self.state[p]["momentum_buffer"], alpha=mu).T) for p in ps])
            u = orthogonalize(g.float(), group["ns_steps"])
            for p, ui in zip(ps, u):
                ui = ui if p.size(0) <= p.size(1) else ui.T
                # A semi-orthogonal update has RMS 1/sqrt(max dim); sqrt(max(1, rows/cols)) keeps
                # tall matrices' steps comparable (Jordan et al.).
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(ui.to(p.dtype), alpha=-lr * scale)


def _unique_trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    seen, out = set(), []
    for name, p in module.named_parameters():   # tied weights appear once
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def hidden_matrices(module: torch.nn.Module) -> set[int]:
    """ids of the weights Muon should own: 2-D weights of linear maps between hidden spaces, i.e. every
    nn.Linear weight except the LM head, embeddings (also when tied to the head) and 1-row read-outs
    (reward/value heads)."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    out = set()
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head":
            w = m.weight
            if w.dim() == 2 and min(w.shape) > 1 and id(w) not in embeddings:
                out.add(id(w))
    return out


def make_optimizer(module: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, weight decay on matrices only (biases and gains are left
    alone). Every group's ``base_lr`` is its peak learning rate; the schedule scales it."""
    params = _unique_trainable(module)
    if cfg.optimizer == "adamw":
        groups = [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}]
        for g in groups:
            g["base_lr"] = cfg.lr
        # The fused kernel (one pass per tensor) also exists on CPU, 4x faster there than foreach
        # (which CPU runs as per-tensor ops); FSDP's DTensor parameters keep the foreach path.
        extra = {"foreach": True} if cfg.fsdp else {"fused": True}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)
    if cfg.optimizer != "muon":
        raise GptlabError(f"unknown optimizer {cfg.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if cfg.fsdp:
        raise GptlabError("--optimizer muon needs whole matrices; with --fsdp use --optimizer adamw")
    hidden = hidden_matrices(module)
    # No weight decay on Muon's matrices: its updates have a fixed size, so the weights cannot grow
    # the way Adam's can on short runs (modded-nanogpt's records use none either).
    groups = [{"params": [p for _, p in params if id(p) in hidden], "muon": True, "base_lr": cfg.muon_lr,
               "weight_decay": 0.0},
              {"params": [p for _, p in params if id(p) not in hidden and p.dim() >= 2], "base_lr": cfg.lr,
               "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in params if p.dim() < 2], "base_lr": cfg.lr, "weight_decay": 0.0}]
    for g in groups:
        g["lr"] = g["base_lr"]
    return MuonAdamW(groups, betas=(cfg.beta1, cfg.beta2))
