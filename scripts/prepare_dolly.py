"""Prepare Databricks Dolly 15k (15,011 human-written instruction/response rows, CC BY-SA 3.0) for fine-tuning.

    python scripts/prepare_dolly.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Downloads databricks-dolly-15k.jsonl from the Hugging Face dataset databricks/databricks-dolly-15k (into the Hub
cache, once), or reads a local copy given with --data_file (rows with `instruction`, `context`, `response` and
`category`). A non-empty context (the reference text of the closed QA, summarization and extraction rows) follows
the instruction as its input. Each sample's task is its category, so meta.json counts them per category.
"""

from pathlib import Path
from typing import Optional

from model.cli import run_cli
from model.data.prepare import (
    check_prepare_flags,
    hub_dataset_file,
    instruction_example,
    optional_field,
    prepare_sft_dataset,
)
from model.data.records import field, read_records
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer

REPO_ID = "databricks/databricks-dolly-15k"
FILENAME = "databricks-dolly-15k.jsonl"


def prepare_dolly(
    checkpoint_dir: Path,
    out_dir: Path = Path("data/dolly"),
    data_file: Optional[Path] = None,
    max_seq_length: int = -1,
    val_split_fraction: float = 0.05,
    seed: int = 42,
    mask_inputs: bool = True,
    reverse_instructions: bool = False,
) -> None:
    """Tokenize Dolly 15k for `checkpoint_dir` and write train.pt, test.pt and meta.json to `out_dir`.

    Args:
        checkpoint_dir: the checkpoint to fine-tune: its tokenizer and prompt style encode the samples.
        out_dir: where to write train.pt, test.pt and meta.json.
        data_file: a local copy of databricks-dolly-15k.jsonl; without it, it is downloaded from the Hub.
        max_seq_length: cut samples to this many tokens (-1: no limit); samples left without any answer token are
            dropped. Both counts are printed and saved in meta.json.
        val_split_fraction: the fraction of rows held out as test.pt (seeded).
        seed: seeds the split.
        mask_inputs: put the loss on the response only (the prompt's labels are -100).
        reverse_instructions: learn to write the instruction for a given response (instruction backtranslation).
    """
    check_prepare_flags(max_seq_length, val_split_fraction)
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_style = load_prompt_style(checkpoint_dir)
    path = data_file if data_file is not None else hub_dataset_file(REPO_ID, FILENAME)
    examples = [
        instruction_example(
            prompt_style, field(record, "instruction"), field(record, "response"),
            input=optional_field(record, "context") or "", reverse=reverse_instructions, where=record.where,
            task=optional_field(record, "category"),
        )
        for record in read_records(path)
    ]
    prepare_sft_dataset(
        examples, tokenizer, prompt_style, out_dir, checkpoint_dir=checkpoint_dir, max_seq_length=max_seq_length,
        mask_inputs=mask_inputs, val_split_fraction=val_split_fraction, seed=seed,
        reverse_instructions=reverse_instructions, source=str(path),
    )


if __name__ == "__main__":
    run_cli(prepare_dolly)
