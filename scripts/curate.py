"""Curate an instruction or chat dataset: dedup, rule filters, perplexity and LLM-as-judge scores, a report.

    python scripts/curate.py --data_file data.jsonl --out_file data/curated/data.jsonl --report_dir out/curate/data
    python scripts/curate.py --data_file data.jsonl --out_file curated.jsonl --report_dir out/curate/data \\
        --stages rules,exact_dedup,fuzzy_dedup,perplexity,judge \\
        --perplexity_checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --judge_checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --judge_min_score 7

Rows are instruction/input/output records (column names set by the --*_field flags), OpenAI-style `messages` or
ShareGPT `conversations`, in JSON, JSONL, CSV or Parquet. The kept rows are written unchanged to `--out_file`
(format from its suffix); every removed row goes to `report_dir/removed.jsonl` with the stage and the reason, so
nothing is lost silently. `report_dir/report.md` and its PNGs summarise what each stage removed, the lengths, the
scores and a map of the topics the kept data covers.

Stages run in this order whatever order --stages lists them in, cheapest first, so the model stages only see rows
that survived the others:
  rules        empty answers, too short/long, refusal and "as an AI language model" boilerplate, degenerate
               repetition, non-text junk, your own --drop_regex patterns
  exact_dedup  the same text after normalizing case, punctuation and spacing (first occurrence kept)
  fuzzy_dedup  near duplicates: MinHash + LSH over character (or word) n-grams, Jaccard >= --fuzzy_threshold
  perplexity   the answer's perplexity under --perplexity_checkpoint_dir; drops the most surprising ones
  judge        a 1-10 score from --judge_checkpoint_dir (model/judge.py); drops rows under --judge_min_score.
               Scores are appended to a cache file as they come, so a killed run continues where it stopped.
The first three stream the input and keep only hashes, so they run in bounded memory on large files.
"""

import json
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
from tqdm import tqdm

from model.cli import run_cli
from model.data.curate import (
    ExactDedup,
    FieldMap,
    FuzzyDedup,
    Rules,
    Sample,
    detect_format,
    model_embeddings,
    percentile_summary,
    response_perplexities,
    save_histogram,
    save_topic_map,
    tfidf_embeddings,
    to_sample,
    topic_map,
)
from model.data.records import Record, RecordError, data_format, iter_records, write_records
from model.files import atomic_write_text
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer
from model.weights.load import load_any
from model.workflows.judge import Judge, ScoreCache, pair_key, score_pairs

STAGES = ("rules", "exact_dedup", "fuzzy_dedup", "perplexity", "judge")
STREAMING = ("rules", "exact_dedup", "fuzzy_dedup")


