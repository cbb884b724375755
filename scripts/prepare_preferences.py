"""Prepare preference pairs (prompt, chosen, rejected) for finetune/dpo.py.

    python scripts/prepare_preferences.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python scripts/prepare_preferences.py --checkpoint_dir ... --data_file pairs.jsonl --out_dir data/my-prefs
    python scripts/prepare_preferences.py --checkpoint_dir out/sft/merged --from_run out/sft/merged --out_dir data/own

Without `--data_file` the pairs come from the built-in task set (scripts/prepare_tasks.py, no download): the chosen
answer is the correct one, the rejected answer a plausible wrong one made by a systematic corruption of the task
(a word count off by one, one space left in, the last word not uppercased, ...), so the pairs teach exactly the
difference between right and nearly right. Train and test pairs are about disjoint sentences.

With `--from_run` the rejected answers are the model's own (on-policy): the run (or checkpoint) answers each task
prompt `--samples_per_prompt` times, in batches (the first answer greedy, the others sampled at `--temperature`),
and each distinct answer that fails the task's exact-match check (model/data/tasks.py) is paired, as rejected,
with the gold answer of the same prompt. So DPO pushes down the mistakes this model really makes.

With `--data_file` (JSON, JSONL, CSV or Parquet; `--format auto` recognises the layout from the first row):

    pairs           prompt / chosen / rejected fields (names set by --prompt_field etc.). The prompt may be text or a
                    conversation ([{"role", "content"}, ...] ending with a user turn); chosen and rejected may be text
                    or conversations ending with the assistant's answer (the binarized UltraFeedback layout), in which
                    case the prompt may be left out and is what precedes the answer.
    hh              Anthropic HH-RLHF: chosen and rejected are whole transcripts
                    "\\n\\nHuman: ...\\n\\nAssistant: ...", identical up to their last assistant turn.
    ultrafeedback   a prompt (text in --prompt_field or "instruction", or a conversation in "messages") and
                    "completions": [{"response" | "text" | "content": ..., "overall_score" | "score" | "rating": ...}];
                    the best-scored completion is chosen, the worst rejected.

Rows that cannot make a pair are skipped and counted, never silently: a missing field, chosen identical to rejected,
all completions scored the same, transcripts that differ before the answer, or a prompt that leaves no room for an
answer within --max_seq_length. The report names the first rows of each kind and goes into meta.json; with
`--strict true` the first such row is an error instead. Writes train.pt, test.pt and meta.json (format: see
model/preference.py), tokenized with the checkpoint's tokenizer and rendered with its prompt style.
"""

import json
import random
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal, Optional

from model.cli import run_cli
from model.data.on_policy import PromptItem, sample_answers, wrong_answer_pairs
from model.data.preference import encode_pair, save_pairs
from model.data.prepare import tokenizer_fingerprint
from model.data.records import Record, RecordError, field, read_records
from model.data.tasks import (
    check_answer,
    generate_pairs,
    instruction_fields,
    parse_tasks,
    read_sentences,
    read_training_sentences,
    split_sentences,
)
from model.files import atomic_write_text
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer
from model.weights.load import load_any

TEXT_KEYS = ("response", "text", "content", "completion")
SCORE_KEYS = ("overall_score", "score", "rating")
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
SHOWN_PER_REASON = 3


class Skip(Exception):
    """A row that makes no pair; the message is the reason, counted in the report."""


# ----------------------------------------------------------------------------------------------- input layouts


def detect_format(row: dict, chosen_field: str) -> str:
    if "completions" in row:
        return "ultrafeedback"
    chosen = row.get(chosen_field)
    if isinstance(chosen, str) and chosen.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in chosen:
        return "hh"
    return "pairs"


def text_field(record: Record, name: str) -> str:
    """A required text field; its absence is a counted skip whose reason is the same for every row, so the report
    groups them (the row's own fields are named by `model.records.field` under --strict)."""
    try:
        return field(record, name)
    except RecordError as e:
        if "missing field" in str(e):
            raise Skip(f"missing field {name!r} (map your column names with --prompt_field etc.)") from e
        raise Skip(f"field {name!r} is not text") from e


