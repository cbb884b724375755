"""scripts/prepare_preferences.py: the built-in pairs are right vs nearly right, the HH-RLHF / UltraFeedback / pairs
layouts parse, and every row that makes no pair is counted and named (or, with --strict, an error naming its line).
Uses the real SmolLM2 tokenizer only (no model weights).
"""

import json
import shutil

import pytest
import torch
from conftest import load_script

from model.cli import run_cli
from model.data.preference import load_pairs
from model.data.records import write_records
from model.data.sft import IGNORE_INDEX

prepare = load_script("scripts/prepare_preferences.py")
tasks = load_script("scripts/prepare_tasks.py")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, smollm2_dir):
    directory = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_style.yaml"):
        shutil.copy(smollm2_dir / name, directory / name)
    return directory


def test_task_pairs_prefer_the_right_answer_to_a_near_miss(tokenizer_dir, tmp_path):
    out = tmp_path / "pref"
    prepare.prepare_preferences(checkpoint_dir=tokenizer_dir, out_dir=out, num_train=40, num_test=20)
    train, test = load_pairs(out / "train.pt"), load_pairs(out / "test.pt")
    assert len(train) == 40 and len(test) == 20
    user_turn = "<|im_start|>user\n"
    for pair in train + test:
        instruction = pair["prompt"].split(user_turn, 1)[1].rsplit("<|im_end|>", 1)[0]
        assert tasks.check_answer(pair["task"], instruction, pair["chosen"])
        assert not tasks.check_answer(pair["task"], instruction, pair["rejected"])
        for side in ("chosen", "rejected"):  # the loss is on the answer: the prompt is masked, the answer is not
            ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
            prompt_length = (labels == IGNORE_INDEX).sum().item()
            assert torch.equal(ids[:prompt_length], pair["chosen_input_ids"][:prompt_length])
            assert torch.equal(labels[prompt_length:], ids[prompt_length:])
    assert len({p["task"] for p in train}) == len(tasks.TASKS)
    # byte-identical files from the same flags
    prepare.prepare_preferences(checkpoint_dir=tokenizer_dir, out_dir=tmp_path / "again", num_train=40, num_test=20)
    assert (out / "train.pt").read_bytes() == (tmp_path / "again" / "train.pt").read_bytes()


def test_bad_rows_are_skipped_counted_and_named(tokenizer_dir, tmp_path, capsys):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Right {i}", "rejected": f"Wrong {i}"} for i in range(8)]
    rows[2] = {"prompt": "No rejected here", "chosen": "x"}
    rows[4] = {"prompt": "Same", "chosen": "same answer", "rejected": "same answer "}
    rows[6] = {"prompt": "long " * 300, "chosen": "a", "rejected": "b"}
    path = tmp_path / "pairs.jsonl"
    write_records(rows, path)
    out = tmp_path / "out"
    prepare.prepare_preferences(checkpoint_dir=tokenizer_dir, data_file=path, out_dir=out, max_seq_length=64,
                                test_fraction=0.2)
    report = capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train"]["pairs"] + meta["test"]["pairs"] == 5
    skipped = meta["skipped"]
    assert skipped["missing field 'rejected' (map your column names with --prompt_field etc.)"] == {
        "count": 1, "first": [f"{path} line 3"]}
    assert skipped["chosen and rejected are identical"]["first"] == [f"{path} line 5"]
    too_long = [value for reason, value in skipped.items() if "leaves no room" in reason]
    assert too_long and too_long[0]["count"] == 1
    assert "skipped: 3 row(s):" in report and f"{path} line 7" in report

    # --strict: the first bad row is an error naming its line; nothing is written
    with pytest.raises(SystemExit):
        run_cli(prepare.prepare_preferences, ["--checkpoint_dir", str(tokenizer_dir), "--data_file", str(path),
                                              "--out_dir", str(tmp_path / "strict"), "--strict", "true"])
    error = capsys.readouterr().err
    assert f"error: {path} line 3: missing field 'rejected'" in error
    assert not (tmp_path / "strict").exists()

    # nothing usable at all: an error that lists why
    write_records([{"question": "q", "good": "a", "bad": "b"}] * 3, tmp_path / "renamed.csv")
    with pytest.raises(ValueError, match=r"No train pairs left .* missing field 'chosen'.*: 3"):
        prepare.prepare_preferences(checkpoint_dir=tokenizer_dir, data_file=tmp_path / "renamed.csv",
                                    out_dir=tmp_path / "none")
    # ... which the field flags fix
    prepare.prepare_preferences(checkpoint_dir=tokenizer_dir, data_file=tmp_path / "renamed.csv",
                                out_dir=tmp_path / "mapped", prompt_field="question", chosen_field="good",
                                rejected_field="bad", test_fraction=0.34)
    assert load_pairs(tmp_path / "mapped" / "train.pt")[0]["chosen"] == "a"


