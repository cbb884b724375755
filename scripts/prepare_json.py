"""Prepare your own instruction or chat data (JSON, JSONL, CSV or Parquet) for fine-tuning.

    python scripts/prepare_json.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --data_file my_data.jsonl --out_dir data/my_data

Each row is one of:
- an instruction row: `instruction`, optional `input` and `system`, and `output` (rename the columns you have with
  --instruction_field --input_field --system_field --output_field);
- an OpenAI-style chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`;
- a ShareGPT chat: `{"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...]}`.
A chat may have many turns: with --mask_inputs (the default) every assistant turn carries the loss, and nothing
else does. A row's `system` field (--system_field) is the system prompt of a chat that has no system turn of its
own. Rows of both kinds may be mixed in one file; CSV holds instruction rows only.

test.pt is held out from the rows (--val_split_fraction), or made from --test_file.
"""

from pathlib import Path
from typing import Optional

from model.cli import run_cli
from model.data.prepare import (
    Example,
    chat_example,
    check_prepare_flags,
    instruction_example,
    optional_field,
    prepare_sft_dataset,
)
from model.data.records import field, read_records
from model.prompts import PromptStyle, load_prompt_style
from model.tokenizer import Tokenizer


def read_examples(
    path: Path, prompt_style: PromptStyle, instruction_field: str, input_field: Optional[str], output_field: str,
    system_field: Optional[str], task_field: Optional[str], reverse: bool,
) -> list[Example]:
    examples = []
    for record in read_records(path):
        system = optional_field(record, system_field)
        task = optional_field(record, task_field)
        if "messages" in record.row or "conversations" in record.row:
            examples.append(chat_example(record, system, reverse=reverse, task=task))
        else:
            examples.append(instruction_example(
                prompt_style, field(record, instruction_field), field(record, output_field),
                input=optional_field(record, input_field) or "", system=system, reverse=reverse,
                where=record.where, task=task,
            ))
    return examples


def prepare_json(
    checkpoint_dir: Path,
    data_file: Path,
    out_dir: Path = Path("data/custom"),
    test_file: Optional[Path] = None,
    instruction_field: str = "instruction",
    input_field: Optional[str] = "input",
    output_field: str = "output",
    system_field: Optional[str] = "system",
    task_field: Optional[str] = None,
    max_seq_length: int = -1,
    val_split_fraction: float = 0.05,
    seed: int = 42,
    mask_inputs: bool = True,
    reverse_instructions: bool = False,
) -> None:
    """Tokenize the rows of `data_file` for `checkpoint_dir` and write train.pt, test.pt and meta.json to `out_dir`.

    Args:
        checkpoint_dir: the checkpoint to fine-tune: its tokenizer and prompt style encode the samples.
        data_file: the rows: .json (a list, or an object holding one list), .jsonl, .csv or .parquet.
        out_dir: where to write train.pt, test.pt and meta.json.
        test_file: rows for test.pt (same format); without it, test.pt is held out from `data_file`.
        instruction_field: the column with the instruction (instruction rows).
        input_field: the column with an optional input that follows the instruction; rows may lack it.
        output_field: the column with the response to learn.
        system_field: the column with an optional system prompt; rows may lack it.
        task_field: an optional column naming each row's task or source; meta.json counts samples per task.
        max_seq_length: cut samples to this many tokens (-1: no limit); samples left without any answer token are
            dropped. Both counts are printed and saved in meta.json.
        val_split_fraction: the fraction of rows held out as test.pt (seeded); unused with --test_file.
        seed: seeds the split.
        mask_inputs: put the loss on the assistant turns only (the other labels are -100).
        reverse_instructions: learn to write the instruction for a given response (instruction backtranslation).
    """
    check_prepare_flags(max_seq_length, val_split_fraction)
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_style = load_prompt_style(checkpoint_dir)
    fields = (instruction_field, input_field, output_field, system_field, task_field, reverse_instructions)
    examples = read_examples(data_file, prompt_style, *fields)
    test_examples = read_examples(test_file, prompt_style, *fields) if test_file is not None else None
    prepare_sft_dataset(
        examples, tokenizer, prompt_style, out_dir, checkpoint_dir=checkpoint_dir, max_seq_length=max_seq_length,
        mask_inputs=mask_inputs, val_split_fraction=val_split_fraction, seed=seed,
        reverse_instructions=reverse_instructions, source=str(data_file), test_examples=test_examples,
    )


if __name__ == "__main__":
    run_cli(prepare_json)
