"""Prepare FLAN (the Flan 2021 task collection as released in Muennighoff/flan: 66 tasks, each rendered with 10
instruction templates) for fine-tuning.

    python scripts/prepare_flan.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --subsets anli_r1_10templates,trec_10templates --max_rows_per_subset 2000

The full collection is tens of millions of rows, so you choose the tasks (--subsets, see SUBSETS) and how many
rows of each to take (--max_rows_per_subset, read from the start of each file without loading the rest). Each
subset's train file `train/<subset>_train.jsonl` is downloaded from the Hugging Face dataset Muennighoff/flan
(into the Hub cache, once), or --data_file names a local JSONL/JSON/CSV/Parquet file with rows of `inputs`,
`targets` and optionally `task`. Each sample's task is its subset, so meta.json counts them per task.
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
from model.data.records import RecordError, field, iter_records
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer

REPO_ID = "Muennighoff/flan"
SUBSETS = (
    "aeslc", "ag_news_subset", "anli_r1", "anli_r2", "anli_r3", "arc_challenge", "arc_easy", "bool_q", "cb",
    "cnn_dailymail", "cola", "common_gen", "copa", "coqa", "cosmos_qa", "dart", "definite_pronoun_resolution", "drop",
    "e2e_nlg", "fix_punct", "gigaword", "glue_mrpc", "glue_qqp", "hellaswag", "imdb_reviews", "math_dataset",
    "mnli_matched", "mnli_mismatched", "multi_news", "multirc", "natural_questions", "openbookqa",
    "opinion_abstracts_idebate", "opinion_abstracts_rotten_tomatoes", "para_crawl_enes", "paws_wiki", "piqa", "qnli",
    "quac", "record", "rte", "samsum", "sentiment140", "snli", "squad_v1", "squad_v2", "sst2", "story_cloze", "stsb",
    "trec", "trivia_qa", "true_case", "web_nlg_en", "wic", "wiki_lingua_english_en", "wmt14_enfr",
    "wmt16_translate_csen", "wmt16_translate_deen", "wmt16_translate_fien", "wmt16_translate_roen",
    "wmt16_translate_ruen", "wmt16_translate_tren", "wnli", "word_segment", "wsc", "yelp_polarity_reviews",
)
SUBSETS = tuple(f"{name}_10templates" for name in SUBSETS)
DEFAULT_SUBSETS = "anli_r1_10templates,bool_q_10templates,cosmos_qa_10templates,samsum_10templates,trec_10templates"


def parse_subsets(subsets: str) -> list[str]:
    names = [name.strip() for name in subsets.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUBSETS]
    if unknown or not names:
        raise ValueError(f"Unknown FLAN subset(s) {', '.join(unknown) or repr(subsets)}. Use a comma list of:"
                         f" {', '.join(SUBSETS)}")
    return list(dict.fromkeys(names))


def prepare_flan(
    checkpoint_dir: Path,
    out_dir: Path = Path("data/flan"),
    data_file: Optional[Path] = None,
    subsets: str = DEFAULT_SUBSETS,
    max_rows_per_subset: int = 2000,
    max_seq_length: int = -1,
    val_split_fraction: float = 0.05,
    seed: int = 42,
    mask_inputs: bool = True,
    reverse_instructions: bool = False,
) -> None:
    """Tokenize FLAN subsets for `checkpoint_dir` and write train.pt, test.pt and meta.json to `out_dir`.

    Args:
        checkpoint_dir: the checkpoint to fine-tune: its tokenizer and prompt style encode the samples.
        out_dir: where to write train.pt, test.pt and meta.json.
        data_file: a local file of FLAN rows (`inputs`, `targets`, optional `task`); without it, the subsets'
            train files are downloaded from the Hub.
        subsets: comma-separated FLAN tasks to download (ignored with --data_file).
        max_rows_per_subset: take the first this many rows of each subset (of --data_file: in all); -1: all.
        max_seq_length: cut samples to this many tokens (-1: no limit); samples left without any answer token are
            dropped. Both counts are printed and saved in meta.json.
        val_split_fraction: the fraction of rows held out as test.pt (seeded).
        seed: seeds the split.
        mask_inputs: put the loss on the target only (the prompt's labels are -100).
        reverse_instructions: learn to write the input for a given target (instruction backtranslation).
    """
    check_prepare_flags(max_seq_length, val_split_fraction)
    if max_rows_per_subset < 1 and max_rows_per_subset != -1:
        raise ValueError(f"--max_rows_per_subset must be positive, or -1 for all rows, got {max_rows_per_subset}")
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_style = load_prompt_style(checkpoint_dir)
    if data_file is not None:
        files = {data_file.stem: data_file}
    else:
        files = {name: hub_dataset_file(REPO_ID, f"train/{name}_train.jsonl") for name in parse_subsets(subsets)}
    examples = []
    for subset, path in files.items():
        count = 0
        for record in iter_records(path):
            if count == max_rows_per_subset:
                break
            examples.append(instruction_example(
                prompt_style, field(record, "inputs"), field(record, "targets"), reverse=reverse_instructions,
                where=record.where, task=optional_field(record, "task") or subset,
            ))
            count += 1
        if count == 0:
            raise RecordError(f"{path}: no rows in the file")
    source = str(data_file) if data_file is not None else f"{REPO_ID} ({', '.join(files)})"
    prepare_sft_dataset(
        examples, tokenizer, prompt_style, out_dir, checkpoint_dir=checkpoint_dir, max_seq_length=max_seq_length,
        mask_inputs=mask_inputs, val_split_fraction=val_split_fraction, seed=seed,
        reverse_instructions=reverse_instructions, source=source,
    )


if __name__ == "__main__":
    run_cli(prepare_flan)
