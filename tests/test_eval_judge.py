"""eval/judge.py: verdict and rating parsing, the two orders cancel position bias, single grading, errors."""

import json
from pathlib import Path

import pytest
from conftest import cli_error, last_line, load_script

judge = load_script("eval/judge.py")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, verdict", [
    ("Both are fine but B is more precise. [[B]]", "B"),
    ('Format: "[[A]]" if A is better, "[[B]]" if B is better. My verdict: [[A]]', "A"),
    ("They are equally good. [[C]]", "tie"),
    ("Assistant B is clearly better because it answers.", "B"),
    ("Final verdict: A", "A"),
    ("B", "B"),
    ("I cannot decide which one", None),
])
def test_parse_verdict(text, verdict):
    assert judge.parse_verdict(text) == verdict


@pytest.mark.parametrize("text, score", [
    ("Clear and correct. Rating: [[8]]", 8.0), ("Rating: 6", 6.0), ("I give it 7/10.", 7.0),
    ("3 out of 10", 3.0), ("Rating: [[11]]", None), ("no number here", None), ("[[4.5]]", 4.5),
])
def test_parse_rating(text, score):
    assert judge.parse_rating(text) == score


def fake_models(monkeypatch, answers: dict[str, list[str]], judge_reply):
    monkeypatch.setattr(judge, "answer_prompts", lambda path, prompts, *a, **k: answers[Path(path).name])
    monkeypatch.setattr(judge, "judge_texts", lambda path, texts, *a, **k: [judge_reply(t) for t in texts])


def test_judge_both_orders_cancel_position_bias(tiny_smollm2_dir, tiny_lora_run, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(6)))
    answers = {tiny_smollm2_dir.name: [f"base answer {i}" for i in range(6)],
               tiny_lora_run.name: [f"good answer {i}" if i < 4 else f"base answer {i}" for i in range(6)]}
    args = dict(prompts_file=prompts, judge_dir=tiny_smollm2_dir, model_a=tiny_smollm2_dir, model_b=tiny_lora_run,
                out_dir=tmp_path)

    # a judge that always picks whatever is shown first: every prompt is a tie, B's win rate is exactly 1/2
    fake_models(monkeypatch, answers, lambda text: "[[A]]")
    assert judge.main(**args) == 0.5
    result = json.loads((tmp_path / "judge.json").read_text())
    assert (result["wins_a"], result["wins_b"], result["ties"]) == (0, 0, 6)
    assert result["position_consistency"] == 0.0

    # a judge that prefers the answer saying "good", in either position: B wins 4, 2 ties (identical quality)
    def prefers_good(text: str) -> str:
        first = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n")[0]
        second = text.split("[The Start of Assistant B's Answer]\n")[1].split("\n")[0]
        return "[[A]]" if "good" in first and "good" not in second else \
            "[[B]]" if "good" in second and "good" not in first else "[[C]]"

    fake_models(monkeypatch, answers, prefers_good)
    value = judge.main(**args)
    assert value == pytest.approx((4 + 0.5 * 2) / 6)
    assert last_line(capsys) == f"win_rate: {value:.4f}"
    result = json.loads((tmp_path / "judge.json").read_text())
    assert (result["wins_a"], result["wins_b"], result["ties"]) == (0, 4, 2)
    low, high = result["win_rate_ci95"]
    assert 0.5 <= low <= value <= high <= 1.0

    # single grading: "good" answers get 8, the others 3
    fake_models(monkeypatch, answers, lambda text: "Rating: [[8]]" if "good answer" in text else "Rating: [[3]]")
    assert judge.main(**args, mode="single") == pytest.approx(5 * 4 / 6)
    assert last_line(capsys).startswith("score_difference: 3.33")


def test_judge_errors(tiny_smollm2_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("What is two plus two?\nName a colour.\n")
    args = ["--prompts_file", str(tmp_path / "p.txt"), "--judge_dir", str(tiny_smollm2_dir),
            "--model_a", str(tiny_smollm2_dir),
            "--model_b", str(tiny_smollm2_dir), "--max_new_tokens", "4", "--out_dir", str(tmp_path / "out")]
    # the real models answer; the judge prompt does not fit the tiny judge's 64-token context
    assert "exceeds the model's context of 64 tokens" in cli_error(capsys, judge.main, args)
    # a judge that writes no readable verdict: a clear error, not a made-up win rate
    monkeypatch.setattr(judge, "judge_texts", lambda path, texts, *a, **k: ["I like both of them."] * len(texts))
    assert "no verdict" in cli_error(capsys, judge.main, args)
    assert not (tmp_path / "out" / "judge.json").exists()
    assert "--model_b" in cli_error(capsys, judge.main, args[:6])
    assert "neither a checkpoint" in cli_error(capsys, judge.main, [*args[:2], "--judge_dir", str(tmp_path),
                                                                    *args[4:]])
    (tmp_path / "p.jsonl").write_text('{"prompt": "fine"}\n{"question": "no prompt"}\n')
    assert "p.jsonl, line 2" in cli_error(capsys, judge.main, [args[0], str(tmp_path / "p.jsonl"), *args[2:]])
