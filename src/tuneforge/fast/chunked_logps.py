"""Log-probabilities of chosen labels through the output layer in chunks: the preference losses' input
without the full logits.

Preference and RL losses are functions of each trained token's log p(label), not a sum, so the
gradient arriving for each position differs and cannot be formed in the forward pass as the
chunked cross-entropy does. Instead the forward keeps each position's log-sum-exp, and the backward
recomputes one chunk of logits at a time to form d log p / d logits = onehot - softmax. The price
is the output layer's product once more in the backward; the saving is the logits and their fp32
copies, positions x vocabulary, twice for a preference pair.

With the fast path's kernels switch, where Triton runs, the cross-entropy kernel of the chunked loss
(fast/kernels/cross_entropy_triton.py) does both halves: the log-sum-exp in the forward, and in the
backward the gradient written over the recomputed products, each row times -dL/dlogp (it recomputes
the log-sum-exp there too, one more read of the row, rather than taking a second input).
"""

from __future__ import annotations

import torch

from tuneforge.fast.chunked_loss import chunk_logits, kernel_rows, kernel_runs


class _LabelLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, softcap: float | None, temperature: float, kernel: bool):
        out = torch.empty(labels.shape, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, labels.numel(), chunk):
            end = start + chunk
            h = hidden[start:end]
            if kernel_runs(h, kernel):
                lse[start:end], target, _ = kernel_rows(h, weight, labels[start:end], softcap, temperature)
                out[start:end] = target - lse[start:end]
                continue
            z, _ = chunk_logits(h, weight, softcap, temperature)
            lse[start:end] = torch.logsumexp(z, dim=-1)
            out[start:end] = z.gather(1, labels[start:end, None]).squeeze(1) - lse[start:end]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk, ctx.softcap, ctx.temperature, ctx.kernel = chunk, softcap, temperature, kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        wide = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=wide) if need_w else None
        for start in range(0, labels.numel(), ctx.chunk):
            end = start + ctx.chunk
            h, g = hidden[start:end], grad_out[start:end].to(lse.dtype)
            if kernel_runs(h, ctx.kernel):
                # d/dz of g * (z_y - lse) is -g times the cross-entropy's gradient, written over z
                *_, z = kernel_rows(h, weight, labels[start:end], ctx.softcap, ctx.temperature, grad=True, scale=-g)
                grad = z.to(h.dtype)
            else:
                z, capped = chunk_logits(h, weight, ctx.softcap, ctx.temperature)
                grad = -torch.exp(z - lse[start:end, None]) * g[:, None]  # d/dz of g * (z_y - lse) = g * (onehot - p)
                grad[torch.arange(h.size(0), device=grad.device), labels[start:end]] += g
                grad = grad / ctx.temperature
                if capped is not None:
                    grad = grad * (1 - capped * capped)
                grad = grad.to(h.dtype)
            if need_h:
                grad_hidden[start:end] = grad @ weight.to(h.dtype)
            if need_w:
                grad_weight += (grad.t() @ h).to(wide)
        return grad_hidden, grad_weight.to(weight.dtype) if need_w else None, None, None, None, None, None


def label_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                softcap: float | None = None, temperature: float = 1.0, kernel: bool = False) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[label] per row (fp32), `chunk` rows at a time;
    `hidden` is [N, H] and every label a real token id. `kernel`: the fast path's kernels switch."""
    return _LabelLogps.apply(hidden, weight, labels, chunk, softcap, temperature, kernel)
