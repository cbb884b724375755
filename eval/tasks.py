"""Exact-match accuracy of greedy answers on a prepared test split, overall and per task.

    python eval/tasks.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data_dir data/tasks
    python eval/tasks.py --lora_dir out/lora --data_dir data/tasks
    python eval/tasks.py --adapter_dir out/adapter --data_dir data/tasks

Each test sample's prompt (already rendered in the checkpoint's prompt style when the data was prepared) is
answered greedily; an answer counts when it equals the expected response after stripping surrounding whitespace.
Writes `tasks.json` (summary + every answer) to `--out_dir` and ends with the line `exact_match: <value>`.
"""

import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).parent))
from scoring import default_out_dir, greedy_answers, write_result  # noqa: E402

from model.cli import run_cli
from model.data.sft import load_dataset
from model.tokenizer import Tokenizer  # noqa: E402
from model.weights.load import load_model_run


def exact_match_of(model, tokenizer: Tokenizer, samples: list[dict], max_new_tokens: int = 64,
                   batch_size: int = 16) -> dict:
    """Exact match overall and per task, with every answer (eval/compare.py calls this for each run)."""
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


def evaluate(
    checkpoint_dir: Optional[Path] = None,
    lora_dir: Optional[Path] = None,
    adapter_dir: Optional[Path] = None,
    data_dir: Path = Path("data/tasks"),
    split: str = "test",
    limit: Optional[int] = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    out_dir: Optional[Path] = None,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    quantize: Optional[str] = None,
    device: str = "auto",
) -> float:
    """Greedy exact-match accuracy on `data_dir/{split}.pt`.

    Args:
        checkpoint_dir: The model to evaluate (with --lora_dir/--adapter_dir: the base; default: the run's base).
        lora_dir: A LoRA/DoRA run (its out_dir, final/ or a step-* directory) to evaluate on top of the base.
        adapter_dir: An adapter run (finetune/adapter.py or adapter_v2.py) to evaluate on top of the base.
        data_dir: Prepared data (from scripts/prepare_tasks.py with the same checkpoint's tokenizer).
        split: "test" or "train".
        limit: Evaluate only the first `limit` samples.
        max_new_tokens: The longest answer generated.
        batch_size: Prompts answered together (greedy answers are the same as one at a time, only faster).
        out_dir: Where to write tasks.json; default: the run's directory, else `out/eval/<checkpoint name>`.
        precision: 32-true, bf16-true or 16-true. Default: bf16 on GPU, fp32 on CPU.
        quantize: Load the base quantized with bitsandbytes (bnb.nf4, ...); default: as the run trained.
        device: "auto", "cpu", "cuda", ...
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    model, checkpoint_dir, run_dir = load_model_run(checkpoint_dir, lora_dir, adapter_dir, device, precision, quantize)
    tokenizer = Tokenizer(checkpoint_dir)
    samples = load_dataset(Path(data_dir) / f"{split}.pt", vocab_size=tokenizer.vocab_size)[:limit]
    t0 = time.perf_counter()
    result = exact_match_of(model, tokenizer, samples, max_new_tokens, batch_size)
    summary = {"checkpoint_dir": str(checkpoint_dir), "lora_dir": str(run_dir) if lora_dir else None,
               "adapter_dir": str(run_dir) if adapter_dir else None, "data": str(Path(data_dir) / f"{split}.pt"),
               **result, "seconds": time.perf_counter() - t0}
    path = write_result(out_dir or default_out_dir(checkpoint_dir, run_dir), "tasks.json", summary)
    width = max(len(task) for task in result["per_task"])
    for task, value in result["per_task"].items():
        print(f"{task:<{width}}  {value:.3f}  ({result['per_task_samples'][task]} samples)")
    print(f"wrote {path}")
    print(f"exact_match: {result['exact_match']:.4f}")
    return result["exact_match"]


if __name__ == "__main__":
    run_cli(evaluate)
