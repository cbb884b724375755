"""Merge a LoRA or DoRA adapter into its base model and save a plain checkpoint.

    python scripts/merge_lora.py --checkpoint_dir out/lora --out_dir checkpoints/my-org/smollm2-tasks

`--checkpoint_dir` is a LoRA/DoRA run (finetune/lora.py's out_dir, its final/ or a step-* directory); its base
checkpoint is the one named in the run's hparams.yaml.

The output is a complete checkpoint directory (model_config.yaml, lit_model.safetensors, tokenizer files,
prompt_style.yaml) that every script reads like any other, and that `scripts/convert_to_hf.py` exports. A run
trained on a quantized base (QLoRA/QDoRA) is merged into the same dequantized weights it was trained against and
saved in the base checkpoint's dtype.
"""

from pathlib import Path

import torch

from model.cli import run_cli
from model.config import Config
from model.gpt import GPT
from model.lora import LORA_WEIGHTS, inject_lora, load_lora_state_dict, merge_lora
from model.quantize import dequantize_linear, is_quantized_linear, quantize_model
from model.weights.checkpoint import load_state_dict, write_checkpoint_dir
from model.weights.load import load_hparams, load_lora_run, run_output_dir


def merge(checkpoint_dir: Path, out_dir: Path) -> None:
    """Merge the LoRA/DoRA run at `checkpoint_dir` into its base and write the result to `out_dir`.

    Args:
        checkpoint_dir: The LoRA/DoRA run: its output directory, its final/ or a step-* directory.
        out_dir: Where to write the merged checkpoint (must not exist yet, or be empty).
    """
    run_dir = run_output_dir(checkpoint_dir, LORA_WEIGHTS)
    hparams = load_hparams(run_dir)
    checkpoint_dir = Path(hparams["checkpoint_dir"])
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new --out_dir")
    lora_config, adapter = load_lora_run(run_dir)

    config = Config.from_checkpoint(checkpoint_dir)
    state_dict = load_state_dict(checkpoint_dir)
    dtype = state_dict["transformer.wte.weight"].dtype
    model = GPT(config)
    model.load_state_dict(state_dict)
    quantize = hparams.get("quantize")
    if quantize:
        # merge into the weights the adapter was trained against: the dequantized 4/8-bit base
        quantize_model(model, quantize, compute_dtype=dtype)
    inject_lora(model, lora_config)
    load_lora_state_dict(model, adapter)
    merge_lora(model.eval(), dtype=dtype)
    if quantize:
        dequantize_unadapted_layers(model, dtype)
    if lora_config.head and config.tie_embeddings:
        config.tie_embeddings = False  # the merged head differs from the embedding now

    # assembled in a temporary directory beside out_dir and renamed into place: a kill never leaves half a checkpoint
    write_checkpoint_dir(iter(model.state_dict().items()), config, checkpoint_dir, out_dir)
    print(f"Merged {run_dir} into {checkpoint_dir.name} and saved it to {out_dir}")


def dequantize_unadapted_layers(model: GPT, dtype: torch.dtype) -> None:
    """Replace the 4/8-bit layers that had no adapter (merging replaced the others) by plain nn.Linear layers holding
    their dequantized weights: the weights the adapter was trained with, in a checkpoint any script can load."""
    for path, module in list(model.named_modules()):
        if is_quantized_linear(module):
            parent_path, _, name = path.rpartition(".")
            bias = module.bias is not None
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=bias, device="meta")
            dense.weight = torch.nn.Parameter(dequantize_linear(module).to(dtype))
            if bias:
                dense.bias = torch.nn.Parameter(module.bias.detach().to(dtype))
            setattr(model.get_submodule(parent_path), name, dense)


if __name__ == "__main__":
    run_cli(merge)
