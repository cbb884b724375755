"""Convert a Hugging Face checkpoint directory into a Forge checkpoint (in place).

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Reads config.json + the safetensors (or PyTorch .bin) weights, sharded or not, one tensor at a time, and writes
model_config.yaml, lit_model.safetensors and prompt_style.yaml beside them.
"""

from pathlib import Path
from typing import Literal, Optional

from model.cli import run_cli
from model.weights.convert import convert_hf_checkpoint as convert


def convert_hf_checkpoint(
    checkpoint_dir: Path,
    model_name: Optional[str] = None,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
) -> None:
    """Convert the HF weights in `checkpoint_dir` to Forge's format.

    Args:
        checkpoint_dir: Directory with config.json and the HF weights (as written by scripts/download.py).
        model_name: A name from the config table (`python scripts/download.py --repo_id list`); by default the
            directory's `org/name` is looked up, and an unknown model gets its config from config.json.
        dtype: Store the weights in this dtype; by default they keep the checkpoint's dtype.
    """
    config = convert(checkpoint_dir, model_name=model_name, dtype=dtype)
    print(f"Converted {config.name} ({config.hf_architecture}, {config.n_layer} layers) into {checkpoint_dir}")


if __name__ == "__main__":
    run_cli(convert_hf_checkpoint)
