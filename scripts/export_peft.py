"""Export a Forge LoRA/DoRA adapter as a PEFT adapter folder.

    python scripts/export_peft.py --checkpoint_dir out/lora --out_dir out/peft-adapter

`--checkpoint_dir` is a LoRA/DoRA run (its out_dir, final/ or a step-* directory): `lora.safetensors` (the
adapter, as saved from `model.lora.lora_state_dict`) and `hparams.yaml` (its LoRA settings under the keys `lora_r`,
`lora_alpha`, `lora_dropout`, `lora_query`, `lora_key`, `lora_value`, `lora_projection`, `lora_mlp`, `lora_head` and
`dora`, and its base checkpoint under `checkpoint_dir`). The output holds `adapter_config.json` and
`adapter_model.safetensors`, and loads on the Hugging Face export of the base model:

    base = AutoModelForCausalLM.from_pretrained(<scripts/convert_to_hf.py output for the run's base checkpoint>)
    model = peft.PeftModel.from_pretrained(base, "out/peft-adapter")

Our q, k and v adapters become PEFT's q_proj/k_proj/v_proj adapters one to one. Where transformers fuses layers
that we keep apart or apart that we fuse (Phi-3's qkv_proj and gate_up_proj, Falcon's query_key_value), the fused
layer gets the exactly equivalent adapter: A stacks the parts' A matrices along the rank, B places each part's B in
its own rows and rank columns, and the layer's rank (and alpha, to keep alpha / r) is raised in `rank_pattern`.
Two cases have no exact PEFT form and are refused: DoRA on only some of the parts of a fused layer (PEFT would give
every row of the layer a magnitude), and LoRA on Mixtral's experts (transformers stores them as stacked 3-D
parameters that PEFT adapts without DoRA or dropout). Merge those with the base model instead.
"""

import json
from pathlib import Path
from typing import Optional

import torch

from model.cli import run_cli
from model.config import Config
from model.files import atomic_save_safetensors, staged_dir
from model.gpt import GPT
from model.lora import LORA_WEIGHTS, LoRALinear, inject_lora, load_lora_state_dict
from model.weights.convert import WeightMap, weight_maps
from model.weights.load import load_hparams, load_lora_run, run_output_dir


