"""What LoRA dropout costs: PyTorch's `nn.Dropout` vs Forge's `model.lora.Dropout` vs none, on the mask alone and on
whole LoRA training steps, in one process.

    python benchmarks/dropout_speed.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

The mask: forward and backward of each dropout on the two input shapes of SmolLM2-135M's adapted layers at 4 x 256
tokens (576 wide: qkv, attention projection, MLP fc; 1536 wide: MLP projection). The step: LoRA r=8 with dropout on
every linear of the blocks, as `benchmarks/finetune_speed.py --data tasks` trains it, the same model, batches and
seed for each variant; the variants take turns over `--rounds` and each prints its seconds per step per round.
"""

import time
from pathlib import Path
from typing import Literal

import torch

from finetune_speed import DTYPES, forge_lora, make_batches  # this directory's Forge engine and batches

from model.lora import Dropout, LoRALinear

VARIANTS = {"nn.Dropout": torch.nn.Dropout, "forge Dropout": Dropout, "no dropout": lambda p: torch.nn.Identity()}


def time_mask(shape: tuple, dtype: torch.dtype, p: float, repeats: int = 20) -> dict[str, float]:
    """Milliseconds per forward + backward of each dropout on an input of `shape`."""
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    result = {}
    for name in ("nn.Dropout", "forge Dropout"):
        layer = VARIANTS[name](p).train()
        layer(x).sum().backward()
        t0 = time.perf_counter()
        for _ in range(repeats):
            layer(x).backward(torch.ones(shape, dtype=dtype))
        result[name] = (time.perf_counter() - t0) / repeats * 1e3
    return result


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data_dir: Path = Path("data/tasks"),
    dtype: Literal["float32", "bfloat16"] = "bfloat16",
    lora_dropout: float = 0.05,
    micro_batch_size: int = 4,
    seq_len: int = 256,
    steps: int = 4,
    rounds: int = 3,
) -> None:
    """Print the mask's milliseconds per input shape, then seconds per LoRA step per variant and round (on the CPU:
    on a GPU Forge's dropout is F.dropout itself)."""
    for width in (576, 1536):
        ms = time_mask((micro_batch_size, seq_len, width), DTYPES[dtype], lora_dropout)
        timings = ", ".join(f"{name} {value:.1f} ms" for name, value in ms.items())
        print(f"mask on {micro_batch_size} x {seq_len} x {width} (forward + backward): {timings}")

    torch.manual_seed(0)
    model, loss_fn = forge_lora(checkpoint_dir, torch.device("cpu"), DTYPES[dtype], lora_dropout)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = make_batches("tasks", data_dir, steps, micro_batch_size, seq_len)

    def step(input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        loss_fn(input_ids, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for batch in batches[:2]:  # warm-up
        step(*batch)
    seconds = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, make in VARIANTS.items():
            for module in model.modules():
                if isinstance(module, LoRALinear):
                    module.dropout = make(lora_dropout).train()
            t0 = time.perf_counter()
            for batch in batches:
                step(*batch)
            seconds[name].append((time.perf_counter() - t0) / len(batches))
    print(f"seconds per LoRA step ({micro_batch_size} x {seq_len} tokens, {dtype}, dropout {lora_dropout}), per round:")
    for name, values in seconds.items():
        print(f"  {name:14s} " + "  ".join(f"{v:.2f}" for v in values))


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
