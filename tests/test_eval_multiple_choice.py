"""eval/multiple_choice.py: a planted question set is scored exactly as its oracle answers, every bad CSV is one
`error:` line.
"""

import json

import pytest
from conftest import cli_error, last_line, load_script
from mc_oracle import PLANTED, Oracle, write_csv

from model.tokenizer import Tokenizer
from model.weights.load import Loaded

multiple_choice = load_script("eval/multiple_choice.py")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_multiple_choice_scores_a_planted_set_by_construction(tiny_smollm2_dir, tmp_path, capsys, monkeypatch,
                                                              num_fewshot):
    tokenizer = Tokenizer(tiny_smollm2_dir)
    data_file = write_csv(tmp_path / "planted.csv", PLANTED, header=num_fewshot == 0)
    # the oracle knows the right answer to four questions and a wrong one to two
    believed = {q: a for q, _, a in PLANTED} | {"Which is a colour?": "C", "Which is a metal?": "A"}
    oracle = Oracle(tokenizer, believed)
    monkeypatch.setattr(multiple_choice, "load_any",
                        lambda *args, **kwargs: Loaded(oracle, tiny_smollm2_dir, None, "checkpoint", {}))
    value = multiple_choice.main(data_file=data_file, checkpoint_dir=tiny_smollm2_dir, num_fewshot=num_fewshot,
                                 batch_size=4, out_dir=tmp_path)
    assert value == pytest.approx(4 / 6)
    assert last_line(capsys) == "accuracy: 0.6667"
    result = json.loads((tmp_path / "multiple_choice.json").read_text())
    assert [a["predicted"] for a in result["answers"]] == [believed[q] for q, _, _ in PLANTED]
    assert [a["line"] for a in result["answers"]] == list(range(2 if num_fewshot == 0 else 1, 8))[:6]
    assert all(max(a["probabilities"].values()) > 0.99 for a in result["answers"])
    assert result["example_prompt"].count("Answer:") == num_fewshot + 1
    if num_fewshot:  # the examples never include the question being asked
        shots = result["example_prompt"].split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
        assert "Which is a fruit?" not in shots and "Which is a colour?" in shots


def test_multiple_choice_bad_csv(tiny_smollm2_dir, tmp_path, capsys):
    def error_for(text: str) -> str:
        (tmp_path / "q.csv").write_text(text)
        return cli_error(capsys, multiple_choice.main, ["--checkpoint_dir", str(tiny_smollm2_dir), "--data_file",
                                                        str(tmp_path / "q.csv"), "--out_dir", str(tmp_path / "out")])

    assert "q.csv, line 3" in error_for("question,A,B,C,D,answer\nQ1,a,b,c,d,A\nQ2,a,b,c,d,E\n")
    assert "line 2" in error_for("Q1,a,b,c,d,A\nQ2,a,B\n")
    assert "choice C is empty" in error_for("Q1,a,b,,d,A\n")
    assert "no questions" in error_for("question,A,B,C,D,answer\n")
    assert "does not exist" in cli_error(capsys, multiple_choice.main, ["--checkpoint_dir", str(tiny_smollm2_dir),
                                                                        "--data_file", str(tmp_path / "none.csv")])
    write_csv(tmp_path / "two.csv", PLANTED[:2])
    assert "--num_fewshot 3" in cli_error(capsys, multiple_choice.main, [
        "--checkpoint_dir", str(tiny_smollm2_dir), "--data_file", str(tmp_path / "two.csv"), "--num_fewshot", "3",
        "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_removed_csv_file_flag_names_its_replacement(tiny_smollm2_dir, tmp_path, capsys):
    questions = write_csv(tmp_path / "planted.csv", PLANTED)
    error = cli_error(capsys, multiple_choice.main, ["--checkpoint_dir", str(tiny_smollm2_dir), "--csv_file",
                                                     str(questions)])
    assert error == "error: --csv_file was removed: pass the CSV file as --data_file"
