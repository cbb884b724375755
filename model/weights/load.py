"""Load "a model to use" from any directory a Forge script writes, told apart by its files through one table.

A path given to a generate, eval, merge or export script is one of:

    a checkpoint       model_config.yaml + lit_model*.safetensors (convert_hf_checkpoint.py, a full fine-tune's final/
                       or step-*/, a merge)
    a fine-tuning run  hparams.yaml + the method's weights file (RUN_KINDS), in the directory itself or its final/;
                       the base checkpoint and its quantization come from the run's hparams.yaml

A new fine-tuning method that saves small weights on top of a frozen base adds one entry to `RUN_KINDS`; every
consumer then loads it without a new flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from model.adapter import ADAPTER_WEIGHTS, AdapterConfig, attach_adapter
from model.device import precision_to_dtype, resolve_device
from model.lora import LORA_WEIGHTS, LoRAConfig, attach_lora

HPARAMS = "hparams.yaml"
MODEL_CONFIG = "model_config.yaml"


@dataclass(frozen=True)
class RunKind:
    """A kind of fine-tuning run that stores weights on top of a frozen base checkpoint."""

    name: str
    weights: str  # the file that identifies the run and holds its trained weights
    made_by: str  # the script that writes it, for error messages
    attach: Callable[[torch.nn.Module, dict, dict[str, torch.Tensor]], None]  # (base model, hparams, weights)


RUN_KINDS = (
    RunKind("LoRA/DoRA run", LORA_WEIGHTS, "finetune/lora.py", attach_lora),
    RunKind("adapter run", ADAPTER_WEIGHTS, "finetune/adapter.py", attach_adapter),
)


@dataclass
class Loaded:
    """What `load_any` found: the model in eval mode, its base checkpoint, and the run it came from (or None)."""

    model: torch.nn.Module
    checkpoint_dir: Path
    run_dir: Optional[Path]
    kind: str
    hparams: dict


def load_hparams(run_dir: Path | str) -> dict:
    path = Path(run_dir) / HPARAMS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} the output directory of a fine-tuning run?")
    return yaml.safe_load(path.read_text()) or {}


def load_run(run_dir: Path | str, weights_name: str, made_by: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The hparams.yaml and the safetensors weights that a fine-tuning run saved in `run_dir` (its final/ or a step-*
    directory); `made_by` names the script that writes such a directory, for the error messages."""
    run_dir = Path(run_dir)
    for name in (HPARAMS, weights_name):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"{run_dir / name} not found: such a run directory holds {HPARAMS} and {weights_name}, as written"
                f" by `python {made_by} --out_dir ...`"
            )
    hparams = load_hparams(run_dir)
    try:
        state_dict = load_file(run_dir / weights_name)
    except SafetensorError as e:
        raise ValueError(f"{run_dir / weights_name} is not a valid safetensors file ({e})") from e
    return hparams, state_dict


def run_output_dir(path: Path | str, weights_name: str) -> Path:
    """The directory holding a run's weights: `path` itself, or its `final/` when given the run's out_dir."""
    path = Path(path)
    if (path / weights_name).is_file():
        return path
    if (path / "final" / weights_name).is_file():
        return path / "final"
    kinds = {kind.weights: kind for kind in RUN_KINDS}
    made_by = f" ({kinds[weights_name].name}, written by {kinds[weights_name].made_by})" if weights_name in kinds else ""
    raise FileNotFoundError(
        f"No {weights_name} in {path} or {path / 'final'}: pass the output directory of a finished fine-tuning run"
        f"{made_by}, or one of its step-* checkpoints"
    )


def load_lora_run(run_dir: Path | str) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The LoRAConfig and adapter weights that a LoRA run saved in `run_dir` (hparams.yaml + lora.safetensors)."""
    hparams, state_dict = load_run(run_dir, LORA_WEIGHTS, "finetune/lora.py")
    return LoRAConfig.from_hparams(hparams, source=str(Path(run_dir) / HPARAMS)), state_dict


def load_adapter_run(run_dir: Path | str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The AdapterConfig and adapter weights that an adapter run saved in `run_dir` (hparams.yaml and
    adapter.safetensors)."""
    hparams, state_dict = load_run(run_dir, ADAPTER_WEIGHTS, "finetune/adapter.py")
    return AdapterConfig.from_hparams(hparams, source=str(Path(run_dir) / HPARAMS)), state_dict


def detect(path: Path | str) -> tuple[Optional[RunKind], Path]:
    """(the run kind, the directory holding its weights) for a run, or (None, path) for a checkpoint."""
    path = Path(path)
    if (path / MODEL_CONFIG).is_file():
        return None, path
    for kind in RUN_KINDS:
        for candidate in (path, path / "final"):
            if (candidate / kind.weights).is_file():
                return kind, candidate
    if (path / "final" / MODEL_CONFIG).is_file():  # a full fine-tune's out_dir
        return None, path / "final"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a checkpoint (make one with `python scripts/download.py`)"
                                " or the output directory of a fine-tuning run")
    if (path / "training_state.pt").is_file():
        raise FileNotFoundError(
            f"{path} is a step checkpoint of a full fine-tune: it holds the training state for --resume only; use the"
            f" run's final/ once it has finished (`--checkpoint_dir {path.parent}`)"
        )
    names = ", ".join(kind.weights for kind in RUN_KINDS)
    raise FileNotFoundError(
        f"{path} is neither a checkpoint ({MODEL_CONFIG}) nor a fine-tuning run ({names} in it or in its final/);"
        " make a checkpoint with `python scripts/download.py` or `python scripts/convert_hf_checkpoint.py`"
    )


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


def load_any(path: Path | str, device: str = "auto", precision: str | None = None,
             quantize: str | None = None) -> Loaded:
    """The model that `path` names (a checkpoint or any fine-tuning run, see the module docstring), ready to use:
    a run is attached to its base straight from the run directory (no merge needed), quantized as it trained unless
    `quantize` says otherwise."""
    kind, directory = detect(path)
    if kind is None:
        model = load_model(directory, device=device, precision=precision, quantize=quantize)
        return Loaded(model.eval(), directory, None, "checkpoint", {})
    hparams, weights = load_run(directory, kind.weights, kind.made_by)
    checkpoint_dir = Path(hparams["checkpoint_dir"])
    if not (checkpoint_dir / MODEL_CONFIG).is_file():
        raise FileNotFoundError(
            f"The base checkpoint of {directory} ({checkpoint_dir}, from its {HPARAMS}) has no {MODEL_CONFIG}; convert"
            f" it, or edit checkpoint_dir in {directory / HPARAMS} if it moved"
        )
    quantize = quantize or hparams.get("quantize")
    if quantize == "bnb.int8-training":
        quantize = "bnb.int8"
    model = load_model(checkpoint_dir, device=device, precision=precision, quantize=quantize)
    kind.attach(model, hparams, weights)
    model = model.to(model.transformer.wte.weight.device).eval()
    return Loaded(model, checkpoint_dir, directory, kind.name, hparams)
