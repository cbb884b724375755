"""How a training script runs on its devices: the default precision, the Fabric strategy, the weights' dtype."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning_fabric as L
import torch

from model.device import PRECISIONS
from model.training.fsdp import fsdp_strategy, validate_devices


def default_precision(trains_base_weights: bool) -> str:
    """`--precision` when not given. On a GPU, methods that train only small adapters on a frozen base run in
    bf16-true; a method that updates the base weights themselves (full fine-tuning) runs in bf16-mixed, because a
    bf16 weight cannot hold an update much smaller than 1/256 of itself, and at full fine-tuning learning rates most
    updates are. On the CPU: 32-true."""
    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if trains_base_weights else "bf16-true"


def fabric_strategy(strategy: str, devices: int = 1, num_nodes: int = 1, precision: Optional[str] = None,
                    checkpoint_dir: Optional[Path] = None, quantize: Optional[str] = None):
    """The Fabric strategy for `--strategy` (auto, ddp or fsdp), after checking that the machine has `--devices`.

    fsdp is FSDP2 through Fabric's ModelParallelStrategy (`model.training.fsdp`): build the model under
    `fabric.init_module(empty_init=True)` (the meta device) and `fabric.setup_module` shards it and loads each
    rank's shards of `checkpoint_dir` (its Blocks' linears quantized to NF4 with `quantize="ao.nf4"`)."""
    validate_devices(devices, num_nodes, strategy, precision)
    if strategy != "fsdp":
        return strategy
    return fsdp_strategy(checkpoint_dir, devices, num_nodes, precision or "32-true", quantize)


def weights_dtype(fabric: L.Fabric) -> torch.dtype:
    """The dtype to load the weights in: the precision's own under the *-true precisions, fp32 under the mixed ones
    (they keep fp32 master weights and compute in 16 bits)."""
    return getattr(torch, PRECISIONS.get(fabric.strategy.precision.precision, "float32"))
