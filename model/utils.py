"""Small helpers that two or more scripts share."""

from __future__ import annotations

import os
import resource
import sys
from typing import Any, Callable

import torch


def run_cli(function: Callable, args: list[str] | None = None) -> Any:
    """Run `function` as a command line (its signature is the CLI, its docstring the help).

    A user mistake (a missing file, a bad value) prints one clear `error:` line and exits with status 1 instead of
    a traceback; set FORGE_DEBUG=1 to see the traceback.
    """
    from jsonargparse import CLI

    try:
        return CLI(function, args=args, as_positional=False)
    except (FileNotFoundError, ValueError, NotADirectoryError, FileExistsError) as e:
        if os.environ.get("FORGE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


PRECISIONS = {"32-true": "float32", "bf16-true": "bfloat16", "16-true": "float16"}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def precision_to_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """The weights' dtype for `--precision`; by default bf16 where the hardware has fast bf16, else fp32."""
    if precision is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return getattr(torch, PRECISIONS[precision])


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by PyTorch, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load_model(checkpoint_dir, device: str = "auto", precision: str | None = None, quantize: str | None = None):
    """A checkpoint's GPT on `device` in `precision`, optionally with its linear layers quantized by bitsandbytes."""
    from model.gpt import GPT
    from model.quantize import quantize_model, validate_quantize

    validate_quantize(quantize)
    device = resolve_device(device)
    dtype = precision_to_dtype(precision, device)
    if not quantize:
        return GPT.from_checkpoint(checkpoint_dir, device=device, dtype=dtype)
    model = GPT.from_checkpoint(checkpoint_dir, device="cpu", dtype=dtype)
    # one block at a time, so the GPU never holds the unquantized model
    for block in model.transformer.h:
        quantize_model(block.to(device), quantize, compute_dtype=dtype)
    return model.to(device)
