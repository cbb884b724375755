"""Prepare the built-in task set: short text-manipulation instructions whose answers are checkable by exact match.

    python scripts/prepare_tasks.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Needs no download: every sample is made here from the sentences in scripts/data/sentences.txt, by a task such as
"reverse the word order" or "count the words" (see TASKS). The sentences are split first, so the test samples are
about sentences that no training sample contains, and test accuracy measures whether the model learned the task
rather than the sentences. Each task has a few phrasings of its instruction, so the model learns the task rather
than one string. The same flags give byte-identical files.

Writes data/tasks/train.pt, test.pt and meta.json in the format described in model/data.py, tokenized with the
checkpoint's tokenizer and rendered with its prompt style.
"""

import json
import random
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from model.cli import run_cli
from model.data.sft import encode_example, save_dataset
from model.files import atomic_write_text
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer

SENTENCES_FILE = Path(__file__).parent / "data" / "sentences.txt"
TEST_SENTENCE_FRACTION = 0.2
SYSTEM_PROMPTS = (
    "You are a careful assistant. Answer with the result only.",
    "You follow text-editing instructions exactly.",
    "Reply with nothing but the requested output.",
)
# Words that replace_word swaps in, one the sentence lacks, so the answer always differs from the sentence.
REPLACEMENTS = ("apple", "violet", "engine", "planet", "ribbon", "marble", "saddle", "tunnel", "whisper", "zebra")
NUMBER = re.compile(r"\d+")


def words(sentence: str) -> list[str]:
    return sentence.split(" ")


@dataclass(frozen=True)
class Task:
    templates: tuple[str, ...]  # phrasings of the instruction, filled with {sentence} and the task's own fields
    answer: Callable[..., str]  # the answer, from the sentence and the fields
    fields: Callable[[str, random.Random], dict[str, str]] = lambda sentence, rng: {}
    needs_numbers: bool = False  # only for sentences with a number in them


def replace_word_fields(sentence: str, rng: random.Random) -> dict[str, str]:
    present = {word.lower() for word in words(sentence)}
    return {"old": rng.choice(words(sentence)), "new": rng.choice([w for w in REPLACEMENTS if w not in present])}


TASKS = {
    "remove_spaces": Task(
        (
            "Remove all the spaces from this sentence: {sentence}",
            "Write the following sentence without any spaces.\n{sentence}",
            "Sentence: {sentence}\nRewrite it with the spaces removed.",
        ),
        lambda sentence: sentence.replace(" ", ""),
    ),
    "reverse_words": Task(
        (
            "Reverse the order of the words in this sentence: {sentence}",
            "Write these words in reverse order: {sentence}",
            "Sentence: {sentence}\nSay it backwards, word by word.",
        ),
        lambda sentence: " ".join(reversed(words(sentence))),
    ),
    "uppercase": Task(
        (
            "Convert this sentence to uppercase: {sentence}",
            "Rewrite in all capital letters: {sentence}",
            "{sentence}\nWrite the sentence above in upper case.",
        ),
        lambda sentence: sentence.upper(),
    ),
    "lowercase": Task(
        (
            "Convert this sentence to lowercase: {sentence}",
            "Rewrite using only small letters: {sentence}",
            "{sentence}\nWrite the sentence above in lower case.",
        ),
        lambda sentence: sentence.lower(),
    ),
    "count_words": Task(
        (
            "How many words are in this sentence? {sentence}",
            "Count the words in the following sentence and answer with a number.\n{sentence}",
            "Sentence: {sentence}\nNumber of words?",
        ),
        lambda sentence: str(len(words(sentence))),
    ),
    "sort_words": Task(
        (
            "Sort the words of this sentence alphabetically, ignoring case: {sentence}",
            "Put these words in alphabetical order: {sentence}",
            "Sentence: {sentence}\nList its words from A to Z.",
        ),
        # ties ("The", "the") go capital first, so the order is fully defined
        lambda sentence: " ".join(sorted(words(sentence), key=lambda word: (word.lower(), word))),
    ),
    "extract_numbers": Task(
        (
            "List the numbers in this sentence, separated by commas: {sentence}",
            "Which numbers does the following sentence mention? Separate them with commas.\n{sentence}",
            "Sentence: {sentence}\nExtract the numbers.",
        ),
        lambda sentence: ", ".join(NUMBER.findall(sentence)),
        needs_numbers=True,
    ),
    "first_letters": Task(
        (
            "Write the first letter of each word in this sentence, with nothing between them: {sentence}",
            "Join the first letters of these words: {sentence}",
            "{sentence}\nWhat do the first letters of the words spell?",
        ),
        lambda sentence: "".join(word[0] for word in words(sentence)),
    ),
    "replace_word": Task(
        (
            'Replace the word "{old}" with "{new}" in this sentence: {sentence}',
            'In the sentence below, change every "{old}" to "{new}".\n{sentence}',
            'Sentence: {sentence}\nSwap "{old}" for "{new}".',
        ),
        lambda sentence, old, new: " ".join(new if word == old else word for word in words(sentence)),
        replace_word_fields,
    ),
    "repeat_last_word": Task(
        (
            "Repeat the last word of this sentence {times} times: {sentence}",
            "Write the final word of the following sentence {times} times, separated by spaces.\n{sentence}",
            "Sentence: {sentence}\nSay its last word {times} times.",
        ),
        lambda sentence, times: " ".join([words(sentence)[-1]] * int(times)),
        lambda sentence, rng: {"times": str(rng.randint(2, 5))},
    ),
}


