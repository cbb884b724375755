"""Preference pairs: encode, save, load and batch them.

Prepared data (`scripts/prepare_preferences.py`) lives in `data/<name>/train.pt, test.pt, meta.json`; a sample is a
dict (loadable with `torch.load(path, weights_only=True)`):

    "prompt"                str    the rendered prompt, as a generation script feeds it
    "chosen", "rejected"    str    the two answers, without the end-of-turn marker
    "chosen_input_ids"      LongTensor (T,)  prompt tokens + chosen answer tokens (+ end-of-turn)
    "chosen_labels"         LongTensor (T,)  the same with the prompt positions at -100 (not shifted)
    "rejected_input_ids"    LongTensor (T,)  prompt tokens + rejected answer tokens
    "rejected_labels"       LongTensor (T,)
    "truncated"             int    tokens cut off the longer of the two to fit max_seq_length (0: none)
    "task"                  str    optional: the task or source of the pair

"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from model.data.sft import IGNORE_INDEX
from model.files import atomic_torch_save

PAIR_KEYS = {"prompt": str, "chosen": str, "rejected": str, "chosen_input_ids": torch.Tensor,
             "chosen_labels": torch.Tensor, "rejected_input_ids": torch.Tensor, "rejected_labels": torch.Tensor}


OPTIONAL_KEYS = {"truncated": int, "task": str}


def encode_pair(tokenizer, prompt_style, prompt, chosen: str, rejected: str, system: Optional[str] = None,
                max_seq_length: int = -1) -> dict:
    """One prepared pair: the prompt (a string or a conversation ending with a user turn) with each answer, encoded
    exactly as SFT data is (`model.data.encode_example`), so both share the prompt's tokens and the loss sees only
    the answers."""
    from model.data.sft import encode_example

    chosen_sample = encode_example(tokenizer, prompt_style, prompt, chosen, system, True, max_seq_length)
    rejected_sample = encode_example(tokenizer, prompt_style, prompt, rejected, system, True, max_seq_length)
    return {
        "prompt": chosen_sample["prompt"], "chosen": chosen, "rejected": rejected,
        "chosen_input_ids": chosen_sample["input_ids"], "chosen_labels": chosen_sample["labels"],
        "rejected_input_ids": rejected_sample["input_ids"], "rejected_labels": rejected_sample["labels"],
        "truncated": max(chosen_sample["truncated"], rejected_sample["truncated"]),
    }


def save_pairs(samples: list[dict], path: Path | str) -> None:
    """`torch.save` through a temporary file and a rename (same bytes for the same samples)."""
    atomic_torch_save(samples, Path(path))


def load_pairs(path: Path | str, vocab_size: Optional[int] = None) -> list[dict]:
    """The pairs of a prepared train.pt / test.pt, checked, so a wrong file fails here with its name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist. Prepare preference data first, e.g."
            f" `python scripts/prepare_preferences.py --checkpoint_dir <checkpoint> --out_dir {path.parent}`"
        )
    try:
        samples = torch.load(path, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a prepared dataset saved with torch.save: {error}") from error
    if not isinstance(samples, list) or not samples:
        raise ValueError(f"{path} must hold a non-empty list of preference pairs")
    for i, sample in enumerate(samples):
        where = f"{path}: pair {i}"
        if not isinstance(sample, dict):
            raise ValueError(f"{where} must be a dict, got a {type(sample).__name__}")
        missing = [key for key in PAIR_KEYS if key not in sample]
        if missing:
            hint = (" It looks like SFT data (input_ids/labels): prepare preference pairs with"
                    " scripts/prepare_preferences.py." if "input_ids" in sample else "")
            raise ValueError(f"{where} lacks the key(s) {', '.join(missing)}.{hint}")
        for key, kind in {**PAIR_KEYS, **OPTIONAL_KEYS}.items():
            if key in sample and not isinstance(sample[key], kind):
                raise ValueError(f"{where}: {key!r} must be a {kind.__name__}, got a {type(sample[key]).__name__}")
        for side in ("chosen", "rejected"):
            ids, labels = sample[f"{side}_input_ids"], sample[f"{side}_labels"]
            if ids.dtype != torch.long or ids.ndim != 1 or ids.shape != labels.shape or labels.dtype != torch.long:
                raise ValueError(f"{where}: {side}_input_ids and {side}_labels must be 1-D LongTensors of equal length")
            if vocab_size is not None and int(ids.max()) >= vocab_size:
                raise ValueError(
                    f"{where} has the token id {int(ids.max())}, beyond the tokenizer's {vocab_size} tokens: the data"
                    " was prepared with another tokenizer. Prepare it again with --checkpoint_dir of this model."
                )
    return samples


def with_answers(samples: list[dict], max_seq_length: int, path: Path, log: Callable[[str], None]) -> list[dict]:
    """The pairs that keep at least one answer token on both sides within `max_seq_length`; the others (the prompt
    alone fills the window) are dropped with a count, and an error if none are left."""
    def answered(labels):
        return bool((labels[1:max_seq_length] != IGNORE_INDEX).any())  # position 0 is never predicted

    kept = [s for s in samples if answered(s["chosen_labels"]) and answered(s["rejected_labels"])]
    if not kept:
        longest = max(len(s["chosen_input_ids"]) for s in samples)
        raise ValueError(f"--max_seq_length {max_seq_length} cuts off an answer of every pair in {path}; raise it"
                         f" (the longest chosen sample has {longest} tokens)")
    if len(kept) < len(samples):
        log(f"Skipping {len(samples) - len(kept)} of {len(samples)} pairs of {path}: an answer has no token within"
            f" --max_seq_length {max_seq_length}")
    return kept


def collate_pairs(samples: list[dict], max_seq_length: int = -1, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One batch of 2B rows, the B chosen sequences first and then the B rejected ones, cut to `max_seq_length`
    (if > 0) and right-padded (labels -100 on the padding), so a single forward pass scores both sides."""
    limit = max_seq_length if max_seq_length > 0 else None
    ids = [s["chosen_input_ids"][:limit] for s in samples] + [s["rejected_input_ids"][:limit] for s in samples]
    labels = [s["chosen_labels"][:limit] for s in samples] + [s["rejected_labels"][:limit] for s in samples]
    longest = max(len(row) for row in ids)
    batch_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    batch_labels = torch.full((len(ids), longest), IGNORE_INDEX, dtype=torch.long)
    for row, (row_ids, row_labels) in enumerate(zip(ids, labels)):
        batch_ids[row, : len(row_ids)] = row_ids
        batch_labels[row, : len(row_labels)] = row_labels
    return {"input_ids": batch_ids, "labels": batch_labels}


def pair_lengths(samples: list[dict], max_seq_length: int) -> list[int]:
    return [min(max(len(s["chosen_input_ids"]), len(s["rejected_input_ids"])), max_seq_length) for s in samples]


def pair_tokens(samples: list[dict], max_seq_length: int) -> int:
    """The real tokens of `collate_pairs(samples, max_seq_length)`: both sequences of every pair, padding excluded."""
    return sum(min(len(s["chosen_input_ids"]), max_seq_length) + min(len(s["rejected_input_ids"]), max_seq_length)
               for s in samples)
