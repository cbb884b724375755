"""Cross-entropy through the output head without the full-vocabulary logits.

At a 128k vocabulary the logits of one token are 0.5 MB in float32, and PyTorch's cross-entropy keeps them, their
log-softmax and then their gradient: about 1.5 MB per labelled token, 12 GB for 8k labelled tokens. `linear_cross_entropy`
computes the head and the loss over chunks of positions and keeps only each position's log-sum-exp; the backward pass
recomputes one chunk's logits at a time to form its gradient (the idea of Apple's Cut Cross-Entropy and Liger's
fused linear cross-entropy, written in plain PyTorch so it runs on any device). Memory per labelled token is then the
hidden state and a few scalars; the price is one more head matmul in the backward pass.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.data.sft import IGNORE_INDEX
from model.lora import LoRALinear

# float32 logits per chunk: 2**25 elements = 128 MB (about 260 positions at a 128k vocabulary)
CHUNK_ELEMENTS = 2**25


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """The cross-entropy of `F.linear(hidden, weight, bias)` against `targets`, per position `(N,)`, float32.

    `hidden` `(N, n_embd)`, `weight` `(vocab, n_embd)`, `targets` `(N,)`; a target of -100 gives a loss of 0 and no
    gradient. The head runs in the autocast dtype when autocast is on, else in `weight`'s dtype; logits and softmax
    are float32. `chunk_size` positions at a time (default: 128 MB of float32 logits).
    """
    chunk_size = chunk_size or max(1, CHUNK_ELEMENTS // weight.size(0))
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size)


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy `(N,)` of the output head `head` (the model's `lm_head`) on `hidden` `(N, n_embd)`.

    A plain linear head goes through `linear_cross_entropy`; any other head (e.g. one with LoRA on it) computes its
    logits and `F.cross_entropy` on them."""
    if isinstance(head, LoRALinear) and not head.adapters_enabled:  # DPO's reference: the plain head
        head = head.linear
    if type(head) is nn.Linear:
        return linear_cross_entropy(hidden, head.weight, head.bias, targets)
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device_type = weight.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(hidden, weight, bias).float()


class LinearCrossEntropy(torch.autograd.Function):
    """Forward: per chunk, float32 logits -> log-sum-exp and the loss; only the log-sum-exp is kept. Backward: per
    chunk, logits again -> softmax minus one-hot, scaled by the incoming gradient -> the gradients of hidden, weight
    and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        dtype = compute_dtype(weight)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.masked_fill(~valid, 0)
        lse = torch.empty(h.size(0), device=h.device, dtype=torch.float32)
        loss = torch.empty_like(lse)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.size(0), chunk_size):
                rows = slice(start, start + chunk_size)
                logits = chunk_logits(h[rows], w, b)
                lse[rows] = torch.logsumexp(logits, dim=-1)
                loss[rows] = lse[rows] - logits.gather(1, safe_targets[rows].unsqueeze(1)).squeeze(1)
        loss.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(h, w, b, safe_targets, valid, lse)
        ctx.chunk_size, ctx.dtypes = chunk_size, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, b, targets, valid, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(w, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(w.size(0), device=w.device, dtype=torch.float32) if need_b else None
        scale = (grad_loss.float() * valid).unsqueeze(1)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.size(0), ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                # d loss / d logits = softmax - one_hot(target), per position times its incoming gradient
                grad_logits = torch.exp_(chunk_logits(h[rows], w, b).sub_(lse[rows].unsqueeze(1)))
                grad_logits.scatter_add_(1, targets[rows].unsqueeze(1), torch.full_like(lse[rows], -1.0).unsqueeze(1))
                grad_logits.mul_(scale[rows])
                if need_h:
                    grad_h[rows] = grad_logits.to(w.dtype) @ w
                if need_w and w.dtype == torch.float32:
                    grad_w.addmm_(grad_logits.t(), h[rows])
                elif need_w:  # a 16-bit matmul, accumulated over the chunks in float32
                    grad_w += grad_logits.t().to(w.dtype) @ h[rows]
                if need_b:
                    grad_b += grad_logits.sum(0)
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if grad_h is None else grad_h.to(hidden_dtype),
            None if grad_w is None else grad_w.to(weight_dtype),
            None if grad_b is None else grad_b.to(bias_dtype),
            None, None,
        )
