"""eval/lm_eval_harness.py: results and the headline line, an unknown task is one `error:` line."""

import json

import pytest
from conftest import cli_error, last_line, load_script

harness = load_script("eval/lm_eval_harness.py")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lm_eval_script_writes_results_and_headline(tiny_smollm2_dir, tmp_path, capsys):
    value = harness.main(checkpoint_dir=tiny_smollm2_dir, tasks="forge_capitals", limit=3, out_dir=tmp_path,
                         batch_size=4,
                         bootstrap_iters=0)
    result = json.loads((tmp_path / "lm_eval.json").read_text())
    assert result["results"]["forge_capitals"]["acc_norm,none"] == value
    assert result["n-samples"]["forge_capitals"]["effective"] == 3
    assert last_line(capsys) == f"forge_capitals/acc_norm: {value:.4f}"


def test_lm_eval_unknown_task_is_an_error(tiny_smollm2_dir, tmp_path, capsys):
    error = cli_error(capsys, harness.main, ["--checkpoint_dir", str(tiny_smollm2_dir), "--tasks", "forge_capitols",
                                             "--out_dir", str(tmp_path)])
    assert "forge_capitols" in error and "forge_capitals" in error  # the close match is suggested
    assert not (tmp_path / "lm_eval.json").exists()


def test_missing_lm_eval_is_one_line_before_the_model_loads(tiny_smollm2_dir, tmp_path, monkeypatch):
    """lm-eval is an optional dependency (the `eval` extra): without it the script says what to install."""
    import sys

    for name in [name for name in sys.modules if name == "lm_eval" or name.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    import model.workflows

    monkeypatch.delitem(sys.modules, "model.workflows.harness", raising=False)
    monkeypatch.delattr(model.workflows, "harness", raising=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if it were not installed
    monkeypatch.setattr(harness, "load_any", lambda *args, **kwargs: pytest.fail("loaded the model first"))
    with pytest.raises(SystemExit, match=r"lm-eval is not installed: pip install -e '\.\[eval\]'"):
        harness.main(checkpoint_dir=tiny_smollm2_dir, tasks="forge_capitals", out_dir=tmp_path)
    assert not (tmp_path / "lm_eval.json").exists()
