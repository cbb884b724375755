"""Generate with a full fine-tune (finetune/full.py), from its run directory.

    python generate/full.py --checkpoint_dir out/full --prompt "Reverse the word order: the cat sat"

A full fine-tune's `final/` is a complete checkpoint directory, so this is generate/base.py pointed at it: give the
run's out_dir or its final/.
"""

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).parent))
from base import main as generate_from_checkpoint  # noqa: E402

from model.cli import run_cli


def main(
    checkpoint_dir: Path,
    prompt: str = "What food do llamas eat?",
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
    """Generate `num_samples` completions of `prompt` with the fine-tuned model.

    Args:
        checkpoint_dir: The run's output directory, or its final/.
        prompt: The user's message (wrapped in the prompt style).
        max_new_tokens: The most tokens to generate.
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample among the k most likely tokens only.
        top_p: Nucleus sampling threshold.
        num_samples: How many completions to generate.
        seed: Random seed for sampling.
        system: A system message (overrides the prompt style's default).
        prompt_style: Override the checkpoint's prompt style.
        precision: 32-true, bf16-true or 16-true. Default: bf16 on GPU, fp32 on CPU.
        quantize: Load the linear layers quantized: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8.
        device: "auto", "cpu", "cuda", ...
    """
    generate_from_checkpoint(prompt, finetuned_checkpoint(checkpoint_dir), max_new_tokens, temperature, top_k, top_p,
                             num_samples, seed, system, prompt_style, precision, quantize, device)


def finetuned_checkpoint(path: Path) -> Path:
    """`path` if it is a checkpoint directory, else the final/ of the run in `path`."""
    for candidate in (path, path / "final"):
        if (candidate / "model_config.yaml").is_file():
            return candidate
    if (path / "training_state.pt").is_file():
        raise FileNotFoundError(
            f"{path} is a step checkpoint of a full fine-tune: it holds the training state for --resume only. Generate"
            f" from the run's final/ once it has finished (`--checkpoint_dir {path.parent}`)"
        )
    raise FileNotFoundError(
        f"No model_config.yaml in {path} or {path / 'final'}: pass the out_dir of a finished finetune/full.py run"
        " (or its final/)"
    )


if __name__ == "__main__":
    run_cli(main)
