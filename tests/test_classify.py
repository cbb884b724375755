"""LLM classifiers: scripts/prepare_classification.py, finetune/classify.py (every mode), generate/classify.py and the
*ForSequenceClassification export of scripts/convert_to_hf.py.

A tiny random Llama (SmolLM2-shaped, tied head) with a tiny sentencepiece tokenizer learns a synthetic task that is
separable by its tokens: "positive" texts are made of the letters a-h, "negative" ones of p-w.
"""

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_script
from hf_models import save_tiny_model
from safetensors.torch import load_file

from model.cli import run_cli
from model.data.classification import collate
from model.gpt import GPT
from model.lora import LoRAConfig, count_parameters, inject_lora
from model.tokenizer import Tokenizer
from model.weights.convert import convert_hf_checkpoint
from model.workflows.classify import (
    CLASSIFIER_WEIGHTS,
    Classifier,
    last_token_index,
    load_classifier,
    mark_trainable,
    pool,
)

prepare = load_script("scripts/prepare_classification.py")
classify = load_script("finetune/classify.py")
generate_classify = load_script("generate/classify.py")
convert_to_hf = load_script("scripts/convert_to_hf.py")

POSITIVE, NEGATIVE = "abcdefgh", "pqrstuvw"
FAST = {"max_steps": 24, "micro_batch_size": 8, "global_batch_size": 8, "warmup_steps": 2, "eval_interval": 1000,
        "eval_iters": 1, "save_interval": 1000, "feature_batch_size": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_sentencepiece_model) -> Path:
    checkpoint_dir = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    checkpoint_dir.mkdir()
    shutil.copy(tiny_sentencepiece_model, checkpoint_dir / "tokenizer.model")
    vocab_size = Tokenizer(checkpoint_dir).vocab_size
    save_tiny_model("smollm2", checkpoint_dir, vocab_size=vocab_size)
    convert_hf_checkpoint(checkpoint_dir)
    return checkpoint_dir


def synthetic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        letters = POSITIVE if label == "positive" else NEGATIVE
        rows.append({"review": " ".join(rng.choice(letters) for _ in range(rng.randint(3, 7))), "sentiment": label})
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    from model.data.records import write_records

    write_records(rows, path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_dir) -> Path:
    directory = tmp_path_factory.mktemp("data")
    source = write_csv(synthetic_rows(140, seed=0), directory / "reviews.csv")
    prepare.prepare_classification(checkpoint_dir=tiny_dir, data_file=source, out_dir=directory / "prepared",
                                   text_field="review", label_field="sentiment", test_fraction=0.3)
    return directory / "prepared"


def cli_error(capsys, function, args: list[str]) -> str:
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as exit_info:
        run_cli(function, args)
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and "Traceback" not in stderr
    return stderr


def test_prepare_maps_labels_and_reports_balance(data_dir, capsys):
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["labels"] == ["negative", "positive"]  # sorted names -> ids 0, 1
    train = torch.load(data_dir / "train.pt", weights_only=True)
    test = torch.load(data_dir / "test.pt", weights_only=True)
    assert {s["label"] for s in train} == {0, 1}
    for sample in train + test:  # every label id matches the letters of its text
        assert (sample["text"][0] in POSITIVE) == (meta["labels"][sample["label"]] == "positive")
    assert not {s["text"] for s in train} & {s["text"] for s in test}  # duplicates never straddle the splits
    splits = meta["splits"]
    assert splits["train"]["samples"] == len(train) and splits["test"]["samples"] == len(test)
    assert sum(splits["test"]["classes"].values()) == len(test)
    assert abs(splits["test"]["classes"]["negative"] - splits["test"]["classes"]["positive"]) <= 1  # stratified


