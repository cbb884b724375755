"""The command line (model/cli.py): a flag out of range is one `error:` line naming it, exit 1, and the script does
not run (so nothing is written)."""

from pathlib import Path
from typing import Literal, Optional

import pytest

from model.cli import NonNegativeInt, PositiveInt, run_cli


def make_script(out_dir: Path):
    def train(
        micro_batch_size: PositiveInt = 4,
        global_batch_size: PositiveInt = 16,
        max_steps: Optional[PositiveInt] = None,
        epochs: PositiveInt = 1,
        max_seq_length: Optional[PositiveInt] = None,
        eval_interval: PositiveInt = 50,
        eval_iters: PositiveInt = 20,
        save_interval: PositiveInt = 100,
        warmup_steps: NonNegativeInt = 10,
        top_k: Optional[PositiveInt] = None,
        precision: Literal["32-true", "bf16-true"] = "32-true",
    ) -> None:
        """A script's signature, as the training and generation scripts declare their numbers."""
        out_dir.mkdir()
        (out_dir / "hparams.yaml").write_text("ran")

    return train


@pytest.mark.parametrize("flag, value, message", [
    ("--global_batch_size", "-4", "--global_batch_size must be a positive integer, got -4"),
    ("--micro_batch_size", "0", "--micro_batch_size must be a positive integer, got 0"),
    ("--max_steps", "-3", "--max_steps must be a positive integer, got -3"),
    ("--max_steps", "0", "--max_steps must be a positive integer, got 0"),
    ("--max_seq_length", "0", "--max_seq_length must be a positive integer, got 0"),
    ("--max_seq_length", "-5", "--max_seq_length must be a positive integer, got -5"),
    ("--epochs", "0", "--epochs must be a positive integer, got 0"),
    ("--eval_interval", "0", "--eval_interval must be a positive integer, got 0"),
    ("--eval_iters", "0", "--eval_iters must be a positive integer, got 0"),
    ("--save_interval", "-1", "--save_interval must be a positive integer, got -1"),
    ("--warmup_steps", "-1", "--warmup_steps must be a non-negative integer, got -1"),
    ("--top_k", "0", "--top_k must be a positive integer, got 0"),
    ("--precision", "fp8", "--precision: must be one of 32-true, bf16-true, got fp8"),
    ("--unknown_flag", "1", "unrecognized arguments: --unknown_flag 1 (see --help)"),
])
def test_a_bad_number_is_one_line_exit_1_and_nothing_written(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(make_script(tmp_path / "out"), [flag, value])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_valid_numbers_run_the_script(tmp_path):
    run_cli(make_script(tmp_path / "out"), ["--max_steps", "3", "--warmup_steps", "0", "--top_k", "1"])
    assert (tmp_path / "out" / "hparams.yaml").read_text() == "ran"
