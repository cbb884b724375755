"""Perplexity of a checkpoint or fine-tuning run on a text file, a JSONL file, or a prepared dataset split.

    python eval/perplexity.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data_file notes.txt
    python eval/perplexity.py --lora_dir out/lora --data_dir data/tasks --split test

A `.txt` file holds documents separated by blank lines; a `.jsonl` file one document per line (`--text_key`).
Each document is scored from its first token (after BOS, or EOS for tokenizers without one) in windows of
`--max_length` tokens that each token is predicted in exactly once, with as much preceding context as fits: the
windows of lm-evaluation-harness's `loglikelihood_rolling`. A prepared split (`data/<name>/<split>.pt`) is scored
on its answer tokens only (the positions with a label), given the prompt: what a fine-tune is trained to lower.
Writes `perplexity.json` to `--out_dir` and ends with `perplexity: <value>` (per token).
"""

import json
import math
import sys
import time
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).parent))
from scoring import continuation_logprobs, default_out_dir, prefix_token, rolling_windows, write_result  # noqa: E402

from model.cli import run_cli
from model.data.sft import IGNORE_INDEX, load_dataset
from model.tokenizer import Tokenizer  # noqa: E402
from model.weights.load import load_model_run


def read_documents(path: Path, text_key: str = "text") -> list[str]:
    """The documents of a `.txt` (separated by blank lines) or `.jsonl` (one object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data_file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
                raise ValueError(f"{path}, line {number}: expected an object with a string field {text_key!r}"
                                 " (choose the field with --text_key)")
            if row[text_key].strip():
                documents.append(row[text_key])
    elif path.suffix in (".txt", ".md", ""):
        documents = [block.strip() for block in text.split("\n\n") if block.strip()]
    else:
        raise ValueError(f"--data_file {path}: expected a .txt or .jsonl file, got {path.suffix!r}")
    if not documents:
        raise ValueError(f"{path} holds no text to score")
    return documents


def answer_spans(sample: dict) -> list[tuple[list[int], list[int]]]:
    """`(context, continuation)` pairs covering the labelled positions of a prepared sample: the answer given the
    prompt (one pair per answer in a multi-turn sample)."""
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    spans, start = [], None
    for t in range(1, len(ids) + 1):
        scored = t < len(ids) and labels[t] != IGNORE_INDEX
        if scored and start is None:
            start = t
        elif not scored and start is not None:
            spans.append((ids[:start], ids[start:t]))
            start = None
    return spans


def perplexity_of(model, tokenizer: Tokenizer, documents: Optional[list[str]] = None,
                  samples: Optional[list[dict]] = None, max_length: Optional[int] = None,
                  batch_size: int = 8) -> dict:
    """Per-token perplexity (and per-document log-likelihoods) of documents or prepared samples."""
    max_length = max_length or model.config.block_size
    if not 2 <= max_length <= model.config.block_size:
        raise ValueError(f"--max_length must be between 2 and the model's context ({model.config.block_size}),"
                         f" got {max_length}")
    pairs, owners = [], []
    if documents is not None:
        prefix = prefix_token(tokenizer)
        for index, document in enumerate(documents):
            for window in rolling_windows(tokenizer.encode(document, bos=False).tolist(), prefix, max_length):
                pairs.append(window)
                owners.append(index)
        count = len(documents)
    else:
        for index, sample in enumerate(samples):
            for context, continuation in answer_spans(sample):
                pairs.append((context[-(max_length - len(continuation)):] or context[-1:], continuation))
                owners.append(index)
        count = len(samples)
    if not pairs:
        raise ValueError("Nothing to score: the samples have no labelled (answer) tokens")
    scores = continuation_logprobs(model, pairs, batch_size, desc="Scoring")
    logprob, tokens = [0.0] * count, [0] * count
    for owner, (context, continuation), (value, _) in zip(owners, pairs, scores):
        logprob[owner] += value
        tokens[owner] += len(continuation)
    total_logprob, total_tokens = sum(logprob), sum(tokens)
    result = {"perplexity": math.exp(-total_logprob / total_tokens), "nll_per_token": -total_logprob / total_tokens,
              "tokens": total_tokens, "documents": count, "max_length": max_length,
              "per_document": [{"logprob": lp, "tokens": n} for lp, n in zip(logprob, tokens)]}
    if documents is not None:
        total_bytes = sum(len(d.encode("utf-8")) for d in documents)
        result["bits_per_byte"] = -total_logprob / total_bytes / math.log(2)
        result["word_perplexity"] = math.exp(-total_logprob / sum(len(d.split()) for d in documents))
    return result


def main(
    checkpoint_dir: Optional[Path] = None,
    lora_dir: Optional[Path] = None,
    adapter_dir: Optional[Path] = None,
    data_file: Optional[Path] = None,
    data_dir: Optional[Path] = None,
    split: str = "test",
    text_key: str = "text",
    max_length: Optional[int] = None,
    limit: Optional[int] = None,
    batch_size: int = 8,
    out_dir: Optional[Path] = None,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    quantize: Optional[str] = None,
    device: str = "auto",
) -> float:
    """Per-token perplexity on `--data_file` or on `--data_dir`'s prepared `--split`.

    Args:
        checkpoint_dir: The model (with --lora_dir/--adapter_dir: the base; default: the run's own base).
        lora_dir: A LoRA/DoRA run (finetune/lora.py's out_dir, its final/ or a step-* directory).
        adapter_dir: An adapter run (finetune/adapter.py or adapter_v2.py).
        data_file: A .txt (documents separated by blank lines) or .jsonl (one document per line) file.
        data_dir: Prepared data (scripts/prepare_*.py with the same checkpoint's tokenizer); scores the answers.
        split: The prepared split to score ("test" or "train").
        text_key: The JSONL field holding the text.
        max_length: Window length in tokens; default: the model's context.
        limit: Score only the first `limit` documents or samples.
        batch_size: Windows scored together.
        out_dir: Where to write perplexity.json; default: the run's directory, else out/eval/<checkpoint name>.
        precision: 32-true, bf16-true or 16-true. Default: bf16 on GPU, fp32 on CPU.
        quantize: Load the base quantized with bitsandbytes (bnb.nf4, bnb.int8, ...); default: as the run trained.
        device: "auto", "cpu", "cuda", ...
    """
    if (data_file is None) == (data_dir is None):
        raise ValueError("Give exactly one of --data_file (a .txt or .jsonl file) and --data_dir (prepared data)")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    documents = read_documents(data_file, text_key)[:limit] if data_file is not None else None
    model, checkpoint_dir, run_dir = load_model_run(checkpoint_dir, lora_dir, adapter_dir, device, precision, quantize)
    tokenizer = Tokenizer(checkpoint_dir)
    samples = None
    if data_dir is not None:
        samples = load_dataset(Path(data_dir) / f"{split}.pt", vocab_size=tokenizer.vocab_size)[:limit]
    t0 = time.perf_counter()
    result = perplexity_of(model, tokenizer, documents, samples, max_length, batch_size)
    source = str(data_file) if data_file is not None else str(Path(data_dir) / f"{split}.pt")
    summary = {"checkpoint_dir": str(checkpoint_dir), "run_dir": str(run_dir) if run_dir else None, "data": source,
               **result, "seconds": time.perf_counter() - t0}
    path = write_result(out_dir or default_out_dir(checkpoint_dir, run_dir), "perplexity.json", summary)
    print(f"{result['documents']} {'documents' if documents is not None else 'samples'}, {result['tokens']} tokens"
          f" scored, {result['nll_per_token']:.4f} nats per token"
          + (f", {result['bits_per_byte']:.4f} bits per byte" if "bits_per_byte" in result else ""))
    print(f"wrote {path}")
    print(f"perplexity: {result['perplexity']:.4f}")
    return result["perplexity"]


if __name__ == "__main__":
    run_cli(main)
