"""Exact-match accuracy of greedy answers on a prepared test split, overall and per task.

    python eval/tasks.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data_dir data/tasks
    python eval/tasks.py --checkpoint_dir out/lora --data_dir data/tasks

`--checkpoint_dir` is a checkpoint or any fine-tuning run (a LoRA/DoRA, adapter or full fine-tune out_dir, its final/
or a step-* directory), loaded by `model.weights.load.load_any`.

Each test sample's prompt (already rendered in the checkpoint's prompt style when the data was prepared) is
answered greedily; an answer counts when it equals the expected response after stripping surrounding whitespace.
Writes `tasks.json` (summary + every answer) to `--out_dir` and ends with the line `exact_match: <value>`.
"""

import time
from pathlib import Path
from typing import Literal, Optional

from model.cli import run_cli
from model.data.sft import load_dataset
from model.tokenizer import Tokenizer
from model.weights.load import load_any
from model.workflows.evaluate import default_out_dir, exact_match_of, write_result


def evaluate(
    checkpoint_dir: Path,
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
        checkpoint_dir: The model: a checkpoint or a fine-tuning run (its out_dir, final/ or a step-* directory).
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
    loaded = load_any(checkpoint_dir, device, precision, quantize)
    model, checkpoint_dir, run_dir = loaded.model, loaded.checkpoint_dir, loaded.run_dir
    tokenizer = Tokenizer(checkpoint_dir)
    samples = load_dataset(Path(data_dir) / f"{split}.pt", vocab_size=tokenizer.vocab_size)[:limit]
    t0 = time.perf_counter()
    result = exact_match_of(model, tokenizer, samples, max_new_tokens, batch_size)
    summary = {"checkpoint_dir": str(checkpoint_dir), "run_dir": str(run_dir) if run_dir else None,
               "kind": loaded.kind, "data": str(Path(data_dir) / f"{split}.pt"),
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