def curate(
    data_file: Path,
    out_file: Path,
    report_dir: Path = Path("out/curate"),
    stages: str = "rules,exact_dedup,fuzzy_dedup",
    format: Literal["auto", "instruction", "messages", "sharegpt"] = "auto",
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
    system_field: str = "system",
    fuzzy_threshold: float = 0.8,
    ngram: int = 5,
    shingle: Literal["char", "word"] = "char",
    num_perm: int = 128,
    min_instruction_chars: int = 3,
    min_response_chars: int = 1,
    max_chars: int = 20000,
    max_repeated_ngram_fraction: float = 0.3,
    min_text_fraction: float = 0.5,
    boilerplate: bool = True,
    drop_regex: Optional[str] = None,
    perplexity_checkpoint_dir: Optional[Path] = None,
    perplexity_percentile: float = 95.0,
    perplexity_max: Optional[float] = None,
    max_tokens: int = 1024,
    judge_checkpoint_dir: Optional[Path] = None,
    judge_min_score: float = 7.0,
    judge_unscored: Literal["keep", "drop"] = "keep",
    judge_max_new_tokens: int = 8,
    judge_prefill: str = "Score:",
    judge_cache: Optional[Path] = None,
    batch_size: int = 8,
    map_embeddings: Literal["auto", "model", "tfidf", "none"] = "auto",
    embed_checkpoint_dir: Optional[Path] = None,
    map_samples: int = 2000,
    map_method: Literal["tsne", "pca"] = "tsne",
    clusters: int = 8,
    device: str = "auto",
    precision: Optional[str] = None,
    seed: int = 0,
) -> dict:
    """Filter `data_file` through the chosen stages into `out_file`; write removed.jsonl and report.md to `report_dir`.

    Args:
        data_file: Input rows: .jsonl, .json, .csv or .parquet.
        out_file: Where the kept rows go, unchanged (format from the suffix). Written only when the run succeeds.
        report_dir: Gets report.md, the PNGs, removed.jsonl, stats.json and the judge's score cache.
        stages: Comma-separated: rules, exact_dedup, fuzzy_dedup, perplexity, judge (run in that order).
        format: Row layout; "auto" decides from the first row (`messages` -> messages, `conversations` -> sharegpt).
        instruction_field: Column with the instruction (instruction format).
        input_field: Optional column with extra input appended to the instruction ("" for none).
        output_field: Column with the response.
        system_field: Optional column with a system prompt ("" for none).
        fuzzy_threshold: Jaccard similarity of the n-gram sets at and above which a row is a near duplicate.
        ngram: Shingle size for fuzzy dedup (characters or words, see --shingle).
        shingle: "char" n-grams (robust on short rows) or "word" n-grams (the usual choice for long documents).
        num_perm: MinHash permutations: more estimate Jaccard more exactly and cost more time and memory.
        min_instruction_chars: Rules: drop rows whose instruction is shorter.
        min_response_chars: Rules: drop rows whose response is shorter (an empty response is always dropped).
        max_chars: Rules: drop rows whose instruction plus response is longer.
        max_repeated_ngram_fraction: Rules: drop responses in which more of the word 3-grams repeat than this.
        min_text_fraction: Rules: drop rows (or responses) with fewer letters, digits and spaces than this share.
        boilerplate: Rules: drop refusals and "as an AI language model" boilerplate in any assistant turn.
        drop_regex: Rules: drop rows whose instruction or response matches this Python regex (join several with |).
        perplexity_checkpoint_dir: Checkpoint that scores the answers' perplexity (needed by the perplexity stage).
        perplexity_percentile: Drop answers above this percentile of perplexity (the most surprising ones).
        perplexity_max: Drop answers above this perplexity instead of using the percentile.
        max_tokens: Rows are cut to this many tokens for the perplexity stage and the judge's prompt.
        judge_checkpoint_dir: Checkpoint that grades the rows (needed by the judge stage).
        judge_min_score: Keep rows the judge scores at least this (1-10).
        judge_unscored: What to do with rows whose judge reply holds no score: keep them or drop them.
        judge_max_new_tokens: Longest judge reply (after the prefill).
        judge_prefill: Text that starts the judge's reply, so its next tokens are the score ("" to let it talk).
        judge_cache: Score cache (JSONL); default report_dir/judge_scores.jsonl. Rerun the same command to resume.
        batch_size: Rows per forward pass in the model stages and the embedding map.
        map_embeddings: The topic map's embeddings: "model" (mean-pooled hidden states of --embed_checkpoint_dir, or
            of the judge/perplexity checkpoint), "tfidf", "auto" (model if a checkpoint is given, else tfidf), "none".
        embed_checkpoint_dir: Checkpoint whose hidden states embed the rows for the topic map.
        map_samples: Kept rows (a random sample) drawn on the topic map.
        map_method: "tsne" (clearer clusters) or "pca" (faster) for the 2-D map.
        clusters: k of k-means on the topic map.
        device: "auto", "cpu", "cuda", ... for the model stages.
        precision: 32-true, bf16-true or 16-true. Default: bf16 on GPU, fp32 on CPU.
        seed: Seeds the map's sample, k-means and t-SNE.
    """
    t_start = time.perf_counter()
    chosen = check_flags(data_file, out_file, stages, perplexity_checkpoint_dir, perplexity_percentile,
                         judge_checkpoint_dir, embed_checkpoint_dir, map_embeddings)
    rules = Rules(min_instruction_chars, min_response_chars, max_chars, max_repeated_ngram_fraction,
                  min_text_fraction=min_text_fraction, boilerplate=boilerplate,
                  drop_regex=[drop_regex] if drop_regex else [])
    fuzzy = FuzzyDedup(fuzzy_threshold, ngram, shingle, num_perm, seed=seed + 1) if "fuzzy_dedup" in chosen else None
    fields = FieldMap(instruction_field, input_field, output_field, system_field)
    models = Models(device, precision)

    with tempfile.TemporaryDirectory(prefix="curate-") as spool_dir:
        removals = Removals(Path(spool_dir) / "removed.jsonl")
        kept = KeptRows(Path(spool_dir) / "kept.jsonl", fields)

        # ---- pass 1: the streaming stages, one row at a time
        t0 = time.perf_counter()
        streamed = stream_rows(data_file, format, fields, chosen, rules, ExactDedup(), fuzzy, kept, removals)
        streaming_seconds = time.perf_counter() - t0
        kept.row_format = streamed.row_format
        print(f"{streamed.rows} rows read ({streamed.row_format} format) in {streaming_seconds:.1f}s "
              f"({streamed.rows / max(streaming_seconds, 1e-9):.0f} rows/s); {len(kept)} left after "
              f"{', '.join(s for s in chosen if s in STREAMING) or 'no streaming stage'}", file=sys.stderr)

        # ---- the model stages: a score per surviving row (in the spool's order), then a threshold
        alive = np.ones(len(kept), dtype=bool)
        stage_seconds = {}
        perplexities, perplexity_threshold = np.full(len(kept), np.nan), None
        if "perplexity" in chosen and alive.any():
            t0 = time.perf_counter()
            perplexities, perplexity_threshold, dropped = perplexity_stage(
                kept, alive, models.load(perplexity_checkpoint_dir), perplexity_percentile, perplexity_max,
                max_tokens, batch_size)
            drop(kept, alive, removals, "perplexity", dropped)
            stage_seconds["perplexity"] = time.perf_counter() - t0

        judged = alive.copy()
        cache_path = Path(judge_cache) if judge_cache is not None else Path(report_dir) / "judge_scores.jsonl"
        judging = JudgeResult(np.full(len(kept), np.nan), [], 0, {})
        if "judge" in chosen and alive.any():
            t0 = time.perf_counter()
            judge = Judge(judge_checkpoint_dir, device=device, precision=precision,
                          max_new_tokens=judge_max_new_tokens, max_prompt_tokens=max_tokens, prefill=judge_prefill)
            judging = judge_stage(kept, alive, judge, ScoreCache(cache_path), judge_min_score, judge_unscored,
                                  batch_size)
            drop(kept, alive, removals, "judge", judging.dropped)
            stage_seconds["judge"] = time.perf_counter() - t0

        # ---- exploration: a topic map of a sample of the kept rows
        checkpoint_for_map = embed_checkpoint_dir or judge_checkpoint_dir or perplexity_checkpoint_dir
        embedding_kind = map_embeddings if map_embeddings != "auto" else ("model" if checkpoint_for_map else "tfidf")
        t0 = time.perf_counter()
        topics, map_texts = topic_stage(kept, alive, embedding_kind, models, checkpoint_for_map, map_samples,
                                        clusters, map_method, batch_size, seed)
        if topics is not None:
            stage_seconds["topic map"] = time.perf_counter() - t0

        # ---- outputs: every file written to a temporary name and renamed, the data file last
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        counts = stage_counts(chosen, streamed.rows, removals)
        kept_lengths = {"instruction": [], "response": []}
        for index, entry in enumerate(kept):
            if alive[index]:
                for part in kept_lengths:
                    kept_lengths[part].append(streamed.lengths[part][entry["n"] - 1])
        scores = judging.scores
        stats = {"data_file": str(data_file), "out_file": str(out_file), "format": streamed.row_format,
                 "rows": streamed.rows, "kept": int(alive.sum()), "stages": counts,
                 "streaming_rows_per_second": streamed.rows / max(streaming_seconds, 1e-9),
                 "seconds": {"streaming stages": streaming_seconds, **stage_seconds},
                 "perplexity_threshold": perplexity_threshold,
                 "judge": None if "judge" not in chosen else {
                     "min_score": judge_min_score, "scored": int((~np.isnan(scores)).sum()),
                     "unscored": int((judged & np.isnan(scores)).sum()), "cache": str(cache_path),
                     "cached_before_run": judging.cached_before},
                 "topics": None if topics is None else {
                     "embeddings": embedding_kind, "rows": len(map_texts),
                     "clusters": [{"size": size, "top_words": words} for size, words in
                                  zip(topics.sizes, topics.top_words)]}}
        plots = save_plots(report_dir, streamed.lengths, kept_lengths, perplexities, perplexity_threshold,
                           perplexity_checkpoint_dir, scores if "judge" in chosen else None, judge_checkpoint_dir,
                           judge_min_score, topics, len(map_texts), checkpoint_for_map, embedding_kind, map_method)
        atomic_write_text(report_dir / "stats.json", json.dumps(stats, indent=2))
        atomic_write_text(report_dir / "report.md", render_report(
            stats, chosen, removals.examples, plots, topics, judging.replies, streamed.lengths, kept_lengths,
            perplexities[~np.isnan(perplexities)], scores[~np.isnan(scores)]))
        removals.publish(report_dir / "removed.jsonl")
        write_records((entry["row"] for index, entry in enumerate(kept) if alive[index]), out_file)
        kept.close()

    print(f"kept {stats['kept']} of {streamed.rows} rows -> {out_file}")
    for stage in chosen:
        c = counts[stage]
        print(f"  {stage:<12} removed {c['removed']:>6}  ({', '.join(f'{k}: {v}' for k, v in c['reasons'].items()) or '-'})")
    print(f"report: {report_dir / 'report.md'}; removed rows: {report_dir / 'removed.jsonl'} "
          f"({time.perf_counter() - t_start:.1f}s)")
    return stats


