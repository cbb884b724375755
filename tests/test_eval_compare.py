"""eval/compare.py: a base and its LoRA run scored without merging, each column equal to its own script's number."""

import json
from pathlib import Path

import pytest
from conftest import cli_error, load_script
from mc_oracle import PLANTED, write_csv

compare = load_script("eval/compare.py")
perplexity = load_script("eval/perplexity.py")
TEXT_LOCAL = "eval/lm_eval_tasks/data/text_test.jsonl"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_scores_a_base_and_its_tiny_lora_run_without_merging(tiny_smollm2_dir, tiny_lora_run, tmp_path, capsys):
    questions = write_csv(tmp_path / "planted.csv", PLANTED)
    value = compare.main(models=[f"base={tiny_smollm2_dir}", str(tiny_lora_run)], metrics="perplexity,multiple_choice",
                         ppl_file=Path(TEXT_LOCAL), mc_csv=questions, out_dir=tmp_path / "cmp", batch_size=4)
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    table = result["table"]
    assert list(table) == ["base", tiny_lora_run.name]
    # each column equals its own script's number for that model; the LoRA run changes the model
    for name, path in (("base", tiny_smollm2_dir), (tiny_lora_run.name, tiny_lora_run)):
        expected = perplexity.main(checkpoint_dir=path, data_file=Path(TEXT_LOCAL), out_dir=tmp_path / name)
        assert table[name]["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert table["base"]["perplexity"] != pytest.approx(table[tiny_lora_run.name]["perplexity"], rel=1e-3)
    assert out[-1] == f"perplexity_change: {value:+.4f}"
    assert value == pytest.approx(table[tiny_lora_run.name]["perplexity"] - table["base"]["perplexity"], abs=1e-4)
    markdown = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert markdown[0] == "| model | perplexity ↓ | multiple_choice ↑ |" and len(markdown) == 4
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_bad_inputs(tiny_smollm2_dir, tmp_path, capsys):
    assert "'accuracy'" in cli_error(capsys, compare.main, ["--models", f"[{tiny_smollm2_dir}]", "--metrics",
                                                            "accuracy"])
    assert "--mc_csv" in cli_error(capsys, compare.main, ["--models", f"[{tiny_smollm2_dir}]", "--metrics", "multiple_choice"])
    assert "neither a checkpoint" in cli_error(capsys, compare.main, ["--models", f"[a={tmp_path}]"])
    assert "named 'x'" in cli_error(capsys, compare.main, ["--models", f"[x={tiny_smollm2_dir}, x={tiny_smollm2_dir}]"])
