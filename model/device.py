"""Devices, precisions and dtypes: one table for every script.
"""

from __future__ import annotations

import resource
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: Optional[str]) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the CPU) on `device` without making the host wait: on CUDA through pinned memory, asynchronously
    (a plain copy from pageable memory synchronizes the stream)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by PyTorch, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16), so bf16 training beats fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = set(next((line for line in cpuinfo if line.startswith("flags")), "").split())
    except OSError:  # not Linux: ask oneDNN, which checks the same instructions
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def fast_training_precision() -> str:
    """bf16-true on a GPU or CPU with fast bf16 matmuls, 32-true elsewhere (bf16 emulated in software is slower)."""
    if torch.cuda.is_available():
        return "bf16-true" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-true" if cpu_has_fast_bf16() else "32-true"
