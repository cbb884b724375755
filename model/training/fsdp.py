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

from model.adapter import AdapterAttention, AdapterV2Linear
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


def fsdp_strategy(checkpoint_dir: Optional[Path], devices: int, num_nodes: int, precision: str,
                  quantize: Optional[str] = None):
    """Fabric's ModelParallelStrategy with every process in one data-parallel (sharding) dimension. Its
    `parallelize_fn` shards the model and, when it is still on the meta device, loads `checkpoint_dir` into the
    shards (`checkpoint_dir=None`: the model's weights are set already), with the Blocks' linears quantized to
    torchao's NF4 when `quantize` is "ao.nf4"."""
    from lightning_fabric.strategies import ModelParallelStrategy

    return ModelParallelStrategy(
        parallelize_fn=partial(shard_and_load, checkpoint_dir=checkpoint_dir, precision=precision, quantize=quantize),
        data_parallel_size=devices * num_nodes, tensor_parallel_size=1,
    )


def is_fsdp(fabric) -> bool:
    from lightning_fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


def mixed_precision_policy(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-mixed":
        # weights and optimizer state stay fp32 in the shards; compute in bf16, gradients summed in fp32
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def find_gpt(module: nn.Module) -> tuple[str, GPT]:
    """The GPT inside `module` (itself, or a classifier's body) and the prefix of its parameter names."""
    for path, submodule in module.named_modules():
        if isinstance(submodule, GPT):
            return (f"{path}." if path else ""), submodule
    raise ValueError(f"--strategy fsdp shards a GPT, and {type(module).__name__} holds none")


def shard_and_load(model: nn.Module, device_mesh, checkpoint_dir: Optional[Path], precision: str,
                   quantize: Optional[str] = None) -> nn.Module:
    """`fully_shard` each transformer Block, the embedding and the head, then the root (the final norm; a tied head
    and embedding share one parameter, so they stay together in the root). What is still on the meta device is then
    allocated shard by shard and filled from `checkpoint_dir`; parameters created for real before (a classifier's
    zero head) keep their values, now sharded.

    With `quantize="ao.nf4"` each Block is instead loaded whole (one 16-bit Block at a time, as
    `model.quantize.load_quantized` does), its linears quantized to torchao's NF4Tensor exactly as one process
    quantizes them, and only then sharded: FSDP2 splits an NF4Tensor along its rows into 4-bit shards (torchao
    implements the split and the all-gather hooks), so each rank keeps 1/N of the 4-bit weights."""
    from torch.distributed.fsdp import fully_shard

    _, gpt = find_gpt(model)
    mesh = device_mesh["data_parallel"]
    policy = mixed_precision_policy(precision)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    row_norms = {}
    for i, block in enumerate(gpt.transformer.h):
        if quantize:
            row_norms.update(quantize_block(block, f"transformer.h.{i}.", checkpoint_dir, quantize, device,
                                            mesh.size()))
        fully_shard(block, mesh=mesh, mp_policy=policy)
    if not gpt.config.tie_embeddings:
        # each as large as a few blocks at a 128k vocabulary: gathered only while it computes, not the whole step
        # (a classifier has no LM head left to shard)
        for module in (gpt.transformer.wte, gpt.lm_head):
            if any(True for _ in module.parameters()):
                fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    on_meta = {name for name, t in model.named_parameters() if t.is_meta}
    if on_meta or quantize:
        if checkpoint_dir is None:
            raise ValueError("The model is on the meta device and no checkpoint_dir was given to load it from")
        for module in model.modules():
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if any(t.is_meta for t in tensors):
                module.to_empty(device=device, recurse=False)
        load_sharded_weights(model, checkpoint_dir, on_meta, row_norms)
        gpt.reset_rope(device)
    return model


@torch.no_grad()
def quantize_block(block: nn.Module, prefix: str, checkpoint_dir: Path, mode: str, device, world_size: int
                   ) -> dict[str, torch.Tensor]:
    """Allocate a Block still on the meta device, fill it whole from `checkpoint_dir` (its LoRA parameters are
    initialised later, with the others) and quantize its frozen linears with `mode`, before FSDP shards it. Returns
    the row norms of each quantized weight under a DoRA layer (path in the Block -> norms), from which its
    magnitudes start, as `LoRALinear` computes them from the dequantized weight in one process."""
    from safetensors import safe_open

    from model.quantize import dequantize_linear, quantize_model

    if mode != "ao.nf4":
        raise ValueError(f"--strategy fsdp takes --quantize ao.nf4 (torchao's NF4 shards); {mode} keeps its"
                         " quantization state outside the weight tensor, which FSDP2's sharding drops")
    block.to_empty(device=device)
    layers = {path: m for path, m in block.named_modules() if isinstance(m, LoRALinear)}
    adapters = {id(p) for layer in layers.values() for p in layer.lora.parameters()}
    files = {}
    for path in lit_weight_files(checkpoint_dir):
        with safe_open(path, framework="pt", device="cpu") as handle:
            files.update({key: path for key in handle.keys() if key.startswith(prefix)})
    for name, param in block.named_parameters():
        if id(param) in adapters:
            continue
        key = prefix + name.replace(".linear.", ".") if any(name.startswith(f"{p}.linear.") for p in layers) else prefix + name
        if key not in files:
            raise ValueError(f"{checkpoint_dir}: no weight {key} for the model's parameter {prefix + name}")
        with safe_open(files[key], framework="pt", device="cpu") as handle:
            param.copy_(handle.get_tensor(key))
    quantize_model(block, mode, compute_dtype=torch.bfloat16, skip=())
    row_norms = {}
    for path, layer in layers.items():
        weight = layer.linear.weight
        if weight.shape[0] % world_size or any(t.numel() % world_size for t in
                                               (weight.quantized_data, weight.quantized_scalers,
                                                weight.quantization_factor)):
            raise ValueError(f"{prefix + path}: a {tuple(weight.shape)} NF4 weight does not split into"
                             f" {world_size} equal 4-bit shards; use a number of processes that divides its rows")
        if layer.dora:
            row_norms[prefix + path] = torch.linalg.norm(dequantize_linear(layer.linear), dim=1)
    return row_norms


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The local shard of a parameter (a plain tensor: all of it) and the global index of its first dim-0 row."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return param.data, 0
    local = param.to_local()
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return local, (offset[0] if offset else 0)


def _checkpoint_names(model: nn.Module) -> dict[str, str]:
    """Model parameter name -> its key in lit_model.safetensors: without the prefix of the GPT inside a classifier,
    and without the `.linear` of a layer that wraps the base linear (LoRALinear, AdapterV2Linear)."""
    prefix, gpt = find_gpt(model)
    wrappers = [path for path, m in model.named_modules() if isinstance(m, (LoRALinear, AdapterV2Linear))]
    names = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        for path in wrappers:
            if name.startswith(f"{path}.linear."):
                name_in_file = f"{path}.{name[len(path) + len('.linear.'):]}"
                break
        else:
            name_in_file = name
        key = name_in_file.removeprefix(prefix)
        if key == "lm_head.weight" and gpt.config.tie_embeddings:
            key = "transformer.wte.weight"  # the head is the embedding: saved once, under its name
        names[name] = key
    return names


@torch.no_grad()
def load_sharded_weights(model: nn.Module, checkpoint_dir: Path, on_meta: set[str],
                         row_norms: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Fill this rank's shards of the parameters named in `on_meta` from `checkpoint_dir`, reading only its rows of
    each memory-mapped tensor, and initialise the adapters' new parameters as a one-process run would (see
    `init_adapters`)."""
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
    new = {id(p) for m in model.modules() if isinstance(m, LoRAAdapter) for p in m.parameters()}
    new |= {id(p) for m in model.modules() if isinstance(m, (AdapterAttention, AdapterV2Linear))
            for name, p in m.named_parameters(recurse=False) if name.startswith("adapter_")}
    for name, param in model.named_parameters():
        if id(param) in new or name not in on_meta:
            continue
        key = names[name]
        if key not in files:
            raise ValueError(f"{checkpoint_dir}: no weight {key} for the model's parameter {name}; --strategy fsdp"
                             " loads base weights, LoRA and LLaMA-Adapter parameters only")
        local, start = _local_rows(param)
        local.copy_(read_rows(key, start, start + local.shape[0] if local.dim() else None))
    prefix, _ = find_gpt(model)
    row_norms = row_norms or {}

    def base_row_norms(path: str, start: int, stop: int) -> torch.Tensor:
        if path.removeprefix(prefix) in row_norms:  # a quantized weight: the norms of its dequantized rows
            return row_norms[path.removeprefix(prefix)][start:stop]
        return torch.linalg.norm(read_rows(names[f"{path}.linear.weight"], start, stop).float(), dim=1)

    init_adapters(model, base_row_norms)


@torch.no_grad()
def init_adapters(model: nn.Module, base_row_norms) -> None:
    """The adapters' new parameters, as `inject_lora` and `inject_adapter` initialise them in one process: LoRA A
    (Kaiming-uniform) and LLaMA-Adapter prompts (N(0, 1)) drawn in full from the global random stream in injection
    order, so that every rank draws what one process draws; LoRA B = 0; DoRA magnitude = the norm of each base
    weight row it scales; adapter gates and V2 biases 0, V2 scales 1. Each rank keeps its own rows;
    `base_row_norms(path, start, stop)` gives the norms of rows [start, stop) of the base weight of the LoRALinear
    at `path`."""
    prefix, _ = find_gpt(model)
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]
    # inject_lora wraps the blocks' linears first and the head last
    layers.sort(key=lambda item: item[0] == f"{prefix}lm_head")
    for path, layer in layers:
        for adapter in layer.lora.values():
            a_full = torch.empty(adapter.A.shape, dtype=adapter.A.dtype)
            nn.init.kaiming_uniform_(a_full, a=math.sqrt(5))
            _copy_rows(adapter.A, a_full)
            _local_rows(adapter.B)[0].zero_()
            if adapter.magnitude is not None:
                local, start = _local_rows(adapter.magnitude)
                local.copy_(base_row_norms(path, adapter.start + start, adapter.start + start + local.shape[0]))
    for module in model.modules():  # inject_adapter's order: the blocks' attention in turn
        if isinstance(module, AdapterAttention):
            _copy_rows(module.adapter_prompt, torch.randn(module.adapter_prompt.shape,
                                                          dtype=module.adapter_prompt.dtype))
            _local_rows(module.adapter_gate)[0].zero_()
        elif isinstance(module, AdapterV2Linear):
            _local_rows(module.adapter_scale)[0].fill_(1.0)
            _local_rows(module.adapter_bias)[0].zero_()


def _copy_rows(param: torch.Tensor, full: torch.Tensor) -> None:
    """This rank's rows of `full` into the (sharded) parameter."""
    local, start = _local_rows(param)
    local.copy_(full[start:start + local.shape[0]])


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
