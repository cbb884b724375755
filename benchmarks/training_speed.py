"""What length-grouped micro-batches and `--compile` save, and what `--gradient_checkpointing block` costs, in LoRA
training steps: same checkpoint, data, one run.

    python benchmarks/training_speed.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --data_dir data/tasks

Padding: the positions one epoch of `data_dir/train.pt` computes when each micro-batch is padded to its longest
sample, with a plain shuffle and with length grouping (`model.training.run.epoch_batches`): exact counts.

Speed: finetune/lora.py's model and step (LoRA r=8 on query and value, AdamW, the head and its loss only where a
label follows) in five copies that take turns over `rounds`, each round `steps` optimizer steps of one micro-batch:
eager on plain-shuffled micro-batches, eager on length-grouped ones, eager with every Block recomputed in the
backward pass (`GPT.set_gradient_checkpointing("block")`; on the CPU `offload` computes the same), eager with the
first half of the Blocks recomputed (`--checkpoint_layers`) and compiled Blocks (`GPT.compile_blocks`), the last
four on the same length-grouped micro-batches. Tokens/s counts real tokens (padding excluded), the median over the
rounds. The compile time is the compiled copy's first step minus the eager one's (both on the epoch's longest
micro-batch).
"""

import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from model.cli import PositiveInt, run_cli
from model.config import Config
from model.data.sft import get_collate_fn, load_dataset
from model.device import resolve_device
from model.gpt import GPT
from model.lora import LoRAConfig, inject_lora, mark_only_lora_as_trainable
from model.training.loss import head_cross_entropy
from model.training.run import epoch_batches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lora_model(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype, compiled: bool,
               checkpointing: str, layers=None) -> tuple:
    torch.manual_seed(0)
    model = GPT.from_checkpoint(checkpoint_dir, device=device, dtype=dtype)
    inject_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.05), dtype=dtype)
    mark_only_lora_as_trainable(model)
    model.set_gradient_checkpointing(checkpointing, layers)
    if compiled:
        model.compile_blocks()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, betas=(0.9, 0.95))
    return model.train(), optimizer


def train_step(model, optimizer, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """finetune/lora.py's step with one micro-batch: the head and its loss in chunks, only where a label follows."""
    targets = labels[:, 1:]
    predicting = torch.nn.functional.pad(targets != -100, (0, 1))
    loss = model(input_ids, logits_mask=predicting,
                 head_fn=partial(head_cross_entropy, targets=targets[targets != -100])).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def timed(device: torch.device, function) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data_dir: Path = Path("data/tasks"),
    dtype: Literal["float32", "bfloat16"] = "bfloat16",
    device: str = "auto",
    micro_batch_size: PositiveInt = 4,
    steps: PositiveInt = 10,
    rounds: PositiveInt = 3,
    seed: int = 1337,
) -> None:
    """Print the padding one epoch computes with and without length grouping, and the real tokens/s of eager,
    checkpointed and compiled LoRA steps.

    Args:
        checkpoint_dir: A converted checkpoint directory.
        data_dir: Prepared SFT data (`train.pt`) from a scripts/prepare_*.py run with this checkpoint.
        dtype: The weights' dtype (finetune/lora.py's --precision bf16-true is bfloat16).
        device: auto (CUDA when available), cpu or cuda.
        micro_batch_size: Samples per micro-batch (one micro-batch per optimizer step).
        steps: Timed optimizer steps per copy per round.
        rounds: Rounds the copies take turns over.
        seed: The data order's seed.
    """
    device_ = resolve_device(device)
    block_size = Config.from_checkpoint(checkpoint_dir).block_size
    samples = load_dataset(data_dir / "train.pt")
    lengths = [min(len(s["input_ids"]), block_size) for s in samples]
    real = sum(lengths)
    orders = {grouped: epoch_batches(lengths, micro_batch_size, 0, seed, group_by_length=grouped)
              for grouped in (False, True)}
    print(f"{len(samples)} samples, {real:,} real tokens, micro-batches of {micro_batch_size}; positions computed per"
          " epoch (padded to each micro-batch's longest sample):")
    for grouped, batches in orders.items():
        positions = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        print(f"  {'length-grouped' if grouped else 'plain shuffle '}: {positions:,} positions, {positions / real:.3f}x"
              f" the real tokens ({1 - real / positions:.1%} padding)")

    collate = get_collate_fn(pad_id=0, max_seq_length=block_size)
    needed = 1 + steps * rounds
    # full micro-batches only: a batch of 1 would compile one more (specialized) graph and time that
    half = Config.from_checkpoint(checkpoint_dir).n_layer // 2
    runs = {"eager, plain shuffle": (False, False, "none", None), "eager, grouped": (True, False, "none", None),
            "checkpointed, grouped": (True, False, "block", None),
            f"{half} checkpointed, grouped": (True, False, "block", half),
            "compiled, grouped": (True, True, "none", None)}
    engines = {}
    for name, (grouped, compiled, checkpointing, layers) in runs.items():
        batches = [b for b in orders[grouped] if len(b) == micro_batch_size][:needed]
        if len(batches) < needed:
            raise ValueError(f"{data_dir / 'train.pt'} has too few samples for {needed} micro-batches; lower --steps")
        model, optimizer = lora_model(checkpoint_dir, device_, DTYPES[dtype], compiled, checkpointing, layers)
        tensors = [tuple(t.to(device_) for t in collate([samples[i] for i in b]).values()) for b in batches]
        engines[name] = (model, optimizer, tensors, [sum(lengths[i] for i in b) for b in batches])

    first = {name: timed(device_, lambda e=e: train_step(e[0], e[1], *e[2][0])) for name, e in engines.items()}
    eager_s, compiled_s = first["eager, grouped"], first["compiled, grouped"]
    print(f"First step (the longest micro-batch): eager {eager_s:.2f}s, compiled {compiled_s:.2f}s -> compile time"
          f" ~{compiled_s - eager_s:.1f}s")
    rates = {name: [] for name in engines}
    for round_ in range(rounds):
        for name, (model, optimizer, tensors, tokens) in engines.items():
            window = slice(1 + round_ * steps, 1 + (round_ + 1) * steps)
            seconds = timed(device_, lambda: [train_step(model, optimizer, *batch) for batch in tensors[window]])
            rates[name].append(sum(tokens[window]) / seconds)
    base = statistics.median(rates["eager, grouped"])
    print(f"Real tokens/s, median of {rounds} rounds of {steps} steps ({dtype}, {device_.type},"
          f" {torch.get_num_threads()} threads):")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:25s} {median:9,.0f} tok/s  {median / base:.2f}x eager grouped")
    sys.stdout.flush()


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(main)
