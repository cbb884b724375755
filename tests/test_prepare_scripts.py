"""scripts/prepare_{alpaca,dolly,lima,longform,flan,json}.py run offline on the small fixture files in
tests/data/prepare/ (rows shaped like the real datasets'), and fail clearly, with nothing written, on bad input."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_script
from test_data import chatml_dir  # noqa: F401 (fixture)
from test_prepare import loss_runs

from model.cli import run_cli
from model.data.sft import IGNORE_INDEX, load_dataset
from model.tokenizer import Tokenizer

DATA = ROOT / "tests" / "data" / "prepare"
SCRIPTS = {name: load_script(f"scripts/prepare_{name}.py") for name in
           ("alpaca", "dolly", "lima", "longform", "flan", "json")}


def prepare(name, checkpoint_dir, out_dir, **flags):
    getattr(SCRIPTS[name], f"prepare_{name}")(checkpoint_dir=checkpoint_dir, out_dir=out_dir, **flags)
    tokenizer = Tokenizer(checkpoint_dir)
    train = load_dataset(out_dir / "train.pt", vocab_size=tokenizer.vocab_size)
    test = load_dataset(out_dir / "test.pt", vocab_size=tokenizer.vocab_size)
    return train, test, json.loads((out_dir / "meta.json").read_text())


def loss_texts(tokenizer, sample):
    return [tokenizer.decode(sample["input_ids"][a:b]) for a, b in loss_runs(sample)]


def rows_of(path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    "name, data_file, instruction, response, task",
    [
        ("alpaca", "alpaca.json", "instruction", "output", None),
        ("dolly", "dolly.jsonl", "instruction", "response", "category"),
        ("longform", "longform.json", "input", "output", "source"),
        ("flan", "flan.jsonl", "inputs", "targets", "task"),
    ],
)
def test_instruction_datasets_prepare_offline(chatml_dir, tmp_path, name, data_file, instruction, response, task):
    rows = rows_of(DATA / data_file)
    train, test, meta = prepare(name, chatml_dir, tmp_path, data_file=DATA / data_file, val_split_fraction=0.25)
    tokenizer = Tokenizer(chatml_dir)
    assert len(train) + len(test) == len(rows) and len(test) == round(len(rows) * 0.25)
    assert meta["train"]["samples"] == len(train) and meta["prompt_style"] == "chatml"
    by_response = {row[response]: row for row in rows}
    for sample in train + test:
        row = by_response[sample["response"]]
        # the loss is on the response and its end-of-turn marker, and nothing else
        assert loss_texts(tokenizer, sample) == [row[response] + "<|im_end|>"]
        assert row[instruction] in sample["prompt"]
        for context in ("input", "context"):
            if row.get(context) and instruction != context:
                assert row[context] in sample["prompt"]
        if task:
            assert sample["task"] == row[task]
    if task:
        assert sum(meta["train"]["per_task"].values()) == len(train)


def test_lima_learns_every_assistant_turn_of_multi_turn_conversations(chatml_dir, tmp_path):
    rows = rows_of(DATA / "lima.jsonl")
    train, test, _ = prepare("lima", chatml_dir, tmp_path / "all", data_file=DATA / "lima.jsonl")
    tokenizer = Tokenizer(chatml_dir)
    samples = {sample["response"]: sample for sample in train + test}
    assert len(samples) == len(rows)
    for row in rows:
        answers = row["conversations"][1::2]
        sample = samples[answers[-1]]
        assert loss_texts(tokenizer, sample) == [answer + "<|im_end|>" for answer in answers]
        assert sample["task"] == row["source"]
    train, test, _ = prepare("lima", chatml_dir, tmp_path / "single", data_file=DATA / "lima.jsonl",
                             include_multiturn_conversations=False)
    assert len(train) + len(test) == len(rows) - 1 and all(len(loss_runs(s)) == 1 for s in train + test)


@pytest.mark.parametrize(
    "data_file, flags",
    [
        ("chat_messages.jsonl", {}),
        ("sharegpt.json", {}),
        ("custom.csv", {"instruction_field": "question", "output_field": "answer", "input_field": "context"}),
    ],
)
def test_prepare_json_reads_chat_and_mapped_fields(chatml_dir, tmp_path, data_file, flags):
    train, test, _ = prepare("json", chatml_dir, tmp_path, data_file=DATA / data_file, **flags)
    tokenizer = Tokenizer(chatml_dir)
    samples = train + test
    if data_file == "chat_messages.jsonl":
        by_response = {s["response"]: s for s in samples}
        assert sorted(by_response) == ["3, 2, 1", "Berlin", "Hello!", "QUIET"]
        assert loss_texts(tokenizer, by_response["Berlin"]) == ["Paris<|im_end|>", "Berlin<|im_end|>"]
        assert "You answer in one word." in by_response["Berlin"]["prompt"]
        assert "You are terse." in by_response["3, 2, 1"]["prompt"]  # the row's system field
        assert "Uppercase this word\n\nquiet" in by_response["QUIET"]["prompt"]  # an instruction row in the same file
    elif data_file == "sharegpt.json":
        by_response = {s["response"]: s for s in samples}
        assert sorted(by_response) == ["12", "Apple", "I am sorry. You can try again."]
        assert loss_texts(tokenizer, by_response["12"]) == ["4<|im_end|>", "12<|im_end|>"]
        assert "Be kind." in by_response["I am sorry. You can try again."]["prompt"]
        assert not by_response["Apple"]["prompt"].endswith("thanks")  # the unanswered last turn is gone
    else:
        by_response = {s["response"]: s for s in samples}
        assert sorted(by_response) == ["7", "CALM", "blue", "blue green red"]
        assert "What is the sum?\n\n3 and 4" in by_response["7"]["prompt"]
        assert loss_texts(tokenizer, by_response["7"]) == ["7<|im_end|>"]


def test_prepare_json_parquet_test_file_and_reverse(chatml_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = rows_of(DATA / "alpaca.json")
    pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "test.parquet")
    train, test, meta = prepare("json", chatml_dir, tmp_path / "out", data_file=tmp_path / "train.parquet",
                                test_file=tmp_path / "test.parquet", reverse_instructions=True)
    assert [s["response"] for s in train] == [row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
                                             for row in rows[:4]]
    assert [s["response"] for s in test] == [row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
                                            for row in rows[4:]]
    tokenizer = Tokenizer(chatml_dir)
    assert all(rows[i]["output"] in train[i]["prompt"] for i in range(4))
    assert loss_texts(tokenizer, train[0]) == [rows[0]["instruction"] + "<|im_end|>"]
    assert meta["reverse_instructions"] is True


def test_truncation_report_and_determinism(chatml_dir, tmp_path, capsys):
    # with the tiny tokenizer the rows have 130 to 412 tokens; the longest one's prompt alone has 314
    flags = dict(data_file=DATA / "dolly.jsonl", max_seq_length=210, val_split_fraction=0.4)
    train, test, meta = prepare("dolly", chatml_dir, tmp_path / "a", **flags)
    samples = train + test
    assert all(len(s["input_ids"]) <= 210 for s in samples)
    assert all((s["labels"][1:] != IGNORE_INDEX).any() for s in samples)  # every kept sample has an answer token
    truncated = sum(meta[split]["truncated"] for split in ("train", "test"))
    dropped = sum(meta[split]["dropped_answer_cut_off"] for split in ("train", "test"))
    assert truncated == sum(s["truncated"] > 0 for s in samples) > 0
    assert truncated == 2 and dropped == 1 and len(samples) == 4  # the long closed_qa context leaves no room
    output = capsys.readouterr().out
    assert (f"{meta['train']['truncated']} cut to --max_seq_length 210 and kept,"
            f" {meta['train']['dropped_answer_cut_off']} dropped (no answer token left)") in output
    assert "⟦" in output

    prepare("dolly", chatml_dir, tmp_path / "b", **flags)
    for name in ("train.pt", "test.pt", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    prepare("dolly", chatml_dir, tmp_path / "c", **{**flags, "seed": 3, "max_seq_length": -1})
    assert (tmp_path / "a" / "test.pt").read_bytes() != (tmp_path / "c" / "test.pt").read_bytes()


BAD_FILES = {
    "malformed.jsonl": (b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n',
                        r"malformed.jsonl line 2: not valid JSON"),
    "malformed.json": (b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n',
                       r"malformed.json line 3: not valid JSON"),
    "missing.jsonl": (b'{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "response": "d"}\n',
                      r"missing.jsonl line 3: missing field 'output' \(it has \['instruction', 'response'\]\)"),
    "empty.jsonl": (b"\n", r"empty.jsonl: no rows in the file"),
    "latin1.csv": ("instruction,output\ncaf\xe9,b\n".encode("latin-1"),
                   r"latin1.csv: not UTF-8 text \(byte 0xe9 at offset 22, line 2\)"),
    "empty_answer.jsonl": (b'{"instruction": "a", "output": "  "}\n', r"empty_answer.jsonl line 1: the response is empty"),
    "bad_chat.jsonl": (b'{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n',
                       r"bad_chat.jsonl line 1: messages turn 1 has the unknown role 'bot'"),
}


@pytest.mark.parametrize("file_name", list(BAD_FILES))
def test_bad_input_is_one_clear_error_and_writes_nothing(chatml_dir, tmp_path, capsys, file_name):
    content, message = BAD_FILES[file_name]
    data_file = tmp_path / file_name
    data_file.write_bytes(content)
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(SCRIPTS["json"].prepare_json, ["--checkpoint_dir", str(chatml_dir), "--data_file", str(data_file),
                                                "--out_dir", str(out_dir)])
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: ")
    assert re.search(message, stderr[0]), stderr[0]
    assert not out_dir.exists()


def test_a_failed_run_leaves_an_earlier_output_as_it_was(chatml_dir, tmp_path):
    out_dir = tmp_path / "out"
    prepare("alpaca", chatml_dir, out_dir, data_file=DATA / "alpaca.json")
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]')
    with pytest.raises(ValueError, match=r"bad.json item 1: missing field 'output'"):
        SCRIPTS["alpaca"].prepare_alpaca(checkpoint_dir=chatml_dir, out_dir=out_dir, data_file=bad)
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before


@pytest.mark.parametrize(
    "name, flags, match",
    [
        ("json", {"max_seq_length": 0}, "--max_seq_length must be positive"),
        ("json", {"val_split_fraction": 1.0}, "--val_split_fraction must be between 0 and 1"),
        ("flan", {"subsets": "trec_10templates,nope"}, "Unknown FLAN subset.*nope"),
        ("flan", {"max_rows_per_subset": 0}, "--max_rows_per_subset must be positive"),
    ],
)
def test_bad_flags_are_rejected_before_any_work(chatml_dir, tmp_path, name, flags, match):
    data = {"data_file": DATA / "chat_messages.jsonl"} if name == "json" else {}
    with pytest.raises(ValueError, match=match):
        getattr(SCRIPTS[name], f"prepare_{name}")(checkpoint_dir=chatml_dir, out_dir=tmp_path / "out", **data, **flags)
    assert not (tmp_path / "out").exists()


def test_offline_download_is_a_clear_cli_error(chatml_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/prepare_dolly.py"), "--checkpoint_dir", str(chatml_dir),
         "--out_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env=env, check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: Could not download databricks-dolly-15k.jsonl from the Hugging Face"
                                    " dataset databricks/databricks-dolly-15k")
    assert "--data_file PATH" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.real_model
def test_real_smollm2_sharegpt_labels_are_the_answers_and_im_end(smollm2_dir, tmp_path):
    train, test, meta = prepare("json", smollm2_dir, tmp_path, data_file=DATA / "sharegpt.json")
    tokenizer = Tokenizer(smollm2_dir)
    rows = rows_of(DATA / "sharegpt.json")
    for sample in train + test:
        row = next(r for r in rows if any(t["value"] == sample["response"] for t in r["conversations"]))
        answers = [t["value"] for t in row["conversations"] if t["from"] == "gpt"]
        assert loss_texts(tokenizer, sample) == [answer + "<|im_end|>" for answer in answers]
        # the tokens are exactly those of the rendered text, as the model sees it at generation time
        text = tokenizer.decode(sample["input_ids"])
        assert torch.equal(tokenizer.encode(text), sample["input_ids"])
    assert meta["vocab_size"] == 49152


def test_a_conversation_the_prompt_style_cannot_render_names_its_row(tmp_path, tiny_sentencepiece_model):
    from test_tokenizer import make_sentencepiece_dir

    from model.prompts import save_prompt_style

    checkpoint_dir = make_sentencepiece_dir(tmp_path / "llama2", tiny_sentencepiece_model)
    save_prompt_style("llama2", checkpoint_dir)  # needs user/assistant/user/... turns
    data_file = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}
    data_file.write_text("\n".join(json.dumps(row) for row in [good, good, bad]) + "\n")
    with pytest.raises(ValueError, match=r"chats.jsonl line 3: The 'llama2' prompt style needs turns that alternate"):
        SCRIPTS["json"].prepare_json(checkpoint_dir=checkpoint_dir, data_file=data_file, out_dir=tmp_path / "out",
                                     val_split_fraction=0.3)
    assert not (tmp_path / "out").exists()