def check_flags(data_file: Path, out_file: Path, stages: str, perplexity_checkpoint_dir: Optional[Path],
                perplexity_percentile: float, judge_checkpoint_dir: Optional[Path],
                embed_checkpoint_dir: Optional[Path], map_embeddings: str) -> list[str]:
    """The chosen stages in running order, after every check that can fail before any work is done."""
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        raise ValueError(f"--stages: unknown stage(s) {unknown or stages!r}; choose from {', '.join(STAGES)}")
    chosen = [s for s in STAGES if s in chosen]
    if "perplexity" in chosen and perplexity_checkpoint_dir is None:
        raise ValueError("The perplexity stage needs --perplexity_checkpoint_dir")
    if "judge" in chosen and judge_checkpoint_dir is None:
        raise ValueError("The judge stage needs --judge_checkpoint_dir")
    if not 0 < perplexity_percentile <= 100:
        raise ValueError(f"--perplexity_percentile must be in (0, 100], got {perplexity_percentile}")
    if Path(out_file).resolve() == Path(data_file).resolve():
        raise ValueError("--out_file must differ from --data_file (the input is never overwritten)")
    data_format(data_file), data_format(out_file)  # an unknown suffix fails now, not after an hour of judging
    for checkpoint in (perplexity_checkpoint_dir, judge_checkpoint_dir, embed_checkpoint_dir):
        if checkpoint is not None and not Path(checkpoint).is_dir():
            raise FileNotFoundError(f"{checkpoint}: no such checkpoint directory")
    if map_embeddings == "model" and not (embed_checkpoint_dir or judge_checkpoint_dir or perplexity_checkpoint_dir):
        raise ValueError("--map_embeddings model needs a checkpoint: give --embed_checkpoint_dir")
    return chosen


