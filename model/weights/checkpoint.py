"""A converted checkpoint directory: `model_config.yaml` and `lit_model.safetensors` (or, above `shard_size_bytes`,
`lit_model-0000i-of-0000n.safetensors` shards listed in `lit_model.safetensors.index.json`) beside the Hugging Face
files it came from (config, tokenizer, generation config).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.files import atomic_write_text, publish_file

LIT_WEIGHTS = "lit_model.safetensors"


LIT_INDEX = "lit_model.safetensors.index.json"
# the Hugging Face tokenizer and generation files, which an export to transformers carries
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
# what makes a checkpoint directory complete besides its weights and model_config.yaml
CHECKPOINT_FILES = TOKENIZER_FILES + ("prompt_style.yaml", "chat_template.jinja")


def require_checkpoint(checkpoint_dir: Path) -> None:
    """Raise the one clear error for a directory that is not a converted checkpoint."""
    if not (Path(checkpoint_dir) / "model_config.yaml").is_file():
        raise FileNotFoundError(
            f"{Path(checkpoint_dir) / 'model_config.yaml'} not found. Convert the checkpoint first:"
            f" `python scripts/convert_hf_checkpoint.py --checkpoint_dir {checkpoint_dir}`"
        )


def lit_weight_files(checkpoint_dir: Path) -> list[Path]:
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / LIT_WEIGHTS).is_file():
        return [checkpoint_dir / LIT_WEIGHTS]
    if (checkpoint_dir / LIT_INDEX).is_file():
        index = json.loads((checkpoint_dir / LIT_INDEX).read_text())
        return [checkpoint_dir / name for name in sorted(set(index["weight_map"].values()))]
    raise FileNotFoundError(
        f"{checkpoint_dir / LIT_WEIGHTS} not found. Convert the checkpoint first:"
        f" `python scripts/convert_hf_checkpoint.py --checkpoint_dir {checkpoint_dir}`"
    )


def load_state_dict(
    checkpoint_dir: Path | str, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None
) -> dict[str, torch.Tensor]:
    state_dict = {}
    for path in lit_weight_files(Path(checkpoint_dir)):
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint shard {path} is missing")
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    state_dict[key] = tensor
        except SafetensorError as e:
            raise ValueError(f"{path} is not a valid safetensors file ({e}); convert or download it again") from e
    return state_dict


def save_sharded(
    tensors: Iterator[tuple[str, torch.Tensor]], checkpoint_dir: Path, shard_size_bytes: int = 4 * 2**30
) -> None:
    """Stream `(name, tensor)` pairs into `lit_model.safetensors` (or shards), holding at most one shard in RAM.

    Shards are written to a temporary directory and moved into place at the end, so an interrupted conversion
    leaves the directory as it was.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tmp_dir = Path(tempfile.mkdtemp(dir=checkpoint_dir, prefix=".convert-"))
    try:
        shards: list[dict[str, str]] = []
        current: dict[str, torch.Tensor] = {}
        current_bytes = 0

        def flush():
            nonlocal current, current_bytes
            save_file(current, tmp_dir / f"shard-{len(shards)}")
            shards.append({name: "" for name in current})
            current, current_bytes = {}, 0

        for name, tensor in tensors:
            size = tensor.numel() * tensor.element_size()
            if current and current_bytes + size > shard_size_bytes:
                flush()
            current[name] = tensor.contiguous()
            current_bytes += size
        if current or not shards:
            flush()
        for stale in [checkpoint_dir / LIT_WEIGHTS, checkpoint_dir / LIT_INDEX, *checkpoint_dir.glob("lit_model-*.safetensors")]:
            stale.unlink(missing_ok=True)
        if len(shards) == 1:
            publish_file(tmp_dir / "shard-0", checkpoint_dir / LIT_WEIGHTS)
            return
        weight_map = {}
        for i, names in enumerate(shards):
            file_name = f"lit_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            publish_file(tmp_dir / f"shard-{i}", checkpoint_dir / file_name)
            weight_map.update({name: file_name for name in names})
        atomic_write_text(checkpoint_dir / LIT_INDEX, json.dumps({"weight_map": weight_map}, indent=2))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def copy_checkpoint_files(source_dir: Path, out_dir: Path, names: tuple[str, ...] = CHECKPOINT_FILES) -> None:
    """Copy the tokenizer, generation config and prompt style that `source_dir` has into `out_dir`."""
    for name in names:
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, Path(out_dir) / name)


def write_checkpoint_dir(tensors: Iterator[tuple[str, torch.Tensor]], config, source_dir: Path, out_dir: Path,
                         extra: Optional[Callable[[Path], None]] = None) -> None:
    """A complete checkpoint directory `out_dir` (weights, model_config.yaml, the tokenizer and prompt style of
    `source_dir`), assembled beside it and renamed into place, so a kill never leaves half a checkpoint. A tied
    model's head is saved once, as the embedding (loading re-ties it). `extra(directory)` adds files of its own."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = ((k, v) for k, v in tensors if not (config.tie_embeddings and k == "lm_head.weight"))
        save_sharded(tensors, tmp)
        config.save(tmp)
        copy_checkpoint_files(source_dir, tmp)
        if extra is not None:
            extra(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