def is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def answer_of(record: Record, name: str) -> tuple[Optional[list[dict]], str]:
    """(the conversation before the answer or None, the answer) of a chosen/rejected field: text, or a conversation
    ending with the assistant's turn."""
    value = record.row.get(name)
    if is_conversation(value):
        if not value or value[-1]["role"] != "assistant":
            raise Skip(f"{name!r} is a conversation that does not end with an assistant turn")
        return value[:-1], value[-1]["content"]
    return None, text_field(record, name)


def prompt_of(record: Record, name: str, context: Optional[list[dict]]):
    value = record.row.get(name)
    if is_conversation(value):
        if not value or value[-1]["role"] != "user":
            raise Skip(f"{name!r} is a conversation that does not end with a user turn")
        return value
    if value is None and context:
        return context
    return text_field(record, name)


def parse_pairs(record: Record, prompt_field: str, chosen_field: str, rejected_field: str, system_field: str):
    chosen_context, chosen = answer_of(record, chosen_field)
    rejected_context, rejected = answer_of(record, rejected_field)
    if chosen_context is not None and rejected_context is not None and chosen_context != rejected_context:
        raise Skip("the chosen and rejected conversations differ before the answer")
    prompt = prompt_of(record, prompt_field, chosen_context)
    system = field(record, system_field, required=False) or None
    return prompt, chosen, rejected, system


def parse_hh_transcript(text: str) -> list[dict]:
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if parts[0].strip():
        raise Skip("the transcript does not start with '\\n\\nHuman: '")
    messages = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
                for role, content in zip(parts[1::2], parts[2::2])]
    if not messages or messages[-1]["role"] != "assistant":
        raise Skip("the transcript does not end with an Assistant turn")
    return messages