# ----------------------------------------------------------------------------------------------- bookkeeping


class Removals:
    """Every removed row, spooled to disk with its stage and reason (removed.jsonl), counted by kind, and the first
    three of each stage kept as the report's examples."""

    def __init__(self, spool: Path) -> None:
        self.spool = open(spool, "w+", encoding="utf-8")
        self.counts: dict[str, Counter] = {stage: Counter() for stage in STAGES}
        self.examples: dict[str, list] = {stage: [] for stage in STAGES}

    def add(self, stage: str, reason: str, kind: str, where: str, row: dict) -> None:
        self.spool.write(json.dumps({"stage": stage, "reason": reason, "where": where, "row": row},
                                    ensure_ascii=False) + "\n")
        self.counts[stage][kind] += 1
        if len(self.examples[stage]) < 3:
            self.examples[stage].append((where, reason, row))

    def publish(self, path: Path) -> None:
        self.spool.seek(0)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".removed.", suffix=".tmp", delete=False,
                                         encoding="utf-8") as tmp:
            for line in self.spool:
                tmp.write(line)
        Path(tmp.name).replace(path)
        self.spool.close()


class KeptRows:
    """The rows that passed the streaming stages, spooled to disk in input order ({"n", "where", "row"} each), read
    back as often as the model stages need them."""

    def __init__(self, spool: Path, fields: FieldMap) -> None:
        self.spool = open(spool, "w+", encoding="utf-8")
        self.fields, self.row_format, self.count = fields, "auto", 0

    def add(self, row_number: int, record: Record) -> None:
        self.spool.write(json.dumps({"n": row_number, "where": record.where, "row": record.row},
                                    ensure_ascii=False) + "\n")
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict]:
        self.spool.seek(0)
        for line in self.spool:
            yield json.loads(line)

    def sample(self, entry: dict) -> Sample:
        return to_sample(Record(entry["row"], entry["where"]), self.row_format, self.fields)

    def batches(self, alive: np.ndarray, batch_size: int) -> Iterator[list[tuple[int, Sample]]]:
        """(index, sample) of the rows still alive, `batch_size` at a time."""
        batch = []
        for index, entry in enumerate(self):
            if alive[index]:
                batch.append((index, self.sample(entry)))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def close(self) -> None:
        self.spool.close()


