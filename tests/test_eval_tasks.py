"""eval/tasks.py: exact match of greedy answers, per task, for a checkpoint and for a LoRA run given by its
directory; a removed per-method flag is one `error:` line naming --checkpoint_dir."""

import json

import pytest
from conftest import cli_error, last_line, load_script

from model.data.sft import encode_example, save_dataset
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer
from model.weights.load import load_any
from model.workflows.evaluate import greedy_answers

tasks = load_script("eval/tasks.py")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def task_data(tiny_smollm2_dir, tmp_path):
    tokenizer, style = Tokenizer(tiny_smollm2_dir), load_prompt_style(tiny_smollm2_dir)
    samples = []
    for task, n in (("count", 3), ("count", 4), ("say", 5)):
        sample = encode_example(tokenizer, style, f"Say the number {n}.", f"{n}")
        samples.append({**sample, "task": task})
    save_dataset(samples, tmp_path / "test.pt")
    return tmp_path, samples


@pytest.mark.parametrize("run", [False, True], ids=["checkpoint", "lora-run"])
def test_exact_match_counts_the_greedy_answers_equal_to_the_response(tiny_smollm2_dir, tiny_lora_run, task_data,
                                                                     capsys, run):
    data_dir, samples = task_data
    path = tiny_lora_run if run else tiny_smollm2_dir
    loaded = load_any(path)
    tokenizer = Tokenizer(loaded.checkpoint_dir)
    answers = greedy_answers(loaded.model, tokenizer, [s["prompt"] for s in samples], max_new_tokens=4, batch_size=1)
    # plant one right answer: the data's response is what the model says for the first sample
    samples[0]["response"] = answers[0]
    save_dataset(samples, data_dir / "test.pt")
    value = tasks.evaluate(checkpoint_dir=path, data_dir=data_dir, max_new_tokens=4, batch_size=2,
                           out_dir=data_dir / "out")
    expected = sum(a == s["response"].strip() for a, s in zip(answers, samples)) / len(samples)
    assert value == pytest.approx(expected) and value >= 1 / 3
    assert last_line(capsys) == f"exact_match: {value:.4f}"
    result = json.loads((data_dir / "out" / "tasks.json").read_text())
    assert [a["answer"] for a in result["answers"]] == answers
    assert set(result["per_task"]) == {"count", "say"} and result["per_task_samples"] == {"count": 2, "say": 1}
    assert result["kind"] == ("LoRA/DoRA run" if run else "checkpoint")
    assert result["run_dir"] == (str(tiny_lora_run / "final") if run else None)


def test_removed_run_flags_name_the_checkpoint_dir_flag(tiny_lora_run, task_data, capsys):
    for flag in ("--lora_dir", "--adapter_dir"):
        error = cli_error(capsys, tasks.evaluate, [flag, str(tiny_lora_run), "--data_dir", str(task_data[0])])
        assert error == f"error: {flag} was removed: pass the run directory as --checkpoint_dir"
