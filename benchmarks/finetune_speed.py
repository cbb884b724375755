"""LoRA fine-tuning speed and peak memory: Forge vs transformers + PEFT, same checkpoint, same batches, same run.

    python benchmarks/finetune_speed.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

LoRA r=8, alpha=16, dropout 0.05 (`--lora_dropout`) on every linear layer of the blocks (query, key, value, output
projection, MLP; PEFT's "all-linear"), AdamW on the adapters, micro-batches of `micro_batch_size` x `seq_len` tokens
in `dtype` weights. `--data random`: random tokens with the loss on every position (pure throughput of the same
matmuls). `--data tasks`: rows cut from the prepared instruction data (`--data_dir`, samples concatenated one after
the other into rows of `seq_len` tokens), the loss on the answers only (the prompts' labels are -100), which is what
a supervised fine-tune computes; every engine gets the same rows and labels. Each engine runs in its own process (so
peak memory is its own:
GPU max allocated, or CPU peak resident set), warms up, then times `steps` optimizer steps; the engines take turns
over `rounds` and the table shows the median tokens/s. Each library keeps its own defaults otherwise, with one
exception shown as its own row: PEFT keeps the adapter weights in float32 by default (`transformers+peft`), which
makes every LoRA matmul mix float32 and the base dtype; `transformers+peft-bf16` keeps them in the base weights'
dtype (`autocast_adapter_dtype=False`), as Forge does, and is the stronger peer in bf16.

The matmul FLOPs each engine executes in one step are counted with `torch.utils.flop_counter` (so an engine that
skips the output head at unlabelled positions is not credited with them), and the table gives the achieved FLOP/s as
a fraction of the peak this machine reaches on one large square matmul in `dtype` with the same threads.
"""

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

# the litgpt engine runs in litgpt's own environment, where Forge is not installed: its subprocess imports `model`
# from this checkout through PYTHONPATH
REPO_ROOT = Path(__file__).resolve().parent.parent

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_batches(data: str, data_dir: Path, count: int, micro_batch_size: int, seq_len: int) -> list[tuple]:
    """`count` (input_ids, labels) micro-batches, the same for every engine."""
    if data == "random":
        ids = torch.randint(0, 49152, (count, micro_batch_size, seq_len), generator=torch.Generator().manual_seed(0))
        return [(batch, batch.clone()) for batch in ids]
    from model.data.sft import load_dataset

    samples = load_dataset(data_dir / "train.pt")
    input_ids = torch.cat([s["input_ids"] for s in samples])
    labels = torch.cat([s["labels"] for s in samples])
    needed = count * micro_batch_size * seq_len
    if len(input_ids) < needed:
        raise SystemExit(f"{data_dir / 'train.pt'} has {len(input_ids)} tokens; the benchmark needs {needed}")
    shape = (count, micro_batch_size, seq_len)
    return list(zip(input_ids[:needed].view(shape), labels[:needed].view(shape)))


def forge_lora(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype, lora_dropout: float):
    """Forge's engine: the model with LoRA r=8 on every linear of the blocks, and its loss as finetune/lora.py
    computes it (the output head only where a label follows, its cross-entropy in chunks)."""
    from functools import partial

    from model import GPT
    from model.lora import LoRAConfig, inject_lora, mark_only_lora_as_trainable
    from model.training.loss import head_cross_entropy

    model = GPT.from_checkpoint(checkpoint_dir, device=device, dtype=dtype)
    inject_lora(model, LoRAConfig(r=8, alpha=16, dropout=lora_dropout, query=True, key=True, value=True,
                                  projection=True, mlp=True))
    mark_only_lora_as_trainable(model)

    def loss_fn(input_ids, labels):
        targets = labels[:, 1:]
        return model(input_ids, logits_mask=torch.nn.functional.pad(targets != -100, (0, 1)),
                     head_fn=partial(head_cross_entropy, targets=targets[targets != -100])).mean()

    return model, loss_fn