class Models:
    """Checkpoints loaded once each, shared by the stages that use the same one."""

    def __init__(self, device: str, precision: Optional[str]) -> None:
        self.device, self.precision, self.loaded = device, precision, {}

    def load(self, checkpoint_dir: Path) -> tuple:
        """(model, tokenizer, prompt style) of a checkpoint or fine-tuning run."""
        key = str(Path(checkpoint_dir).resolve())
        if key not in self.loaded:
            loaded = load_any(checkpoint_dir, device=self.device, precision=self.precision)
            self.loaded[key] = (loaded.model, Tokenizer(loaded.checkpoint_dir),
                                load_prompt_style(loaded.checkpoint_dir))
        return self.loaded[key]


def drop(kept: KeptRows, alive: np.ndarray, removals: Removals, stage: str,
         dropped: dict[int, tuple[str, str]]) -> None:
    """Remove the rows a model stage dropped ({index: (reason, kind)}) from `alive`, recording each."""
    for index, entry in enumerate(kept):
        if index in dropped:
            alive[index] = False
            reason, kind = dropped[index]
            removals.add(stage, reason, kind, entry["where"], entry["row"])


def stage_counts(chosen: list[str], rows: int, removals: Removals) -> dict:
    counts, remaining = {}, rows
    for stage in chosen:
        removed = sum(removals.counts[stage].values())
        counts[stage] = {"in": remaining, "removed": removed, "out": remaining - removed,
                         "reasons": dict(removals.counts[stage].most_common())}
        remaining -= removed
    return counts


# ----------------------------------------------------------------------------------------------- the stages


@dataclass
class Streamed:
    rows: int
    row_format: str
    lengths: dict[str, list[int]]