@lru_cache
def template_pattern(template: str) -> re.Pattern:
    """A regex that matches the instructions `template` makes and captures their fields."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(f"(?P<{field}>.+?)")
    return re.compile("".join(parts), re.DOTALL)


def instruction_fields(task_name: str, instruction: str) -> dict[str, str]:
    """The sentence and fields an instruction of `task_name` was made from, read back from its text."""
    for template in TASKS[task_name].templates:
        match = template_pattern(template).fullmatch(instruction)
        if match:
            return match.groupdict()
    raise ValueError(f"{instruction!r} is not phrased like any {task_name} instruction")


def check_answer(task_name: str, instruction: str, answer: str) -> bool:
    """Whether `answer` (say, a model's generation) answers the instruction: exact match, surrounding spaces aside."""
    return answer.strip() == TASKS[task_name].answer(**instruction_fields(task_name, instruction))


def read_sentences(path: Path = SENTENCES_FILE) -> list[str]:
    """One sentence a line, words split on single spaces; double quotes are reserved for the instructions."""
    sentences = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line != " ".join(line.split()) or '"' in line:
            raise ValueError(f"{path}, line {number}: use single spaces between words and no double quotes: {line!r}")
        if line in sentences:
            raise ValueError(f"{path}, line {number}: the sentence appears twice: {line!r}")
        sentences.append(line)
    return sentences


def split_sentences(sentences: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Disjoint train and test sentences. Sentences with and without numbers are split separately, so both splits
    have sentences for extract_numbers."""
    rng = random.Random(seed)
    train, test = [], []
    for has_numbers in (True, False):
        group = [sentence for sentence in sentences if bool(NUMBER.search(sentence)) == has_numbers]
        if len(group) < 2:
            kind = "with" if has_numbers else "without"
            raise ValueError(f"{SENTENCES_FILE} needs at least 2 sentences {kind} numbers, one for each split")
        rng.shuffle(group)
        num_test = max(1, round(len(group) * TEST_SENTENCE_FRACTION))
        test += group[:num_test]
        train += group[num_test:]
    return train, test


def generate_pairs(
    sentences: list[str], count: int, task_names: list[str], seed: str, system_prompt_fraction: float
) -> list[dict]:
    """`count` instruction/response pairs, the tasks taking turns (so their counts differ by one at most)."""
    rng = random.Random(seed)
    pairs = []
    for index in range(count):
        task_name = task_names[index % len(task_names)]
        task = TASKS[task_name]
        sentence = rng.choice([s for s in sentences if NUMBER.search(s)] if task.needs_numbers else sentences)
        fields = {"sentence": sentence, **task.fields(sentence, rng)}
        instruction = rng.choice(task.templates).format(**fields)
        # A template that leaves out a field, or reads like another one, would make answers the model can only
        # guess; the instruction must give back exactly what it was made from.
        if instruction_fields(task_name, instruction) != fields:
            raise ValueError(f"Task {task_name}: the instruction {instruction!r} does not state all of {fields}")
        response = task.answer(**fields)
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < system_prompt_fraction else None
        pairs.append({"task": task_name, "instruction": instruction, "response": response, "system": system})
    rng.shuffle(pairs)
    return pairs


def parse_tasks(tasks: str) -> list[str]:
    if tasks == "all":
        return list(TASKS)
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ValueError(
            f"Unknown task(s) {', '.join(unknown) or repr(tasks)}. Use all, or a comma list of {', '.join(TASKS)}"
        )
    return list(dict.fromkeys(names))


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
