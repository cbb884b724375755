"""Generate text from a checkpoint.

    python generate/base.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --prompt "What is the capital of France?" --temperature 0

The prompt is wrapped in the checkpoint's prompt style (prompt_style.yaml; `--prompt_style default` sends it
raw). Tokens are printed as they are generated; speed and memory go to stderr.
"""

import sys
import time
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch

from model.cli import run_cli
from model.device import peak_memory_gb
from model.generate import generate, until_stop
from model.prompts import PromptStyle, load_prompt_style
from model.quantize import QUANTIZE_MODES
from model.tokenizer import Tokenizer
from model.weights.load import load_model


def stop_ids_and_strings(tokenizer: Tokenizer, style: PromptStyle) -> tuple[set[int], list[str]]:
    """What ends a reply: the tokenizer's EOS ids, the prompt style's end-of-turn markers that are single tokens
    (as ids), and the markers that take several tokens (as text)."""
    ids, strings = set(tokenizer.stop_ids), []
    for text in style.stop_tokens():
        encoded = tokenizer.encode(text, bos=False)
        if encoded.numel() == 1:
            ids.add(int(encoded))
        else:
            strings.append(text)
    return ids, strings


def stream_reply(model, tokenizer: Tokenizer, prompt_ids: torch.Tensor, stop_ids: set[int], stop_strings: list[str],
                 generated: list[int], **sampling) -> Iterator[str]:
    """The reply's text, piece by piece, without its stop marker; the token ids are appended to `generated`."""

    def tokens():
        for token_id in generate(model, prompt_ids, stop_ids=stop_ids, **sampling):
            if token_id in stop_ids:
                return
            generated.append(token_id)
            yield token_id

    return until_stop(tokenizer.decode_stream(tokens()), stop_strings)


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
        checkpoint_dir: A converted checkpoint directory.
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
            bnb.int8 (4-bit modes run on CPU too).
        device: "auto", "cpu", "cuda", "cuda:1", ...
    """
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"Unknown --quantize {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    check_sampling_flags(max_new_tokens, num_samples, temperature, top_p)
    style = PromptStyle.from_name(prompt_style) if prompt_style else load_prompt_style(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    t0 = time.perf_counter()
    model = load_model(checkpoint_dir, device=device, precision=precision, quantize=quantize)
    print(f"Loaded the model in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    generate_and_print(model, tokenizer, style, prompt, system, max_new_tokens, temperature, top_k, top_p, num_samples,
                       seed)


def generate_and_print(model, tokenizer: Tokenizer, style: PromptStyle, prompt: str, system: Optional[str],
                       max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: float, num_samples: int,
                       seed: int) -> None:
    """Stream `num_samples` replies to stdout, with speed and memory on stderr."""
    device = model.transformer.wte.weight.device
    encoded = tokenizer.encode(style.apply(prompt, system=system)).to(device)
    stop_ids, stop_strings = stop_ids_and_strings(tokenizer, style)
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
