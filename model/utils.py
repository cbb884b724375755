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


def load_model_run(checkpoint_dir=None, lora_dir=None, adapter_dir=None, device: str = "auto",
                   precision: str | None = None, quantize: str | None = None):
    """The model that an eval script scores: a checkpoint, or a LoRA/DoRA run (finetune/lora.py) or an adapter run
    (finetune/adapter.py, adapter_v2.py) on top of its base, straight from the run directory (no merge needed).

    The base defaults to the run's own `checkpoint_dir`, and its quantization to the one the run trained with.
    Returns `(model, checkpoint_dir, run_dir)`; `run_dir` is the directory holding the run's weights, or None.
    """
    from pathlib import Path

    from model.adapter import ADAPTER_WEIGHTS, inject_adapter, load_adapter_run, load_adapter_state_dict
    from model.lora import LORA_WEIGHTS, inject_lora, load_lora_run, load_lora_state_dict
    from model.training import load_hparams, run_output_dir

    if lora_dir is not None and adapter_dir is not None:
        raise ValueError("Give --lora_dir or --adapter_dir, not both")
    run_dir = None
    if lora_dir is not None:
        run_dir = run_output_dir(lora_dir, LORA_WEIGHTS)
    elif adapter_dir is not None:
        run_dir = run_output_dir(adapter_dir, ADAPTER_WEIGHTS)
    if run_dir is None and checkpoint_dir is None:
        raise ValueError("Give --checkpoint_dir, or a run with --lora_dir or --adapter_dir")
    if run_dir is not None:
        hparams = load_hparams(run_dir)
        checkpoint_dir = checkpoint_dir or hparams["checkpoint_dir"]
        quantize = quantize or hparams.get("quantize")
        if quantize == "bnb.int8-training":
            quantize = "bnb.int8"
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "model_config.yaml").is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir / 'model_config.yaml'} not found: --checkpoint_dir must be a Forge checkpoint (make one"
            f" with `python scripts/download.py` or `python scripts/convert_hf_checkpoint.py --checkpoint_dir DIR`)"
        )
    model = load_model(checkpoint_dir, device=device, precision=precision, quantize=quantize)
    if lora_dir is not None:
        lora_config, weights = load_lora_run(run_dir)
        inject_lora(model, lora_config)
        load_lora_state_dict(model, weights)
    elif adapter_dir is not None:
        adapter_config, weights = load_adapter_run(run_dir)
        inject_adapter(model, adapter_config)
        load_adapter_state_dict(model, weights)
    return model.to(model.transformer.wte.weight.device).eval(), checkpoint_dir, run_dir
