"""Scoring a model on a benchmark, shared by the eval scripts: log-likelihoods of continuations in batches, rolling
windows over long texts, batched greedy answers, the metrics (exact match, perplexity, multiple choice) and
writing a result file. eval/tasks.py, eval/perplexity.py, eval/multiple_choice.py, eval/judge.py and eval/compare.py
are command lines over these functions.

Scoring a continuation is one forward pass over `context + continuation`; only the continuation's positions go
through the output head (`logits_mask`), which is most of the cost for a large vocabulary. Sequences are sorted by
length and right-padded: causal attention never lets a real position see the padding after it, so each score
equals the one computed alone.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from model.data.sft import IGNORE_INDEX
from model.files import atomic_write_text
from model.generate import generate_batch, stop_markers
from model.gpt import GPT
from model.prompts import PromptStyle
from model.tokenizer import Tokenizer

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@torch.inference_mode()
def continuation_logprobs(
    model: GPT, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16, desc: Optional[str] = None,
) -> list[tuple[float, bool]]:
    """For each `(context_ids, continuation_ids)`: the summed log-probability of the continuation given the context,
    and whether greedy decoding would produce exactly the continuation.

    A sequence longer than the model's context keeps its last `block_size` tokens (the continuation must fit).
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    block_size = model.config.block_size
    device = model.transformer.wte.weight.device
    inputs = []
    for index, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"Request {index} has an empty context or continuation; both need at least one token")
        if len(continuation) > block_size:
            raise ValueError(f"A continuation of {len(continuation)} tokens does not fit the model's context of"
                             f" {block_size} tokens")
        # the last token is only ever a target, never an input
        inputs.append((list(context) + list(continuation))[-(block_size + 1):][:-1])
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, disable=desc is None) as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            length = len(inputs[batch[0]])
            idx = torch.zeros(len(batch), length, dtype=torch.long)
            scored = torch.zeros(len(batch), length, dtype=torch.bool)
            targets = []
            for row, i in enumerate(batch):
                n, m = len(inputs[i]), len(requests[i][1])
                idx[row, :n] = torch.tensor(inputs[i])
                scored[row, n - m:n] = True
                targets.extend(requests[i][1])
            logits = model(idx.to(device), logits_mask=scored.to(device))
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            targets_t = torch.tensor(targets, device=logprobs.device)
            token_logprobs = logprobs.gather(-1, targets_t[:, None]).squeeze(-1).cpu()
            greedy = (logprobs.argmax(dim=-1) == targets_t).cpu()
            offset = 0
            for i in batch:
                m = len(requests[i][1])
                results[i] = (float(token_logprobs[offset:offset + m].sum()), bool(greedy[offset:offset + m].all()))
                offset += m
            progress.update(len(batch))
    return results


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split the way lm-evaluation-harness does: the two texts are
    encoded together (a word keeps its usual tokens across the seam) and cut after the context's own tokens; a
    space that ends the context moves to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation).tolist()
    context_ids = tokenizer.encode(context).tolist()
    return whole[:len(context_ids)], whole[len(context_ids):]


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """`(context, continuation)` pairs that score every token of `tokens` exactly once (the first one after
    `prefix_token`, a BOS or EOS), each with as much preceding context as fits in `max_length`. These are
    lm-evaluation-harness's own windows, so a perplexity here equals its `loglikelihood_rolling`."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = get_rolling_token_windows(tokens, prefix_token=prefix_token, max_seq_len=max_length, context_len=1)
    return [make_disjoint_window(window) for window in windows]


def prefix_token(tokenizer: Tokenizer) -> int:
    """The token that stands before a text scored from its very beginning: BOS, or EOS for tokenizers without one
    (what lm-evaluation-harness's HF model uses)."""
    token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if token is None:
        raise ValueError(f"The tokenizer in {tokenizer.checkpoint_dir} has neither a BOS nor an EOS token to start"
                         " a text with")
    return token


def greedy_answers(model: GPT, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                   style: Optional[PromptStyle] = None, desc: str = "Answering") -> list[str]:
    """The greedy answer to each of `prompts` (already rendered in the model's prompt style), decoded in batches;
    with `style`, an answer also ends at the style's end-of-turn markers."""
    stop_ids, stop_strings = stop_markers(tokenizer, style) if style is not None else (tokenizer.stop_ids, [])
    device = model.transformer.wte.weight.device
    answers = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr) as progress:
        for start in range(0, len(prompts), batch_size):
            batch = [tokenizer.encode(p).to(device) for p in prompts[start:start + batch_size]]
            for ids in generate_batch(model, batch, max_new_tokens, temperature=0.0, stop_ids=stop_ids):
                text = tokenizer.decode(ids)
                for marker in stop_strings:
                    text = text.split(marker)[0]
                answers.append(text.strip())
            progress.update(len(batch))
    return answers