@pytest.mark.parametrize("problem", ["unknown label column", "single class", "empty text", "unknown label"])
def test_prepare_bad_input_is_a_clear_error(problem, tiny_dir, tmp_path, capsys):
    rows = synthetic_rows(12, seed=1)
    args = ["--checkpoint_dir", str(tiny_dir), "--out_dir", str(tmp_path / "out"), "--text_field", "review",
            "--label_field", "sentiment"]
    if problem == "unknown label column":
        args[-1] = "stars"
        expected = "no column 'stars' (the columns are ['review', 'sentiment']); pass --label_field"
    elif problem == "single class":
        rows = [dict(row, sentiment="positive") for row in rows]
        expected = "only one class ('positive') in column 'sentiment'"
    elif problem == "empty text":
        rows[4]["review"] = "   "
        expected = "reviews.csv line 6: empty text in column 'review'"  # line 1 is the header
    else:
        rows[7]["sentiment"] = "neutral"
        args += ["--labels", "[negative, positive]"]
        expected = "reviews.csv line 9: label 'neutral' is not one of --labels ['negative', 'positive']"
    source = write_csv(rows, tmp_path / "reviews.csv")
    error = cli_error(capsys, prepare.prepare_classification, args + ["--data_file", str(source)])
    assert expected in error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def test_pooling_picks_the_last_real_token_for_right_and_left_padding(tiny_dir):
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    left = right.flip(1)
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    hidden = torch.arange(3 * 5, dtype=torch.float32).view(3, 5, 1)
    assert pool(hidden, right, "last").flatten().tolist() == [2.0, 9.0, 10.0]
    assert pool(hidden, right, "mean").flatten().tolist() == [1.0, 7.0, 10.0]

    # the whole classifier: the same logits for a text alone, right-padded and left-padded in a batch
    tokenizer = Tokenizer(tiny_dir)
    samples = [{"input_ids": tokenizer.encode(text)} for text in ("a b c d e f", "p q", "a q b r c")]
    for pooling in ("last", "mean"):
        torch.manual_seed(0)
        classifier = Classifier(GPT.from_checkpoint(tiny_dir), 3, pooling)
        torch.nn.init.normal_(classifier.score.weight)
        with torch.no_grad():
            alone = torch.cat([classifier(s["input_ids"][None], torch.ones(1, len(s["input_ids"]), dtype=torch.bool))
                               for s in samples])
            for side in ("right", "left"):
                batch = collate(samples, pad_id=7, padding_side=side)
                assert not batch["attention_mask"].all()  # there is padding to get wrong
                torch.testing.assert_close(classifier(batch["input_ids"], batch["attention_mask"]), alone,
                                           rtol=1e-5, atol=1e-5)


def expected_trainable(gpt: GPT, mode: str, n_layers: int, num_labels: int, lora_config: LoRAConfig) -> int:
    c = gpt.config
    head = c.n_embd * num_labels
    if mode == "features":
        return 0
    if mode == "head":
        return head
    if mode == "full":
        return sum(p.numel() for p in gpt.parameters()) + head  # the tied embedding counts once
    if mode == "last_layers":
        return sum(p.numel() for b in gpt.transformer.h[-n_layers:] for p in b.parameters()) + c.n_embd + head
    q_size, kv_size = c.n_head * c.head_size, c.n_query_groups * c.head_size
    per_layer = lora_config.r * (c.n_embd + q_size) + lora_config.r * (c.n_embd + kv_size)  # q and v: A and B
    return c.n_layer * per_layer + head


@pytest.mark.parametrize("mode", ["features", "head", "last_layers", "full", "lora"])
def test_each_mode_trains_only_its_parameters(mode, tiny_dir):
    lora_config = LoRAConfig(r=4)
    gpt = GPT.from_checkpoint(tiny_dir)
    if mode == "lora":
        inject_lora(gpt, lora_config)
    classifier = Classifier(gpt, 3, bias=mode == "features")
    mark_trainable(classifier, mode, n_layers=1)
    assert count_parameters(classifier) == expected_trainable(gpt, mode, 1, 3, lora_config)
    trainable = {name for name, p in classifier.named_parameters() if p.requires_grad}
    if mode == "last_layers":
        assert {name.split(".")[3] for name in trainable if ".h." in name} == {str(gpt.config.n_layer - 1)}
    if mode == "lora":
        assert all(".lora." in name for name in trainable - {"score.weight"})


