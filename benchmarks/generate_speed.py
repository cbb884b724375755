"""Greedy generation speed and peak memory: Forge vs transformers' `generate`, same checkpoint, same run.

    python benchmarks/generate_speed.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

The checkpoint directory must hold both formats (a GGUF conversion or `download.py` leaves the HF files beside
ours). Each engine runs in its own process, so peak memory (GPU: max allocated; CPU: peak resident set) is its
own; both generate exactly `max_new_tokens` tokens from the same prompt with the same dtype and thread count,
after one warm-up; the engines alternate over several rounds and the median is reported.
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_engine(engine: str, checkpoint_dir: Path, prompt: str, max_new_tokens: int, dtype: str, repeats: int,
               device: str) -> dict:
    from model.device import peak_memory_gb, resolve_device
    from model.prompts import load_prompt_style
    from model.tokenizer import Tokenizer

    device_ = resolve_device(device)
    prompt_ids = Tokenizer(checkpoint_dir).encode(load_prompt_style(checkpoint_dir).apply(prompt)).to(device_)
    if engine == "forge":
        from model import GPT
        from model.generate import generate

        model = GPT.from_checkpoint(checkpoint_dir, device=device_, dtype=DTYPES[dtype])

        def once() -> list[int]:
            return list(generate(model, prompt_ids, max_new_tokens, temperature=0.0))
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=DTYPES[dtype]).to(device_).eval()
        # no EOS: both engines generate exactly max_new_tokens (min_new_tokens would add a logits processor)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0

        def once() -> list[int]:
            with torch.inference_mode():
                out = model.generate(prompt_ids.unsqueeze(0), max_new_tokens=max_new_tokens, do_sample=False,
                                     attention_mask=torch.ones_like(prompt_ids).unsqueeze(0))
            return out[0, prompt_ids.numel():].tolist()

    tokens = once()  # warm-up
    times = []
    for _ in range(repeats):
        if device_.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = once()
        if device_.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {"engine": engine, "tokens": len(tokens), "seconds": seconds, "tokens_per_s": len(tokens) / seconds,
            "peak_memory_gb": peak_memory_gb(device_), "token_ids": tokens}


def main(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    prompt: str = "Explain in a few sentences why the sky is blue.",
    max_new_tokens: int = 128,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    repeats: int = 3,
    device: str = "auto",
    rounds: int = 3,
    engine: Literal["both", "forge", "transformers"] = "both",
) -> None:
    """Compare tokens/s and peak memory of Forge and transformers on the same checkpoint.

    Each of `rounds` rounds runs both engines in turn, each in a fresh process doing one warm-up and `repeats`
    timed generations; the table shows the median over rounds."""
    if engine != "both":
        print(json.dumps(run_engine(engine, checkpoint_dir, prompt, max_new_tokens, dtype, repeats, device)))
        return
    # the engines take turns, so a change in the machine's background load hits both alike
    runs: dict[str, list[dict]] = {"forge": [], "transformers": []}
    for _ in range(rounds):
        for name in runs:
            cmd = [sys.executable, __file__, "--engine", name, "--checkpoint_dir", str(checkpoint_dir), "--prompt", prompt,
                   "--max_new_tokens", str(max_new_tokens), "--dtype", dtype, "--repeats", str(repeats), "--device", device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {name: dict(r[0], tokens_per_s=statistics.median(x["tokens_per_s"] for x in r),
                          peak_memory_gb=max(x["peak_memory_gb"] for x in r)) for name, r in runs.items()}
    forge, hf = results["forge"], results["transformers"]
    same = forge["token_ids"] == hf["token_ids"]
    print(f"checkpoint: {checkpoint_dir}  dtype: {dtype}  new tokens: {max_new_tokens}  threads: {torch.get_num_threads()}"
          f"  rounds: {rounds} x {repeats}")
    print("| engine | tokens/s | peak memory (GB) |")
    print("|---|---|---|")
    for r in (forge, hf):
        print(f"| {r['engine']} | {r['tokens_per_s']:.1f} | {r['peak_memory_gb']:.2f} |")
    print(f"speed ratio forge/transformers: {forge['tokens_per_s'] / hf['tokens_per_s']:.2f}x;"
          f" memory ratio: {forge['peak_memory_gb'] / hf['peak_memory_gb']:.2f}x; identical greedy tokens: {same}")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
