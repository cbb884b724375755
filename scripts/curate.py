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
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from tqdm import tqdm

from model.cli import run_cli
from model.data.curate import (
    ExactDedup,
    FieldMap,
    FuzzyDedup,
    Rules,
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
    rules = Rules(min_instruction_chars, min_response_chars, max_chars, max_repeated_ngram_fraction,
                  min_text_fraction=min_text_fraction, boilerplate=boilerplate,
                  drop_regex=[drop_regex] if drop_regex else [])
    exact = ExactDedup()
    fuzzy = FuzzyDedup(fuzzy_threshold, ngram, shingle, num_perm, seed=seed + 1) if "fuzzy_dedup" in chosen else None
    fields = FieldMap(instruction_field, input_field, output_field, system_field)

    with tempfile.TemporaryDirectory(prefix="curate-") as spool_dir:
        spool_dir = Path(spool_dir)
        kept_spool = open(spool_dir / "kept.jsonl", "w+", encoding="utf-8")
        removed_spool = open(spool_dir / "removed.jsonl", "w+", encoding="utf-8")
        removed_counts: dict[str, Counter] = {stage: Counter() for stage in STAGES}
        examples: dict[str, list] = {stage: [] for stage in STAGES}

        def remove(stage: str, reason: str, kind: str, where: str, row: dict) -> None:
            removed_spool.write(json.dumps({"stage": stage, "reason": reason, "where": where, "row": row},
                                           ensure_ascii=False) + "\n")
            removed_counts[stage][kind] += 1
            if len(examples[stage]) < 3:
                examples[stage].append((where, reason, row))

        # ---- pass 1: the streaming stages, one row at a time
        lengths = {"instruction": [], "response": []}
        row_format, n_rows, n_kept = format, 0, 0
        t0 = time.perf_counter()
        for row_number, record in enumerate(tqdm(iter_records(data_file), desc="Filtering", unit=" rows",
                                                 file=sys.stderr, mininterval=2.0), start=1):
            if row_format == "auto":
                row_format = detect_format(record.row)
            sample = to_sample(record, row_format, fields)
            n_rows += 1
            lengths["instruction"].append(len(sample.instruction))
            lengths["response"].append(len(sample.response))
            if "rules" in chosen:
                reason = rules.check(sample)
                if reason is not None:
                    remove("rules", reason, reason.split(":")[0].split(" (")[0], record.where, record.row)
                    continue
            if "exact_dedup" in chosen:
                first = exact.check(sample, row_number)
                if first is not None:
                    remove("exact_dedup", f"exact duplicate of row {first}", "exact duplicate", record.where,
                           record.row)
                    continue
            if fuzzy is not None:
                hit = fuzzy.check(sample, row_number)
                if hit is not None:
                    remove("fuzzy_dedup", f"near duplicate of row {hit[0]} (Jaccard ~{hit[1]:.2f})",
                           "near duplicate", record.where, record.row)
                    continue
            kept_spool.write(json.dumps({"n": row_number, "where": record.where, "row": record.row},
                                        ensure_ascii=False) + "\n")
            n_kept += 1
        if n_rows == 0:
            raise RecordError(f"{data_file}: no rows in the file")
        streaming_seconds = time.perf_counter() - t0
        print(f"{n_rows} rows read ({row_format} format) in {streaming_seconds:.1f}s "
              f"({n_rows / max(streaming_seconds, 1e-9):.0f} rows/s); {n_kept} left after "
              f"{', '.join(s for s in chosen if s in STREAMING) or 'no streaming stage'}", file=sys.stderr)

        def kept_rows():
            kept_spool.seek(0)
            for line in kept_spool:
                yield json.loads(line)

        # ---- the model stages: a score per surviving row (kept_spool order), then a threshold
        alive = np.ones(n_kept, dtype=bool)
        models: dict = {}

        def load(checkpoint_dir: Path):
            from model.prompts import load_prompt_style
            from model.tokenizer import Tokenizer
            from model.weights.load import load_model

            key = str(Path(checkpoint_dir).resolve())
            if key not in models:
                model = load_model(checkpoint_dir, device=device, precision=precision)
                model.eval()
                models[key] = (model, Tokenizer(checkpoint_dir), load_prompt_style(checkpoint_dir))
            return models[key]

        def batches_of_alive():
            batch = []
            for index, entry in enumerate(kept_rows()):
                if alive[index]:
                    batch.append((index, entry, to_sample_entry(entry)))
                    if len(batch) == batch_size:
                        yield batch
                        batch = []
            if batch:
                yield batch

        def to_sample_entry(entry: dict):
            return to_sample(Record(entry["row"], entry["where"]), row_format, fields)

        perplexities = np.full(n_kept, np.nan)
        perplexity_threshold = None
        stage_seconds = {}
        if "perplexity" in chosen and alive.any():
            t0 = time.perf_counter()
            model, tokenizer, style = load(perplexity_checkpoint_dir)
            progress = tqdm(total=int(alive.sum()), desc="Perplexity", unit=" rows", file=sys.stderr)
            for batch in batches_of_alive():
                values = response_perplexities(model, tokenizer, style, [s for _, _, s in batch], max_tokens)
                for (index, _, _), value in zip(batch, values):
                    perplexities[index] = value
                progress.update(len(batch))
            progress.close()
            scored = perplexities[alive]
            perplexity_threshold = perplexity_max if perplexity_max is not None else \
                float(np.percentile(scored, perplexity_percentile))
            for index, entry in enumerate(kept_rows()):
                if alive[index] and perplexities[index] > perplexity_threshold:
                    alive[index] = False
                    remove("perplexity", f"perplexity {perplexities[index]:.1f} > {perplexity_threshold:.1f}",
                           "high perplexity", entry["where"], entry["row"])
            stage_seconds["perplexity"] = time.perf_counter() - t0

        scores = np.full(n_kept, np.nan)
        judge_replies: list = []
        cache_path = Path(judge_cache) if judge_cache is not None else Path(report_dir) / "judge_scores.jsonl"
        cached_before = 0
        judged = alive.copy()
        if "judge" in chosen and alive.any():
            t0 = time.perf_counter()
            judge = Judge(judge_checkpoint_dir, device=device, precision=precision,
                          max_new_tokens=judge_max_new_tokens, max_prompt_tokens=max_tokens, prefill=judge_prefill)
            cache = ScoreCache(cache_path)
            cached_before = len(cache)
            progress = tqdm(total=int(alive.sum()), desc="Judging", unit=" rows", file=sys.stderr)
            try:
                for batch in batches_of_alive():
                    values = score_pairs(judge, [(s.instruction, s.response) for _, _, s in batch], cache,
                                         batch_size=batch_size, progress=progress)
                    for (index, _, s), value in zip(batch, values):
                        scores[index] = np.nan if value is None else value
                        if len(judge_replies) < 8:
                            raw = cache[pair_key(s.instruction, s.response, judge.id)]["raw"]
                            judge_replies.append((s.instruction, raw, value))
            finally:
                progress.close()
                cache.close()
            for index, entry in enumerate(kept_rows()):
                if not alive[index]:
                    continue
                if np.isnan(scores[index]):
                    if judge_unscored == "drop":
                        alive[index] = False
                        remove("judge", "the judge's reply held no score", "no score", entry["where"], entry["row"])
                elif scores[index] < judge_min_score:
                    alive[index] = False
                    remove("judge", f"judge score {scores[index]:g} < {judge_min_score:g}", "low score",
                           entry["where"], entry["row"])
            stage_seconds["judge"] = time.perf_counter() - t0

        # ---- exploration: a topic map of a sample of the kept rows
        rng = random.Random(seed)
        alive_indices = np.flatnonzero(alive)
        map_indices = set(rng.sample(list(alive_indices), min(map_samples, len(alive_indices))))
        checkpoint_for_map = embed_checkpoint_dir or judge_checkpoint_dir or perplexity_checkpoint_dir
        embedding_kind = map_embeddings if map_embeddings != "auto" else ("model" if checkpoint_for_map else "tfidf")
        topics, map_texts = None, []
        if embedding_kind != "none" and len(map_indices) >= 3:
            t0 = time.perf_counter()
            map_texts = [to_sample_entry(entry).text for index, entry in enumerate(kept_rows()) if index in map_indices]
            if embedding_kind == "model":
                model, tokenizer, _ = load(checkpoint_for_map)
                with tqdm(total=len(map_texts), desc="Embedding", unit=" rows", file=sys.stderr) as progress:
                    embeddings = model_embeddings(model, tokenizer, map_texts, batch_size=batch_size,
                                                  progress=progress)
            else:
                embeddings = tfidf_embeddings(map_texts, seed=seed)
            topics = topic_map(map_texts, embeddings, clusters=clusters, method=map_method, seed=seed)
            stage_seconds["topic map"] = time.perf_counter() - t0

        # ---- outputs: every file written to a temporary name and renamed, the data file last
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        counts = {}
        remaining = n_rows
        for stage in chosen:
            removed = sum(removed_counts[stage].values())
            counts[stage] = {"in": remaining, "removed": removed, "out": remaining - removed,
                             "reasons": dict(removed_counts[stage].most_common())}
            remaining -= removed
        kept_lengths = {"instruction": [], "response": []}
        for index, entry in enumerate(kept_rows()):
            if alive[index]:
                n = entry["n"] - 1
                kept_lengths["instruction"].append(lengths["instruction"][n])
                kept_lengths["response"].append(lengths["response"][n])

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
        if "judge" in chosen and not np.isnan(scores).all():
            plots["judge"] = "judge_scores.png"
            save_histogram(report_dir / plots["judge"], {"scored": scores[~np.isnan(scores)]},
                           f"judge scores by {Path(judge_checkpoint_dir).name}", "score (1-10)",
                           threshold=judge_min_score, bins=19)
        if topics is not None:
            plots["topics"] = "topics.png"
            source = f"{Path(checkpoint_for_map).name} hidden states" if embedding_kind == "model" else "TF-IDF + SVD"
            save_topic_map(report_dir / plots["topics"], topics,
                           f"topics of {len(map_texts)} kept rows ({source}, k-means, {map_method})")

        n_out = int(alive.sum())
        stats = {"data_file": str(data_file), "out_file": str(out_file), "format": row_format, "rows": n_rows,
                 "kept": n_out, "stages": counts, "streaming_rows_per_second": n_rows / max(streaming_seconds, 1e-9),
                 "seconds": {"streaming stages": streaming_seconds, **stage_seconds},
                 "perplexity_threshold": perplexity_threshold,
                 "judge": None if "judge" not in chosen else {
                     "min_score": judge_min_score, "scored": int((~np.isnan(scores)).sum()),
                     "unscored": int((judged & np.isnan(scores)).sum()), "cache": str(cache_path),
                     "cached_before_run": cached_before},
                 "topics": None if topics is None else {
                     "embeddings": embedding_kind, "rows": len(map_texts),
                     "clusters": [{"size": size, "top_words": words} for size, words in
                                  zip(topics.sizes, topics.top_words)]}}
        atomic_write_text(report_dir / "stats.json", json.dumps(stats, indent=2))
        atomic_write_text(report_dir / "report.md", render_report(
            stats, chosen, examples, plots, topics, judge_replies, lengths, kept_lengths,
            perplexities[~np.isnan(perplexities)], scores[~np.isnan(scores)]))
        removed_spool.seek(0)
        with tempfile.NamedTemporaryFile("w", dir=report_dir, prefix=".removed.", suffix=".tmp", delete=False,
                                         encoding="utf-8") as tmp:
            for line in removed_spool:
                tmp.write(line)
        Path(tmp.name).replace(report_dir / "removed.jsonl")
        write_records((entry["row"] for index, entry in enumerate(kept_rows()) if alive[index]), out_file)
        kept_spool.close()
        removed_spool.close()

    print(f"kept {n_out} of {n_rows} rows -> {out_file}")
    for stage in chosen:
        c = counts[stage]
        print(f"  {stage:<12} removed {c['removed']:>6}  ({', '.join(f'{k}: {v}' for k, v in c['reasons'].items()) or '-'})")
    print(f"report: {report_dir / 'report.md'}; removed rows: {report_dir / 'removed.jsonl'} "
          f"({time.perf_counter() - t_start:.1f}s)")
    return stats


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