def lm_eval_harness():
    """`model.workflows.harness` (lm-eval's model interface over our GPT); one line on what to install when lm-eval,
    an optional dependency (the `eval` extra), is missing."""
    try:
        from model.workflows import harness
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "lm_eval":
            raise
        raise SystemExit("lm-eval is not installed: pip install -e '.[eval]' (the test extra includes it)") from None
    return harness


def write_result(out_dir: Path, name: str, result: dict) -> Path:
    """Write `result` as `out_dir/name` atomically (never a half-written file) and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / name, json.dumps(result, indent=2, ensure_ascii=False))
    return out_dir / name


def default_out_dir(checkpoint_dir: Path, run_dir: Optional[Path]) -> Path:
    """Where a result goes when --out_dir is not given: the run's weights directory, else out/eval/<checkpoint>."""
    return Path(run_dir) if run_dir is not None else Path("out/eval") / Path(checkpoint_dir).name


def exact_match_of(model, tokenizer: Tokenizer, samples: list[dict], max_new_tokens: int = 64,
                   batch_size: int = 16) -> dict:
    """Exact match overall and per task, with every answer."""
    outputs = greedy_answers(model, tokenizer, [sample["prompt"] for sample in samples], max_new_tokens, batch_size)
    correct: dict[str, list[bool]] = defaultdict(list)
    answers = []
    for sample, answer in zip(samples, outputs):
        ok = answer == sample["response"].strip()
        correct[sample.get("task", "all")].append(ok)
        answers.append({"task": sample.get("task"), "prompt": sample["prompt"], "expected": sample["response"],
                        "answer": answer, "correct": ok})
    return {"samples": len(answers), "exact_match": sum(a["correct"] for a in answers) / len(answers),
            "per_task": {task: sum(v) / len(v) for task, v in sorted(correct.items())},
            "per_task_samples": {task: len(v) for task, v in sorted(correct.items())}, "answers": answers}


def read_documents(path: Path, text_key: str = "text") -> list[str]:
    """The documents of a `.txt` (separated by blank lines) or `.jsonl` (one object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data_file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
                raise ValueError(f"{path}, line {number}: expected an object with a string field {text_key!r}"
                                 " (choose the field with --text_key)")
            if row[text_key].strip():
                documents.append(row[text_key])
    elif path.suffix in (".txt", ".md", ""):
        documents = [block.strip() for block in text.split("\n\n") if block.strip()]
    else:
        raise ValueError(f"--data_file {path}: expected a .txt or .jsonl file, got {path.suffix!r}")
    if not documents:
        raise ValueError(f"{path} holds no text to score")
    return documents


def answer_spans(sample: dict) -> list[tuple[list[int], list[int]]]:
    """`(context, continuation)` pairs covering the labelled positions of a prepared sample: the answer given the
    prompt (one pair per answer in a multi-turn sample)."""
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    spans, start = [], None
    for t in range(1, len(ids) + 1):
        scored = t < len(ids) and labels[t] != IGNORE_INDEX
        if scored and start is None:
            start = t
        elif not scored and start is not None:
            spans.append((ids[:start], ids[start:t]))
            start = None
    return spans


def perplexity_of(model, tokenizer: Tokenizer, documents: Optional[list[str]] = None,
                  samples: Optional[list[dict]] = None, max_length: Optional[int] = None,
                  batch_size: int = 8) -> dict:
    """Per-token perplexity (and per-document log-likelihoods) of documents or prepared samples."""
    max_length = max_length or model.config.block_size
    if not 2 <= max_length <= model.config.block_size:
        raise ValueError(f"--max_length must be between 2 and the model's context ({model.config.block_size}),"
                         f" got {max_length}")
    pairs, owners = [], []
    if documents is not None:
        prefix = prefix_token(tokenizer)
        for index, document in enumerate(documents):
            for window in rolling_windows(tokenizer.encode(document, bos=False).tolist(), prefix, max_length):
                pairs.append(window)
                owners.append(index)
        count = len(documents)
    else:
        for index, sample in enumerate(samples):
            for context, continuation in answer_spans(sample):
                pairs.append((context[-(max_length - len(continuation)):] or context[-1:], continuation))
                owners.append(index)
        count = len(samples)
    if not pairs:
        raise ValueError("Nothing to score: the samples have no labelled (answer) tokens")
    scores = continuation_logprobs(model, pairs, batch_size, desc="Scoring")
    logprob, tokens = [0.0] * count, [0] * count
    for owner, (context, continuation), (value, _) in zip(owners, pairs, scores):
        logprob[owner] += value
        tokens[owner] += len(continuation)
    total_logprob, total_tokens = sum(logprob), sum(tokens)
    result = {"perplexity": math.exp(-total_logprob / total_tokens), "nll_per_token": -total_logprob / total_tokens,
              "tokens": total_tokens, "documents": count, "max_length": max_length,
              "per_document": [{"logprob": lp, "tokens": n} for lp, n in zip(logprob, tokens)]}
    if documents is not None:
        total_bytes = sum(len(d.encode("utf-8")) for d in documents)
        result["bits_per_byte"] = -total_logprob / total_bytes / math.log(2)
        result["word_perplexity"] = math.exp(-total_logprob / sum(len(d.split()) for d in documents))
    return result


def read_questions(path: Path) -> list[dict]:
    """The questions of an MMLU-format CSV: `{"question", "choices", "answer" (index), "line"}` each."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, newline="", encoding="utf-8") as fp:
        try:
            rows = list(csv.reader(fp))
        except csv.Error as e:
            raise ValueError(f"{path}: not a readable CSV file ({e})") from None
    questions = []
    for number, row in enumerate(rows, start=1):
        if not any(cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if number == 1 and cells[0].lower() == "question" and cells[-1].lower() == "answer":
            continue
        if len(cells) < 4:
            raise ValueError(f"{path}, line {number}: expected question, at least two choices and an answer letter"
                             f" (question,A,B,C,D,answer), got {len(cells)} column(s)")
        question, choices, answer = cells[0], cells[1:-1], cells[-1].upper()
        if not question:
            raise ValueError(f"{path}, line {number}: the question is empty")
        if len(choices) > len(LETTERS) or answer not in LETTERS[:len(choices)]:
            raise ValueError(f"{path}, line {number}: the answer must be one of the letters"
                             f" {', '.join(LETTERS[:len(choices)])} (one per choice), got {cells[-1]!r}")
        empty = [LETTERS[i] for i, choice in enumerate(choices) if not choice]
        if empty:
            raise ValueError(f"{path}, line {number}: choice {', '.join(empty)} is empty")
        questions.append({"question": question, "choices": choices, "answer": LETTERS.index(answer), "line": number})
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def format_question(item: dict, with_answer: bool) -> str:
    lines = [item["question"]] + [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item["choices"])]
    return "\n".join(lines) + "\nAnswer:" + (f" {LETTERS[item['answer']]}" if with_answer else "")