def test_hh_rlhf_transcripts(tokenizer_dir, tmp_path):
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a color."
    rows = [
        {"chosen": shared + "\n\nAssistant: Blue.", "rejected": shared + "\n\nAssistant: No."},
        {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: Different\n\nAssistant: C"},
        {"chosen": "\n\nHuman: Q1\n\nAssistant: yes", "rejected": "\n\nHuman: Q1\n\nAssistant: no"},
    ]
    write_records(rows, tmp_path / "hh.jsonl")
    out = tmp_path / "out"
    prepare.prepare_preferences(checkpoint_dir=tokenizer_dir, data_file=tmp_path / "hh.jsonl", out_dir=out,
                                test_fraction=0.5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "hh"
    assert meta["skipped"]["the chosen and rejected transcripts differ before the last Assistant turn"]["count"] == 1
    pairs = load_pairs(out / "train.pt") + load_pairs(out / "test.pt")
    multi_turn = next(p for p in pairs if p["chosen"] == "Blue.")
    assert multi_turn["rejected"] == "No."
    # the earlier turns are the prompt, in the chat template, ending with the assistant's generation prompt
    assert ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
            "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n") in multi_turn["prompt"]


def test_ultrafeedback_best_vs_worst_and_conversational_pairs(tokenizer_dir, tmp_path):
    rows = [
        {"instruction": "Say hi", "completions": [{"response": "hi", "overall_score": 7.5},
                                                  {"response": "bye", "overall_score": 2},
                                                  {"response": "hello", "overall_score": 5}]},
        {"instruction": "Tie", "completions": [{"response": "a", "overall_score": 3}, {"response": "b", "overall_score": 3}]},
        {"instruction": "Count", "completions": [{"text": "1 2 3", "score": 1}, {"text": "one", "score": 0}]},
    ]
    write_records(rows, tmp_path / "uf.json")
    out = tmp_path / "uf"
    prepare.prepare_preferences(checkpoint_dir=tokenizer_dir, data_file=tmp_path / "uf.json", out_dir=out,
                                test_fraction=0.5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "ultrafeedback"
    assert meta["skipped"]["all completions have the same score: no preference"]["count"] == 1
    pairs = {p["chosen"]: p["rejected"] for p in load_pairs(out / "train.pt") + load_pairs(out / "test.pt")}
    assert pairs == {"hi": "bye", "1 2 3": "one"}

    # binarized layout: chosen/rejected conversations ending with the answer; the prompt is what precedes it
    conversation = [{"role": "user", "content": "Capital of France?"}]
    rows = [{"chosen": conversation + [{"role": "assistant", "content": "Paris"}],
             "rejected": conversation + [{"role": "assistant", "content": "Lyon"}]}] * 2
    write_records(rows, tmp_path / "binarized.parquet")
    prepare.prepare_preferences(checkpoint_dir=tokenizer_dir, data_file=tmp_path / "binarized.parquet",
                                out_dir=tmp_path / "bin", test_fraction=0.5)
    pair = load_pairs(tmp_path / "bin" / "train.pt")[0]
    assert (pair["chosen"], pair["rejected"]) == ("Paris", "Lyon") and "Capital of France?" in pair["prompt"]
