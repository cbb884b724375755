"""Build a Mixtral-style mixture of experts from a base model and fine-tunes of it, from a mergekit-moe-style YAML.

    python scripts/merge_moe.py --config examples/merge/moe.yaml --out_dir checkpoints/merged/smollm2-moe

    base_model: checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct   # attention, norms, embeddings and head
    gate_mode: hidden                                              # hidden, cheap_embed or random
    experts_per_token: 2
    experts:                                                       # each expert's MLPs come from its model
      - source_model: out/merge-area/numbers
        positive_prompts: ["How many words are in this sentence: ..."]
        negative_prompts: []                                       # optional

Every block's MLP becomes a router ("gate") over the experts' MLPs; a token goes to its `experts_per_token` best
experts, weighted by the router's softmax renormalised over them. The router's row for an expert is the mean of the
hidden states that the router itself will receive (the input of the MLP: after the post-attention norm), over every
token of the expert's positive prompts (their own tokens: not the chat template around them, not padding), scaled
to unit norm, minus the same unit mean over its negative prompts if it has any. Unit rows route a token by its
cosine with each expert's mean, so each expert's mean hidden state goes to that expert whatever the norms (with
raw means a larger mean would take the other experts' tokens, and the router has no bias to correct it).
`cheap_embed` does the same with the token embeddings (no forward pass); `random` draws the rows at random (for
training the routers afterwards: finetune/lora.py --lora_router true).

The script then routes each expert's positive prompts through the new model and prints, per layer, the share of
each expert's prompts whose average routing weight is highest for that expert, and warns where the router cannot
tell the experts apart; routing.json and routing.png in `out_dir` keep the diagnostic. The output is a normal
Forge checkpoint (Mixtral config) that generate/, eval/, finetune/ and convert_to_hf.py (-> MixtralForCausalLM)
read.
"""

import json
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from model.cli import run_cli
from model.config import Config
from model.device import DTYPES
from model.files import atomic_save_figure, atomic_write_text, check_out_dir, publish_dir
from model.gpt import GPT
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer
from model.weights.checkpoint import copy_checkpoint_files, save_sharded
from model.weights.convert import hf_config_dict
from model.workflows.merge import (
    CheckpointReader,
    layer_of,
    resolve_model_dir,
)

GATE_MODES = ("hidden", "cheap_embed", "random")
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts"}
MLP_WEIGHTS = ("fc_1", "fc_2", "proj")
FREE_CONFIG_FIELDS = {"name", "hf_repo"}
CONFIG_LABEL = "moe config"