def streaming_verdict(sample: Sample, row_number: int, chosen: list[str], rules: Rules, exact: ExactDedup,
                      fuzzy: Optional[FuzzyDedup]) -> Optional[tuple[str, str, str]]:
    """(stage, reason, kind) of the first streaming stage that removes the row, or None to keep it."""
    if "rules" in chosen:
        reason = rules.check(sample)
        if reason is not None:
            return "rules", reason, reason.split(":")[0].split(" (")[0]
    if "exact_dedup" in chosen:
        first = exact.check(sample, row_number)
        if first is not None:
            return "exact_dedup", f"exact duplicate of row {first}", "exact duplicate"
    if fuzzy is not None:
        hit = fuzzy.check(sample, row_number)
        if hit is not None:
            return "fuzzy_dedup", f"near duplicate of row {hit[0]} (Jaccard ~{hit[1]:.2f})", "near duplicate"
    return None


def stream_rows(data_file: Path, row_format: str, fields: FieldMap, chosen: list[str], rules: Rules,
                exact: ExactDedup, fuzzy: Optional[FuzzyDedup], kept: KeptRows, removals: Removals) -> Streamed:
    """Pass 1: each row through the streaming stages (rules, exact and fuzzy dedup), in bounded memory; kept rows go
    to `kept`, removed ones to `removals`."""
    lengths = {"instruction": [], "response": []}
    rows = 0
    for row_number, record in enumerate(tqdm(iter_records(data_file), desc="Filtering", unit=" rows",
                                             file=sys.stderr, mininterval=2.0), start=1):
        if row_format == "auto":
            row_format = detect_format(record.row)
        sample = to_sample(record, row_format, fields)
        rows += 1
        lengths["instruction"].append(len(sample.instruction))
        lengths["response"].append(len(sample.response))
        verdict = streaming_verdict(sample, row_number, chosen, rules, exact, fuzzy)
        if verdict is None:
            kept.add(row_number, record)
        else:
            removals.add(*verdict, record.where, record.row)
    if rows == 0:
        raise RecordError(f"{data_file}: no rows in the file")
    return Streamed(rows, row_format, lengths)


def perplexity_stage(kept: KeptRows, alive: np.ndarray, loaded: tuple, percentile: float, maximum: Optional[float],
                     max_tokens: int, batch_size: int) -> tuple[np.ndarray, float, dict[int, tuple[str, str]]]:
    """The answers' perplexities (NaN for rows not scored), the threshold (`maximum`, else the `percentile` of the
    scores) and the rows above it: {index: (reason, kind)}."""
    model, tokenizer, style = loaded
    perplexities = np.full(len(kept), np.nan)
    with tqdm(total=int(alive.sum()), desc="Perplexity", unit=" rows", file=sys.stderr) as progress:
        for batch in kept.batches(alive, batch_size):
            values = response_perplexities(model, tokenizer, style, [s for _, s in batch], max_tokens)
            for (index, _), value in zip(batch, values):
                perplexities[index] = value
            progress.update(len(batch))
    threshold = maximum if maximum is not None else float(np.percentile(perplexities[alive], percentile))
    dropped = {int(index): (f"perplexity {perplexities[index]:.1f} > {threshold:.1f}", "high perplexity")
               for index in np.flatnonzero(alive & (perplexities > threshold))}
    return perplexities, threshold, dropped


@dataclass
class JudgeResult:
    scores: np.ndarray  # NaN where the judge gave no score or did not judge
    replies: list  # (instruction, raw reply, score) of the first few rows, for the report
    cached_before: int  # scores that were in the cache before this run
    dropped: dict[int, tuple[str, str]]  # {index: (reason, kind)}