@pytest.mark.parametrize("mode", ["features", "head", "last_layers", "full", "lora"])
def test_each_mode_beats_chance_and_saves_what_it_trained(mode, tiny_dir, data_dir, tmp_path, capsys):
    out_dir = tmp_path / mode
    lr = {} if mode in ("features", "head") else {"learning_rate": 1e-2 if mode == "lora" else 3e-3}
    extra = {} if mode == "features" else {**FAST, "head_learning_rate": 3e-2, **lr}
    classify.setup(checkpoint_dir=tiny_dir, data_dir=data_dir, out_dir=out_dir, mode=mode, n_layers=1, lora_r=4,
                   lora_dropout=0.0, **extra)
    result = json.loads((out_dir / "results.json").read_text())
    test_size = len(torch.load(data_dir / "test.pt", weights_only=True))
    assert result["test_samples"] == test_size and sum(map(sum, result["confusion_matrix"])) == test_size
    assert result["accuracy"] >= 0.85, result  # chance is 0.5
    assert result["macro_f1"] >= 0.85
    assert (out_dir / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["train_time_s"] > 0 and result["peak_memory_gb"] > 0

    saved = load_file(out_dir / "final" / CLASSIFIER_WEIGHTS)
    expected = {"features": {"score.weight", "score.bias"}, "head": {"score.weight"}}.get(mode)
    if expected is None:
        assert "score.weight" in saved and len(saved) > 1
        body = set(saved) - {"score.weight"}
        if mode == "lora":
            assert all(".lora." in key for key in body)
        if mode == "last_layers":
            assert body == {k for k in body if k.startswith("gpt.transformer.h.1.") or k.startswith("gpt.transformer.ln_f")}
    else:
        assert set(saved) == expected
    if mode == "features":
        assert len(list((out_dir / "features").glob("*.pt"))) == 2  # train and test, cached

    # the saved classifier gives the same predictions through generate/classify.py
    reloaded, hparams = load_classifier(out_dir)
    assert hparams["labels"] == ["negative", "positive"] and hparams["mode"] == mode
    test = torch.load(data_dir / "test.pt", weights_only=True)
    csv_path = write_csv([{"text": s["text"], "truth": hparams["labels"][s["label"]]} for s in test], tmp_path / "t.csv")
    capsys.readouterr()
    rows = generate_classify.classify(classifier_dir=out_dir, input_file=csv_path, label_field="truth",
                                      output_file=tmp_path / "labelled.jsonl")
    out = capsys.readouterr().out
    assert f"accuracy {result['accuracy']:.4f}" in out
    assert len(rows) == test_size and all(abs(r["prob_negative"] + r["prob_positive"] - 1) < 1e-4 for r in rows)


def test_classifier_bad_flags_and_data(tiny_dir, data_dir, tmp_path, capsys):
    args = ["--checkpoint_dir", str(tiny_dir), "--out_dir", str(tmp_path / "run")]
    error = cli_error(capsys, classify.setup, args + ["--data_dir", str(tmp_path / "none")])
    assert "train.pt not found. Prepare the data first" in error
    error = cli_error(capsys, classify.setup, args + ["--data_dir", str(data_dir), "--mode", "last_layers",
                                                      "--n_layers", "9", "--max_steps", "1"])
    assert "--n_layers must be between 1 and the model's 2 layers, got 9" in error
    error = cli_error(capsys, classify.setup, args + ["--data_dir", str(data_dir), "--mode", "head",
                                                      "--learning_rate", "0.1"])
    assert "use --head_learning_rate" in error
    error = cli_error(capsys, generate_classify.classify, ["--classifier_dir", str(tmp_path / "run")])
    assert "Pass the texts with --text" in error


def test_export_to_transformers_gives_the_same_logits(tiny_dir, data_dir, tmp_path, capsys):
    import transformers

    run = tmp_path / "lora"
    classify.setup(checkpoint_dir=tiny_dir, data_dir=data_dir, out_dir=run, mode="lora", lora_r=4, **FAST,
                   max_seq_length=None)
    classifier, hparams = load_classifier(run)
    with torch.no_grad():  # a trained-looking head and LoRA B (B starts at zero, which would hide a missed merge)
        torch.manual_seed(0)
        for name, param in classifier.named_parameters():
            if name.endswith(".B") or name == "score.weight":
                param.normal_(0, 0.5)
    from model.workflows.classify import save_classifier

    save_classifier(classifier, run / "final", hparams)
    exported = tmp_path / "hf"
    convert_to_hf.convert_to_hf(checkpoint_dir=tiny_dir, out_dir=exported, classifier_dir=run)
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(exported).eval()

    tokenizer = Tokenizer(tiny_dir)
    samples = [{"input_ids": tokenizer.encode(t)} for t in ("a b c", "p q r s t u", "a p")]
    batch = collate(samples, pad_id=config["pad_token_id"])
    with torch.no_grad():
        ours = classifier(batch["input_ids"], batch["attention_mask"])
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
    assert ours.abs().max() > 0.1  # the comparison is not of zeros
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)

    features_run = tmp_path / "features"
    classify.setup(checkpoint_dir=tiny_dir, data_dir=data_dir, out_dir=features_run, mode="features")
    error = cli_error(capsys, convert_to_hf.convert_to_hf, ["--checkpoint_dir", str(tiny_dir), "--out_dir",
                                                            str(tmp_path / "hf2"), "--classifier_dir", str(features_run)])
    assert "has a bias" in error and not (tmp_path / "hf2").exists()


def test_resumed_run_ends_where_an_uninterrupted_one_does(tiny_dir, data_dir, tmp_path):
    settings = dict(checkpoint_dir=tiny_dir, data_dir=data_dir, mode="lora", lora_r=4, **{**FAST, "max_steps": 6,
                    "save_interval": 3})
    classify.setup(out_dir=tmp_path / "run", **settings)
    uninterrupted = load_file(tmp_path / "run" / "final" / CLASSIFIER_WEIGHTS)
    # what a run killed after step 4 leaves: checkpoint 3 (and rows of metrics.csv past it)
    shutil.rmtree(tmp_path / "run" / "step-000006")
    shutil.rmtree(tmp_path / "run" / "final")
    classify.setup(out_dir=tmp_path / "run", resume=True, **settings)
    resumed = load_file(tmp_path / "run" / "final" / CLASSIFIER_WEIGHTS)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    with open(tmp_path / "run" / "metrics.csv", newline="") as fp:
        training_rows = [int(row["step"]) for row in csv.DictReader(fp) if row["loss"]]
    assert training_rows == [1, 2, 3, 4, 5, 6]  # the rows after checkpoint 3 were replaced, not repeated