def merge_moe(
    out_dir: Path,
    base_model: str,
    experts: list[dict],
    gate_mode: str = "hidden",
    experts_per_token: int = 2,
    dtype: Optional[str] = None,
    apply_prompt_style: bool = True,
    batch_size: int = 8,
    seed: int = 0,
    diagnose: bool = True,
    shard_size_mb: int = 4096,
) -> dict:
    """Build the mixture of experts a YAML (given with --config) describes and write it to `out_dir`.

    Args:
        out_dir: Where to write the MoE checkpoint (must not exist yet, or be empty).
        base_model: The checkpoint the attention, norms, embeddings and head come from (a SwiGLU/LLaMA-MLP model).
        experts: `[{source_model: DIR, positive_prompts: [...], negative_prompts: [...]}]`, fine-tunes of the base.
        gate_mode: How the routers start: hidden, cheap_embed or random (see the module docstring).
        experts_per_token: How many experts each token goes to.
        dtype: The output's dtype (float32, bfloat16, float16); default: the base model's.
        apply_prompt_style: Wrap each prompt in the base model's chat template, as it will be at inference.
        batch_size: Prompts per forward pass when computing the routers' hidden states.
        seed: Seeds the random gates.
        diagnose: Route the experts' prompts through the result and report which expert they go to.
        shard_size_mb: Write the weights in files of at most this size.

    Returns:
        The routing diagnostic: per layer, the share of each expert's prompts routed to that expert.
    """
    label = CONFIG_LABEL
    if gate_mode not in GATE_MODES:
        raise ValueError(f"{label}: gate_mode {gate_mode!r} is not one of {', '.join(GATE_MODES)}")
    if not isinstance(experts, list) or len(experts) < 2:
        raise ValueError(f"{label}: `experts` must list at least two experts")
    if not 1 <= experts_per_token <= len(experts):
        raise ValueError(f"{label}: experts_per_token={experts_per_token} must be between 1 and the number of experts"
                         f" ({len(experts)})")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"{label}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    base_dir = resolve_model_dir(base_model, f"{label}: base_model {base_model!r}")
    base_config = Config.from_checkpoint(base_dir)
    if base_config.mlp_class_name != "LLaMAMLP" or base_config.parallel_residual:
        raise ValueError(f"{label}: base_model {base_model!r} is a {base_config.mlp_class_name} model; Mixtral-style"
                         " experts need a sequential block with a SwiGLU (LLaMAMLP) MLP, like Llama, Mistral, SmolLM2")
    expert_dirs, prompts = [], []
    for i, expert in enumerate(experts):
        where = f"{label}: experts[{i}]"
        if not isinstance(expert, dict) or "source_model" not in expert or set(expert) - EXPERT_KEYS:
            raise ValueError(f"{where} must be {{source_model: DIR, positive_prompts: [...], negative_prompts: [...]}},"
                             f" got {expert!r}")
        expert_dir = resolve_model_dir(expert["source_model"], f"{where}: source_model {expert['source_model']!r}")
        check_same_architecture(Config.from_checkpoint(expert_dir), base_config, f"{where} ({expert['source_model']})",
                                base_model)
        positive, negative = (read_prompts(expert.get(key), f"{where}.{key}")
                              for key in ("positive_prompts", "negative_prompts"))
        if not positive and (gate_mode != "random" or diagnose):
            raise ValueError(f"{where}: give positive_prompts (needed by gate_mode {gate_mode} and the diagnostic)")
        expert_dirs.append(expert_dir)
        prompts.append((positive, negative))
    check_out_dir(out_dir)

    base = CheckpointReader(base_dir)
    readers = [CheckpointReader(d) for d in expert_dirs]
    for i, reader in enumerate(readers):
        for layer in range(base_config.n_layer):
            for weight in MLP_WEIGHTS:
                name = f"transformer.h.{layer}.mlp.{weight}.weight"
                if name not in reader or reader.shapes[name] != base.shapes[name]:
                    raise ValueError(f"{label}: experts[{i}] ({experts[i]['source_model']}): tensor {name} is missing or"
                                     f" has another shape than the base's {list(base.shapes[name])}")
    out_dtype = DTYPES[dtype] if dtype else {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[
        base.dtypes["transformer.wte.weight"]]

    tokenizer = Tokenizer(base_dir) if gate_mode != "random" or diagnose else None
    style = load_prompt_style(base_dir) if apply_prompt_style else None
    encoded = [([encode(tokenizer, style, p) for p in pos], [encode(tokenizer, style, p) for p in neg])
               for pos, neg in prompts] if tokenizer else None
    print(f"Initialising the routers of {len(experts)} experts ({gate_mode})")
    gates = gate_weights(gate_mode, base_dir, base_config, len(experts), encoded, batch_size, seed)

    moe_config = replace(base_config, name=out_dir.name, hf_repo="", hf_architecture="MixtralForCausalLM",
                         mlp_class_name="LLaMAMoE", n_expert=len(experts), n_expert_per_token=experts_per_token)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-merging-"))
    try:
        save_sharded(moe_tensors(base, readers, gates, out_dtype), tmp_dir,
                     shard_size_bytes=shard_size_mb * 2**20)
        moe_config.save(tmp_dir)
        copy_checkpoint_files(base_dir, tmp_dir)
        hf_config = hf_config_dict(moe_config)
        hf_config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
        atomic_write_text(tmp_dir / "config.json", json.dumps(hf_config, indent=2))
        spec = dict(base_model=base_model, experts=experts, gate_mode=gate_mode, experts_per_token=experts_per_token,
                    dtype=dtype, apply_prompt_style=apply_prompt_style, seed=seed)
        atomic_write_text(tmp_dir / "moe_config.yaml", yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
        diagnostic = {}
        if diagnose:
            names = [Path(e["source_model"]).name for e in experts]
            diagnostic = routing_diagnostic(tmp_dir, [pos for pos, _ in encoded], names, batch_size)
            report_routing(diagnostic, names)
            atomic_write_text(tmp_dir / "routing.json", json.dumps(diagnostic, indent=2))
            plot_routing(diagnostic, names, tmp_dir / "routing.png")
        check_out_dir(out_dir)
        publish_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"Saved the {len(experts)}-expert MoE (top-{experts_per_token}) to {out_dir}")
    return diagnostic


def check_same_architecture(config: Config, base: Config, where: str, base_name: str) -> None:
    expected = asdict(base)
    differences = [f"{key}: {expected[key]!r} vs {value!r}" for key, value in asdict(config).items()
                   if key not in FREE_CONFIG_FIELDS and value != expected[key]]
    if differences:
        raise ValueError(f"{where} has another architecture than base_model {base_name!r} ({'; '.join(differences)});"
                         " the experts must be fine-tunes of the base")


def read_prompts(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise ValueError(f"{where} must be a list of non-empty strings, got {value!r}")
    return value


def encode(tokenizer: Tokenizer, style, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's token ids (in the chat template, if any) and a mask of the prompt's own tokens. The template's
    tokens are the same for every expert: they give the hidden states their context, but would drown the
    difference between the experts' prompts in any mean over tokens."""
    if style is None:
        ids = tokenizer.encode(prompt)
        return ids, torch.ones_like(ids, dtype=torch.bool)
    text = style.apply(prompt)
    ids = tokenizer.encode(text)
    start = text.find(prompt)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    first, end = len(tokenizer.encode(text[:start])), len(tokenizer.encode(text[:start + len(prompt)]))
    mask[first:end] = True
    return ids, mask


# ----------------------------------------------------------------------------------------------- the routers


def padded_batches(prompts: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int):
    """(ids (B, T), mask (B, T)) batches of (ids, mask of the prompt's own tokens) pairs, right-padded: with causal
    attention the padding never reaches a real token, and the mask keeps it (and the template) out of every mean."""
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        length = max(p.numel() for p, _ in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.bool)
        for row, (p, own) in enumerate(chunk):
            ids[row, :p.numel()], mask[row, :p.numel()] = p, own
        yield ids, mask


@torch.no_grad()
def router_inputs(model: GPT, prompts: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> torch.Tensor:
    """The mean, over the prompts' own tokens (no padding, no template), of each block's MLP input: what a router there sees.
    Returns (n_layer, n_embd)."""
    sums = torch.zeros(model.config.n_layer, model.config.n_embd, dtype=torch.float64)
    count = 0
    captured: dict[int, torch.Tensor] = {}
    hooks = [block.mlp.register_forward_pre_hook(lambda _, args, i=i: captured.__setitem__(i, args[0]))
             for i, block in enumerate(model.transformer.h)]
    try:
        for ids, mask in padded_batches(prompts, batch_size):
            model(ids, return_hidden=True)
            for i, hidden in captured.items():
                sums[i] += hidden[mask].double().sum(0)
            count += int(mask.sum())
    finally:
        for hook in hooks:
            hook.remove()
    return (sums / count).float()


def gate_weights(gate_mode: str, base_dir: Path, config: Config, n_expert: int, encoded, batch_size: int,
                 seed: int) -> torch.Tensor:
    """The routers' weights, (n_layer, n_expert, n_embd)."""
    if gate_mode == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(config.n_layer, n_expert, config.n_embd, generator=generator) * 0.02
    if gate_mode == "hidden":
        model = GPT.from_checkpoint(base_dir, dtype=torch.float32)

        def mean(prompts):
            return router_inputs(model, prompts, batch_size)
    else:
        wte = CheckpointReader(base_dir).get("transformer.wte.weight").float()

        def mean(prompts):
            tokens = torch.cat([ids[own] for ids, own in prompts])
            return wte[tokens].mean(0).expand(config.n_layer, -1)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    rows = [unit(mean(pos)) - (unit(mean(neg)) if neg else 0)
            for pos, neg in tqdm(encoded, desc="Routing prompts", unit="expert")]
    return torch.stack(rows, dim=1)


def moe_tensors(base: CheckpointReader, experts: list[CheckpointReader], gates: torch.Tensor, dtype: torch.dtype):
    """The MoE checkpoint's tensors, one at a time: the base's, with each block's MLP replaced by its router and
    the experts' MLPs."""
    emitted = set()
    names = base.keys()
    for name in tqdm(names, desc="Merging", unit="tensor"):
        located = layer_of(name)
        if located is None or not located[1].startswith("mlp."):
            yield name, base.get(name).to(dtype)
            continue
        layer = located[0]
        if layer in emitted:
            continue
        emitted.add(layer)
        yield f"transformer.h.{layer}.mlp.gate.weight", gates[layer].to(dtype)
        for e, expert in enumerate(experts):
            for weight in MLP_WEIGHTS:
                yield (f"transformer.h.{layer}.mlp.experts.{e}.{weight}.weight",
                       expert.get(f"transformer.h.{layer}.mlp.{weight}.weight").to(dtype))


# ----------------------------------------------------------------------------------------------- the diagnostic


@torch.no_grad()
def routing_diagnostic(checkpoint_dir: Path, prompts: list[list[tuple[torch.Tensor, torch.Tensor]]], names: list[str],
                       batch_size: int) -> dict:
    """Route each expert's prompts through the MoE: per layer, which expert gets the highest routing weight on
    average over a prompt's own tokens, and the share of each expert's prompts that go to that expert."""
    model = GPT.from_checkpoint(checkpoint_dir, dtype=torch.float32)
    n_layer, n_expert = model.config.n_layer, len(prompts)
    captured: dict[int, torch.Tensor] = {}
    hooks = [block.mlp.gate.register_forward_hook(lambda _, __, out, i=i: captured.__setitem__(i, out))
             for i, block in enumerate(model.transformer.h)]
    # choices[layer][expert] = the expert each of that expert's prompts goes to
    choices = [[[] for _ in range(n_expert)] for _ in range(n_layer)]
    try:
        for e, expert_prompts in enumerate(prompts):
            for ids, mask in padded_batches(expert_prompts, batch_size):
                model(ids, return_hidden=True)
                for layer, logits in captured.items():
                    probs = logits.reshape(*ids.shape, n_expert).float().softmax(-1) * mask[..., None]
                    mean = probs.sum(1) / mask.sum(1, keepdim=True)
                    choices[layer][e] += mean.argmax(-1).tolist()
    finally:
        for hook in hooks:
            hook.remove()
    layers = []
    for layer in range(n_layer):
        own = [sum(c == e for c in choices[layer][e]) / len(choices[layer][e]) for e in range(n_expert)]
        counts = [[choices[layer][e].count(j) for j in range(n_expert)] for e in range(n_expert)]
        layers.append({"layer": layer, "own_share": own, "routed_to": counts})
    # separated: each expert's prompts go to it at least halfway between chance (1/n) and always
    threshold = (1 + 1 / n_expert) / 2
    return {"experts": names, "threshold": threshold, "layers": layers,
            "separated_layers": sum(all(s >= threshold for s in layer["own_share"]) for layer in layers)}


def report_routing(diagnostic: dict, names: list[str]) -> None:
    width = max(8, *(len(n) for n in names))
    print("Routing: the share of each expert's prompts routed to that expert (top routing weight, token mean)")
    print("layer  " + "  ".join(f"{n:>{width}}" for n in names))
    for layer in diagnostic["layers"]:
        print(f"{layer['layer']:>5}  " + "  ".join(f"{s:>{width}.0%}" for s in layer["own_share"]))
    threshold = diagnostic["threshold"]
    for layer in diagnostic["layers"]:
        weak = [n for n, s in zip(names, layer["own_share"]) if s < threshold]
        if weak:
            print(f"warning: layer {layer['layer']}: the router cannot separate {', '.join(weak)} (below"
                  f" {threshold:.0%} of their prompts routed to them); give more distinct positive prompts, negative"
                  " prompts, or train the routers (finetune/lora.py --lora_router true)")
    print(f"{diagnostic['separated_layers']} of {len(diagnostic['layers'])} layers separate every expert's prompts")


def plot_routing(diagnostic: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = torch.tensor([layer["own_share"] for layer in diagnostic["layers"]])
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(names), 1 + 0.25 * len(shares)))
    image = ax.imshow(shares, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("layer")
    ax.set_title("prompts routed to their own expert")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=100)


if __name__ == "__main__":
    run_cli(merge_moe)
