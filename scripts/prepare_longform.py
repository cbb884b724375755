"""Prepare LongForm (Köksal et al. 2023: human-written documents paired with instructions an LLM wrote for them,
the "reverse instructions" recipe, 23k rows; MIT licensed, some sources carry their own terms) for fine-tuning.

    python scripts/prepare_longform.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Downloads train.json from the LongForm repository (github.com/akoksal/LongForm, also on the Hub as
akoksal/LongForm) into --download_dir (once), or reads a local copy given with --data_file: rows with `input` (the
instruction), `output` (the long answer) and `source`, which becomes each sample's task. Its answers are long:
look at the truncation report when you set --max_seq_length.
"""

from pathlib import Path
from typing import Optional

from model.cli import run_cli
from model.data.prepare import check_prepare_flags, instruction_example, optional_field, prepare_sft_dataset, url_file
from model.data.records import field, read_records
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer

DATA_URL = "https://raw.githubusercontent.com/akoksal/LongForm/main/dataset/train.json"


def prepare_longform(
    checkpoint_dir: Path,
    out_dir: Path = Path("data/longform"),
    data_file: Optional[Path] = None,
    download_dir: Path = Path("data/downloads/longform"),
    data_url: str = DATA_URL,
    max_seq_length: int = -1,
    val_split_fraction: float = 0.05,
    seed: int = 42,
    mask_inputs: bool = True,
    reverse_instructions: bool = False,
) -> None:
    """Tokenize LongForm for `checkpoint_dir` and write train.pt, test.pt and meta.json to `out_dir`.

    Args:
        checkpoint_dir: the checkpoint to fine-tune: its tokenizer and prompt style encode the samples.
        out_dir: where to write train.pt, test.pt and meta.json.
        data_file: a local copy of the data; without it, `data_url` is downloaded into `download_dir`.
        download_dir: where the downloaded file is kept (it is downloaded once).
        data_url: the JSON file to download.
        max_seq_length: cut samples to this many tokens (-1: no limit); samples left without any answer token are
            dropped. Both counts are printed and saved in meta.json.
        val_split_fraction: the fraction of rows held out as test.pt (seeded).
        seed: seeds the split.
        mask_inputs: put the loss on the response only (the prompt's labels are -100).
        reverse_instructions: learn to write the instruction for a given document (instruction backtranslation).
    """
    check_prepare_flags(max_seq_length, val_split_fraction)
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_style = load_prompt_style(checkpoint_dir)
    path = data_file if data_file is not None else url_file(data_url, download_dir)
    examples = [
        instruction_example(
            prompt_style, field(record, "input"), field(record, "output"), reverse=reverse_instructions,
            where=record.where, task=optional_field(record, "source"),
        )
        for record in read_records(path)
    ]
    prepare_sft_dataset(
        examples, tokenizer, prompt_style, out_dir, checkpoint_dir=checkpoint_dir, max_seq_length=max_seq_length,
        mask_inputs=mask_inputs, val_split_fraction=val_split_fraction, seed=seed,
        reverse_instructions=reverse_instructions, source=str(path),
    )


if __name__ == "__main__":
    run_cli(prepare_longform)
