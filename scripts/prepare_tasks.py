"""Prepare the built-in task set: short text-manipulation instructions whose answers are checkable by exact match.

    python scripts/prepare_tasks.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Needs no download: every sample is made here from the sentences in scripts/data/sentences.txt, by a task such as
"reverse the word order" or "count the words" (see TASKS in model/data/tasks.py). The sentences are split first,
so the test samples are about sentences that no training sample contains, and test accuracy measures whether the
model learned the task rather than the sentences. Each task has a few phrasings of its instruction, so the model
learns the task rather than one string. The same flags give byte-identical files.

Writes data/tasks/train.pt, test.pt and meta.json in the format described in model/data.py, tokenized with the
checkpoint's tokenizer and rendered with its prompt style.
"""

import json
from pathlib import Path
from typing import Optional

from model.cli import run_cli
from model.data.sft import encode_example, save_dataset

# the task set lives in the library (scripts/prepare_preferences.py judges answers with it); re-exported here
from model.data.tasks import (  # noqa: F401
    MORE_SENTENCES_FILE,
    NUMBER,
    SYSTEM_PROMPTS,
    TASKS,
    check_answer,
    generate_pairs,
    instruction_fields,
    parse_tasks,
    read_sentences,
    read_training_sentences,
    recombine_sentences,
    split_sentences,
    template_pattern,
)
from model.files import atomic_write_text
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer


def prepare_tasks(
    checkpoint_dir: Path,
    out_dir: Path = Path("data/tasks"),
    num_train: int = 2000,
    num_test: int = 200,
    seed: int = 42,
    max_seq_length: int = 256,
    mask_inputs: bool = True,
    system_prompt_fraction: float = 0.0,
    tasks: str = "all",
    recombined_sentences: int = 0,
    more_sentences: Optional[Path] = None,
) -> None:
    """Generate the task samples, tokenize them for `checkpoint_dir` and write train.pt, test.pt and meta.json.

    Args:
        checkpoint_dir: the checkpoint to fine-tune: its tokenizer and prompt style encode the samples.
        out_dir: where to write train.pt, test.pt and meta.json.
        num_train: number of training samples.
        num_test: number of test samples (about sentences that no training sample contains).
        seed: seeds the sentence split and the samples; the same flags give byte-identical files.
        max_seq_length: cut samples to this many tokens (-1: no limit).
        mask_inputs: put the loss on the answer only (the prompt's labels are -100).
        system_prompt_fraction: the fraction of samples that get a system message.
        tasks: "all", or a comma-separated list of task names.
        recombined_sentences: add this many training sentences made of the training sentences' words in new random
            orders (the test sentences stay as they are): fewer repeats of the same 126 sentences to learn by heart.
        more_sentences: add this file's sentences (one a line, none a test sentence) to the training sentences, e.g.
            scripts/data/more_sentences.txt (311 more); the test set stays byte-identical.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"--num_train and --num_test must be at least 1, got {num_train} and {num_test}")
    if max_seq_length < 1 and max_seq_length != -1:
        raise ValueError(f"--max_seq_length must be positive, or -1 for no limit, got {max_seq_length}")
    if not 0.0 <= system_prompt_fraction <= 1.0:
        raise ValueError(f"--system_prompt_fraction must be between 0 and 1, got {system_prompt_fraction}")
    task_names = parse_tasks(tasks)
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_style = load_prompt_style(checkpoint_dir)

    train_sentences, test_sentences = split_sentences(read_sentences(), seed)
    if recombined_sentences < 0:
        raise ValueError(f"--recombined_sentences must be 0 or more, got {recombined_sentences}")
    if more_sentences is not None:
        train_sentences += [s for s in read_training_sentences(more_sentences, test_sentences)
                            if s not in train_sentences]
    if recombined_sentences:
        train_sentences += recombine_sentences(train_sentences, recombined_sentences, f"{seed}:recombined",
                                               avoid=tuple(test_sentences))
    # Each split has its own random stream, so the test set stays the same when only --num_train changes.
    pairs = {
        "train": generate_pairs(train_sentences, num_train, task_names, f"{seed}:train", system_prompt_fraction),
        "test": generate_pairs(test_sentences, num_test, task_names, f"{seed}:test", system_prompt_fraction),
    }
    meta = {
        "checkpoint_dir": str(checkpoint_dir),
        "vocab_size": tokenizer.vocab_size,
        "prompt_style": prompt_style.name,
        "max_seq_length": max_seq_length,
        "mask_inputs": mask_inputs,
        "seed": seed,
        "system_prompt_fraction": system_prompt_fraction,
        "tasks": task_names,
        "recombined_sentences": recombined_sentences,
        "more_sentences": str(more_sentences) if more_sentences else None,
        "train_sentences": len(train_sentences),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    encoded = {}
    for split, split_pairs in pairs.items():
        samples = []
        for pair in split_pairs:
            sample = encode_example(
                tokenizer, prompt_style, pair["instruction"], pair["response"], system=pair["system"],
                mask_inputs=mask_inputs, max_seq_length=max_seq_length,
            )
            sample["task"] = pair["task"]
            samples.append(sample)
        save_dataset(samples, out_dir / f"{split}.pt")
        encoded[split] = samples
        meta[split] = {
            "samples": len(samples),
            "per_task": {name: sum(sample["task"] == name for sample in samples) for name in task_names},
            "longest": max(len(sample["input_ids"]) for sample in samples),
            "truncated": sum(sample["truncated"] > 0 for sample in samples),
            # cut inside the prompt: nothing of the answer is left to learn
            "answer_cut_off": sum(
                len(sample["input_ids"]) <= len(tokenizer.encode(sample["prompt"]))
                for sample in samples
                if sample["truncated"]
            ),
        }
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")

    print(f"Wrote {out_dir}/train.pt, test.pt and meta.json ({prompt_style.name!r} prompt style, {checkpoint_dir})")
    print(f"{'task':<18}{'train':>7}{'test':>7}")
    for name in task_names:
        print(f"{name:<18}{meta['train']['per_task'][name]:>7}{meta['test']['per_task'][name]:>7}")
    for split in pairs:
        stats = meta[split]
        print(
            f"{split}: {stats['samples']} samples, longest {stats['longest']} tokens, {stats['truncated']} truncated to"
            f" --max_seq_length {max_seq_length}, {stats['answer_cut_off']} of them with the whole answer cut off"
        )
    for sample in encoded["train"][:2]:
        print(f"\nExample ({sample['task']}), the tokens decoded:\n{tokenizer.decode(sample['input_ids'])}")


if __name__ == "__main__":
    run_cli(prepare_tasks)