def judge_stage(kept: KeptRows, alive: np.ndarray, judge: Judge, cache: ScoreCache, min_score: float,
                unscored: str, batch_size: int) -> JudgeResult:
    """A 1-10 score for each row alive (cached as it comes, so a killed run resumes), and the rows to drop: under
    `min_score`, or without a score when `unscored` is "drop"."""
    scores = np.full(len(kept), np.nan)
    replies = []
    cached_before = len(cache)
    progress = tqdm(total=int(alive.sum()), desc="Judging", unit=" rows", file=sys.stderr)
    try:
        for batch in kept.batches(alive, batch_size):
            values = score_pairs(judge, [(s.instruction, s.response) for _, s in batch], cache,
                                 batch_size=batch_size, progress=progress)
            for (index, s), value in zip(batch, values):
                scores[index] = np.nan if value is None else value
                if len(replies) < 8:
                    replies.append((s.instruction, cache[pair_key(s.instruction, s.response, judge.id)]["raw"], value))
    finally:
        progress.close()
        cache.close()
    dropped = {}
    for index in np.flatnonzero(alive):
        if np.isnan(scores[index]):
            if unscored == "drop":
                dropped[int(index)] = ("the judge's reply held no score", "no score")
        elif scores[index] < min_score:
            dropped[int(index)] = (f"judge score {scores[index]:g} < {min_score:g}", "low score")
    return JudgeResult(scores, replies, cached_before, dropped)


def topic_stage(kept: KeptRows, alive: np.ndarray, embedding_kind: str, models: Models,
                checkpoint_for_map: Optional[Path], map_samples: int, clusters: int, map_method: str,
                batch_size: int, seed: int) -> tuple:
    """The topic map of a random sample of the kept rows (None when off or too few rows) and the sample's texts."""
    rng = random.Random(seed)
    alive_indices = np.flatnonzero(alive)
    map_indices = set(rng.sample(list(alive_indices), min(map_samples, len(alive_indices))))
    if embedding_kind == "none" or len(map_indices) < 3:
        return None, []
    texts = [kept.sample(entry).text for index, entry in enumerate(kept) if index in map_indices]
    if embedding_kind == "model":
        model, tokenizer, _ = models.load(checkpoint_for_map)
        with tqdm(total=len(texts), desc="Embedding", unit=" rows", file=sys.stderr) as progress:
            embeddings = model_embeddings(model, tokenizer, texts, batch_size=batch_size, progress=progress)
    else:
        embeddings = tfidf_embeddings(texts, seed=seed)
    return topic_map(texts, embeddings, clusters=clusters, method=map_method, seed=seed), texts


# ----------------------------------------------------------------------------------------------- the report


def save_plots(report_dir: Path, lengths: dict, kept_lengths: dict, perplexities: np.ndarray,
               perplexity_threshold: Optional[float], perplexity_checkpoint_dir: Optional[Path],
               scores: Optional[np.ndarray], judge_checkpoint_dir: Optional[Path], judge_min_score: float, topics,
               map_rows: int, checkpoint_for_map: Optional[Path], embedding_kind: str, map_method: str) -> dict:
    """The report's PNGs; returns {plot: file name}."""
    plots = {}
    for part in ("instruction", "response"):
        plots[f"length_{part}"] = f"length_{part}.png"
        save_histogram(report_dir / plots[f"length_{part}"], {"input": lengths[part], "kept": kept_lengths[part]},
                       f"{part} length", "characters", log_x=True)
    if perplexity_threshold is not None:
        plots["perplexity"] = "perplexity.png"
        save_histogram(report_dir / plots["perplexity"], {"scored": perplexities[~np.isnan(perplexities)]},
                       f"answer perplexity under {Path(perplexity_checkpoint_dir).name}", "perplexity",
                       threshold=perplexity_threshold, log_x=True)
    if scores is not None and not np.isnan(scores).all():
        plots["judge"] = "judge_scores.png"
        save_histogram(report_dir / plots["judge"], {"scored": scores[~np.isnan(scores)]},
                       f"judge scores by {Path(judge_checkpoint_dir).name}", "score (1-10)",
                       threshold=judge_min_score, bins=19)
    if topics is not None:
        plots["topics"] = "topics.png"
        source = f"{Path(checkpoint_for_map).name} hidden states" if embedding_kind == "model" else "TF-IDF + SVD"
        save_topic_map(report_dir / plots["topics"], topics,
                       f"topics of {map_rows} kept rows ({source}, k-means, {map_method})")
    return plots


