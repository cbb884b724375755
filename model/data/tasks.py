"""The built-in task set: short text-manipulation instructions whose answers are checkable by exact match.

Every sample is made from a sentence of scripts/data/sentences.txt by a task such as "reverse the word order" or
"count the words" (TASKS), each with a few phrasings of its instruction. `check_answer` reads the sentence and fields
back from an instruction's text and compares an answer with the task's own: scripts/prepare_tasks.py writes the SFT
data with it, scripts/prepare_preferences.py judges a model's own answers with it.
"""

import random
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

# The sentences ship with the scripts (scripts/data/), in a checkout of the repository.
SENTENCES_FILE = Path(__file__).resolve().parents[2] / "scripts" / "data" / "sentences.txt"
# Training-only sentences (none is, or is close to, a test sentence of SENTENCES_FILE): --more_sentences of
# scripts/prepare_tasks.py and --train_sentences of scripts/prepare_preferences.py.
MORE_SENTENCES_FILE = SENTENCES_FILE.with_name("more_sentences.txt")
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


def read_training_sentences(path: Path, test_sentences: list[str]) -> list[str]:
    """The sentences of `path` for training; one that is also a test sentence (case aside) is an error, since test
    accuracy would then measure memory rather than the task."""
    sentences = read_sentences(path)
    held_out = {sentence.lower() for sentence in test_sentences}
    leaked = [sentence for sentence in sentences if sentence.lower() in held_out]
    if leaked:
        raise ValueError(f"{path}: {len(leaked)} sentence(s) are test sentences of the task set, e.g. {leaked[0]!r}")
    return sentences


def recombine_sentences(sentences: list[str], count: int, seed: str, avoid: tuple[str, ...] = ()) -> list[str]:
    """`count` new sentences made of the words of `sentences` in random orders, their lengths drawn from theirs, the
    first letter capitalized; none repeats, or equals one of `sentences` or `avoid` (the test sentences).

    126 training sentences are few enough for a small model to learn their answers by heart: SmolLM2-135M after the
    quickstart's LoRA answers 69% of training prompts but 38% of held-out ones, upper-casing 76% of the training
    sentences and 5% of the held-out ones. New word orders were meant to make it learn the operations instead; on the
    quickstart's recipe 1,000 of them did not (39.5% held-out exact match vs 38.0%, tutorials/finetune_lora.md)."""
    rng = random.Random(seed)
    pool = [word for sentence in sentences for word in words(sentence)]
    lengths = [len(words(sentence)) for sentence in sentences]
    taken = set(sentences) | set(avoid)
    made: list[str] = []
    while len(made) < count:
        sentence = " ".join(rng.choice(pool) for _ in range(rng.choice(lengths)))
        sentence = sentence[0].upper() + sentence[1:]
        if sentence not in taken:
            taken.add(sentence)
            made.append(sentence)
    return made


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
