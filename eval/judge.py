"""LLM-as-judge with a local Forge checkpoint: pairwise (model A vs model B) or single-answer grading (1-10).

    python eval/judge.py --prompts_file eval/judge_prompts.jsonl --judge_dir checkpoints/org/judge \
        --model_a checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --model_b out/lora
    python eval/judge.py --mode single --prompts_file prompts.jsonl --judge_dir checkpoints/org/judge --model_a out/lora

Both models answer every prompt (greedy, batched, each in its own prompt style); `--model_a/--model_b` are a
checkpoint or any fine-tuning run directory. Pairwise, the judge sees each pair twice, A first and then B first, and a
model wins a prompt only when the judge prefers it in both orders; a verdict that flips with the order is a tie (this
cancels the judge's position bias, which small judges have a lot of). The win rate of B counts ties as half, with a
bootstrap 95% confidence interval over the prompts. Single grading asks for a 1-10 rating of each answer alone.
Prompts come from a `.jsonl` file (`{"prompt": ..., "reference": optional reference answer}` per line) or a `.txt`
file (one prompt per line). Writes `judge.json` with every answer and judgement; ends with `win_rate: <value>`
(pairwise), `score_difference: <value>` (single, B minus A) or `mean_score: <value>` (single, one model).
"""

import json
import random
import re
import time
from pathlib import Path
from functools import partial
from typing import Callable, Literal, Optional

from model.cli import run_cli
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer
from model.weights.load import detect, load_any
from model.workflows.evaluate import greedy_answers, write_result
from model.workflows.judge import parse_score

# MT-Bench's judge prompts (Zheng et al. 2023, "Judging LLM-as-a-Judge"), with the reference answer optional
PAIRWISE_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the"
    " user question displayed below. You should choose the assistant that follows the user's instructions and answers"
    " the user's question better.{reference_note} Avoid any position biases and ensure that the order in which the"
    " responses were presented does not influence your decision. Do not allow the length of the responses to influence"
    " your evaluation. Be as objective as possible. After providing your explanation, output your final verdict by"
    ' strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]"'
    " for a tie.\n\n[User Question]\n{question}\n\n{reference}[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]"
)
SINGLE_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the"
    " user question displayed below. Consider helpfulness, relevance, accuracy, depth and level of detail.{reference_note}"
    " Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10"
    ' by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n[Question]\n{question}\n\n'
    "{reference}[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
REFERENCE_NOTE = " Compare the answers with the reference answer; an answer that contradicts it is wrong."
VERDICTS = {"a": "A", "b": "B", "c": "tie", "tie": "tie"}


def parse_verdict(text: str) -> Optional[str]:
    """"A", "B" or "tie" from a judge's reply; None when it gives no verdict.

    The format asked for ("[[A]]") wins, its last occurrence since judges often restate the options first; then
    common free-form endings ("Assistant B is better", "Verdict: A", a bare "B").
    """
    marked = re.findall(r"\[\[\s*(A|B|C|tie)\s*\]\]", text, flags=re.IGNORECASE)
    if marked:
        return VERDICTS[marked[-1].lower()]
    patterns = (
        r"\b(?:assistant|answer|response)\s+(A|B)\s+(?:is|was)\s+(?:clearly\s+|much\s+|slightly\s+)?better\b",
        r"\b(?:final\s+)?verdict\s*(?:is)?\s*[:\-]?\s*\(?\s*(A|B|C|tie)\b",
        r"^\s*\(?(A|B|C)\)?\s*[.!]?\s*$",
    )
    for pattern in patterns:
        found = re.findall(pattern, text, flags=re.IGNORECASE | re.MULTILINE)
        if found:
            return VERDICTS[found[-1].lower()]
    if re.search(r"\b(?:it'?s\s+a\s+tie|both\s+(?:answers|responses|assistants)\s+are\s+equally)\b", text, re.IGNORECASE):
        return "tie"
    return None