def _short(text, limit: int = 120) -> str:
    text = json.dumps(text, ensure_ascii=False) if not isinstance(text, str) else text
    text = " ".join(text.split())
    return (text[:limit] + "…" if len(text) > limit else text).replace("|", "\\|")


def render_report(stats: dict, chosen: list, examples: dict, plots: dict, topics, judge_replies: list,
                  lengths: dict, kept_lengths: dict, perplexities, scores) -> str:
    lines = [
        "# Curation report", "",
        f"`{' '.join(shlex.quote(a) for a in ['python', 'scripts/curate.py', *sys.argv[1:]])}`", "",
        f"- input: `{stats['data_file']}`: {stats['rows']} rows ({stats['format']} format)",
        f"- kept: `{stats['out_file']}`: {stats['kept']} rows ({stats['kept'] / stats['rows']:.1%})",
        f"- removed: `removed.jsonl`: {stats['rows'] - stats['kept']} rows, each with its stage and reason",
        "- time: " + ", ".join(f"{name} {seconds:.1f}s" + (f" ({stats['streaming_rows_per_second']:.0f} rows/s)"
                                                          if name == "streaming stages" else "")
                               for name, seconds in stats["seconds"].items()), "",
        "## What each stage removed", "",
        "| stage | rows in | removed | rows out | reasons |", "|---|---:|---:|---:|---|",
    ]
    for stage in chosen:
        c = stats["stages"][stage]
        reasons = "; ".join(f"{k}: {v}" for k, v in c["reasons"].items()) or "-"
        lines.append(f"| {stage} | {c['in']} | {c['removed']} | {c['out']} | {_short(reasons, 300)} |")
    for stage in chosen:
        if examples[stage]:
            lines += ["", f"Examples removed by {stage}:", ""]
            lines += [f"- {where}: {reason}: `{_short(row, 100)}`" for where, reason, row in examples[stage]]
    lines += ["", "## Lengths (characters)", "",
              "| | input | kept |", "|---|---|---|"]
    for part in ("instruction", "response"):
        lines.append(f"| {part} | {percentile_summary(lengths[part])} | {percentile_summary(kept_lengths[part])} |")
    lines += ["", f"![instruction lengths]({plots['length_instruction']}) ![response lengths]({plots['length_response']})"]
    if "perplexity" in plots:
        lines += ["", "## Perplexity of the answers", "",
                  f"{percentile_summary(perplexities)}; threshold {stats['perplexity_threshold']:.1f}", "",
                  f"![perplexity]({plots['perplexity']})"]
    if stats["judge"] is not None:
        j = stats["judge"]
        lines += ["", "## Judge scores", "",
                  f"{j['scored']} rows scored ({percentile_summary(scores)}), {j['unscored']} replies held no score; "
                  f"keep >= {j['min_score']:g}. Cache: `{j['cache']}` ({j['cached_before_run']} scores were there "
                  "before this run)."]
        if "judge" in plots:
            lines += ["", f"![judge scores]({plots['judge']})"]
        if judge_replies:
            lines += ["", "Some replies of the judge:", "", "| instruction | judge's reply | parsed score |",
                      "|---|---|---:|"]
            lines += [f"| {_short(i, 60)} | {_short(raw, 80)} | {'-' if s is None else f'{s:g}'} |"
                      for i, raw, s in judge_replies]
    if topics is not None:
        t = stats["topics"]
        lines += ["", "## Topics of the kept rows", "",
                  f"{t['rows']} kept rows embedded with {'the model' if t['embeddings'] == 'model' else 'TF-IDF'}, "
                  f"{len(topics.sizes)} k-means clusters; the words are each cluster's most distinctive ones.", "",
                  f"![topics]({plots['topics']})", "",
                  "| cluster | rows | top words | the row nearest its centre |", "|---:|---:|---|---|"]
        order = sorted(range(len(topics.sizes)), key=lambda c: -topics.sizes[c])
        lines += [f"| {c} | {topics.sizes[c]} | {', '.join(topics.top_words[c])} | {_short(topics.examples[c], 90)} |"
                  for c in order if topics.sizes[c]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(curate)
