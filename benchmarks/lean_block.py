"""What the lean Block saves and costs, against what it replaces, in one process on the same model, batches and seed.

    python benchmarks/lean_block.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

The model: LoRA r=8 on every linear of the blocks, as `benchmarks/finetune_speed.py --data tasks` trains it. For each
variant ("lean": `model.gpt.RMSNormFunction` and `SwiGLUFunction`; "selective": the same, and the backward pass
computes their outputs again instead of keeping them (`--gradient_checkpointing selective`); "expression": `weight *
rms_norm(x.float()).to(x.dtype)` and `silu(fc_1(x)) * fc_2(x)` through autograd), the bytes autograd keeps for the
backward pass of one micro-batch (every saved storage once, the weights excluded) and the seconds of forward +
backward, the variants alternating step by step over `--steps` micro-batches (the paired ratios are robust to a
machine whose speed drifts). All variants keep v in its own storage (`CausalSelfAttention.forward`), which this does
not switch.
"""

import statistics
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from finetune_speed import DTYPES, forge_lora, make_batches  # this directory's Forge engine and batches

from model.gpt import LLaMAMLP, RMSNorm

LEAN = {"norm": RMSNorm.forward, "mlp": LLaMAMLP.forward, "checkpointing": "none"}
SELECTIVE = {**LEAN, "checkpointing": "selective"}
EXPRESSION = {
    "norm": lambda self, x: self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype),
    "mlp": lambda self, x: self.proj(F.silu(self.fc_1(x)) * self.fc_2(x)),
    "checkpointing": "none",
}


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data_dir: Path = Path("data/tasks"),
    micro_batch_size: int = 4,
    seq_len: int = 256,
    dtype: Literal["float32", "bfloat16"] = "bfloat16",
    lora_dropout: float = 0.0,
    steps: int = 16,
) -> None:
    """Print kept bytes per token per layer and forward + backward seconds of the lean functions and the expressions."""
    torch.manual_seed(0)
    model, loss_fn = forge_lora(checkpoint_dir, torch.device("cpu"), DTYPES[dtype], lora_dropout)
    model.train()
    batches = make_batches("tasks", data_dir, steps, micro_batch_size, seq_len)
    variants = {"lean": LEAN, "selective": SELECTIVE, "expression": EXPRESSION}

    def use(variant: dict) -> None:
        RMSNorm.forward, LLaMAMLP.forward = variant["norm"], variant["mlp"]
        model.set_gradient_checkpointing(variant["checkpointing"])

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = micro_batch_size * seq_len * model.config.n_layer

    for name, variant in variants.items():
        use(variant)
        saved = {}

        def pack(tensor):
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in weights:
                saved[ptr] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = loss_fn(*batches[0])
        loss.backward()
        model.zero_grad(set_to_none=True)
        print(f"{name:>10}: {sum(saved.values()) / tokens / 1024:.1f} KB kept per token per layer")

    def step(variant: dict, batch: tuple) -> float:
        use(variant)
        t0 = time.perf_counter()
        loss_fn(*batch).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for variant in variants.values():  # warm-up
        step(variant, batches[0])
    times = {name: [] for name in variants}
    ratios = {name: [] for name in variants if name != "lean"}
    for i, batch in enumerate(batches):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        took = {name: step(variants[name], batch) for name in order}
        for name, seconds in took.items():
            times[name].append(seconds)
        for name in ratios:
            ratios[name].append(took[name] / took["lean"])
    use(LEAN)
    print(f"forward + backward, {micro_batch_size} x {seq_len} tokens, {dtype}, dropout {lora_dropout}, {steps} steps"
          " alternating:")
    for name, seconds in times.items():
        print(f"{name:>10}: median {statistics.median(seconds):.3f} s")
    for name, paired in ratios.items():
        quartiles = statistics.quantiles(paired, n=4)
        print(f"{name} / lean, paired: median {quartiles[1]:.3f} (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
