"""Run EleutherAI's lm-evaluation-harness on a Forge checkpoint or fine-tuning run, with our own GPT.

    python eval/lm_eval_harness.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --tasks forge_local
    python eval/lm_eval_harness.py --checkpoint_dir out/lora --tasks arc_easy,hellaswag --num_fewshot 0 --limit 200

`model.workflows.harness.ForgeLM` implements lm-eval's model interface (loglikelihood, loglikelihood_rolling, generate_until) in batches,
so every lm-eval task runs: MMLU, ARC, HellaSwag, ... where the Hugging Face Hub is reachable (their data is
downloaded by `datasets`). Offline, tasks are YAML files over local data: `eval/lm_eval_tasks/` ships `forge_local`
(multiple choice, generation and perplexity over a few local JSONL rows); `--include_path DIR` adds your own.
Writes `lm_eval.json` (lm-eval's results, config and versions) to `--out_dir` and ends with the first task's main
metric: `<task>/<metric>: <value>`.
"""

import math
import time
from pathlib import Path
from typing import Literal, Optional

from model.cli import run_cli
from model.tokenizer import Tokenizer
from model.weights.load import load_any
from model.workflows.evaluate import default_out_dir, lm_eval_harness, write_result


def main(
    checkpoint_dir: Path,
    tasks: str = "forge_local",
    num_fewshot: Optional[int] = None,
    batch_size: int = 16,
    limit: Optional[float] = None,
    include_path: Optional[Path] = None,
    max_gen_toks: int = 256,
    seed: int = 1234,
    bootstrap_iters: int = 1000,
    out_dir: Optional[Path] = None,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    quantize: Optional[str] = None,
    device: str = "auto",
) -> float:
    """Evaluate a checkpoint or a fine-tuning run with lm-evaluation-harness.

    Args:
        checkpoint_dir: The model: a checkpoint or a fine-tuning run (its out_dir, final/ or a step-* directory).
        tasks: Comma-separated lm-eval task, group or tag names (forge_local, mmlu, arc_easy, hellaswag, ...).
        num_fewshot: Examples shown before each question; default: each task's own setting.
        batch_size: Sequences scored or generated together.
        limit: Evaluate only this many documents per task (a fraction below 1.0 means that part of each task).
        include_path: A directory of your own lm-eval YAML tasks (eval/lm_eval_tasks/ is always included).
        max_gen_toks: The most tokens a generation task may produce when it does not say.
        seed: Seed for lm-eval's few-shot sampling and any sampling in generation.
        bootstrap_iters: Bootstrap resamples for the standard errors (0 skips them).
        out_dir: Where to write lm_eval.json; default: the run's directory, else out/eval/<checkpoint name>.
        precision: 32-true, bf16-true or 16-true. Default: bf16 on GPU, fp32 on CPU.
        quantize: Load the base quantized with bitsandbytes (bnb.nf4, bnb.int8, ...); default: as the run trained.
        device: "auto", "cpu", "cuda", ...
    """
    if limit is not None and (limit <= 0 or (limit > 1 and not float(limit).is_integer())):
        raise ValueError(f"--limit must be a whole number of documents or a fraction in (0, 1], got {limit}")
    harness = lm_eval_harness()  # before loading the model: a missing lm-eval is one line, at once
    loaded = load_any(checkpoint_dir, device, precision, quantize)
    model, checkpoint_dir, run_dir = loaded.model, loaded.checkpoint_dir, loaded.run_dir
    tokenizer = Tokenizer(checkpoint_dir)
    t0 = time.perf_counter()
    result = harness.evaluate_model(model, tokenizer, tasks, num_fewshot, batch_size,
                                    int(limit) if limit is not None and limit > 1 else limit, include_path,
                                    max_gen_toks, seed, bootstrap_iters)
    from lm_eval.utils import make_table

    print(make_table({"results": result["results"], "versions": result["versions"], "n-shot": result["n-shot"],
                      "higher_is_better": {}}))
    names = list(result["results"])
    metric, value = harness.headline(result["results"], result["tasks"][0] if result["tasks"][0] in names else names[0])
    summary = {"checkpoint_dir": str(checkpoint_dir), "run_dir": str(run_dir) if run_dir else None,
               "headline": {metric: value}, "seconds": time.perf_counter() - t0, **result}
    path = write_result(out_dir or default_out_dir(checkpoint_dir, run_dir), "lm_eval.json", summary)
    print(f"wrote {path}")
    print(f"{metric}: {value:.4f}" if math.isfinite(value) else f"{metric}: {value}")
    return value


if __name__ == "__main__":
    run_cli(main)
