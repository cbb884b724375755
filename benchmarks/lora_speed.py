"""Speed of this checkout's LoRA layer against an earlier commit's, in one process, taking turns on the same inputs.

    python benchmarks/lora_speed.py --against 3344b3c
    # where the git history is not at hand (a GPU machine given a copy of the working tree):
    git show 3344b3c:model/lora.py > /tmp/lora_3344b3c.py   # here; then there:
    python benchmarks/lora_speed.py --against /tmp/lora_3344b3c.py --device cuda --tokens 8192

One Llama-3.1-8B Block (4096 wide, its real shapes; random weights) with LoRA r=16 on every linear (q, k, v, o,
gate, up, down), frozen base in `dtype`, on `tokens` tokens: forward and backward, the Block's input needing a
gradient as in every Block after the first. The two variants hold the same weights; the earlier commit's
`model/lora.py` is loaded from `git show` (loss_speed.module_at) and injected into a copy of the same base Block.
Printed: the median seconds of each, the paired ratio, and the operators each step runs (counted with the
profiler): the elementwise passes that a GPU runs as separate kernels.
"""

import copy
import statistics
from collections import Counter
from dataclasses import replace
from functools import partial
from typing import Literal

import torch

import model.lora as lora_module
from loss_speed import module_at, paired, take_turns  # this directory's helpers for comparing with a commit
from model import GPT, Config
from training_speed import DTYPES


def operators(step) -> Counter:
    """How many times each operator runs in one call of `step` (the autograd engine's own entries left out)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})


def main(against: str, tokens: int = 1024, dtype: Literal["float32", "bfloat16"] = "bfloat16", device: str = "cpu",
         steps: int = 10) -> None:
    """Print the seconds of a LoRA Block step with this checkout's layer and with `against`'s.

    Args:
        against: a git commit whose `model/lora.py` is measured too, or the path of such a file.
        tokens: tokens in the micro-batch (one sequence).
        dtype: the weights', adapters' and activations' dtype.
        device: cpu or cuda.
        steps: timed steps per variant (two more untimed first), alternating.
    """
    torch.manual_seed(0)
    dtype_, device_ = DTYPES[dtype], torch.device(device)
    config = replace(Config.from_name("Llama-3.1-8B"), n_layer=1, vocab_size=256)
    with torch.device(device_):
        base = GPT(config).to(dtype_)
    earlier = module_at(against, "model/lora.py")
    variants = {}
    for name, module in (("this checkout", lora_module), (against, earlier)):
        model = copy.deepcopy(base)
        module.inject_lora(model, module.LoRAConfig(r=16, alpha=32, dropout=0.0, query=True, key=True, value=True,
                                                    projection=True, mlp=True))
        module.mark_only_lora_as_trainable(model)
        variants[name] = model.transformer.h[0]
    # the same adapter weights in both (B = 0 at init would leave A without a gradient)
    first, second = variants.values()
    with torch.no_grad():
        for (_, p), (_, q) in zip(first.named_parameters(), second.named_parameters()):
            if p.requires_grad:
                q.copy_(p.normal_(0, 0.02))
    x = torch.randn(1, tokens, config.n_embd, device=device_, dtype=dtype_, requires_grad=True)
    weights = torch.randn(1, tokens, config.n_embd, device=device_, dtype=dtype_)
    cos, sin = (t.to(dtype_) for t in base.rope(torch.arange(tokens, device=device_)))  # as GPT.forward passes them

    def step(block) -> None:
        (block(x, cos, sin, None, None, None) * weights).sum().backward()
        x.grad = None
        for p in block.parameters():
            p.grad = None

    times = take_turns({name: partial(step, block) for name, block in variants.items()}, steps, device_)
    print(f"Llama-3.1-8B Block, LoRA r=16 on every linear, {tokens} tokens, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads, {steps} steps alternating:")
    for name, seconds in times.items():
        print(f"{name:>14}: median {statistics.median(seconds):.3f} s")
    print(paired(times, against, "this checkout"))
    counts = {name: operators(partial(step, block)) for name, block in variants.items()}
    print("operators per step (forward + backward) that differ:")
    for op in sorted(set().union(*counts.values())):
        if counts["this checkout"][op] != counts[against][op]:
            print(f"  {op:28} {counts['this checkout'][op]:4} vs {counts[against][op]:4}")
    print(f"  {'all':28} {sum(counts['this checkout'].values()):4} vs {sum(counts[against].values()):4}")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
