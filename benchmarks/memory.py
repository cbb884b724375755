"""Memory at Llama-3.1-8B width, measured on a few random layers: what a fine-tune keeps for the backward pass.

    python benchmarks/memory.py --layers 2 --seq_len 512

1. Bytes kept for the backward pass per token per layer (every tensor autograd saves, counted once per storage, via
   `torch.autograd.graph.saved_tensors_hooks`) for gradient checkpointing none / selective / block / offload x LoRA
   on q,v (r=8, dropout 0.05: Forge's default), QLoRA (nf4 base, the same LoRA) and all-linear LoRA (r=16, dropout
   0 and 0.05), and `block` on the first layer with `selective` on the others (`--checkpoint_layers 1
   --checkpoint_rest selective`).
   The first layer and each later one apart: the first keeps less (its input, the frozen embedding's output, needs
   no gradient), so a model of L layers keeps first + (L - 1) x later.
   `offload` keeps each Block's input in CPU memory instead (listed apart: on a GPU that is host memory).
2. Loss memory per labelled token at the 128,256-token vocabulary: the head + `F.cross_entropy` on float32 logits
   against `model.training.loss.linear_cross_entropy` (saved tensors plus the largest temporary).
3. QLoRA setup: the most `model.quantize.load_quantized` holds while loading a checkpoint of `setup_layers` layers,
   against the quantized model and one bf16 Block.

Weights are random (built from the config on the meta device, then materialized one layer at a time), so nothing is
downloaded; bytes do not depend on the values. Memory numbers do not depend on the machine's load.
"""

import copy
import tempfile
from functools import partial
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, Config
from model.gpt import CHECKPOINTING_MODES
from model.lora import LoRAConfig, inject_lora, mark_only_lora_as_trainable
from model.quantize import quantize_model
from model.training.loss import linear_cross_entropy

SETUPS = {
    "LoRA q,v r=8 dropout 0.05": (LoRAConfig(r=8, alpha=16, dropout=0.05), False),
    "QLoRA nf4, q,v r=8 dropout 0.05": (LoRAConfig(r=8, alpha=16, dropout=0.05), True),
    "all-linear LoRA r=16 dropout 0": (LoRAConfig(r=16, alpha=32, dropout=0.0, key=True, projection=True, mlp=True), False),
    "all-linear LoRA r=16 dropout 0.05": (
        LoRAConfig(r=16, alpha=32, dropout=0.05, key=True, projection=True, mlp=True), False),
}


def random_blocks(config: Config, dtype: torch.dtype) -> GPT:
    """A GPT of `config` on the CPU with random Blocks; the embedding and head stay on the meta device (unused)."""
    with torch.device("meta"):
        model = GPT(config)
    for block in model.transformer.h:
        block.to_empty(device="cpu")
        with torch.no_grad():
            for name, param in block.named_parameters():
                param.normal_(0, 0.02) if param.ndim == 2 else param.fill_(1.0)
        block.to(dtype)
    return model


