"""Download a checkpoint from the Hugging Face Hub and convert it.

    python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct
    python scripts/download.py --repo_id list          # the models with a named config

Only what is needed is fetched: config, tokenizer and the weights (safetensors when the repo has them, else
PyTorch .bin files). Gated models (Llama, some Mistral) need an accepted licence and a token: `--access_token`
or the HF_TOKEN environment variable. Any repo of a supported architecture works, not only the named ones.
"""

import os
import sys
from pathlib import Path
from typing import Literal, Optional

from model.cli import run_cli
from model.config import name_to_config
from model.weights.convert import convert_hf_checkpoint

SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def files_to_download(repo_files: list[str]) -> list[str]:
    """The config/tokenizer files plus one format of weights: safetensors if present, else .bin."""
    # Mistral repos also hold `consolidated.safetensors`, the same weights in Mistral's own format
    top_level = [f for f in repo_files if "/" not in f and not f.startswith("consolidated")]
    safetensors = [f for f in top_level if f.endswith(".safetensors") or f.endswith(".safetensors.index.json")]
    weights = safetensors or [f for f in top_level if f.startswith("pytorch_model") and (f.endswith(".bin") or f.endswith(".bin.index.json"))]
    if not weights:
        raise ValueError("The repo has no safetensors or pytorch_model*.bin weights at its top level")
    return [f for f in top_level if f in SMALL_FILES] + weights


def download(
    repo_id: str,
    checkpoint_dir: Path = Path("checkpoints"),
    access_token: Optional[str] = None,
    convert: bool = True,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    model_name: Optional[str] = None,
) -> None:
    """Download `repo_id` into `checkpoint_dir/ORG/NAME` and convert it to a Forge checkpoint.

    Args:
        repo_id: "ORG/NAME" on the Hugging Face Hub, or "list" to print the models with a named config.
        checkpoint_dir: Root folder for checkpoints.
        access_token: Hugging Face token, for gated models (default: $HF_TOKEN).
        convert: Convert to Forge's format after downloading.
        dtype: Store the converted weights in this dtype (default: as downloaded).
        model_name: A named config to use instead of looking up `repo_id` (e.g. for a fine-tune of a listed model).
    """
    if repo_id == "list":
        width = max(len(name) for name in name_to_config)
        for name, config in name_to_config.items():
            print(f"{name:<{width}}  {config.hf_repo}")
        return
    access_token = access_token or os.getenv("HF_TOKEN")
    if repo_id.count("/") != 1:
        raise ValueError(f"--repo_id must look like ORG/NAME, got {repo_id!r} (`--repo_id list` shows the known ones)")

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        files = files_to_download(HfApi(token=access_token).list_repo_files(repo_id))
        local_dir = checkpoint_dir / repo_id
        print(f"Downloading {len(files)} files of {repo_id} into {local_dir}", file=sys.stderr)
        snapshot_download(repo_id, local_dir=local_dir, allow_patterns=files, token=access_token)
    except GatedRepoError:
        raise ValueError(
            f"{repo_id} is gated. Accept its licence at https://huggingface.co/{repo_id}, then pass"
            " `--access_token hf_...` or set HF_TOKEN."
        ) from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"{repo_id} was not found on the Hugging Face Hub (or it is private: pass --access_token)."
        ) from None
    except ValueError:
        raise
    except Exception as e:  # network errors come from several libraries (httpx, requests, huggingface_hub)
        raise ValueError(
            f"Could not reach the Hugging Face Hub to download {repo_id} ({type(e).__name__}: {e}). Offline, copy the"
            f" model's files into {checkpoint_dir / repo_id} and run `python scripts/convert_hf_checkpoint.py"
            f" --checkpoint_dir {checkpoint_dir / repo_id}`, or convert a GGUF file with"
            " `python scripts/convert_gguf_checkpoint.py`."
        ) from None

    if convert:
        config = convert_hf_checkpoint(local_dir, model_name=model_name, dtype=dtype)
        print(f"Converted {config.name} ({config.hf_architecture}, {config.n_layer} layers) into {local_dir}")


if __name__ == "__main__":
    run_cli(download)
