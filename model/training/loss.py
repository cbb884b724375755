"""Cross-entropy through the output head without the full-vocabulary logits.

At a 128k vocabulary the logits of one token are 0.5 MB in float32, and PyTorch's cross-entropy keeps them, their
log-softmax and then their gradient: about 1.5 MB per labelled token, 12 GB for 8k labelled tokens. `linear_cross_entropy`
computes the head and the loss over chunks of positions, so the full logits never exist at once (the idea of Apple's
Cut Cross-Entropy and Liger's fused linear cross-entropy, written in plain PyTorch so it runs on any device).

With a frozen head (LoRA, adapters, DPO: the usual case) the gradient of each position's loss with respect to its
hidden state does not depend on what comes after the loss except through one scalar per position, so the forward
pass computes it while the chunk's logits are at hand, `(softmax - one_hot) @ W`, and the backward pass only scales
it by the incoming gradient: two head matmuls per chunk, as with full logits, and the `(N, n_embd)` gradient is kept
in place of the hidden state. A trainable head (full fine-tuning) needs the incoming gradient inside its weight's
gradient: the forward pass keeps the hidden state and each position's log-sum-exp, and the backward pass recomputes
one chunk's logits at a time (one more head matmul).
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
# on the CPU 24 MB (128 positions at a 49k vocabulary): glibc maps every allocation over 32 MB afresh and the kernel
# zero-fills its pages on first touch, which made a chunk's float32 copy of its logits 7x slower than the copy itself;
# a smaller chunk is served from memory already mapped (SmolLM2's full-loss head + loss: 0.50 -> 0.41 s)
CPU_CHUNK_ELEMENTS = 3 * 2**21


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """The cross-entropy of `F.linear(hidden, weight, bias)` against `targets`, per position `(N,)`, float32.

    `hidden` `(N, n_embd)`, `weight` `(vocab, n_embd)`, `targets` `(N,)`; a target of -100 gives a loss of 0 and no
    gradient. The head runs in the autocast dtype when autocast is on, else in `weight`'s dtype; logits and softmax
    are float32. `chunk_size` positions at a time (default: 128 MB of float32 logits, 24 MB on the CPU).
    """
    elements = CPU_CHUNK_ELEMENTS if hidden.device.type == "cpu" else CHUNK_ELEMENTS
    chunk_size = chunk_size or max(1, elements // weight.size(0))
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size)


def labelled_positions(labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a next-token loss is computed: the positions `t` whose next label `labels[:, t + 1]` is not
    IGNORE_INDEX, as indices into the flattened `(B * T)` positions (`GPT.forward`'s `logits_mask`), with those
    labels and each position's row, all `(N,)` in row-major order, sent to `device` without waiting.

    Found where `labels` are: a training loop keeps them on the CPU, because on a GPU the boolean selection would
    make the host wait for the device (a sync per micro-batch)."""
    targets = labels[:, 1:]
    rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    positions = rows * labels.size(1) + columns
    return tuple(t.to(device, non_blocking=True) for t in (positions, targets[rows, columns], rows))


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


def softmax_minus_one_hot_(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d loss / d logits of each position, `softmax(logits) - one_hot(target)`, computed in `logits`' memory."""
    grad_logits = torch.exp_(logits.sub_(lse.unsqueeze(1)))
    return one_hot_subtracted_(grad_logits, targets)


def one_hot_subtracted_(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return probs.scatter_add_(1, targets.unsqueeze(1), probs.new_full((probs.size(0), 1), -1.0))


def log_softmax_parts_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log-sum-exp of each row of `logits` and `exp(logits - max)`, computed in `logits`' memory, and their row
    sums: in place, where `torch.logsumexp` allocates several temporaries the size of the chunk on the CPU (it took
    12% of a SmolLM2 LoRA step on full-loss data)."""
    top = logits.amax(dim=1, keepdim=True)
    exps = torch.exp_(logits.sub_(top))
    sums = exps.sum(dim=1)
    return top.squeeze(1) + sums.log(), exps, sums


class LinearCrossEntropy(torch.autograd.Function):
    """Forward: per chunk, float32 logits -> log-sum-exp and the loss. A frozen head: also softmax minus one-hot ->
    the gradient of hidden, kept for the backward pass, which scales it by the incoming gradient. A trainable head:
    only the log-sum-exp is kept; the backward pass computes the logits again per chunk -> softmax minus one-hot,
    scaled by the incoming gradient -> the gradients of hidden, weight and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        dtype = compute_dtype(weight)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.masked_fill(~valid, 0)
        lse = torch.empty(h.size(0), device=h.device, dtype=torch.float32)
        loss = torch.empty_like(lse)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # a frozen head: the gradient of hidden now, per position up to the incoming gradient (no recomputation)
        grad_h = torch.empty_like(h) if need_h and not (need_w or need_b) else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.size(0), chunk_size):
                rows = slice(start, start + chunk_size)
                logits = chunk_logits(h[rows], w, b)
                target_logits = logits.gather(1, safe_targets[rows].unsqueeze(1)).squeeze(1)
                lse[rows], exps, sums = log_softmax_parts_(logits)
                loss[rows] = lse[rows] - target_logits
                if grad_h is not None:
                    grad_logits = one_hot_subtracted_(exps.div_(sums.unsqueeze(1)), safe_targets[rows])
                    grad_h[rows] = grad_logits.mul_(valid[rows].unsqueeze(1)).to(w.dtype) @ w
        loss.masked_fill_(~valid, 0.0)
        if grad_h is not None:
            ctx.save_for_backward(grad_h)
        else:
            ctx.save_for_backward(h, w, b, safe_targets, valid, lse)
        ctx.chunk_size, ctx.dtypes = chunk_size, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.frozen_head = grad_h is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        if ctx.frozen_head:  # the gradient of hidden was computed in the forward pass
            (grad_h,) = ctx.saved_tensors
            return (grad_h * grad_loss.unsqueeze(1)).to(hidden_dtype), None, None, None, None
        h, w, b, targets, valid, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(w, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(w.size(0), device=w.device, dtype=torch.float32) if need_b else None
        scale = (grad_loss.float() * valid).unsqueeze(1)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.size(0), ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                grad_logits = softmax_minus_one_hot_(chunk_logits(h[rows], w, b), lse[rows], targets[rows])
                grad_logits.mul_(scale[rows])
                if need_h:
                    grad_h[rows] = grad_logits.to(w.dtype) @ w
                if need_w and w.dtype == torch.float32:
                    grad_w.addmm_(grad_logits.t(), h[rows])
                elif need_w:  # a 16-bit matmul, accumulated over the chunks in float32
                    grad_w += grad_logits.t().to(w.dtype) @ h[rows]
                if need_b:
                    grad_b += grad_logits.sum(0)
        return (
            None if grad_h is None else grad_h.to(hidden_dtype),
            None if grad_w is None else grad_w.to(weight_dtype),
            None if grad_b is None else grad_b.to(bias_dtype),
            None, None,
        )
