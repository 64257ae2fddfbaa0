"""A fused training kernel for the CPU path, written with plain PyTorch ops.

``linear_cross_entropy`` is the LM head and the cross-entropy in one autograd node. The plain
path materialises logits for every token ([tokens, vocab]: 12.6 MB at 768 tokens x 4096), runs
log-softmax over them, keeps them for backward, and allocates a same-sized zero tensor in NLL's
backward. Here the rows go through in chunks that stay in cache: logits of a chunk -> softmax in
place -> loss -> softmax minus one-hot, turned straight into the gradients of the hidden states
and of the weight. Backward only scales the stored gradients by the incoming one. Same loss, same
gradients (to float rounding), with less memory traffic. GPT.forward uses it when training in fp32 on CPU;
``GPTLAB_FUSED_LOSS=0`` switches back to the plain path.
"""
from __future__ import annotations

import torch


def _chunk_rows(vocab: int) -> int:
    # A [rows, vocab] fp32 chunk of ~2 MB stays in cache between the forward matmul, the softmax and
    # the two gradient matmuls; fewer than 64 rows would starve the matmuls for large vocabularies.
    return max(64, min(1024, (1 << 19) // max(vocab, 1)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int):
        # h [N, C], weight [V, C], targets [N] -> mean loss over targets != ignore_index
        n = h.size(0)
        valid = targets != ignore_index
        n_valid = int(valid.sum())
        all_valid = n_valid == n
        safe = torch.where(valid, targets, 0)[:, None]
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight)
        nll = torch.empty(n, dtype=torch.float32, device=h.device)
        rows = _chunk_rows(weight.size(0))
        scale = 1.0 / max(n_valid, 1)
        buf = h.new_empty(min(rows, n), weight.size(0))    # one buffer, reused: stays cache-hot
        minus_one = h.new_full((min(rows, n), 1), -1.0)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            hc, tc, z = h[s:e], safe[s:e], buf[:e - s]
            torch.mm(hc, weight.t(), out=z)
            z_target = z.gather(1, tc)
            torch.ops.aten._softmax.out(z, -1, False, out=z)      # in place: z is now p
            p_target = z.gather(1, tc)
            nll[s:e] = p_target.log().neg_().squeeze(1)
            tiny = (p_target < 1e-30).squeeze(1)
            if tiny.any():   # p underflowed: the log is wrong there, recompute those rows exactly
                idx = tiny.nonzero().squeeze(1)
                lse = torch.logsumexp(hc[idx] @ weight.t(), dim=-1)
                nll[s + idx] = lse - z_target[idx, 0]
            z.scatter_add_(1, tc, minus_one[:e - s])              # d loss / d logits = p - onehot
            if all_valid:
                z.mul_(scale)
            else:                                                 # ignored rows contribute nothing
                z.mul_((valid[s:e].to(z.dtype) * scale)[:, None])
            torch.mm(z, weight, out=grad_h[s:e])
            grad_w.addmm_(z.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return nll.masked_fill_(~valid, 0).sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` without materialising all logits.

    h: [N, C] (fp32), weight: [V, C], targets: [N] (``ignore_index`` rows are skipped).
    """
    return _LinearCrossEntropy.apply(h, weight, targets, ignore_index)

