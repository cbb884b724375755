"""FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning Fabric's `ModelParallelStrategy`: the model,
its gradients and its optimizer state are split across the processes, so each holds about 1/N of them.

How a run uses it (`fsdp_strategy` builds the strategy that `L.Fabric(strategy=...)` takes):
- The model is built on the meta device (`fabric.init_module(empty_init=True)`), LoRA is injected there, and
  `fabric.setup_module` calls `shard_and_load`: `fully_shard` per Block (and on an untied embedding and head), then
  the root; `to_empty` allocates only this rank's shards, and each shard is read from the memory-mapped
  safetensors (rows `[offset, offset + n)` through `safe_open(...).get_slice`), so no process ever holds the whole
  model. Parameters the checkpoint lacks
  (LoRA's A, B and DoRA's magnitudes) are initialised exactly as `model.lora` initialises them in one process,
  from the same random stream, and sharded the same way.
- FSDP2 keeps every parameter a DTensor of its own: a frozen weight is all-gathered for the forward like any
  other, but autograd gives it no gradient, so it has no `.grad`, no reduce-scatter and no optimizer state.
- `--precision bf16-mixed` becomes FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 gradient reduction);
  bf16-true / 32-true shard the weights in that dtype.
- `save_sharded_state` / `load_sharded_state` write and read a torch.distributed.checkpoint (DCP) directory: each
  rank writes its own shards of the trainable parameters and optimizer state, nobody gathers the frozen model, and
  DCP reshards on load, so a run resumes onto another number of processes.
- `full_tensors` gathers sharded tensors back to their true shapes (an adapter, or a full model one tensor at a
  time), on every rank together, for the plain files in `final/`.
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn

from model.gpt import GPT
from model.lora import LoRAAdapter, LoRALinear
from model.weights.checkpoint import lit_weight_files

SHARDED_METADATA = "meta.pt"  # beside the DCP shards: step, epoch, scheduler, RNG (small, saved by rank 0)
WORLD_SIZE = "world_size"  # in meta.pt: the processes that saved it, to resume on another number of them


def validate_devices(devices: int, num_nodes: int, strategy: str, precision: Optional[str]) -> None:
    """One clear error for a device count this machine cannot give, or a flag FSDP cannot honour."""
    if devices < 1 or num_nodes < 1:
        raise ValueError(f"--devices and --num_nodes must be at least 1, got {devices} and {num_nodes}")
    if torch.cuda.is_available():
        available, what = torch.cuda.device_count(), "GPU(s)"
    else:
        # one CPU process per device: more processes than cores only time-slice
        available, what = os.cpu_count() or 1, "CPU core(s) and no GPU"
    if devices > available:
        raise ValueError(f"--devices {devices} is more than this machine has: {available} {what}. Lower --devices;"
                         " more machines are --num_nodes")
    if strategy == "fsdp" and precision == "16-mixed":
        raise ValueError("--precision 16-mixed needs a gradient scaler for sharded gradients, which FSDP2 through"
                         " Fabric lacks; use --precision bf16-mixed or bf16-true with --strategy fsdp")


def fsdp_strategy(checkpoint_dir: Optional[Path], devices: int, num_nodes: int, precision: str):
    """Fabric's ModelParallelStrategy with every process in one data-parallel (sharding) dimension. Its
    `parallelize_fn` shards the model and, when it is still on the meta device, loads `checkpoint_dir` into the
    shards (`checkpoint_dir=None`: the model's weights are set already)."""
    from lightning.fabric.strategies import ModelParallelStrategy

    return ModelParallelStrategy(
        parallelize_fn=partial(shard_and_load, checkpoint_dir=checkpoint_dir, precision=precision),
        data_parallel_size=devices * num_nodes, tensor_parallel_size=1,
    )


def is_fsdp(fabric) -> bool:
    from lightning.fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


def mixed_precision_policy(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-mixed":
        # weights and optimizer state stay fp32 in the shards; compute in bf16, gradients summed in fp32
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_and_load(model: GPT, device_mesh, checkpoint_dir: Optional[Path], precision: str) -> GPT:
    """`fully_shard` each transformer Block, the embedding and the head, then the root (the final norm; a tied head
    and embedding share one parameter, so they stay together in the root). A model on the meta device is then allocated shard by
    shard and filled from `checkpoint_dir`."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    policy = mixed_precision_policy(precision)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    if not model.config.tie_embeddings:
        # each as large as a few blocks at a 128k vocabulary: gathered only while it computes, not the whole step
        fully_shard(model.transformer.wte, mesh=mesh, mp_policy=policy)
        fully_shard(model.lm_head, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if any(t.is_meta for t in model.parameters()):
        if checkpoint_dir is None:
            raise ValueError("The model is on the meta device and no checkpoint_dir was given to load it from")
        device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
        model.to_empty(device=device)
        load_sharded_weights(model, checkpoint_dir)
        model.reset_rope(device)
    return model


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The local shard of a parameter (a plain tensor: all of it) and the global index of its first dim-0 row."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return param.data, 0
    local = param.to_local()
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return local, (offset[0] if offset else 0)


def _checkpoint_names(model: GPT) -> dict[str, str]:
    """Model parameter name -> its key in lit_model.safetensors: a LoRALinear keeps the base weight in `.linear`."""
    lora_paths = [path for path, module in model.named_modules() if isinstance(module, LoRALinear)]
    names = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        key = name
        for path in lora_paths:
            if name.startswith(f"{path}.linear."):
                key = f"{path}.{name[len(path) + len('.linear.'):]}"
        if key == "lm_head.weight" and model.config.tie_embeddings:
            key = "transformer.wte.weight"  # the head is the embedding: saved once, under its name
        names[name] = key
    return names


@torch.no_grad()
def load_sharded_weights(model: GPT, checkpoint_dir: Path) -> None:
    """Fill this rank's shards from `checkpoint_dir`, reading only its rows of each memory-mapped tensor, and
    initialise LoRA's parameters as a one-process run would (see `init_adapters`)."""
    from safetensors import safe_open

    files = {}
    for path in lit_weight_files(checkpoint_dir):
        with safe_open(path, framework="pt", device="cpu") as handle:
            files.update({key: path for key in handle.keys()})

    def read_rows(key: str, start: int, stop: Optional[int]) -> torch.Tensor:
        # opened per tensor: the file's pages read so far are unmapped again, so they never add up to the model
        with safe_open(files[key], framework="pt", device="cpu") as handle:
            rows = handle.get_slice(key)
            return rows[start:stop] if stop is not None else rows[:]

    names = _checkpoint_names(model)
    adapter_params = {id(p) for m in model.modules() if isinstance(m, LoRAAdapter) for p in m.parameters()}
    for name, param in model.named_parameters():
        if id(param) in adapter_params:
            continue
        key = name if name in files else names[name]
        if key not in files:
            raise ValueError(f"{checkpoint_dir}: no weight {key} for the model's parameter {name}; --strategy fsdp"
                             " loads base weights and LoRA adapters only")
        local, start = _local_rows(param)
        local.copy_(read_rows(key, start, start + local.shape[0] if local.dim() else None))
    init_adapters(model, lambda key, start, stop: read_rows(key, start, stop).float(), names)


@torch.no_grad()
def init_adapters(model: GPT, read_rows, checkpoint_names: dict[str, str]) -> None:
    """LoRA A (Kaiming-uniform, drawn in full from the global random stream in `inject_lora`'s order so that every
    rank draws what one process draws), B = 0, DoRA magnitude = the norm of each base weight row it scales. Each
    rank keeps its own rows; `read_rows(key, start, stop)` reads base weight rows from the checkpoint."""
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]
    # inject_lora wraps the blocks' linears first and the head last
    layers.sort(key=lambda item: item[0] == "lm_head")
    for path, layer in layers:
        for adapter in layer.lora.values():
            a_full = torch.empty(adapter.A.shape, dtype=adapter.A.dtype)
            nn.init.kaiming_uniform_(a_full, a=math.sqrt(5))
            local, start = _local_rows(adapter.A)
            local.copy_(a_full[start:start + local.shape[0]])
            _local_rows(adapter.B)[0].zero_()
            if adapter.magnitude is not None:
                local, start = _local_rows(adapter.magnitude)
                weight_key = checkpoint_names[f"{path}.linear.weight"]
                rows = read_rows(weight_key, adapter.start + start, adapter.start + start + local.shape[0])
                local.copy_(torch.linalg.norm(rows, dim=1))


def full_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each (name, tensor) with a sharded tensor gathered to its true shape (a collective: every rank must iterate
    the same tensors in the same order), on the CPU."""
    from torch.distributed.tensor import DTensor

    for name, tensor in tensors:
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name, tensor.detach().cpu()


def _trainable_names(module: nn.Module) -> set[str]:
    return {name for name, param in module.named_parameters() if param.requires_grad}


def save_sharded_state(fabric, directory: Path, state: dict, trainable_only: bool) -> None:
    """Write `state` (model, optimizer and plain values such as step, scheduler, RNG) as a DCP directory: every rank
    its own shards of the (trainable) weights and of the optimizer state, rank 0 the small rest into meta.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    module = getattr(state["model"], "module", state["model"])
    trainable = _trainable_names(module)
    weights = get_model_state_dict(module)
    if trainable_only:
        weights = {name: tensor for name, tensor in weights.items() if name in trainable}
    sharded = {"model": weights}
    if "optimizer" in state:
        optimizer = getattr(state["optimizer"], "optimizer", state["optimizer"])
        sharded["optimizer"] = get_optimizer_state_dict(module, optimizer)
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save(sharded, checkpoint_id=directory)
    if fabric.global_rank == 0:
        metadata = {key: (value.state_dict() if hasattr(value, "state_dict") else value)
                    for key, value in state.items() if key not in ("model", "optimizer")}
        metadata[WORLD_SIZE] = fabric.world_size
        torch.save(metadata, directory / SHARDED_METADATA)


def load_sharded_state(fabric, directory: Path, state: dict, trainable_only: bool) -> None:
    """Restore what `save_sharded_state` wrote into `state`, in place, on any number of processes (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    module = getattr(state["model"], "module", state["model"])
    trainable = _trainable_names(module)
    weights = get_model_state_dict(module)
    if trainable_only:
        weights = {name: tensor for name, tensor in weights.items() if name in trainable}
    sharded = {"model": weights}
    if "optimizer" in state:
        optimizer = getattr(state["optimizer"], "optimizer", state["optimizer"])
        sharded["optimizer"] = get_optimizer_state_dict(module, optimizer)
    dcp.load(sharded, checkpoint_id=directory)
    set_model_state_dict(module, sharded["model"], options=StateDictOptions(strict=not trainable_only))
    if "optimizer" in state:
        set_optimizer_state_dict(module, optimizer, sharded["optimizer"])
    metadata = torch.load(directory / SHARDED_METADATA, weights_only=True)
    saved_world_size = metadata.pop(WORLD_SIZE)
    if "batch_in_epoch" in metadata and saved_world_size != fabric.world_size:
        # Each rank takes every world_size-th micro-batch of the epoch, so after k micro-batches per rank the first
        # k x world_size of the epoch are done: the same position in another world size's count.
        done = metadata["batch_in_epoch"] * saved_world_size
        if done % fabric.world_size:
            raise ValueError(f"--resume {directory.parent}: the checkpoint is {done} micro-batches into its epoch,"
                             f" which {fabric.world_size} processes cannot split evenly; resume on a number of"
                             f" processes that divides {done}")
        metadata["batch_in_epoch"] = done // fabric.world_size
    for key, value in metadata.items():
        if key in state and hasattr(state[key], "load_state_dict"):
            state[key].load_state_dict(value)
        elif key in state:
            state[key] = value


def stream_full_weights(fabric, module: nn.Module, write) -> None:
    """Gather the model's weights one tensor at a time and pass the stream to `write` on rank 0 (e.g. a
    `write_checkpoint_dir` call); the other ranks run the same gathers and write nothing. Rank 0 so holds one
    gathered tensor at a time (plus what `write` buffers), never the whole model."""
    tensors = full_tensors(module.state_dict().items())
    if fabric.global_rank == 0:
        write(tensors)
    else:
        for _ in tensors:
            pass
