"""Multiple-choice accuracy on an MMLU-format CSV, by the log-likelihood of each choice: a custom benchmark in a file.

    python eval/multiple_choice.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --data_file my_questions.csv --num_fewshot 3 --subject "company policy"

The CSV has one question per row: `question,A,B,C,D,answer` (any number of choices, at least two; `answer` is a
letter), with or without that header line, as in MMLU's released files. Each question is written the way MMLU's
authors prompt it ("The following are multiple choice questions (with answers) about <subject>.", the question,
"A. ...", ..., "Answer:"), after `--num_fewshot` solved examples (from `--fewshot_csv`, else the file's other
questions), and the model's choice is the answer letter it finds most likely (`--score letter`), or the choice text
it finds most likely per character (`--score text`, for models that do not follow the letter format yet).
Writes `multiple_choice.json` (accuracy, per-question choice probabilities) and ends with `accuracy: <value>`.
"""

import time
from pathlib import Path
from typing import Literal, Optional

from model.cli import run_cli
from model.tokenizer import Tokenizer
from model.weights.load import load_any
from model.workflows.evaluate import default_out_dir, read_questions, score_questions, write_result


def main(
    data_file: Path,
    checkpoint_dir: Path,
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
        data_file: The questions, a CSV: question,A,B,C,D,answer per row (any number >= 2 of choices; header
            optional).
        checkpoint_dir: The model: a checkpoint or a fine-tuning run (its out_dir, final/ or a step-* directory).
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
    questions = read_questions(data_file)
    fewshot = read_questions(fewshot_csv) if fewshot_csv is not None else None
    loaded = load_any(checkpoint_dir, device, precision, quantize)
    model, checkpoint_dir, run_dir = loaded.model, loaded.checkpoint_dir, loaded.run_dir
    tokenizer = Tokenizer(checkpoint_dir)
    t0 = time.perf_counter()
    result = score_questions(model, tokenizer, questions[:limit], fewshot, num_fewshot, subject, score, batch_size)
    summary = {"checkpoint_dir": str(checkpoint_dir), "run_dir": str(run_dir) if run_dir else None,
               "data_file": str(data_file), **result, "seconds": time.perf_counter() - t0}
    path = write_result(out_dir or default_out_dir(checkpoint_dir, run_dir), "multiple_choice.json", summary)
    print(f"{result['correct']} of {result['questions']} correct ({num_fewshot}-shot, by {score})")
    print(f"wrote {path}")
    print(f"accuracy: {result['accuracy']:.4f}")
    return result["accuracy"]


if __name__ == "__main__":
    run_cli(main)
