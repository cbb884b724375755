"""Peak memory per rank of a LoRA run: one process vs `--strategy fsdp` on N processes, same model, one sample per
rank per step.

    python benchmarks/fsdp_memory.py --tokenizer_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --data_dir data/tasks --work_dir /tmp/fsdp_memory

The model has the shape of `--model_name` (default Llama-3-8B's width: n_embd 4096, 32 heads, 8 KV groups, MLP
14336, vocab 128256) with `--n_layer` random blocks, written in bf16 as a converted checkpoint in `work_dir` (the tokenizer files come from
`tokenizer_dir`; the data prepared with that tokenizer fits the larger vocabulary). finetune/lora.py then trains
`--max_steps` steps with `--precision`, once on one process and once with `--strategy fsdp --devices N` (CPU
processes on a machine without a GPU), each rank recording its peak resident memory (CPU) or peak allocated GPU
memory, and the bytes of the weights it holds (its shards under FSDP). Writes `work_dir/fsdp_memory.json` and prints
a markdown table.
"""

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent


def build_checkpoint(tokenizer_dir: Path, checkpoint_dir: Path, model_name: str, n_layer: Optional[int]) -> None:
    from model.config import Config
    from model.gpt import GPT
    from model.weights.checkpoint import copy_checkpoint_files, save_sharded

    if (checkpoint_dir / "model_config.yaml").is_file():
        return
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    config = Config.from_name(model_name, **({"n_layer": n_layer} if n_layer else {}))
    with torch.device("meta"):
        model = GPT(config)
    generator = torch.Generator().manual_seed(0)

    def tensors():  # one random tensor at a time, so building the checkpoint never holds the model
        for name, param in model.state_dict().items():
            if config.tie_embeddings and name == "lm_head.weight":
                continue
            scale = 1.0 if name.endswith("norm_1.weight") or name.endswith("norm_2.weight") or "ln_f" in name else 0.02
            tensor = torch.randn(param.shape, generator=generator) * scale
            yield name, (tensor.abs() if scale == 1.0 else tensor).to(torch.bfloat16)

    save_sharded(tensors(), checkpoint_dir)
    config.save(checkpoint_dir)
    copy_checkpoint_files(tokenizer_dir, checkpoint_dir)


def record_run(record_dir: Path, flags: list[str]) -> None:
    """finetune/lora.py with `flags`; every rank writes its peak memory and the bytes of its weights."""
    import importlib.util

    from model.cli import run_cli
    from model.device import peak_memory_gb

    spec = importlib.util.spec_from_file_location("lora_script", ROOT / "finetune/lora.py")
    lora = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lora)
    train = lora.train

    def recording_train(fabric, state, *args, **kwargs):
        from torch.distributed.tensor import DTensor

        train(fabric, state, *args, **kwargs)
        from model.quantize import is_nf4

        params = list(state["model"].parameters())
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        # an NF4 weight's bytes are its 4-bit data, int8 block scales and their scales, not numel x its float dtype
        nbytes = [sum(t.numel() * t.element_size() for t in (p.quantized_data, p.quantized_scalers,
                                                            p.quantization_factor)) if is_nf4(p)
                  else p.numel() * p.element_size() for p in local]
        record = {
            "rank": fabric.global_rank, "world_size": fabric.world_size,
            "peak_memory_gb": peak_memory_gb(fabric.device),
            "cpu_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "weights_gb": sum(nbytes) / 2**30,
            # now, not peak: anonymous memory vs pages of memory-mapped files (a one-process run maps the weights)
            **{key: int(line.split()[1]) / 2**20 for line in Path("/proc/self/status").read_text().splitlines()
               for key in ("RssAnon", "RssFile") if line.startswith(key + ":")},
        }
        (record_dir / f"rank{fabric.global_rank}.json").write_text(json.dumps(record))

    lora.train = recording_train
    run_cli(lora.setup, flags)


def main(tokenizer_dir: Path, data_dir: Path, work_dir: Path, model_name: str = "Meta-Llama-3-8B",
         n_layer: Optional[int] = 2, devices: int = 2,
         precision: str = "bf16-true", max_steps: int = 2, max_seq_length: int = 128,
         quantize: Optional[str] = None) -> None:
    """Build the checkpoint, run one process and FSDP on `devices` processes, print the table.

    Args:
        tokenizer_dir: A checkpoint whose tokenizer prepared `data_dir`.
        data_dir: Prepared SFT data (train.pt, test.pt).
        work_dir: Where the checkpoint, the runs and fsdp_memory.json go.
        model_name: The configuration (model/config.py) whose shape the random checkpoint takes.
        n_layer: Transformer blocks (Llama-3-8B: ~218M parameters each); default: the configuration's.
        devices: FSDP processes.
        precision: The runs' --precision.
        max_steps: Optimizer steps per run.
        max_seq_length: Longest sample, in tokens.
        quantize: The runs' --quantize (ao.nf4: QLoRA, the one 4-bit format FSDP shards); default: none.
    """
    checkpoint_dir = work_dir / "checkpoint"
    build_checkpoint(tokenizer_dir, checkpoint_dir, model_name, n_layer)
    results = {}
    for name, strategy, n in (("1 process", "auto", 1), (f"FSDP, {devices} processes", "fsdp", devices)):
        suffix = f"{n}-{quantize}" if quantize else f"{n}"
        record_dir, out_dir = work_dir / f"record-{suffix}", work_dir / f"run-{suffix}"
        record_dir.mkdir(parents=True, exist_ok=True)
        flags = ["--checkpoint_dir", checkpoint_dir, "--data_dir", data_dir, "--out_dir", out_dir, "--devices", n,
                 "--strategy", strategy, "--precision", precision, "--max_steps", max_steps, "--micro_batch_size", 1,
                 "--global_batch_size", n, "--max_seq_length", max_seq_length, "--lora_mlp", "true",
                 "--eval_interval", 1000, "--eval_iters", 1, "--save_interval", 1000, "--resume", "false",
                 *(["--quantize", quantize] if quantize else [])]
        subprocess.run([sys.executable, __file__, "--record", record_dir, *map(str, flags)], check=True, cwd=ROOT)
        results[name] = [json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(n)]
    (work_dir / f"fsdp_memory{'-' + quantize if quantize else ''}.json").write_text(json.dumps(results, indent=2))
    print("| run | rank | weights held (GB) | peak memory (GB) |\n|---|---|---|---|")
    for name, ranks in results.items():
        for r in ranks:
            print(f"| {name} | {r['rank']} | {r['weights_gb']:.2f} | {r['peak_memory_gb']:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--record":
        record_run(Path(sys.argv[2]), sys.argv[3:])
    else:
        from model.cli import run_cli

        run_cli(main)