def saved_bytes(fn, held: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages autograd saves while `fn()` runs, less those of `held` (weights that exist
    anyway)."""
    storages = {}
    excluded = {tensor.untyped_storage().data_ptr() for tensor in held}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def activation_table(config: Config, seq_len: int, dtype: torch.dtype, compiled: bool = False) -> list[str]:
    """KB per token kept by the first Block and by each later one: the first keeps less, because its input (the
    frozen embedding's output) needs no gradient, so its first norm and dropout record nothing. A model of L layers
    keeps first + (L - 1) x later."""
    if config.n_layer < 2:
        raise ValueError("--layers must be at least 2: the first layer keeps less than the later ones")
    base = random_blocks(config, dtype).train()
    rows = ["| setting | checkpointing | first layer (KB/token) | each later layer (KB/token) |"
            " offloaded to CPU (KB/token/layer) |", "|---|---|---|---|---|"]
    x = torch.randn(1, seq_len, config.n_embd, dtype=dtype)
    positions = torch.arange(seq_len)
    cos, sin = (t.to(dtype) for t in base.rope(positions))
    for setting, (lora_config, quantized) in SETUPS.items():
        model = copy.deepcopy(base)
        if quantized:
            for block in model.transformer.h:
                quantize_model(block, "bnb.nf4", torch.bfloat16, skip=())
        inject_lora(model, lora_config)
        mark_only_lora_as_trainable(model)
        model.train()
        blocks = model.transformer.h

        def kept(n: int) -> int:
            """Bytes kept by the first `n` Blocks."""
            model.transformer.h = blocks[:n]
            try:
                return saved_bytes(partial(model.run_blocks, x, cos, sin, positions),
                                   held=(*model.parameters(), cos, sin, positions))
            finally:
                model.transformer.h = blocks

        def row(checkpointing: str) -> str:
            first, all_ = kept(1), kept(config.n_layer)
            later = (all_ - first) / (config.n_layer - 1)
            offloaded = x.nbytes if "offload" in checkpointing else 0
            return (f"| {setting} | {checkpointing} | {first / seq_len / 1024:.1f} | {later / seq_len / 1024:.1f} |"
                    f" {offloaded / seq_len / 1024:.1f} |")

        for mode in CHECKPOINTING_MODES:
            model.set_gradient_checkpointing(mode)
            rows.append(row(mode))
        # --checkpoint_layers 1 --checkpoint_rest selective: `block` on the first layer, `selective` on the others
        model.set_gradient_checkpointing("block", 1, "selective")
        rows.append(row("block on the first layer, selective on the others"))
        if compiled and not quantized:
            model.compile_blocks()
            for mode in ("none", "selective"):
                model.set_gradient_checkpointing(mode)
                rows.append(row(f"{mode}, `--compile true`"))
        del model
    return rows


def loss_table(config: Config, labelled: int, dtype: torch.dtype) -> list[str]:
    torch.manual_seed(0)
    weight = torch.randn(config.vocab_size, config.n_embd, dtype=dtype) * 0.02
    hidden = torch.randn(labelled, config.n_embd, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, config.vocab_size, (labelled,))
    largest = []

    class Largest(TorchDispatchMode):  # a dispatch mode sees the backward pass's temporaries too
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.data_ptr() != weight.data_ptr():
                largest.append(out.untyped_storage().nbytes())
            return out

    rows = ["| loss | saved for backward (KB/labelled token) | largest temporary (MB) |", "|---|---|---|"]
    for name, fn in (
        ("head + F.cross_entropy (float32 logits)",
         lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets)),
        ("linear_cross_entropy (chunked)", lambda: linear_cross_entropy(hidden, weight, None, targets).mean()),
    ):
        largest.clear()
        with Largest():
            # the head weight is the model's own: count what the loss adds (the hidden states, if it keeps them)
            added = saved_bytes(lambda: fn().backward(), held=(weight,))
        rows.append(f"| {name} | {added / labelled / 1024:.2f} | {max(largest) / 2**20:.0f} |")
    return rows


def setup_table(config: Config) -> list[str]:
    from safetensors.torch import save_file

    import model.quantize
    from model.quantize import load_quantized

    held = []
    quantize = model.quantize.quantize_model
    with tempfile.TemporaryDirectory() as tmp:
        dense = random_blocks(config, torch.bfloat16)
        state = {k: v for k, v in dense.state_dict().items() if v.device.type != "meta"}
        for name in ("transformer.wte.weight", "lm_head.weight"):
            state[name] = torch.randn(config.vocab_size, config.n_embd, dtype=torch.bfloat16) * 0.02
        state["transformer.ln_f.weight"] = torch.ones(config.n_embd, dtype=torch.bfloat16)
        save_file(state, Path(tmp) / "lit_model.safetensors")
        block_bytes = sum(t.nbytes for k, t in state.items() if k.startswith("transformer.h.0."))
        del dense, state

        import model.gpt

        built = []

        class Recorded(model.gpt.GPT):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                built.append(self)

        def recording(module, *args, **kwargs):
            held.append(materialized_bytes(built[0]))
            return quantize(module, *args, **kwargs)

        model.gpt.GPT, model.quantize.quantize_model = Recorded, recording
        try:
            loaded = load_quantized(tmp, "bnb.nf4", "cpu", config=config)
        finally:
            model.gpt.GPT, model.quantize.quantize_model = GPT, quantize
    final = materialized_bytes(loaded)
    gb = 2**30
    return ["| QLoRA setup (nf4) | GB |", "|---|---|",
            f"| quantized model ({config.n_layer} layers, vocab {config.vocab_size:,}) | {final / gb:.2f} |",
            f"| one bf16 Block | {block_bytes / gb:.2f} |",
            f"| most held while loading | {max(held) / gb:.2f} |",
            f"| bound: (most held - quantized) / one bf16 Block | {(max(held) - final) / block_bytes:.2f} |"]


def materialized_bytes(module: torch.nn.Module) -> int:
    import bitsandbytes as bnb

    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "meta" or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.nbytes
        if isinstance(tensor, bnb.nn.Params4bit):
            total += tensor.quant_state.absmax.nbytes
    return total


def main(layers: int = 2, seq_len: int = 512, labelled: int = 512, setup_layers: int = 3,
         setup_vocab: int = 32000, compiled: bool = False) -> None:
    """Print the three tables.

    Args:
        layers: Llama-3.1-8B Blocks in the activation measurement (at least 2: the table gives the first layer and
            the average of the later ones).
        seq_len: tokens per sequence in the activation measurement.
        labelled: labelled positions in the loss measurement (at the full 128,256 vocabulary).
        setup_layers: Blocks in the checkpoint that the QLoRA setup measurement loads.
        setup_vocab: vocabulary of that checkpoint (smaller than Llama 3's to keep the file small; the embedding and
            head are loaded in bf16 either way and only add to both sides of the bound).
        compiled: also measure compiled Blocks (`--compile true`) without checkpointing and with `selective`, for
            the bf16-base LoRA settings (about a minute more on a 2-core CPU).
    """
    torch.manual_seed(0)
    config = replace(Config.from_name("Llama-3.1-8B"), n_layer=layers)
    print(f"Llama-3.1-8B width (n_embd {config.n_embd}, intermediate {config.intermediate_size}, "
          f"{config.n_head} heads / {config.n_query_groups} KV), bf16, {layers} layers x {seq_len} tokens")
    print("\n".join(activation_table(config, seq_len, torch.bfloat16, compiled)))
    print()
    print("\n".join(loss_table(config, labelled, torch.bfloat16)))
    print()
    print("\n".join(setup_table(replace(config, n_layer=setup_layers, vocab_size=setup_vocab))))


if __name__ == "__main__":
    from model.cli import run_cli

    run_cli(main)
