"""LoRA fine-tuning speed and peak memory: Forge vs transformers + PEFT, same checkpoint, same batches, same run.

    python benchmarks/finetune_speed.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

LoRA r=8, alpha=16, dropout 0.05 on every linear layer of the blocks (query, key, value, output projection, MLP;
PEFT's "all-linear"), AdamW on the adapters, micro-batches of `micro_batch_size` x `seq_len` random tokens with the
loss on every position, in `dtype` weights. Each engine runs in its own process (so peak memory is its own:
GPU max allocated, or CPU peak resident set), warms up, then times `steps` optimizer steps; the engines take turns
over `rounds` and the table shows the median tokens/s. Each library keeps its own defaults otherwise (PEFT keeps
the adapter weights in float32, Forge in the base weights' dtype).
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def run_engine(engine: str, checkpoint_dir: Path, micro_batch_size: int, seq_len: int, steps: int, warmup: int,
               dtype: str, device: str) -> dict:
    from model.utils import peak_memory_gb, resolve_device

    device_ = resolve_device(device)
    torch.manual_seed(0)
    if engine == "forge":
        from model import GPT
        from model.lora import LoRAConfig, inject_lora, mark_only_lora_as_trainable

        model = GPT.from_checkpoint(checkpoint_dir, device=device_, dtype=DTYPES[dtype])
        inject_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.05, query=True, key=True, value=True, projection=True,
                                      mlp=True))
        mark_only_lora_as_trainable(model)

        def loss_fn(input_ids):
            logits = model(input_ids)
            return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                                     input_ids[:, 1:].reshape(-1))
    else:
        import peft
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=DTYPES[dtype]).to(device_)
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                          target_modules="all-linear", task_type="CAUSAL_LM"))

        def loss_fn(input_ids):
            return model(input_ids=input_ids, labels=input_ids).loss

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = 49152 if engine == "forge" else model.config.vocab_size
    batches = torch.randint(0, min(vocab, 49152), (warmup + steps, micro_batch_size, seq_len),
                            generator=torch.Generator().manual_seed(0))
    times, losses = [], []
    for i, batch in enumerate(batches):
        batch = batch.to(device_)
        if device_.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device_.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    tokens = micro_batch_size * seq_len * steps
    return {"engine": engine, "tokens_per_s": tokens / sum(times), "peak_memory_gb": peak_memory_gb(device_),
            "trainable_params": sum(p.numel() for p in trainable), "first_loss": losses[0]}


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    micro_batch_size: int = 4,
    seq_len: int = 256,
    steps: int = 5,
    warmup: int = 2,
    dtype: Literal["float32", "bfloat16"] = "bfloat16",
    rounds: int = 3,
    device: str = "auto",
    engine: Literal["both", "forge", "transformers+peft"] = "both",
) -> None:
    """Compare LoRA training tokens/s and peak memory of Forge and transformers+PEFT."""
    if engine != "both":
        print(json.dumps(run_engine(engine, checkpoint_dir, micro_batch_size, seq_len, steps, warmup, dtype, device)))
        return
    runs: dict[str, list[dict]] = {"forge": [], "transformers+peft": []}
    for _ in range(rounds):
        for name in runs:
            cmd = [sys.executable, __file__, "--engine", name, "--checkpoint_dir", str(checkpoint_dir),
                   "--micro_batch_size", str(micro_batch_size), "--seq_len", str(seq_len), "--steps", str(steps),
                   "--warmup", str(warmup), "--dtype", dtype, "--device", device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {name: dict(r[0], tokens_per_s=statistics.median(x["tokens_per_s"] for x in r),
                          peak_memory_gb=max(x["peak_memory_gb"] for x in r)) for name, r in runs.items()}
    forge, hf = results["forge"], results["transformers+peft"]
    print(f"checkpoint: {checkpoint_dir}  dtype: {dtype}  batch: {micro_batch_size} x {seq_len} tokens  steps: {steps}"
          f" (+{warmup} warm-up)  rounds: {rounds}  threads: {torch.get_num_threads()}")
    print("| engine | tokens/s | peak memory (GB) | trainable parameters | first loss |")
    print("|---|---|---|---|---|")
    for r in (forge, hf):
        print(f"| {r['engine']} | {r['tokens_per_s']:.1f} | {r['peak_memory_gb']:.2f} | {r['trainable_params']:,} |"
              f" {r['first_loss']:.3f} |")
    print(f"speed ratio forge/(transformers+peft): {forge['tokens_per_s'] / hf['tokens_per_s']:.2f}x;"
          f" memory ratio: {forge['peak_memory_gb'] / hf['peak_memory_gb']:.2f}x")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
