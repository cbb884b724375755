"""Prepared classification data (`scripts/prepare_classification.py`): load the splits with their label names,
and batch them. The format is described in `model/workflows/classify.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch


def load_classification_data(data_dir: Path | str, split: str, vocab_size: Optional[int] = None) -> tuple[list[dict], list[str]]:
    """The samples of `data_dir/<split>.pt` and the label names of `data_dir/meta.json`, checked."""
    data_dir = Path(data_dir)
    path, meta_path = data_dir / f"{split}.pt", data_dir / "meta.json"
    for required in (path, meta_path):
        if not required.is_file():
            raise FileNotFoundError(f"{required} not found. Prepare the data first: `python"
                                    f" scripts/prepare_classification.py --checkpoint_dir <checkpoint> --out_dir {data_dir}`")
    labels = json.loads(meta_path.read_text()).get("labels")
    if not isinstance(labels, list) or len(labels) < 2:
        raise ValueError(f"{meta_path}: 'labels' must list at least two class names, got {labels!r}")
    try:
        samples = torch.load(path, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a prepared dataset saved with torch.save: {error}") from error
    if not isinstance(samples, list) or not samples:
        raise ValueError(f"{path} must hold a non-empty list of samples")
    for i, sample in enumerate(samples):
        where = f"{path}: sample {i}"
        if not isinstance(sample, dict) or not {"input_ids", "label"} <= sample.keys():
            raise ValueError(f"{where} must be a dict with 'input_ids' and 'label' (was it prepared by"
                             " scripts/prepare_classification.py?)")
        ids = sample["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.ndim != 1 or len(ids) == 0:
            raise ValueError(f"{where}: 'input_ids' must be a non-empty 1-D LongTensor")
        if not isinstance(sample["label"], int) or not 0 <= sample["label"] < len(labels):
            raise ValueError(f"{where}: label {sample['label']!r} is not an id of the {len(labels)} labels in {meta_path}")
        if vocab_size is not None and int(ids.max()) >= vocab_size:
            raise ValueError(f"{where} has the token id {int(ids.max())}, beyond the tokenizer's {vocab_size} tokens:"
                             " prepare the data again with the checkpoint you fine-tune (--checkpoint_dir)")
    return samples, labels


def collate(samples: list[dict], pad_id: int = 0, max_seq_length: int = -1, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """A batch: `input_ids` and `attention_mask` `(B, T)` padded on `padding_side`, and `labels` `(B,)` when the
    samples have them. The pad id never matters to the Classifier (it reads the mask)."""
    limit = max_seq_length if max_seq_length > 0 else None
    ids = [sample["input_ids"][:limit] for sample in samples]
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), longest), dtype=torch.bool)
    for row, x in enumerate(ids):
        where = slice(0, len(x)) if padding_side == "right" else slice(longest - len(x), longest)
        input_ids[row, where] = x
        attention_mask[row, where] = True
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if all("label" in sample for sample in samples):
        batch["labels"] = torch.tensor([sample["label"] for sample in samples], dtype=torch.long)
    return batch
