"""A classical baseline for finetune/classify.py: TF-IDF word and bigram features + logistic regression, trained and
scored on the same prepared splits, so an LLM classifier's numbers have a reference point.

    python eval/classify_baseline.py --data_dir data/movie_reviews --out_dir out/classify/tfidf

Writes `results.json` (accuracy, macro-F1, confusion matrix, train time; the same keys as a finetune/classify.py run)
and `confusion_matrix.png` to out_dir.
"""

import json
import time
from pathlib import Path

from model.cli import run_cli
from model.data.classification import load_classification_data
from model.files import atomic_write_text
from model.workflows.classify import classification_metrics, plot_confusion_matrix


def tfidf_baseline(
    data_dir: Path = Path("data/movie_reviews"),
    out_dir: Path = Path("out/classify/tfidf"),
    ngram_max: int = 2,
    min_df: int = 1,
    logistic_c: float = 10.0,
) -> dict:
    """Fit TF-IDF + logistic regression on `data_dir/train.pt`'s texts and score it on `test.pt`.

    Args:
        data_dir: Prepared data from scripts/prepare_classification.py (its samples keep their text).
        out_dir: Where to write results.json and confusion_matrix.png.
        ngram_max: Use word n-grams up to this length.
        min_df: Ignore n-grams found in fewer training texts than this.
        logistic_c: Inverse L2 regularization strength of the logistic regression.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    train, labels = load_classification_data(data_dir, "train")
    test, _ = load_classification_data(data_dir, "test")
    if not all("text" in s for s in train + test):
        raise ValueError(f"{data_dir}: the samples have no 'text'; prepare the data again with"
                         " scripts/prepare_classification.py")
    t0 = time.perf_counter()
    pipeline = make_pipeline(TfidfVectorizer(ngram_range=(1, ngram_max), min_df=min_df, sublinear_tf=True),
                             LogisticRegression(C=logistic_c, max_iter=5000))
    pipeline.fit([s["text"] for s in train], [s["label"] for s in train])
    train_time = time.perf_counter() - t0
    predictions = pipeline.predict([s["text"] for s in test])
    result = {"mode": "tfidf", "labels": labels, "train_samples": len(train), "test_samples": len(test),
              "train_time_s": round(train_time, 2),
              **classification_metrics([s["label"] for s in test], predictions, len(labels))}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(result, indent=1) + "\n")
    plot_confusion_matrix(result["confusion_matrix"], labels, out_dir / "confusion_matrix.png",
                          f"TF-IDF + logistic regression\naccuracy {result['accuracy']:.1%}, macro-F1"
                          f" {result['macro_f1']:.3f}")
    print(f"TF-IDF (1-{ngram_max}-grams) + logistic regression, {len(train)} training texts: test accuracy"
          f" {result['accuracy']:.4f} | macro-F1 {result['macro_f1']:.4f} | fitted in {train_time:.1f}s\n"
          f"Confusion matrix (rows: true {labels}): {result['confusion_matrix']}\nWrote {out_dir / 'results.json'}")
    return result


if __name__ == "__main__":
    run_cli(tfidf_baseline)
