"""Generate text from a checkpoint or any fine-tuning run.

    python generate/base.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --prompt "What is the capital of France?" --temperature 0
    python generate/base.py --checkpoint_dir out/lora --prompt "Reverse the word order: the cat sat"

`--checkpoint_dir` is a checkpoint or a fine-tuning run (a LoRA/DoRA, adapter or full fine-tune out_dir, its final/ or
a step-* directory): a run is attached to its base checkpoint (from its hparams.yaml) without merging, quantized as it
trained. The prompt is wrapped in the base checkpoint's prompt style (prompt_style.yaml; `--prompt_style default`
sends it raw). Tokens are printed as they are generated; speed and memory go to stderr.
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

from model.cli import run_cli
from model.device import peak_memory_gb
from model.generate import stop_markers, stream_reply
from model.prompts import PromptStyle, load_prompt_style
from model.quantize import QUANTIZE_MODES
from model.tokenizer import Tokenizer
from model.weights.load import load_any


def main(
    prompt: str = "What food do llamas eat?",
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 1234,
    system: Optional[str] = None,
    prompt_style: Optional[str] = None,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    quantize: Optional[str] = None,
    device: str = "auto",
) -> None:
    """Generate `num_samples` completions of `prompt`.

    Args:
        prompt: The user's message (wrapped in the prompt style).
        checkpoint_dir: A checkpoint or a fine-tuning run (its out_dir, final/ or a step-* directory).
        max_new_tokens: The most tokens to generate.
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample among the k most likely tokens only.
        top_p: Nucleus sampling: sample among the most likely tokens holding this much probability.
        num_samples: How many completions to generate.
        seed: Random seed for sampling.
        system: A system message, for prompt styles that have one (overrides the style's default).
        prompt_style: Override the checkpoint's prompt style ("default" = the raw prompt).
        precision: Weights' precision: 32-true, bf16-true or 16-true. Default: bf16 on GPU, fp32 on CPU.
        quantize: Load the linear layers quantized with bitsandbytes: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq,
            bnb.int8 (4-bit modes run on CPU too); default: a run's base as it trained, a checkpoint unquantized.
        device: "auto", "cpu", "cuda", "cuda:1", ...
    """
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"Unknown --quantize {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    check_sampling_flags(max_new_tokens, num_samples, temperature, top_p)
    t0 = time.perf_counter()
    loaded = load_any(checkpoint_dir, device=device, precision=precision, quantize=quantize)
    print(f"Loaded the {loaded.kind} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    style = PromptStyle.from_name(prompt_style) if prompt_style else load_prompt_style(loaded.checkpoint_dir)
    tokenizer = Tokenizer(loaded.checkpoint_dir)
    generate_and_print(loaded.model, tokenizer, style, prompt, system, max_new_tokens, temperature, top_k, top_p,
                       num_samples, seed)


def generate_and_print(model, tokenizer: Tokenizer, style: PromptStyle, prompt: str, system: Optional[str],
                       max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: float, num_samples: int,
                       seed: int) -> None:
    """Stream `num_samples` replies to stdout, with speed and memory on stderr."""
    device = model.transformer.wte.weight.device
    encoded = tokenizer.encode(style.apply(prompt, system=system)).to(device)
    stop_ids, stop_strings = stop_markers(tokenizer, style)
    generator = torch.Generator(device).manual_seed(seed)
    for _ in range(num_samples):
        t0 = time.perf_counter()
        generated: list[int] = []
        for piece in stream_reply(model, tokenizer, encoded, stop_ids, stop_strings, generated,
                                  max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=generator):
            print(piece, end="", flush=True)
        elapsed = time.perf_counter() - t0
        print(flush=True)
        print(f"Time for inference: {elapsed:.2f} s, {len(generated) / elapsed:.2f} tokens/s, {len(generated)} tokens",
              file=sys.stderr)
    print(f"Memory used: {peak_memory_gb(device):.02f} GB", file=sys.stderr)


def check_sampling_flags(max_new_tokens: int, num_samples: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1 or num_samples < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("max_new_tokens and num_samples must be >= 1, temperature >= 0 and 0 < top_p <= 1")


if __name__ == "__main__":
    run_cli(main)
