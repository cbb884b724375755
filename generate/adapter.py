"""Generate with a LLaMA-Adapter or LLaMA-Adapter V2 fine-tune, straight from its run directory.

    python generate/adapter.py --adapter_dir out/adapter/final --prompt "Reverse the word order: the cat sat"

The base checkpoint, the adapter's version and its shape come from the run's hparams.yaml (finetune/adapter.py and
finetune/adapter_v2.py write them); a run trained with --quantize is loaded quantized the same way unless --quantize
says otherwise.
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).parent))
from base import check_sampling_flags, generate_and_print  # noqa: E402

from model.adapter import ADAPTER_WEIGHTS, inject_adapter, load_adapter_state_dict
from model.cli import run_cli
from model.prompts import PromptStyle, load_prompt_style  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from model.weights.load import load_adapter_run, load_hparams, load_model, run_output_dir


def main(
    adapter_dir: Path,
    prompt: str = "What food do llamas eat?",
    checkpoint_dir: Optional[Path] = None,
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
    """Generate from a base model plus the adapter in `adapter_dir`.

    Args:
        adapter_dir: The run's output directory (or its final/ or a step-*/ directory holding adapter.safetensors).
        prompt: The user's message (wrapped in the prompt style).
        checkpoint_dir: The base checkpoint; default: the one the run was trained from.
        max_new_tokens: The most tokens to generate.
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample among the k most likely tokens only.
        top_p: Nucleus sampling threshold.
        num_samples: How many completions to generate.
        seed: Random seed for sampling.
        system: A system message (overrides the prompt style's default).
        prompt_style: Override the checkpoint's prompt style.
        precision: 32-true, bf16-true or 16-true. Default: bf16 on GPU, fp32 on CPU.
        quantize: Quantize the base (bnb.nf4, ...); default: as the run was trained.
        device: "auto", "cpu", "cuda", ...
    """
    check_sampling_flags(max_new_tokens, num_samples, temperature, top_p)
    run_dir = run_output_dir(adapter_dir, ADAPTER_WEIGHTS)
    hparams = load_hparams(run_dir)
    checkpoint_dir = checkpoint_dir or Path(hparams["checkpoint_dir"])
    quantize = quantize or hparams.get("quantize")
    if quantize == "bnb.int8-training":
        quantize = "bnb.int8"
    adapter_config, adapter = load_adapter_run(run_dir)
    style = PromptStyle.from_name(prompt_style) if prompt_style else load_prompt_style(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    t0 = time.perf_counter()
    model = load_model(checkpoint_dir, device=device, precision=precision, quantize=quantize)
    inject_adapter(model, adapter_config)
    load_adapter_state_dict(model, adapter)
    print(f"Loaded the model and adapter (v{adapter_config.version}) in {time.perf_counter() - t0:.2f} s",
          file=sys.stderr)
    generate_and_print(model, tokenizer, style, prompt, system, max_new_tokens, temperature, top_k, top_p, num_samples,
                       seed)


if __name__ == "__main__":
    run_cli(main)
