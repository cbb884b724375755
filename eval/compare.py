"""Compare a base model with its fine-tuned versions on a chosen set of metrics: one table, one chart, one JSON.

    python eval/compare.py --models '[base=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct, lora=out/lora]' \
        --metrics exact_match,perplexity,multiple_choice --data_dir data/tasks --limit 40 --mc_csv my_questions.csv

Each entry of `--models` is `name=path` (or just a path, named after its directory): a checkpoint (a base, a merged
or a full fine-tune, a DPO run's output ...) or any fine-tuning run directory (LoRA/DoRA, adapter), loaded once and
scored on every metric:
  exact_match      greedy answers on `--data_dir`'s prepared `--split` (eval/tasks.py)
  perplexity       per-token perplexity of the answers of that split, or of `--ppl_file` (eval/perplexity.py)
  multiple_choice  accuracy on the MMLU-format `--mc_csv` (eval/multiple_choice.py)
  lm_eval          the main metric of each of `--lm_eval_tasks` (eval/lm_eval_harness.py)
Writes `compare.md` (markdown table), `compare.png` (a bar chart per metric) and `compare.json` (everything) to
`--out_dir`, and ends with the change of the first metric from the first model to the last: `<metric>_change: <value>`.
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

from model.cli import run_cli
from model.data.sft import load_dataset
from model.files import atomic_save_figure, atomic_write_text
from model.tokenizer import Tokenizer
from model.weights.load import detect, load_any
from model.workflows.evaluate import exact_match_of, lm_eval_harness, perplexity_of, read_documents, read_questions, \
    score_questions, write_result

METRICS = ("exact_match", "perplexity", "multiple_choice", "lm_eval")
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def parse_models(models: list[str]) -> dict[str, Path]:
    parsed: dict[str, Path] = {}
    for entry in models:
        name, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        path = Path(path.strip())
        name = name.strip() or (path.parent.name if path.name == "final" else path.name)
        if name in parsed:
            raise ValueError(f"Two models are named {name!r} in --models; name them: --models '[base=..., lora=...]'")
        detect(path)  # a wrong path fails now, not after the first model's evaluation
        parsed[name] = path
    if not parsed:
        raise ValueError("--models is empty; give one or more name=path entries")
    return parsed


def parse_metrics(metrics: str) -> list[str]:
    names = [name.strip() for name in metrics.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"Unknown metric {', '.join(map(repr, unknown)) or '(none given)'} in --metrics; choose from"
                         f" {', '.join(METRICS)}")
    return names


def lower_is_better(column: str) -> bool:
    return column.split("/")[-1] in LOWER_IS_BETTER


def plot(rows: dict[str, dict[str, float]], columns: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns) + 1, 3.6), squeeze=False)
    names = list(rows)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, column in zip(axes[0], columns):
        values = [rows[name].get(column, float("nan")) for name in names]
        bars = ax.bar(names, values, color=[colors[i % len(colors)] for i in range(len(names))])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8)
        ax.set_title(f"{column}\n({'lower' if lower_is_better(column) else 'higher'} is better)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.margins(y=0.15)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)


def main(
    models: list[str],
    metrics: str = "exact_match,perplexity",
    data_dir: Path = Path("data/tasks"),
    split: str = "test",
    limit: Optional[int] = None,
    max_new_tokens: int = 64,
    ppl_file: Optional[Path] = None,
    mc_csv: Optional[Path] = None,
    mc_fewshot_csv: Optional[Path] = None,
    mc_num_fewshot: int = 0,
    lm_eval_tasks: str = "forge_local",
    lm_eval_limit: Optional[int] = None,
    lm_eval_num_fewshot: Optional[int] = None,
    batch_size: int = 16,
    out_dir: Path = Path("out/eval/compare"),
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    quantize: Optional[str] = None,
    device: str = "auto",
) -> float:
    """Score several checkpoints and runs on the same metrics.

    Args:
        models: `name=path` entries (a checkpoint or any fine-tuning run directory), e.g. '[base=DIR, lora=out/lora]'.
        metrics: Comma-separated, from exact_match, perplexity, multiple_choice, lm_eval.
        data_dir: Prepared data for exact_match (and perplexity without --ppl_file), made with the models' tokenizer.
        split: The prepared split to score.
        limit: Score only the first `limit` samples of the split (and of --mc_csv's questions).
        max_new_tokens: The longest answer generated for exact_match.
        ppl_file: A .txt or .jsonl file for perplexity instead of the split's answers.
        mc_csv: The MMLU-format CSV for multiple_choice.
        mc_fewshot_csv: Solved examples for multiple_choice; default: the CSV's other questions.
        mc_num_fewshot: Solved examples before each multiple-choice question.
        lm_eval_tasks: Comma-separated lm-eval tasks for lm_eval.
        lm_eval_limit: Documents per lm-eval task.
        lm_eval_num_fewshot: Few-shot examples for lm-eval tasks; default: each task's own.
        batch_size: Sequences scored or answered together.
        out_dir: Where to write compare.md, compare.png and compare.json.
        precision: 32-true, bf16-true or 16-true. Default: bf16 on GPU, fp32 on CPU.
        quantize: Load every model quantized with bitsandbytes (bnb.nf4, ...); default: as each run trained.
        device: "auto", "cpu", "cuda", ...
    """
    chosen = parse_metrics(metrics)
    runs = parse_models(models)
    if "multiple_choice" in chosen and mc_csv is None:
        raise ValueError("--metrics multiple_choice needs --mc_csv (an MMLU-format CSV file)")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    questions = read_questions(mc_csv)[:limit] if "multiple_choice" in chosen else None
    shots = read_questions(mc_fewshot_csv) if mc_fewshot_csv is not None else None
    documents = read_documents(ppl_file) if ppl_file is not None and "perplexity" in chosen else None
    harness = lm_eval_harness() if "lm_eval" in chosen else None

    rows: dict[str, dict[str, float]] = {}
    details: dict[str, dict] = {}
    t0 = time.perf_counter()
    for name, path in runs.items():
        print(f"=== {name} ({path})", file=sys.stderr)
        loaded = load_any(path, device=device, precision=precision, quantize=quantize)
        model, checkpoint_dir = loaded.model, loaded.checkpoint_dir
        tokenizer = Tokenizer(checkpoint_dir)
        rows[name], details[name] = {}, {"path": str(path), "checkpoint_dir": str(checkpoint_dir)}
        needs_split = "exact_match" in chosen or ("perplexity" in chosen and documents is None)
        samples = load_dataset(Path(data_dir) / f"{split}.pt", tokenizer.vocab_size)[:limit] if needs_split else None
        for metric in chosen:
            if metric == "exact_match":
                result = exact_match_of(model, tokenizer, samples, max_new_tokens, batch_size)
                rows[name]["exact_match"] = result["exact_match"]
            elif metric == "perplexity":
                result = perplexity_of(model, tokenizer, documents, None if documents else samples,
                                       batch_size=batch_size)
                rows[name]["perplexity"] = result["perplexity"]
            elif metric == "multiple_choice":
                result = score_questions(model, tokenizer, questions, shots, mc_num_fewshot, batch_size=batch_size)
                rows[name]["multiple_choice"] = result["accuracy"]
            else:
                result = harness.evaluate_model(model, tokenizer, lm_eval_tasks, lm_eval_num_fewshot, batch_size,
                                        lm_eval_limit)
                for task in result["results"]:
                    column, value = harness.headline(result["results"], task)
                    rows[name][column] = value
            details[name][metric] = result
        del model, loaded

    columns = list(dict.fromkeys(column for row in rows.values() for column in row))
    header = "| model | " + " | ".join(f"{c} {'↓' if lower_is_better(c) else '↑'}" for c in columns) + " |"
    table = [header, "|" + "---|" * (len(columns) + 1)]
    for name, row in rows.items():
        table.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" if c in row else "" for c in columns) + " |")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "compare.md", "\n".join(table) + "\n")
    plot(rows, columns, out_dir / "compare.png")
    write_result(out_dir, "compare.json", {"models": {n: str(p) for n, p in runs.items()}, "metrics": chosen,
                                           "table": rows, "details": details, "seconds": time.perf_counter() - t0})
    print("\n".join(table))
    print(f"wrote {out_dir / 'compare.md'}, {out_dir / 'compare.png'} and {out_dir / 'compare.json'}")
    first, last = list(rows.values())[0], list(rows.values())[-1]
    change = last[columns[0]] - first[columns[0]]
    print(f"{columns[0]}_change: {change:+.4f}")
    return change


if __name__ == "__main__":
    run_cli(main)