def parse_rating(text: str) -> Optional[float]:
    """A 1-10 rating from a judge's reply: the "[[7]]" asked for (its last one), else whatever model/judge.py's
    parser reads ("Rating: 7", "7/10", "I'd give it 7", ...); None when there is none or it is outside 1-10."""
    marked = re.findall(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", text)
    if marked:
        value = float(marked[-1])
        return value if 1 <= value <= 10 else None
    return parse_score(text)


def combine_orders(first: Optional[str], second_swapped: Optional[str]) -> Optional[str]:
    """The outcome of one prompt from the verdict with A shown first and the verdict with B shown first (already
    mapped back to the models' names): a win needs both; a verdict that flips with the order is a tie; no verdict
    in either order leaves the prompt out."""
    if first is None and second_swapped is None:
        return None
    return first if first == second_swapped else "tie"


def swap(verdict: Optional[str]) -> Optional[str]:
    return {"A": "B", "B": "A"}.get(verdict, verdict)


def bootstrap_interval(values: list[float], iters: int = 2000, seed: int = 1234, level: float = 0.95) -> list[float]:
    """Percentile bootstrap confidence interval of the mean of `values` (resampling prompts)."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(iters))
    tail = (1 - level) / 2
    return [means[int(tail * (iters - 1))], means[int((1 - tail) * (iters - 1))]]


def read_prompts(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts_file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".txt":
        prompts = [{"prompt": line.strip()} for line in lines if line.strip()]
    elif path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise ValueError(f"{path}, line {number}: expected an object with a non-empty string field 'prompt'")
            if "reference" in row and not isinstance(row["reference"], str):
                raise ValueError(f"{path}, line {number}: 'reference' must be a string")
            prompts.append({"prompt": row["prompt"], **({"reference": row["reference"]} if "reference" in row else {})})
    else:
        raise ValueError(f"--prompts_file {path}: expected a .jsonl or .txt file, got {path.suffix!r}")
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def answer_prompts(path: Path, prompts: list[dict], max_new_tokens: int, batch_size: int, **load) -> list[str]:
    """Greedy answers of the model at `path` (a checkpoint or a run), each prompt in that model's prompt style."""
    loaded = load_any(path, **load)
    tokenizer, style = Tokenizer(loaded.checkpoint_dir), load_prompt_style(loaded.checkpoint_dir)
    rendered = [style.apply(item["prompt"]) for item in prompts]
    return greedy_answers(loaded.model, tokenizer, rendered, max_new_tokens, batch_size, style,
                          desc=f"Answering ({path})")


def judge_texts(judge_dir: Path, texts: list[str], max_new_tokens: int, batch_size: int, prefill: str = "",
                **load) -> list[str]:
    """The judge's replies; `prefill` starts each reply (e.g. "[[") so that a small judge only has to choose."""
    loaded = load_any(judge_dir, **load)
    tokenizer, style = Tokenizer(loaded.checkpoint_dir), load_prompt_style(loaded.checkpoint_dir)
    rendered = [style.apply(text) + prefill for text in texts]
    replies = greedy_answers(loaded.model, tokenizer, rendered, max_new_tokens, batch_size, style, desc="Judging")
    return [prefill + reply for reply in replies]


def fill(template: str, item: dict, **answers: str) -> str:
    reference = item.get("reference")
    return template.format(
        question=item["prompt"], reference_note=REFERENCE_NOTE if reference else "",
        reference=f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n" if reference else "",
        **answers,
    )


def judge_pairwise(prompts: list[dict], records: list[dict], answers_a: list[str], answers_b: list[str],
                   judge: Callable[[list[str]], list[str]], bootstrap_iters: int,
                   seed: int) -> tuple[dict, list[str], str, float]:
    """Pairwise mode: the judge sees each pair in both orders; B's win rate (ties count half) with its 95% CI.
    Fills each record's judgements and verdicts; returns the summary entries, the lines to print and the headline
    metric with its value."""
    texts = [fill(PAIRWISE_PROMPT, item, answer_a=a, answer_b=b) for item, a, b in zip(prompts, answers_a, answers_b)]
    texts += [fill(PAIRWISE_PROMPT, item, answer_a=b, answer_b=a) for item, a, b in zip(prompts, answers_a, answers_b)]
    judgements = judge(texts)
    n = len(prompts)
    outcomes = []
    for i, record in enumerate(records):
        first, second = parse_verdict(judgements[i]), swap(parse_verdict(judgements[n + i]))
        outcome = combine_orders(first, second)
        record.update(judgement_a_first=judgements[i], judgement_b_first=judgements[n + i],
                      verdict_a_first=first, verdict_b_first=second, outcome=outcome)
        outcomes.append(outcome)
    decided = [o for o in outcomes if o is not None]
    if not decided:
        raise ValueError(f"The judge gave no verdict that could be read for any of the {n} prompts (its first"
                         f" reply: {judgements[0][:160]!r}); use a larger or instruction-tuned judge, or"
                         " --prefill '[['")
    scores = [1.0 if o == "B" else 0.5 if o == "tie" else 0.0 for o in decided]
    both = [(r["verdict_a_first"], r["verdict_b_first"]) for r in records
            if r["verdict_a_first"] is not None and r["verdict_b_first"] is not None]
    summary = dict(
        win_rate=sum(scores) / len(scores), win_rate_ci95=bootstrap_interval(scores, bootstrap_iters, seed),
        wins_b=decided.count("B"), wins_a=decided.count("A"), ties=decided.count("tie"),
        no_verdict=outcomes.count(None),
        verdicts_read=sum(r[k] is not None for r in records for k in ("verdict_a_first", "verdict_b_first")),
        position_consistency=sum(a == b for a, b in both) / len(both) if both else None,
    )
    lines = [f"B wins {summary['wins_b']}, A wins {summary['wins_a']}, ties {summary['ties']}, no verdict"
             f" {summary['no_verdict']} (of {n} prompts, judged in both orders)",
             f"win rate of B over A: {summary['win_rate']:.3f} (95% CI {summary['win_rate_ci95'][0]:.3f}-"
             f"{summary['win_rate_ci95'][1]:.3f}); verdicts read {summary['verdicts_read']}/{2 * n}; same verdict"
             f" in both orders: " + (f"{summary['position_consistency']:.2f}" if both else "n/a")]
    return summary, lines, "win_rate", summary["win_rate"]


def grade_single(prompts: list[dict], records: list[dict], answers_a: list[str], answers_b: Optional[list[str]],
                 judge: Callable[[list[str]], list[str]], bootstrap_iters: int,
                 seed: int) -> tuple[dict, list[str], str, float]:
    """Single mode: a 1-10 rating of each answer alone; each model's mean score and, with B, the paired difference
    B minus A, with 95% CIs. Fills each record's judgements and scores; returns the summary entries, the lines to
    print and the headline metric with its value."""
    graded = [("a", answers_a)] + ([("b", answers_b)] if answers_b is not None else [])
    texts = [fill(SINGLE_PROMPT, item, answer=answer) for _, answers in graded for item, answer in
             zip(prompts, answers)]
    judgements = judge(texts)
    summary: dict = {}
    lines = []
    for k, (name, _) in enumerate(graded):
        ratings = [parse_rating(j) for j in judgements[k * len(prompts):(k + 1) * len(prompts)]]
        for record, judgement, rating in zip(records, judgements[k * len(prompts):], ratings):
            record[f"judgement_{name}"], record[f"score_{name}"] = judgement, rating
        read = [r for r in ratings if r is not None]
        if not read:
            raise ValueError(f"The judge gave no readable 1-10 rating for model {name.upper()}'s answers (its"
                             f" first reply: {judgements[k * len(prompts)][:160]!r}); use a larger or"
                             " instruction-tuned judge, or --prefill 'Rating: [['")
        summary[f"mean_score_{name}"] = sum(read) / len(read)
        summary[f"mean_score_{name}_ci95"] = bootstrap_interval(read, bootstrap_iters, seed)
        summary[f"scores_read_{name}"] = len(read)
        lines.append(f"model {name.upper()}: mean score {summary[f'mean_score_{name}']:.2f} (95% CI"
                     f" {summary[f'mean_score_{name}_ci95'][0]:.2f}-{summary[f'mean_score_{name}_ci95'][1]:.2f}),"
                     f" {len(read)} of {len(prompts)} ratings read")
    if answers_b is not None:
        paired = [r["score_b"] - r["score_a"] for r in records if r["score_a"] is not None and r["score_b"] is not None]
        if not paired:
            raise ValueError("No prompt has a readable rating for both answers; use a larger judge")
        summary["score_difference"] = sum(paired) / len(paired)
        summary["score_difference_ci95"] = bootstrap_interval(paired, bootstrap_iters, seed)
        lines.append(f"B minus A: {summary['score_difference']:+.2f} (95% CI {summary['score_difference_ci95'][0]:+.2f}"
                     f" to {summary['score_difference_ci95'][1]:+.2f}) over {len(paired)} prompts")
        return summary, lines, "score_difference", summary["score_difference"]
    return summary, lines, "mean_score", summary["mean_score_a"]


def main(
    prompts_file: Path,
    judge_dir: Path,
    model_a: Path,
    model_b: Optional[Path] = None,
    mode: Literal["pairwise", "single"] = "pairwise",
    limit: Optional[int] = None,
    max_new_tokens: int = 128,
    judge_max_new_tokens: int = 256,
    prefill: str = "",
    batch_size: int = 8,
    bootstrap_iters: int = 2000,
    seed: int = 1234,
    out_dir: Path = Path("out/eval/judge"),
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    quantize: Optional[str] = None,
    device: str = "auto",
) -> float:
    """Judge two models' answers against each other (pairwise) or grade them one by one (single).

    Args:
        prompts_file: .jsonl ({"prompt": ..., "reference": optional}) or .txt (one prompt per line).
        judge_dir: The judge: a checkpoint (or a fine-tuning run) to prompt with the MT-Bench judge prompts.
        model_a: The baseline: a checkpoint, or a LoRA/adapter run directory.
        model_b: The candidate (pairwise: required; single: optional, graded too).
        mode: "pairwise" (which answer is better, asked in both orders) or "single" (a 1-10 rating per answer).
        limit: Use only the first `limit` prompts.
        max_new_tokens: The longest answer the models give.
        judge_max_new_tokens: The longest judgement (explanation + verdict).
        prefill: Text the judge's reply starts with, e.g. "[[" (pairwise) or "Rating: [[" (single): a small judge
            then gives its verdict at once instead of an explanation that may never reach one.
        batch_size: Prompts answered or judged together.
        bootstrap_iters: Resamples for the 95% confidence intervals.
        seed: Seed of the bootstrap.
        out_dir: Where to write judge.json.
        precision: 32-true, bf16-true or 16-true. Default: bf16 on GPU, fp32 on CPU.
        quantize: Load the models and the judge quantized with bitsandbytes (bnb.nf4, ...).
        device: "auto", "cpu", "cuda", ...
    """
    if mode == "pairwise" and model_b is None:
        raise ValueError("--mode pairwise needs --model_b (the model compared with --model_a)")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    prompts = read_prompts(prompts_file)[:limit]
    for path in [model_a, model_b, judge_dir]:
        if path is not None:
            detect(path)  # fail on a wrong path before any model is loaded
    load = dict(device=device, precision=precision, quantize=quantize)
    t0 = time.perf_counter()
    answers_a = answer_prompts(model_a, prompts, max_new_tokens, batch_size, **load)
    answers_b = answer_prompts(model_b, prompts, max_new_tokens, batch_size, **load) if model_b else None
    records = [{"prompt": item["prompt"], "reference": item.get("reference"), "answer_a": a}
               for item, a in zip(prompts, answers_a)]
    if answers_b is not None:
        for record, b in zip(records, answers_b):
            record["answer_b"] = b
    judge = partial(judge_texts, judge_dir, max_new_tokens=judge_max_new_tokens, batch_size=batch_size,
                    prefill=prefill, **load)
    summary = {"mode": mode, "judge": str(judge_dir), "model_a": str(model_a),
               "model_b": str(model_b) if model_b else None, "prompts_file": str(prompts_file), "prompts": len(prompts)}
    run_mode = judge_pairwise if mode == "pairwise" else grade_single
    results, lines, headline, value = run_mode(prompts, records, answers_a, answers_b, judge, bootstrap_iters, seed)
    summary.update(results)
    summary.update(seconds=time.perf_counter() - t0, records=records)
    path = write_result(out_dir, "judge.json", summary)
    print("\n".join(lines))
    print(f"wrote {path}")
    print(f"{headline}: {value:.4f}")
    return value


if __name__ == "__main__":
    run_cli(main)
