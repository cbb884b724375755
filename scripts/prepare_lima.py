"""Prepare LIMA ("Less Is More for Alignment", Zhou et al. 2023: 1,030 carefully chosen conversations) for fine-tuning.

    HF_TOKEN=... python scripts/prepare_lima.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

The dataset GAIR/lima is gated: accept its terms on its Hugging Face page and set HF_TOKEN (or run
`huggingface-cli login`); or pass a local copy of its train.jsonl with --data_file. A row is
`{"conversations": [user, assistant, user, assistant, ...], "source": ...}` (plain strings taking turns); most are a
single exchange, a few are multi-turn, and those learn every assistant turn (or, with
--include_multiturn_conversations false, are left out). The test file of the release has no answers, so test.pt is
held out from the training rows. Each sample's task is its source (stackexchange, wikihow, ...).
"""

from pathlib import Path
from typing import Optional

from model.cli import run_cli
from model.data.prepare import (
    check_prepare_flags,
    conversation_example,
    hub_dataset_file,
    optional_field,
    prepare_sft_dataset,
)
from model.data.records import RecordError, read_records
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer

REPO_ID = "GAIR/lima"
FILENAME = "train.jsonl"


def prepare_lima(
    checkpoint_dir: Path,
    out_dir: Path = Path("data/lima"),
    data_file: Optional[Path] = None,
    include_multiturn_conversations: bool = True,
    max_seq_length: int = -1,
    val_split_fraction: float = 0.05,
    seed: int = 42,
    mask_inputs: bool = True,
    reverse_instructions: bool = False,
) -> None:
    """Tokenize LIMA for `checkpoint_dir` and write train.pt, test.pt and meta.json to `out_dir`.

    Args:
        checkpoint_dir: the checkpoint to fine-tune: its tokenizer and prompt style encode the samples.
        out_dir: where to write train.pt, test.pt and meta.json.
        data_file: a local copy of LIMA's train.jsonl; without it, it is downloaded from the Hub (needs HF_TOKEN).
        include_multiturn_conversations: keep the conversations of more than one exchange.
        max_seq_length: cut samples to this many tokens (-1: no limit); samples left without any answer token are
            dropped. Both counts are printed and saved in meta.json.
        val_split_fraction: the fraction of rows held out as test.pt (seeded).
        seed: seeds the split.
        mask_inputs: put the loss on the assistant turns only (the other labels are -100).
        reverse_instructions: learn to write the user turns for given answers (instruction backtranslation).
    """
    check_prepare_flags(max_seq_length, val_split_fraction)
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_style = load_prompt_style(checkpoint_dir)
    path = data_file if data_file is not None else hub_dataset_file(REPO_ID, FILENAME, gated=True)
    examples = []
    for record in read_records(path):
        turns = record.row.get("conversations")
        if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) for turn in turns):
            raise RecordError(f"{record.where}: field 'conversations' should be a non-empty list of strings"
                              f" (user and assistant taking turns), got {turns!r:.80}")
        if len(turns) > 2 and not include_multiturn_conversations:
            continue
        messages = [{"role": "user" if index % 2 == 0 else "assistant", "content": text}
                    for index, text in enumerate(turns)]
        examples.append(conversation_example(messages, reverse=reverse_instructions, where=record.where,
                                             task=optional_field(record, "source")))
    prepare_sft_dataset(
        examples, tokenizer, prompt_style, out_dir, checkpoint_dir=checkpoint_dir, max_seq_length=max_seq_length,
        mask_inputs=mask_inputs, val_split_fraction=val_split_fraction, seed=seed,
        reverse_instructions=reverse_instructions, source=str(path),
    )


if __name__ == "__main__":
    run_cli(prepare_lima)
