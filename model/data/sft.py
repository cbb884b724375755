"""Supervised fine-tuning data: encode (prompt, answer) pairs, save and load them, batch them.

Prepared data lives in `data/<dataset>/`, written by a `scripts/prepare_<dataset>.py --checkpoint_dir ...`:

    train.pt, test.pt   `torch.save` of a list of samples, loadable with `torch.load(path, weights_only=True)`.
                        A sample is a dict:
                          "input_ids"  LongTensor (T,)  the prompt's tokens followed by the answer's
                          "labels"     LongTensor (T,)  the training targets: input_ids with the prompt positions
                                                        set to -100 (IGNORE_INDEX) when the inputs are masked,
                                                        so the loss is on the answer only. Not shifted: the
                                                        model's output at position t is scored against labels[t + 1].
                          "prompt"     str   the rendered prompt, exactly the text a generation script feeds
                          "response"   str   the expected answer, without the end-of-turn marker
                          "truncated"  int   tokens cut off at the end to fit max_seq_length (0: none)
                          "task"       str   optional: which task or source the sample comes from
    meta.json           what the tokens mean: the checkpoint_dir and the vocab size of the tokenizer that made
                        them, the prompt style, max_seq_length, sample counts and truncation stats.

The ids only mean something to the tokenizer that made them, so a checkpoint with another tokenizer needs the
data prepared again; `load_dataset(path, vocab_size=...)` catches the common case of ids beyond the vocabulary.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Callable

import torch

from model.files import atomic_torch_save
from model.prompts import Message, PromptStyle
from model.tokenizer import Tokenizer

IGNORE_INDEX = -100  # the label of a position without loss (PyTorch's cross_entropy default ignore_index)
REQUIRED_KEYS = {"input_ids": torch.Tensor, "labels": torch.Tensor, "prompt": str, "response": str}
OPTIONAL_KEYS = {"truncated": int, "task": str}


def encode_example(
    tokenizer: Tokenizer,
    prompt_style: PromptStyle,
    instruction_or_messages: str | list[Message],
    response: str,
    system: str | None = None,
    mask_inputs: bool = True,
    max_seq_length: int = -1,
) -> dict:
    """One sample in the prepared format: the instruction (or a conversation ending with a user turn) and its
    answer, rendered with `prompt_style` and tokenized. With `mask_inputs` the loss is on the final answer and its
    end-of-turn marker only. `max_seq_length > 0` cuts the tokens to that length; "truncated" says how many went."""
    if not isinstance(response, str) or not response:
        raise ValueError(f"The response must be a non-empty string, got {response!r}")
    messages = (
        [{"role": "user", "content": instruction_or_messages}]
        if isinstance(instruction_or_messages, str)
        else list(instruction_or_messages)
    )
    segments = prompt_style.apply_turns(messages + [{"role": "assistant", "content": response}], system)
    answer_index = max(i for i, (_, is_answer) in enumerate(segments) if is_answer)
    # Earlier assistant turns of a conversation are context here; what follows the answer (ChatML's "\n" after
    # <|im_end|>) has no loss and nothing after it to predict, so it is left out.
    prompt = "".join(text for text, _ in segments[:answer_index])
    answer = segments[answer_index][0]
    # Styles that write an end-of-turn marker ("<|im_end|>", "</s>", ...) teach the model to stop with it; plain
    # text styles (default, alpaca, phi2, falcon) have none, and a model that never sees EOS never stops.
    append_eos = not answer.endswith(prompt_style.stop_tokens())
    if append_eos and tokenizer.eos_id is None:
        raise ValueError(
            f"The {prompt_style.name!r} prompt style ends an answer with the tokenizer's EOS token, but the tokenizer"
            f" in {tokenizer.checkpoint_dir} has none."
        )

    # The prompt is tokenized alone, so its tokens are exactly those a generation script feeds the model. The
    # answer's tokens are taken from the tokenization of the whole text rather than of the answer alone:
    # sentencepiece (and Llama's tokenizer.json) put a "▁" in front of every text they encode, so the answer
    # " Paris" alone gives ["▁", "▁Paris"] where the model sees and should write ["▁Paris"]. Only when the two
    # tokenizations disagree inside the prompt (a token spanning the boundary) do we tokenize the answer alone.
    prompt_ids = tokenizer.encode(prompt)
    full_ids = tokenizer.encode(prompt + answer, eos=append_eos)
    if torch.equal(full_ids[: len(prompt_ids)], prompt_ids):
        answer_ids = full_ids[len(prompt_ids):]
    else:
        answer_ids = tokenizer.encode(answer, bos=False, eos=append_eos)
    input_ids = torch.cat([prompt_ids, answer_ids])
    labels = input_ids.clone()
    if mask_inputs:
        labels[: len(prompt_ids)] = IGNORE_INDEX

    truncated = 0
    if 0 < max_seq_length < len(input_ids):
        truncated = len(input_ids) - max_seq_length
        # clone: a slice would keep (and torch.save would write) the whole original storage
        input_ids, labels = input_ids[:max_seq_length].clone(), labels[:max_seq_length].clone()
    return {"input_ids": input_ids, "labels": labels, "prompt": prompt, "response": response, "truncated": truncated}


def save_dataset(samples: list[dict], path: Path | str) -> None:
    """`torch.save` the samples through a temporary file and a rename: a killed run leaves no half-written file."""
    atomic_torch_save(samples, path)


def load_dataset(path: Path | str, vocab_size: int | None = None) -> list[dict]:
    """The samples of a prepared train.pt / test.pt, checked against the format (and against the tokenizer's
    `vocab_size` if given), so a wrong file fails here with its name rather than deep in the training loop."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist. Prepare the data first, e.g."
            f" `python scripts/prepare_tasks.py --checkpoint_dir <checkpoint> --out_dir {path.parent}`"
        )
    try:
        samples = torch.load(path, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a prepared dataset saved with torch.save: {error}") from error
    if not isinstance(samples, list):
        raise ValueError(f"{path} must hold a list of samples (dicts), got a {type(samples).__name__}")
    for i, sample in enumerate(samples):
        _check_sample(sample, f"{path}: sample {i}", vocab_size)
    return samples


def _check_sample(sample: object, where: str, vocab_size: int | None) -> None:
    if not isinstance(sample, dict):
        raise ValueError(f"{where} must be a dict with keys {', '.join(REQUIRED_KEYS)}, got a {type(sample).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in sample]
    if missing:
        raise ValueError(f"{where} lacks the key(s) {', '.join(missing)}; it has {', '.join(map(str, sample))}")
    for key, kind in {**REQUIRED_KEYS, **OPTIONAL_KEYS}.items():
        if key in sample and not isinstance(sample[key], kind):
            raise ValueError(f"{where}: {key!r} must be a {kind.__name__}, got a {type(sample[key]).__name__}")
    input_ids, labels = sample["input_ids"], sample["labels"]
    for key, tensor in (("input_ids", input_ids), ("labels", labels)):
        if tensor.dtype != torch.long or tensor.ndim != 1 or len(tensor) == 0:
            raise ValueError(
                f"{where}: {key!r} must be a non-empty 1-D LongTensor,"
                f" got {tensor.dtype} of shape {tuple(tensor.shape)}"
            )
    if len(input_ids) != len(labels):
        raise ValueError(f"{where}: 'input_ids' has {len(input_ids)} tokens but 'labels' {len(labels)}")
    label_ids = labels[labels != IGNORE_INDEX]
    lowest = min(input_ids.min().item(), label_ids.min().item() if len(label_ids) else 0)
    if lowest < 0:
        raise ValueError(f"{where} has the negative token id {lowest} (only masked labels may be {IGNORE_INDEX})")
    if vocab_size is not None:
        highest = max(input_ids.max().item(), label_ids.max().item() if len(label_ids) else 0)
        if highest >= vocab_size:
            raise ValueError(
                f"{where} has the token id {highest}, beyond the tokenizer's {vocab_size} tokens: the data was"
                " prepared with another tokenizer. Prepare it again with the checkpoint you fine-tune"
                " (`--checkpoint_dir` of the prepare script)."
            )


def get_collate_fn(
    pad_id: int = 0, ignore_index: int = IGNORE_INDEX, max_seq_length: int = -1
) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """A DataLoader collate_fn: samples cut to `max_seq_length` (if > 0), right-padded to the longest in the batch.

    Padding goes at the end, where a causal model's earlier positions never attend to it, and its labels are
    `ignore_index` (so are the masked prompt positions), so the pad id itself never reaches the loss.
    """

    def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
        limit = max_seq_length if max_seq_length > 0 else None
        input_ids = [sample["input_ids"][:limit] for sample in samples]
        labels = [sample["labels"][:limit] for sample in samples]
        longest = max(len(ids) for ids in input_ids)
        batch_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
        batch_labels = torch.full((len(samples), longest), ignore_index, dtype=torch.long)
        for row, (ids, targets) in enumerate(zip(input_ids, labels)):
            batch_ids[row, : len(ids)] = ids
            batch_labels[row, : len(targets)] = targets.masked_fill(targets == IGNORE_INDEX, ignore_index)
        return {"input_ids": batch_ids, "labels": batch_labels}

    return collate


# ---------------------------------------------------------------------------------------------------------- packing
def pack_samples(lengths: list[int], max_seq_length: int) -> list[list[int]]:
    """Group sample indices into packs of at most `max_seq_length` tokens in all (best-fit decreasing).

    Short instruction samples padded to the longest in a batch waste most of a batch on padding; packing several
    into one row wastes almost none. A sample longer than `max_seq_length` gets a pack of its own (the collate
    function cuts it as it would unpacked). The same lengths always give the same packs.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, pack index), sorted: the tightest pack that fits comes first
    for index in order:
        length = min(lengths[index], max_seq_length)
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, pack = free.pop(slot)
            packs[pack].append(index)
        else:
            room, pack = max_seq_length, len(packs)
            packs.append([index])
        if room - length > 0:
            bisect.insort(free, (room - length, pack))
    return packs


def get_packed_collate_fn(
    pad_id: int = 0, ignore_index: int = IGNORE_INDEX, max_seq_length: int = -1
) -> Callable[[list[list[dict]]], dict[str, torch.Tensor]]:
    """A collate_fn for packs (lists of samples, see `pack_samples`): each pack becomes one row, right-padded.

    Besides `input_ids` and `labels` it returns `segment_ids` `(B, T)` (the sample each token belongs to, -1 for
    padding) for `GPT.forward(..., segment_ids=...)`, which restarts positions and keeps attention inside each
    sample. The first label of every sample is `ignore_index`: it would be the target of the previous sample's last
    token, and unpacked it is never a target either, so each sample's loss is exactly its unpacked loss.
    """

    def collate(packs: list[list[dict]]) -> dict[str, torch.Tensor]:
        limit = max_seq_length if max_seq_length > 0 else None
        rows = []
        for pack in packs:
            pieces = [(sample["input_ids"][:limit], sample["labels"][:limit]) for sample in pack]
            ids = torch.cat([piece_ids for piece_ids, _ in pieces])[:limit]
            labels = torch.cat([piece_labels.masked_fill(piece_labels == IGNORE_INDEX, ignore_index)
                                .index_fill(0, torch.tensor([0]), ignore_index) for _, piece_labels in pieces])[:limit]
            segments = torch.cat([torch.full((len(piece_ids),), n) for n, (piece_ids, _) in enumerate(pieces)])[:limit]
            rows.append((ids, labels, segments))
        longest = max(len(ids) for ids, _, _ in rows)
        batch_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        batch_labels = torch.full((len(rows), longest), ignore_index, dtype=torch.long)
        batch_segments = torch.full((len(rows), longest), -1, dtype=torch.long)
        for row, (ids, labels, segments) in enumerate(rows):
            batch_ids[row, : len(ids)] = ids
            batch_labels[row, : len(labels)] = labels
            batch_segments[row, : len(segments)] = segments
        return {"input_ids": batch_ids, "labels": batch_labels, "segment_ids": batch_segments}

    return collate
