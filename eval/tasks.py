"""Exact-match accuracy of greedy answers on a prepared test split, overall and per task.

    python eval/tasks.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data_dir data/tasks
    python eval/tasks.py --lora_dir out/lora --data_dir data/tasks

Each test sample's prompt (already rendered in the checkpoint's prompt style when the data was prepared) is
answered greedily; an answer counts when it equals the expected response after stripping surrounding whitespace.
Writes `tasks.json` (summary + every answer) to `--out_dir` and ends with the line `exact_match: <value>`.
"""

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from model.checkpoint import atomic_write_text
from model.data import load_dataset
from model.generate import generate_batch
from model.lora import inject_lora, load_lora_run, load_lora_state_dict
from model.tokenizer import Tokenizer
from model.training import load_hparams, run_output_dir
from model.utils import load_model, run_cli


def evaluate(
    checkpoint_dir: Optional[Path] = None,
    lora_dir: Optional[Path] = None,
    data_dir: Path = Path("data/tasks"),
    split: str = "test",
    limit: Optional[int] = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    out_dir: Optional[Path] = None,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    device: str = "auto",
) -> float:
    """Greedy exact-match accuracy on `data_dir/{split}.pt`.

    Args:
        checkpoint_dir: The model to evaluate (with --lora_dir: the base; default: the run's base).
        lora_dir: A LoRA run (its out_dir, final/ or a step-* directory) to evaluate on top of the base.
        data_dir: Prepared data (from scripts/prepare_tasks.py with the same checkpoint's tokenizer).
        split: "test" or "train".
        limit: Evaluate only the first `limit` samples.
        max_new_tokens: The longest answer generated.
        batch_size: Prompts answered together (greedy answers are the same as one at a time, only faster).
        out_dir: Where to write tasks.json; default: `lora_dir`'s directory, else `out/eval/<checkpoint name>`.
        precision: 32-true, bf16-true or 16-true. Default: bf16 on GPU, fp32 on CPU.
        quantize: Load the base quantized with bitsandbytes (bnb.nf4, ...).
        device: "auto", "cpu", "cuda", ...
    """
    if checkpoint_dir is None and lora_dir is None:
        raise ValueError("Give --checkpoint_dir, --lora_dir, or both")
    run_dir = run_output_dir(lora_dir, "lora.safetensors") if lora_dir else None
    if checkpoint_dir is None:
        checkpoint_dir = Path(load_hparams(run_dir)["checkpoint_dir"])
    tokenizer = Tokenizer(checkpoint_dir)
    samples = load_dataset(data_dir / f"{split}.pt", vocab_size=tokenizer.vocab_size)[:limit]
    model = load_model(checkpoint_dir, device=device, precision=precision, quantize=quantize)
    if run_dir is not None:
        lora_config, adapter = load_lora_run(run_dir)
        inject_lora(model, lora_config)
        load_lora_state_dict(model, adapter)
        model.eval()
    device_ = model.transformer.wte.weight.device

    correct: dict[str, list[bool]] = defaultdict(list)
    answers = []
    t0 = time.perf_counter()
    progress = tqdm(total=len(samples), desc="Answering", unit="sample", file=sys.stderr)
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        prompts = [tokenizer.encode(sample["prompt"]).to(device_) for sample in batch]
        outputs = generate_batch(model, prompts, max_new_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids)
        for sample, ids in zip(batch, outputs):
            answer = tokenizer.decode(ids).strip()
            ok = answer == sample["response"].strip()
            correct[sample.get("task", "all")].append(ok)
            answers.append({"task": sample.get("task"), "prompt": sample["prompt"], "expected": sample["response"],
                            "answer": answer, "correct": ok})
        progress.update(len(batch))
    progress.close()
    per_task = {task: sum(v) / len(v) for task, v in sorted(correct.items())}
    accuracy = sum(a["correct"] for a in answers) / len(answers)

    out_dir = out_dir or (run_dir if run_dir is not None else Path("out/eval") / checkpoint_dir.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"checkpoint_dir": str(checkpoint_dir), "lora_dir": str(run_dir) if run_dir else None,
               "data": str(data_dir / f"{split}.pt"), "samples": len(answers), "exact_match": accuracy,
               "per_task": per_task, "seconds": time.perf_counter() - t0}
    atomic_write_text(out_dir / "tasks.json", json.dumps({**summary, "answers": answers}, indent=2))
    width = max(len(task) for task in per_task)
    for task, value in per_task.items():
        print(f"{task:<{width}}  {value:.3f}  ({len(correct[task])} samples)")
    print(f"wrote {out_dir / 'tasks.json'}")
    print(f"exact_match: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    run_cli(evaluate)