def run_engine(engine: str, checkpoint_dir: Path, micro_batch_size: int, seq_len: int, steps: int, warmup: int,
               dtype: str, device: str, data: str, data_dir: Path, lora_dropout: float) -> dict:
    from model.device import peak_memory_gb, resolve_device

    device_ = resolve_device(device)
    torch.manual_seed(0)
    if engine == "forge":
        model, loss_fn = forge_lora(checkpoint_dir, device_, DTYPES[dtype], lora_dropout)
    elif engine == "litgpt":
        import yaml
        from litgpt.lora import GPT as LitGPT
        from litgpt.lora import Config as LitConfig
        from litgpt.lora import mark_only_lora_as_trainable as lit_mark_only_lora_as_trainable
        from litgpt.utils import chunked_cross_entropy
        from safetensors.torch import load_file

        # our model_config.yaml and weight names follow litgpt's, so its GPT loads our checkpoint as it is
        ours = yaml.safe_load((checkpoint_dir / "model_config.yaml").read_text())
        fields = {k: v for k, v in ours.items() if k in LitConfig.__dataclass_fields__ and k != "rope_scaling"}
        config = LitConfig(**fields, padded_vocab_size=ours["vocab_size"], lora_r=8, lora_alpha=16,
                           lora_dropout=lora_dropout, lora_query=True, lora_key=True, lora_value=True,
                           lora_projection=True, lora_mlp=True)
        with torch.device(device_):
            model = LitGPT(config).to(DTYPES[dtype])
        state_dict = load_file(checkpoint_dir / "lit_model.safetensors")
        # litgpt has no tied embeddings: its converter copies the embedding into the head, as here
        state_dict.setdefault("lm_head.weight", state_dict["transformer.wte.weight"])
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if unexpected or any("lora_" not in key for key in missing):
            raise SystemExit(f"litgpt did not load the checkpoint: missing {missing[:5]}, unexpected {unexpected[:5]}")
        lit_mark_only_lora_as_trainable(model)

        def loss_fn(input_ids, labels):
            # litgpt's finetune/lora.py recipe: a chunked output head and cross-entropy
            logits = model(input_ids, lm_head_chunk_size=128)
            logits[-1] = logits[-1][..., :-1, :]
            return chunked_cross_entropy(logits, labels[..., 1:])
    else:
        import peft
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=DTYPES[dtype]).to(device_)
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout,
                                                          target_modules="all-linear", task_type="CAUSAL_LM"),
                                    autocast_adapter_dtype=engine == "transformers+peft")

        def loss_fn(input_ids, labels):
            return model(input_ids=input_ids, labels=labels).loss

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batches = make_batches(data, data_dir, warmup + steps, micro_batch_size, seq_len)
    times, losses = [], []
    flops = 0
    for i, (batch, labels) in enumerate(batches):
        batch, labels = batch.to(device_), labels.to(device_)
        if device_.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # the first warm-up step counts the matmul FLOPs of a step (all batches have the same shape)
        with FlopCounterMode(display=False) if i == 0 else contextlib.nullcontext() as counter:
            loss = loss_fn(batch, labels)
            loss.backward()
        if i == 0:
            flops = counter.get_total_flops()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device_.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    tokens = micro_batch_size * seq_len * steps
    return {"engine": engine, "tokens_per_s": tokens / sum(times), "peak_memory_gb": peak_memory_gb(device_),
            "trainable_params": sum(p.numel() for p in trainable), "first_loss": losses[0],
            "flop_per_s": flops * steps / sum(times)}


def matmul_peak_flop_per_s(dtype: torch.dtype, device: torch.device, size: int = 4096, repeats: int = 10) -> float:
    """The FLOP/s of one large square matmul, the best of `repeats`: the roof the engines are measured against."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    micro_batch_size: int = 4,
    seq_len: int = 256,
    steps: int = 5,
    warmup: int = 2,
    dtype: Literal["float32", "bfloat16"] = "bfloat16",
    rounds: int = 3,
    device: str = "auto",
    engine: Literal["all", "forge", "transformers+peft", "transformers+peft-bf16", "litgpt"] = "all",
    data: Literal["random", "tasks"] = "random",
    data_dir: Path = Path("data/tasks"),
    lora_dropout: float = 0.05,
    litgpt_python: Optional[Path] = None,
) -> None:
    """Compare LoRA training tokens/s and peak memory of Forge and transformers+PEFT (and litgpt, installed in its own
    virtual environment: `--litgpt_python /path/to/litgpt-venv/bin/python`)."""
    if engine != "all":
        print(json.dumps(run_engine(engine, checkpoint_dir, micro_batch_size, seq_len, steps, warmup, dtype, device,
                                    data, data_dir, lora_dropout)))
        return
    from model.device import resolve_device

    peak = matmul_peak_flop_per_s(DTYPES[dtype], resolve_device(device))
    runs: dict[str, list[dict]] = {"forge": [], "transformers+peft": [], "transformers+peft-bf16": []}
    if litgpt_python:
        runs["litgpt"] = []
    for _ in range(rounds):
        for name in runs:
            python = str(litgpt_python) if name == "litgpt" else sys.executable
            cmd = [python, __file__, "--engine", name, "--checkpoint_dir", str(checkpoint_dir),
                   "--micro_batch_size", str(micro_batch_size), "--seq_len", str(seq_len), "--steps", str(steps),
                   "--warmup", str(warmup), "--dtype", dtype, "--device", device, "--data", data,
                   "--data_dir", str(data_dir), "--lora_dropout", str(lora_dropout)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                           os.environ.get("PYTHONPATH")]))}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {name: dict(r[0], tokens_per_s=statistics.median(x["tokens_per_s"] for x in r),
                          flop_per_s=statistics.median(x["flop_per_s"] for x in r),
                          peak_memory_gb=max(x["peak_memory_gb"] for x in r)) for name, r in runs.items()}
    forge = results.pop("forge")
    print(f"checkpoint: {checkpoint_dir}  data: {data}  lora dropout: {lora_dropout}  dtype: {dtype}"
          f"  batch: {micro_batch_size} x {seq_len} tokens  steps: {steps}"
          f" (+{warmup} warm-up)  rounds: {rounds}  threads: {torch.get_num_threads()}")
    print(f"{dtype} matmul peak ({4096}^3): {peak / 1e12:.2f} TFLOP/s")
    print("| engine | tokens/s | peak memory (GB) | trainable parameters | first loss | % of matmul peak |")
    print("|---|---|---|---|---|---|")
    for r in (forge, *results.values()):
        print(f"| {r['engine']} | {r['tokens_per_s']:.1f} | {r['peak_memory_gb']:.2f} | {r['trainable_params']:,} |"
              f" {r['first_loss']:.3f} | {100 * r['flop_per_s'] / peak:.0f}% |")
    for r in results.values():
        print(f"speed ratio forge/{r['engine']}: {forge['tokens_per_s'] / r['tokens_per_s']:.2f}x;"
              f" memory ratio: {forge['peak_memory_gb'] / r['peak_memory_gb']:.2f}x")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