def build_prompt(item: dict, shots: list[dict], subject: Optional[str]) -> str:
    about = f" about {subject}" if subject else ""
    header = f"The following are multiple choice questions (with answers){about}.\n\n"
    return header + "".join(format_question(shot, True) + "\n\n" for shot in shots) + format_question(item, False)


def score_questions(model, tokenizer: Tokenizer, questions: list[dict], fewshot: Optional[list[dict]] = None,
                    num_fewshot: int = 0, subject: Optional[str] = None, score: str = "letter",
                    batch_size: int = 16) -> dict:
    """Accuracy and per-question choice probabilities."""
    if score not in ("letter", "text"):
        raise ValueError(f"--score must be 'letter' or 'text', got {score!r}")
    if num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be at least 0, got {num_fewshot}")
    requests, prompts = [], []
    for index, item in enumerate(questions):
        # examples from the same file never include the question being asked
        pool = fewshot if fewshot is not None else questions[:index] + questions[index + 1:]
        if len(pool) < num_fewshot:
            raise ValueError(f"--num_fewshot {num_fewshot} needs that many example questions; only {len(pool)}"
                             " are available (add them with --fewshot_csv)")
        prompt = build_prompt(item, pool[:num_fewshot], subject)
        prompts.append(prompt)
        options = [f" {LETTERS[i]}" for i in range(len(item["choices"]))] if score == "letter" else \
            [f" {choice}" for choice in item["choices"]]
        requests.extend(encode_pair(tokenizer, prompt, option) for option in options)
    logprobs = [value for value, _ in continuation_logprobs(model, requests, batch_size, desc="Scoring choices")]
    results, offset, correct = [], 0, 0
    for item, prompt in zip(questions, prompts):
        n = len(item["choices"])
        values = logprobs[offset:offset + n]
        offset += n
        # per character, so a long choice is not penalized for having more tokens to get right
        ranked = values if score == "letter" else [v / len(c) for v, c in zip(values, item["choices"])]
        predicted = max(range(n), key=lambda i: ranked[i])
        peak = max(values)
        total = sum(math.exp(v - peak) for v in values)
        correct += predicted == item["answer"]
        results.append({"line": item["line"], "question": item["question"], "answer": LETTERS[item["answer"]],
                        "predicted": LETTERS[predicted], "correct": predicted == item["answer"],
                        "probabilities": {LETTERS[i]: math.exp(v - peak) / total for i, v in enumerate(values)}})
    return {"accuracy": correct / len(questions), "correct": correct, "questions": len(questions),
            "num_fewshot": num_fewshot, "score": score, "example_prompt": prompts[0], "answers": results}
