"""Perplexity of a checkpoint or fine-tuning run on a text file, a JSONL file, or a prepared dataset split.

    python eval/perplexity.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data_file notes.txt
    python eval/perplexity.py --checkpoint_dir out/lora --data_dir data/tasks --split test

A `.txt` file holds documents separated by blank lines; a `.jsonl` file one document per line (`--text_key`).
Each document is scored from its first token (after BOS, or EOS for tokenizers without one) in windows of
`--max_length` tokens that each token is predicted in exactly once, with as much preceding context as fits: the
windows of lm-evaluation-harness's `loglikelihood_rolling`. A prepared split (`data/<name>/<split>.pt`) is scored
on its answer tokens only (the positions with a label), given the prompt: what a fine-tune is trained to lower.
Writes `perplexity.json` to `--out_dir` and ends with `perplexity: <value>` (per token).
"""

import time
from pathlib import Path
from typing import Literal, Optional

from model.cli import run_cli
from model.data.sft import load_dataset
from model.tokenizer import Tokenizer
from model.weights.load import load_any
from model.workflows.evaluate import default_out_dir, perplexity_of, read_documents, write_result


def main(
    checkpoint_dir: Path,
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
        checkpoint_dir: The model: a checkpoint or a fine-tuning run (its out_dir, final/ or a step-* directory).
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
    loaded = load_any(checkpoint_dir, device, precision, quantize)
    model, checkpoint_dir, run_dir = loaded.model, loaded.checkpoint_dir, loaded.run_dir
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
