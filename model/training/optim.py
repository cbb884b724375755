"""`--optimizer`: AdamW as PyTorch's loop, its fused kernel, or bitsandbytes' 8-bit (and paged 8-bit) AdamW.

adamw            torch.optim.AdamW, one kernel per parameter tensor group (foreach)
adamw_fused      the same update in one fused kernel per step (CUDA and CPU): faster with many small tensors (LoRA)
adamw8bit        bitsandbytes' AdamW with its two moments in 8 bits (blockwise quantized): 2 bytes per trained
                 parameter instead of 8, which matters for full fine-tuning (8B: 16 GB of optimizer state -> 16 GB / 4)
paged_adamw8bit  adamw8bit with its state in CUDA unified memory, paged to the host under memory pressure instead of
                 failing with out-of-memory (QLoRA's recipe; on the CPU the same as adamw8bit)
"""

from typing import Iterable

import torch

OPTIMIZERS = ("adamw", "adamw_fused", "adamw8bit", "paged_adamw8bit")


def build_optimizer(name: str, params: Iterable, **kwargs) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over `params` (tensors or parameter groups), with AdamW's keyword
    arguments (lr, weight_decay, betas, eps)."""
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    if name in ("adamw8bit", "paged_adamw8bit"):
        import model.quantize  # noqa: F401  (imports bitsandbytes with its import notice filtered)
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" and torch.cuda.is_available() else bnb.optim.AdamW8bit
        return optimizer(params, **kwargs)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
