"""Speed of the chunked head + cross-entropy against the full-logits loss and against an earlier commit's chunked loss,
in one process, the variants taking turns on the same inputs.

    python benchmarks/loss_speed.py --against 73ac570

1. Head + loss alone, forward and backward, with a frozen head (LoRA's case): `hidden` `(positions, n_embd)` in
   `dtype`, the head `(vocab, n_embd)`, every position labelled. Variants: Forge's `linear_cross_entropy`; the head
   and `F.cross_entropy` on float32 logits (what transformers computes); and, with `--against`, the
   `model/training/loss.py` of that git commit.
2. With `--against` and a checkpoint: one LoRA step (forward + backward) of `benchmarks/finetune_speed.py`'s Forge
   engine (r=8 on every linear) on random tokens with the loss on every position, this checkout's loss and the
   commit's alternating step by step; the paired ratio is robust to a machine whose speed drifts.
"""

import statistics
import subprocess
import sys
import types
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

import model.training.loss as loss_module
from finetune_speed import DTYPES, forge_lora, make_batches  # this directory's Forge engine and batches
from training_speed import timed

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def module_at(commit: str, path: str) -> types.ModuleType:
    """The file `path` of this repository as it was at `commit` (or the file at the path `commit`, for a machine
    without the git history), imported as a module of its own."""
    if Path(commit).is_file():
        text, origin = Path(commit).read_text(), commit
    else:
        source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO_ROOT, capture_output=True, text=True)
        if source.returncode != 0:
            raise SystemExit(f"git show {commit}:{path} failed: {source.stderr.strip()}")
        text, origin = source.stdout, f"{commit}:{path}"
    module = types.ModuleType(f"{Path(path).stem}_at_{abs(hash(origin))}")
    sys.modules[module.__name__] = module  # dataclasses look their module up by name
    exec(compile(text, origin, "exec"), module.__dict__)
    return module


def take_turns(functions: dict[str, Callable[[], object]], steps: int, device: torch.device,
               warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each function over `warmup` + `steps` rounds (the first `warmup` untimed), the order reversed every
    other round so that neither gains from coming first."""
    times = {name: [] for name in functions}
    for i in range(warmup + steps):
        for name in (list(functions) if i % 2 else list(functions)[::-1]):
            seconds = timed(device, functions[name])
            if i >= warmup:
                times[name].append(seconds)
    return times


def paired(times: dict[str, list[float]], name: str, reference: str) -> str:
    ratios = [t / r for t, r in zip(times[name], times[reference])]
    low, median, high = statistics.quantiles(ratios, n=4)
    return f"{name} / {reference}, paired: median {median:.3f} (quartiles {low:.3f}-{high:.3f})"


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    against: Optional[str] = None,
    positions: int = 1024,
    n_embd: int = 576,
    vocab: int = 49152,
    dtype: Literal["float32", "bfloat16"] = "bfloat16",
    micro_batch_size: int = 4,
    seq_len: int = 256,
    steps: int = 12,
) -> None:
    """Print the seconds of each loss variant alone and, with `against`, of a LoRA step with either loss.

    Args:
        checkpoint_dir: the model of the LoRA step (SmolLM2-135M-Instruct, whose head the defaults' shape is).
        against: a git commit whose `model/training/loss.py` is measured too.
        positions, n_embd, vocab: the shape of the head + loss measurement.
        dtype: the hidden states' and head's dtype.
        micro_batch_size, seq_len: the LoRA step's micro-batch.
        steps: timed repetitions per variant (two more untimed first).
    """
    torch.manual_seed(0)
    dtype_ = DTYPES[dtype]
    weight = (torch.randn(vocab, n_embd) * 0.02).to(dtype_)
    hidden = torch.randn(positions, n_embd, dtype=dtype_, requires_grad=True)
    targets = torch.randint(0, vocab, (positions,))
    variants = {
        "forge": lambda: loss_module.linear_cross_entropy(hidden, weight, None, targets).mean(),
        "full logits": lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets),
    }
    earlier = module_at(against, "model/training/loss.py") if against else None
    if earlier:
        variants[against] = lambda: earlier.linear_cross_entropy(hidden, weight, None, targets).mean()
    times = take_turns({name: lambda fn=loss_fn: torch.autograd.grad(fn(), hidden) for name, loss_fn in variants.items()},
                       steps, CPU)
    print(f"head + loss, forward + backward: {positions} positions x {n_embd} -> vocabulary {vocab}, {dtype}, frozen "
          f"head, {torch.get_num_threads()} threads")
    for name, seconds in times.items():
        print(f"{name:>12}: median {statistics.median(seconds):.3f} s")
    for name in list(variants)[1:]:
        print(paired(times, name, "forge"))
    if not earlier:
        return

    model, loss_fn = forge_lora(checkpoint_dir, CPU, dtype_, 0.0)
    model.train()
    batches = make_batches("random", Path("data/tasks"), steps + 2, micro_batch_size, seq_len)
    classes = {"forge": loss_module.LinearCrossEntropy, against: earlier.LinearCrossEntropy}
    chunks = {"forge": loss_module.CPU_CHUNK_ELEMENTS, against: getattr(earlier, "CPU_CHUNK_ELEMENTS", None)}
    step_times = {name: [] for name in classes}

    def step(name: str, batch: tuple) -> float:
        # `linear_cross_entropy` looks both up when it is called; the earlier commit's has its own chunk size
        loss_module.LinearCrossEntropy = classes[name]
        loss_module.CPU_CHUNK_ELEMENTS = chunks[name] or loss_module.CHUNK_ELEMENTS
        seconds = timed(CPU, lambda: loss_fn(*batch).backward())
        model.zero_grad(set_to_none=True)
        return seconds

    for i, batch in enumerate(batches):
        for name in (list(classes) if i % 2 else list(classes)[::-1]):
            seconds = step(name, batch)
            if i >= 2:
                step_times[name].append(seconds)
    loss_module.LinearCrossEntropy, loss_module.CPU_CHUNK_ELEMENTS = classes["forge"], chunks["forge"]
    print(f"\nLoRA step (forward + backward), {checkpoint_dir.name}, {micro_batch_size} x {seq_len} random tokens, "
          f"loss on every position, {dtype}, {steps} steps alternating:")
    for name, seconds in step_times.items():
        print(f"{name:>12}: median {statistics.median(seconds):.3f} s")
    print(paired(step_times, against, "forge"))


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