def export_peft(checkpoint_dir: Path, out_dir: Path, base_model_name_or_path: Optional[str] = None) -> None:
    """Write the LoRA/DoRA run at `checkpoint_dir` as a PEFT adapter in `out_dir`.

    Args:
        checkpoint_dir: The LoRA/DoRA run: its output directory, its final/ or a step-* directory (lora.safetensors
            + hparams.yaml, which names the base checkpoint it trained on).
        out_dir: Where to write adapter_config.json and adapter_model.safetensors.
        base_model_name_or_path: Recorded in adapter_config.json for `AutoPeftModelForCausalLM`; by default the
            base checkpoint's Hugging Face repo, or the base checkpoint directory.
    """
    run_dir = run_output_dir(checkpoint_dir, LORA_WEIGHTS)
    lora_config, lora_weights = load_lora_run(run_dir)
    base_dir = Path(load_hparams(run_dir)["checkpoint_dir"])
    config = Config.from_checkpoint(base_dir)
    if lora_config.router:
        raise ValueError(f"{run_dir} trained the MoE routers in full, which a PEFT adapter cannot hold; merge it with"
                         " scripts/merge_lora.py and export the result with scripts/convert_to_hf.py")
    # a weightless model with the adapter's layers checks that the adapter fits this base model, and says where
    # each adapter writes
    with torch.device("meta"):
        model = inject_lora(GPT(config), lora_config)
    load_lora_state_dict(model, lora_weights)
    lora_layers = {path: module for path, module in model.named_modules() if isinstance(module, LoRALinear)}
    if config.hf_architecture == "MixtralForCausalLM" and any(".mlp.experts." in path for path in lora_layers):
        raise ValueError(
            "LoRA on Mixtral's experts cannot be exported to PEFT: transformers stores the experts as stacked 3-D"
            " parameters, which PEFT adapts in another layout and without DoRA or dropout. Export an adapter trained"
            " without --lora_mlp, or merge this one into the base model with scripts/merge_lora.py."
        )

    maps = weight_maps(config)
    if config.tie_embeddings:
        maps.append(WeightMap("lm_head.weight", "lm_head.weight"))
    tensors, ranks = {}, {}
    for weight_map in maps:
        parts = [name.removesuffix(".weight") for name in weight_map.lit]
        if not any(part in lora_layers for part in parts):
            continue
        for hf_module, (A, B, magnitude) in fused_adapters(model, weight_map, lora_weights, lora_config.dora).items():
            prefix = f"base_model.model.{hf_module}"
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = A, B
            if magnitude is not None:
                tensors[f"{prefix}.lora_magnitude_vector"] = magnitude
            ranks[hf_module.rpartition(".")[2]] = A.size(0)

    fused_ranks = {name: rank for name, rank in ranks.items() if rank != lora_config.r}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or config.hf_repo or str(base_dir.resolve()),
        "r": lora_config.r,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "use_dora": lora_config.dora,
        "target_modules": sorted(ranks),
        "rank_pattern": fused_ranks,
        # PEFT scales by alpha / r per layer: a fused layer of rank k * r needs alpha k * alpha for the same scale
        "alpha_pattern": {name: lora_config.alpha * (rank // lora_config.r) for name, rank in fused_ranks.items()},
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }

    with staged_dir(out_dir) as tmp_dir:  # never a half-written export
        atomic_save_safetensors(tensors, tmp_dir / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        (tmp_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    print(f"Saved a PEFT adapter for {len(ranks)} kinds of layers ({', '.join(sorted(ranks))}) to {out_dir}")


def fused_adapters(
    model: GPT, weight_map: WeightMap, lora_weights: dict[str, torch.Tensor], dora: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """HF module name -> (A, B, DoRA magnitude) for the HF layers that `weight_map` builds from our layers.

    Every output row of our layers gets a global index; passing the indices through the map's own `to_hf` says
    which rows of which HF layer each of our adapters writes to, whatever the fusing, splitting or reordering.
    """
    parts = [name.removesuffix(".weight") for name in weight_map.lit]
    offsets = torch.tensor([0] + [model.get_submodule(part).out_features for part in parts]).cumsum(0).tolist()
    hf_rows = weight_map.to_hf([torch.arange(offsets[i], offsets[i + 1]).unsqueeze(1) for i in range(len(parts))])
    # (global rows, A, B, magnitude) of each of our adapters in these layers
    adapters = []
    for part, offset in zip(parts, offsets):
        layer = model.get_submodule(part)
        if not isinstance(layer, LoRALinear):
            continue
        for name, adapter in layer.lora.items():
            key = f"{part}.lora.{name}"
            rows = torch.arange(offset + adapter.start, offset + adapter.start + adapter.size)
            adapters.append((rows, lora_weights[f"{key}.A"], lora_weights[f"{key}.B"], lora_weights.get(f"{key}.magnitude")))

    fused = {}
    for hf_key, rows in zip(weight_map.hf, hf_rows):
        rows = rows.flatten()
        # position of each global row in this HF layer, -1 where it is not in it
        position = torch.full((offsets[-1],), -1)
        position[rows] = torch.arange(len(rows))
        inside = [a for a in adapters if (position[a[0]] >= 0).any()]
        if not inside:
            continue
        hf_module = hf_key.removesuffix(".weight")
        A = torch.cat([a[1] for a in inside])
        B = torch.zeros(len(rows), A.size(0), dtype=A.dtype)
        covered = torch.zeros(len(rows), dtype=torch.bool)
        magnitude = torch.empty(len(rows), dtype=A.dtype) if dora else None
        rank_start = 0
        for adapter_rows, adapter_A, adapter_B, adapter_magnitude in inside:
            r = adapter_A.size(0)
            B[position[adapter_rows], rank_start:rank_start + r] = adapter_B
            covered[position[adapter_rows]] = True
            if dora:
                magnitude[position[adapter_rows]] = adapter_magnitude
            rank_start += r
        if dora and not covered.all():
            raise ValueError(
                f"DoRA on only part of {hf_module} has no PEFT equivalent: PEFT's DoRA learns a magnitude for every"
                " row of the fused layer. Train with LoRA on all of its parts (e.g. --lora_query, --lora_key and"
                " --lora_value together), or merge the adapter with scripts/merge_lora.py."
            )
        fused[hf_module] = (A, B, magnitude)
    return fused


if __name__ == "__main__":
    run_cli(export_peft)
