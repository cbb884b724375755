"""Multiple-choice accuracy on an MMLU-format CSV, by the log-likelihood of each choice: a custom benchmark in a file.

    python eval/multiple_choice.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --csv_file my_questions.csv --num_fewshot 3 --subject "company policy"

The CSV has one question per row: `question,A,B,C,D,answer` (any number of choices, at least two; `answer` is a
letter), with or without that header line, as in MMLU's released files. Each question is written the way MMLU's
authors prompt it ("The following are multiple choice questions (with answers) about <subject>.", the question,
"A. ...", ..., "Answer:"), after `--num_fewshot` solved examples (from `--fewshot_csv`, else the file's other
questions), and the model's choice is the answer letter it finds most likely (`--score letter`), or the choice text
it finds most likely per character (`--score text`, for models that do not follow the letter format yet).
Writes `multiple_choice.json` (accuracy, per-question choice probabilities) and ends with `accuracy: <value>`.
"""

import csv
import math
import sys
import time
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).parent))
from scoring import continuation_logprobs, default_out_dir, encode_pair, write_result  # noqa: E402

from model.cli import run_cli
from model.tokenizer import Tokenizer  # noqa: E402
from model.weights.load import load_model_run

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


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
    """Accuracy and per-question choice probabilities (eval/compare.py calls this for each run)."""
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


def main(
    csv_file: Path,
    checkpoint_dir: Optional[Path] = None,
    lora_dir: Optional[Path] = None,
    adapter_dir: Optional[Path] = None,
    fewshot_csv: Optional[Path] = None,
    num_fewshot: int = 0,
    subject: Optional[str] = None,
    score: Literal["letter", "text"] = "letter",
    limit: Optional[int] = None,
    batch_size: int = 16,
    out_dir: Optional[Path] = None,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    quantize: Optional[str] = None,
    device: str = "auto",
) -> float:
    """Score an MMLU-format CSV by the log-likelihood of each choice.

    Args:
        csv_file: The questions: question,A,B,C,D,answer per row (any number >= 2 of choices; header optional).
        checkpoint_dir: The model (with --lora_dir/--adapter_dir: the base; default: the run's own base).
        lora_dir: A LoRA/DoRA run (finetune/lora.py's out_dir, its final/ or a step-* directory).
        adapter_dir: An adapter run (finetune/adapter.py or adapter_v2.py).
        fewshot_csv: Solved examples shown before each question (MMLU's dev files); default: the file's others.
        num_fewshot: How many solved examples precede each question (0: zero-shot).
        subject: Named in the instruction line ("... about <subject>."); default: none.
        score: "letter": the most likely answer letter; "text": the most likely choice text per character.
        limit: Score only the first `limit` questions.
        batch_size: Choices scored together.
        out_dir: Where to write multiple_choice.json; default: the run's directory, else out/eval/<checkpoint name>.
        precision: 32-true, bf16-true or 16-true. Default: bf16 on GPU, fp32 on CPU.
        quantize: Load the base quantized with bitsandbytes (bnb.nf4, bnb.int8, ...); default: as the run trained.
        device: "auto", "cpu", "cuda", ...
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    questions = read_questions(csv_file)
    fewshot = read_questions(fewshot_csv) if fewshot_csv is not None else None
    model, checkpoint_dir, run_dir = load_model_run(checkpoint_dir, lora_dir, adapter_dir, device, precision, quantize)
    tokenizer = Tokenizer(checkpoint_dir)
    t0 = time.perf_counter()
    result = score_questions(model, tokenizer, questions[:limit], fewshot, num_fewshot, subject, score, batch_size)
    summary = {"checkpoint_dir": str(checkpoint_dir), "run_dir": str(run_dir) if run_dir else None,
               "csv_file": str(csv_file), **result, "seconds": time.perf_counter() - t0}
    path = write_result(out_dir or default_out_dir(checkpoint_dir, run_dir), "multiple_choice.json", summary)
    print(f"{result['correct']} of {result['questions']} correct ({num_fewshot}-shot, by {score})")
    print(f"wrote {path}")
    print(f"accuracy: {result['accuracy']:.4f}")
    return result["accuracy"]


if __name__ == "__main__":
    run_cli(main)
