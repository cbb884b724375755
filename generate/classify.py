"""Label new texts with a classifier trained by finetune/classify.py, with each label's probability.

    python generate/classify.py --classifier_dir out/classify/lora --text+ "A gorgeous, moving film." --text+ "Dull."
    python generate/classify.py --classifier_dir out/classify/lora --input_file reviews.csv --output_file labelled.jsonl

Prints one line per text (or, with `--output_file`, writes CSV/JSONL/JSON/Parquet rows: the input row plus
`label` and `prob_<label>` columns). With `--label_field` naming a column of true labels in the input file, it also
prints accuracy and macro-F1 against them.
"""

from pathlib import Path
from typing import Optional

import torch

from model.cli import run_cli
from model.data.records import RecordError, field, read_records, write_records
from model.device import precision_to_dtype, resolve_device
from model.tokenizer import Tokenizer
from model.workflows.classify import classification_metrics, load_classifier, predict


def classify(
    classifier_dir: Path,
    text: Optional[list[str]] = None,
    input_file: Optional[Path] = None,
    text_field: str = "text",
    label_field: Optional[str] = None,
    output_file: Optional[Path] = None,
    checkpoint_dir: Optional[Path] = None,
    batch_size: int = 16,
    max_seq_length: Optional[int] = None,
    device: str = "auto",
    precision: Optional[str] = None,
) -> list[dict]:
    """Classify `--text` strings or the rows of `--input_file`.

    Args:
        classifier_dir: A finetune/classify.py run directory (its final/ is used) or one of its step-* directories.
        text: Texts to classify: `--text+ "one" --text+ "two"` (or a JSON list).
        input_file: A CSV, JSONL, JSON or Parquet file of texts to classify.
        text_field: The column of input_file that holds the text.
        label_field: A column of input_file with the true labels: print accuracy and macro-F1 against them.
        output_file: Write the input rows with `label` and `prob_<label>` columns here (format from the suffix).
        checkpoint_dir: The base checkpoint; default: the one the classifier was trained on (from its hparams.yaml).
        batch_size: Texts per forward pass.
        max_seq_length: Cut texts to this many tokens; default: the max_seq_length the classifier was trained with,
            or the model's context.
        device: cpu, cuda, cuda:1, ... or auto.
        precision: 32-true, bf16-true or 16-true; default bf16 on a GPU with it, else fp32.
    """
    if (text is None) == (input_file is None):
        raise ValueError("Pass the texts with --text (repeatable) or --input_file, one of the two")
    if label_field and input_file is None:
        raise ValueError("--label_field names a column of --input_file")
    device = resolve_device(device)
    classifier, hparams = load_classifier(classifier_dir, device=device, dtype=precision_to_dtype(precision, device),
                                          checkpoint_dir=checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir or hparams["checkpoint_dir"])
    labels = hparams["labels"]
    limit = min(max_seq_length or hparams.get("max_seq_length") or classifier.gpt.config.block_size,
                classifier.gpt.config.block_size)

    if input_file is not None:
        records = read_records(input_file)
        rows = [record.row for record in records]
        texts = [field(record, text_field) for record in records]
        empty = next((record.where for record, t in zip(records, texts) if not t.strip()), None)
        if empty:
            raise RecordError(f"{empty}: empty text in column {text_field!r}")
    else:
        texts = list(text)
        if not all(t.strip() for t in texts):
            raise ValueError("--text: an empty text has nothing to classify")
        rows = [{"text": t} for t in texts]
    samples = [{"input_ids": tokenizer.encode(t)} for t in texts]
    cut = sum(len(s["input_ids"]) > limit for s in samples)
    logits = predict(classifier, samples, batch_size, limit, device, progress=len(samples) > 4 * batch_size)
    probabilities = torch.softmax(logits, dim=-1)

    results = []
    for row, probs in zip(rows, probabilities):
        best = int(probs.argmax())
        results.append({**row, "label": labels[best], **{f"prob_{name}": round(float(p), 6) for name, p in zip(labels, probs)}})
    if output_file is not None:
        write_records(results, output_file)
        print(f"Wrote {len(results)} rows to {output_file}")
    else:
        for t, result in zip(texts, results):
            shown = t if len(t) <= 80 else t[:77] + "..."
            print(f"{result['label']}\t" + " ".join(f"{name}={result['prob_' + name]:.3f}" for name in labels) + f"\t{shown}")
    if cut:
        print(f"{cut} of {len(texts)} texts were cut to {limit} tokens (--max_seq_length)")
    if label_field:
        truth = [field(record, label_field).strip() for record in records]
        unknown = next(((record.where, t) for record, t in zip(records, truth) if t not in labels), None)
        if unknown:
            raise RecordError(f"{unknown[0]}: label {unknown[1]!r} in column {label_field!r} is not one of the"
                              f" classifier's labels {labels}")
        scores = classification_metrics([labels.index(t) for t in truth], probabilities.argmax(-1), len(labels))
        print(f"Against {label_field!r}: accuracy {scores['accuracy']:.4f} | macro-F1 {scores['macro_f1']:.4f} |"
              f" confusion matrix (rows: true {labels}) {scores['confusion_matrix']}")
    return results


if __name__ == "__main__":
    run_cli(classify)