def parse_hh(record: Record, chosen_field: str, rejected_field: str):
    chosen_text, rejected_text = text_field(record, chosen_field), text_field(record, rejected_field)
    chosen, rejected = parse_hh_transcript(chosen_text), parse_hh_transcript(rejected_text)
    if chosen[:-1] != rejected[:-1]:
        raise Skip("the chosen and rejected transcripts differ before the last Assistant turn")
    return merge_turns(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"], None


def merge_turns(messages: list[dict]) -> list[dict]:
    """HH transcripts sometimes have two Human turns in a row; chat templates want them alternating."""
    merged: list[dict] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1] = {"role": message["role"], "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append(dict(message))
    if not merged or merged[-1]["role"] != "user":
        raise Skip("the transcript has no Human turn before the answer")
    return merged


def parse_ultrafeedback(record: Record, prompt_field: str):
    row = record.row
    if is_conversation(row.get("messages")):
        prompt = [m for m in row["messages"] if m["role"] != "assistant" or m is not row["messages"][-1]]
    else:
        name = prompt_field if prompt_field in row else "instruction"
        prompt = text_field(record, name)
    completions = row.get("completions")
    if not isinstance(completions, list) or len(completions) < 2:
        raise Skip("'completions' must be a list of at least 2 scored answers")
    scored = []
    for completion in completions:
        text = next((completion[k] for k in TEXT_KEYS if isinstance(completion, dict) and completion.get(k)), None)
        score = next((completion[k] for k in SCORE_KEYS if isinstance(completion, dict) and k in completion), None)
        if not isinstance(text, str) or not isinstance(score, (int, float)) or isinstance(score, bool):
            raise Skip(f"a completion lacks a text ({'/'.join(TEXT_KEYS)}) or a numeric score ({'/'.join(SCORE_KEYS)})")
        scored.append((float(score), text))
    best, worst = max(scored, key=lambda s: s[0]), min(scored, key=lambda s: s[0])
    if best[0] == worst[0]:
        raise Skip("all completions have the same score: no preference")
    return prompt, best[1], worst[1], None


# ----------------------------------------------------------------------------------------------- built-in tasks


def corrupt(task_name: str, fields: dict, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: the mistake a model that half-learned the task makes."""
    sentence = fields["sentence"]
    words = sentence.split(" ")
    wrong = {
        "remove_spaces": lambda: " ".join([words[0], "".join(words[1:])]),
        "reverse_words": lambda: " ".join(swap_first_two(list(reversed(words)))),
        "uppercase": lambda: " ".join(w.upper() for w in words[:-1]) + " " + words[-1],
        "lowercase": lambda: words[0] + " " + " ".join(w.lower() for w in words[1:]),
        "count_words": lambda: str(len(words) + rng.choice((-1, 1))),
        "sort_words": lambda: " ".join(sorted(words)),
        "extract_numbers": lambda: ", ".join(re.findall(r"\d+", sentence)[:-1]) or str(int(answer.split(",")[0]) + 1),
        "first_letters": lambda: "".join(w[0] for w in words).lower(),
        "replace_word": lambda: sentence,
        "repeat_last_word": lambda: " ".join([words[-1]] * (int(fields.get("times", 2)) + 1)),
    }[task_name]()
    if wrong == answer or not wrong:  # the corruption happens to change nothing for this sentence
        wrong = " ".join(swap_first_two(answer.split(" ")))
        if wrong == answer:
            wrong = answer[:-1] if len(answer) > 1 else answer + "x"
    return wrong


def swap_first_two(items: list[str]) -> list[str]:
    return items[1:2] + items[:1] + items[2:]


def task_prompts(num_train: int, num_test: int, tasks: str, seed: int,
                 train_sentences_file: Optional[Path] = None) -> dict[str, list[dict]]:
    """The task set's instructions and gold answers, train and test about disjoint sentences; the training prompts
    come from `train_sentences_file` instead of the task set's training sentences when it is given."""
    names = parse_tasks(tasks)
    train_sentences, test_sentences = split_sentences(read_sentences(), seed)
    if train_sentences_file is not None:
        train_sentences = read_training_sentences(train_sentences_file, test_sentences)
    return {split: generate_pairs(sentences, count, names, f"{seed}:{split}", 0.0)
            for split, sentences, count in (("train", train_sentences, num_train), ("test", test_sentences, num_test))}


def task_pairs(num_train: int, num_test: int, tasks: str, seed: int,
               train_sentences_file: Optional[Path] = None) -> dict[str, list[tuple]]:
    result = {}
    for split, pairs in task_prompts(num_train, num_test, tasks, seed, train_sentences_file).items():
        rng = random.Random(f"{seed}:{split}:rejected")
        rows = []
        for index, pair in enumerate(pairs):
            fields = instruction_fields(pair["task"], pair["instruction"])
            rejected = corrupt(pair["task"], fields, pair["response"], rng)
            rows.append((f"{split} pair {index} ({pair['task']})", pair["instruction"], pair["response"], rejected,
                         pair["system"], pair["task"]))
        result[split] = rows
    return result


def on_policy_task_pairs(from_run: Path, num_train: int, num_test: int, tasks: str, seed: int,
                         samples_per_prompt: int, temperature: float, max_new_tokens: int, batch_size: int,
                         max_pairs_per_prompt: int, precision: Optional[str], device: str,
                         train_sentences_file: Optional[Path] = None, only_answerable: bool = False,
                         ) -> tuple[dict, dict]:
    """The task set's prompts answered by the model of `from_run`; its wrong answers (by exact match) are rejected."""
    loaded = load_any(from_run, device=device, precision=precision)
    tokenizer = Tokenizer(loaded.checkpoint_dir)
    style = load_prompt_style(loaded.checkpoint_dir)
    result, report = {}, {}
    for split, pairs in task_prompts(num_train, num_test, tasks, seed, train_sentences_file).items():
        items = [PromptItem(f"{split} prompt {index} ({pair['task']})", pair["instruction"], pair["response"],
                            pair["system"], pair["task"]) for index, pair in enumerate(pairs)]
        print(f"Answering {len(items)} {split} prompts {samples_per_prompt} time(s) each with {from_run}")
        t0 = time.perf_counter()
        answers = sample_answers(loaded.model, tokenizer, [style.apply(i.instruction, i.system) for i in items],
                                 samples_per_prompt, temperature, max_new_tokens, batch_size,
                                 seed=hash_seed(seed, split),
                                 stop_strings=style.stop_tokens())
        rows, counts = wrong_answer_pairs(items, answers, lambda i, a: check_answer(i.task, i.instruction, a),
                                          max_pairs_per_prompt, only_answerable)
        greedy_right = sum(check_answer(i.task, i.instruction, a[0]) for i, a in zip(items, answers))
        counts["greedy_exact_match"] = greedy_right / len(items)
        # pass@k: the share of prompts answered right at least once among their samples
        counts["any_answer_right"] = 1 - counts["prompts_never_answered_right"] / len(items)
        counts["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{split}: greedy exact match {greedy_right}/{len(items)}; {counts['right']} of {counts['answers']}"
              f" answers right; {len(rows)} pairs; {counts['prompts_without_a_wrong_answer']} prompts without a wrong"
              f" answer; {len(items) - counts['prompts_never_answered_right']} prompts answered right at least once"
              f" ({counts['seconds']}s)")
        result[split], report[split] = rows, counts
    return result, report


def hash_seed(seed: int, split: str) -> int:
    """A generator seed per split, so the train answers stay the same when only --num_test changes."""
    return seed * 2 + (split == "test")


# ----------------------------------------------------------------------------------------------- main


def prepare_preferences(
    checkpoint_dir: Path,
    data_file: Optional[Path] = None,
    test_file: Optional[Path] = None,
    out_dir: Path = Path("data/preferences"),
    format: Literal["auto", "pairs", "hh", "ultrafeedback"] = "auto",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    system_field: str = "system",
    test_fraction: float = 0.1,
    num_train: int = 1000,
    num_test: int = 100,
    tasks: str = "all",
    train_sentences: Optional[Path] = None,
    seed: int = 42,
    max_seq_length: int = 256,
    strict: bool = False,
    from_run: Optional[Path] = None,
    samples_per_prompt: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    max_pairs_per_prompt: int = 1,
    only_answerable: bool = False,
    precision: Optional[Literal["32-true", "bf16-true"]] = None,
    device: str = "auto",
) -> None:
    """Read or make preference pairs, tokenize them for `checkpoint_dir`, write train.pt, test.pt and meta.json.

    Args:
        checkpoint_dir: The checkpoint to align: its tokenizer and prompt style encode the pairs.
        data_file: A JSON/JSONL/CSV/Parquet file of pairs; default: pairs made from the built-in task set.
        test_file: A file of held-out pairs; default: --test_fraction of data_file's rows, chosen at random.
        out_dir: Where to write train.pt, test.pt and meta.json.
        format: The layout of the rows: pairs, hh, ultrafeedback, or auto (recognised from the first row).
        prompt_field: The prompt's field (pairs; ultrafeedback falls back to "instruction").
        chosen_field: The preferred answer's field (pairs, hh).
        rejected_field: The dispreferred answer's field (pairs, hh).
        system_field: An optional per-row system message (pairs).
        test_fraction: The share of data_file's rows held out as test.pt when no test_file is given.
        num_train: Training pairs made from the task set (without data_file).
        num_test: Test pairs made from the task set (without data_file).
        tasks: "all" or a comma-separated list of the task set's tasks (without data_file).
        train_sentences: Make the training pairs from this file's sentences (one a line, none a test sentence) instead
            of the task set's training sentences, e.g. scripts/data/more_sentences.txt: with --from_run, prompts the
            fine-tuned model has not learned by heart, so its mistakes look like those on the test sentences.
        seed: Seeds the split and the task pairs; the same flags give byte-identical files.
        max_seq_length: Cut sequences to this many tokens; a pair whose prompt leaves no room for an answer is skipped.
        strict: Stop at the first row that makes no pair instead of skipping and counting it.
        from_run: On-policy pairs from the task set: a fine-tuned run or checkpoint (anything eval/tasks.py and
            generate/ load) answers the prompts; its wrong answers (by the task's exact-match check) become rejected
            against the gold answer, chosen. Prompts it always answers right make no pair (counted).
        samples_per_prompt: Answers per prompt with --from_run: the first greedy, the rest sampled.
        temperature: The sampling temperature of the answers after the first (with --from_run).
        max_new_tokens: The longest answer generated (with --from_run).
        batch_size: Answers generated together (with --from_run).
        max_pairs_per_prompt: At most this many of a prompt's distinct wrong answers make pairs (with --from_run).
        only_answerable: Only prompts that one of the model's own answers gets right make pairs (with --from_run and
            --samples_per_prompt > 1): DPO then moves probability towards answers within the model's reach.
        precision: 32-true or bf16-true for generating with --from_run; default: bf16 on GPU, fp32 on CPU.
        device: "auto", "cpu", "cuda", ... for generating with --from_run.
    """
    if max_seq_length < 2:
        raise ValueError(f"--max_seq_length must be at least 2, got {max_seq_length}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test_fraction must be between 0 and 1, got {test_fraction}")
    if data_file is None and test_file is not None:
        raise ValueError("--test_file needs --data_file")
    if train_sentences is not None and data_file is not None:
        raise ValueError("--train_sentences makes pairs from the built-in task set; it cannot be combined with"
                         " --data_file")
    if only_answerable and (from_run is None or samples_per_prompt < 2):
        raise ValueError("--only_answerable needs --from_run and --samples_per_prompt of 2 or more (with one answer a"
                         " prompt answered right has no wrong answer to pair)")
    if from_run is not None and data_file is not None:
        raise ValueError("--from_run answers the built-in task set's prompts; it cannot be combined with --data_file")
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_style = load_prompt_style(checkpoint_dir)
    skipped: dict[str, list[str]] = defaultdict(list)

    def skip(where: str, reason: str) -> None:
        if strict:
            raise ValueError(f"{where}: {reason} (--strict true; leave it false to skip and count such rows)")
        skipped[reason].append(where)

    on_policy = None
    if from_run is not None:
        source = f"tasks answered by {from_run}"
        raw, on_policy = on_policy_task_pairs(from_run, num_train, num_test, tasks, seed, samples_per_prompt,
                                              temperature, max_new_tokens, batch_size, max_pairs_per_prompt,
                                              precision, device, train_sentences, only_answerable)
        used_format = "tasks-on-policy"
    elif data_file is None:
        source = "tasks"
        raw = task_pairs(num_train, num_test, tasks, seed, train_sentences)
        used_format = "tasks"
    else:
        source = str(data_file)
        records = read_records(data_file)
        used_format = format if format != "auto" else detect_format(records[0].row, chosen_field)
        parsed = parse_records(records, used_format, prompt_field, chosen_field, rejected_field, system_field, skip)
        if test_file is not None:
            test_records = read_records(test_file)
            raw = {"train": parsed, "test": parse_records(test_records, used_format, prompt_field, chosen_field,
                                                          rejected_field, system_field, skip)}
        else:
            order = list(range(len(parsed)))
            random.Random(seed).shuffle(order)
            num_held_out = max(1, round(len(parsed) * test_fraction)) if len(parsed) > 1 else 0
            held_out = set(order[:num_held_out])
            raw = {"train": [p for i, p in enumerate(parsed) if i not in held_out],
                   "test": [p for i, p in enumerate(parsed) if i in held_out]}

    encoded: dict[str, list[dict]] = {}
    for split, rows in raw.items():
        samples = []
        for where, prompt, chosen, rejected, system, task in rows:
            if chosen.strip() == rejected.strip():
                skip(where, "chosen and rejected are identical")
                continue
            try:
                pair = encode_pair(tokenizer, prompt_style, prompt, chosen, rejected, system, max_seq_length)
            except ValueError as e:
                skip(where, f"cannot be encoded ({e})")
                continue
            prompt_tokens = len(tokenizer.encode(pair["prompt"]))
            if prompt_tokens >= max_seq_length:
                skip(where, f"the prompt leaves no room for an answer within --max_seq_length {max_seq_length}")
                continue
            if task:
                pair["task"] = task
            samples.append(pair)
        encoded[split] = samples

    report = {reason: {"count": len(wheres), "first": wheres[:SHOWN_PER_REASON]} for reason, wheres in skipped.items()}
    for split in ("train", "test"):
        if not encoded[split]:
            details = "; ".join(f"{r}: {v['count']} (e.g. {v['first'][0]})" for r, v in report.items())
            raise ValueError(f"No {split} pairs left from {source}" + (f". Skipped rows: {details}" if details else ""))

    meta = {
        "checkpoint_dir": str(checkpoint_dir), "vocab_size": tokenizer.vocab_size, "prompt_style": prompt_style.name,
        "tokenizer_sha256": tokenizer_fingerprint(checkpoint_dir),
        "source": source, "format": used_format, "max_seq_length": max_seq_length, "seed": seed,
        "train_sentences": str(train_sentences) if train_sentences else None,
        "skipped": report,
    }
    if on_policy is not None:
        meta["on_policy"] = {"from_run": str(from_run), "samples_per_prompt": samples_per_prompt,
                             "only_answerable": only_answerable,
                             "temperature": temperature, "max_pairs_per_prompt": max_pairs_per_prompt, **on_policy}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, samples in encoded.items():
        save_pairs(samples, out_dir / f"{split}.pt")
        meta[split] = {
            "pairs": len(samples),
            "longest": max(max(len(s["chosen_input_ids"]), len(s["rejected_input_ids"])) for s in samples),
            "truncated": sum(s["truncated"] > 0 for s in samples),
        }
        if any("task" in s for s in samples):
            meta[split]["per_task"] = {t: sum(s.get("task") == t for s in samples)
                                       for t in sorted({s.get("task", "") for s in samples})}
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")

    print(f"Wrote {out_dir}/train.pt, test.pt and meta.json ({used_format} from {source}, {prompt_style.name!r}"
          f" prompt style)")
    for split in encoded:
        stats = meta[split]
        print(f"{split}: {stats['pairs']} pairs, longest {stats['longest']} tokens, {stats['truncated']} with an"
              f" answer cut to --max_seq_length {max_seq_length}")
    total_skipped = sum(v["count"] for v in report.values())
    print(f"skipped: {total_skipped} row(s)" + (":" if total_skipped else ""))
    for reason, value in report.items():
        print(f"  {value['count']:>6}  {reason}  (e.g. {', '.join(value['first'])})")
    example = encoded["train"][0]
    print(f"\nExample pair:\n  prompt:   {example['prompt']!r}\n  chosen:   {example['chosen']!r}\n"
          f"  rejected: {example['rejected']!r}")


def parse_records(records, used_format, prompt_field, chosen_field, rejected_field, system_field, skip) -> list[tuple]:
    rows = []
    for record in records:
        try:
            if used_format == "hh":
                prompt, chosen, rejected, system = parse_hh(record, chosen_field, rejected_field)
            elif used_format == "ultrafeedback":
                prompt, chosen, rejected, system = parse_ultrafeedback(record, prompt_field)
            else:
                prompt, chosen, rejected, system = parse_pairs(record, prompt_field, chosen_field, rejected_field,
                                                               system_field)
        except Skip as reason:
            skip(record.where, str(reason))
            continue
        if not (isinstance(prompt, list) or prompt.strip()) or not chosen.strip() or not rejected.strip():
            skip(record.where, "an empty prompt, chosen or rejected text")
            continue
        task = record.row.get("task") if isinstance(record.row.get("task"), str) else None
        rows.append((record.where, prompt, chosen, rejected, system, task))
    return rows


if __name__ == "__main__":
    run_cli(prepare_preferences)
