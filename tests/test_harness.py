"""model.workflows.harness: our lm-eval model (ForgeLM) equals lm-eval's own HF model on the same weights."""

import json
from pathlib import Path

import pytest
from conftest import load_script

from model.gpt import GPT
from model.tokenizer import Tokenizer
from model.workflows import harness

pytestmark = pytest.mark.usefixtures("one_thread")


def test_forge_lm_equals_lm_eval_hf_model_on_the_local_tasks(tiny_smollm2_dir, tmp_path):
    """Same weights through our GPT (ForgeLM) and through transformers (lm-eval's HFLM, on the convert_to_hf.py
    export): every request of the three shipped tasks gets the same answer, so every metric is the same."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    export = tmp_path / "hf"
    load_script("scripts/convert_to_hf.py").convert_to_hf(tiny_smollm2_dir, export)
    ours = harness.ForgeLM(GPT.from_checkpoint(tiny_smollm2_dir), Tokenizer(tiny_smollm2_dir), batch_size=5)
    theirs = HFLM(pretrained=str(export), device="cpu", dtype="float32", batch_size=3)
    assert ours.max_length == theirs.max_length == 64
    assert ours.prefix_token_id == theirs.prefix_token_id

    outputs = {}
    for name, lm in (("ours", ours), ("theirs", theirs)):
        outputs[name] = lm_eval.simple_evaluate(
            model=lm, tasks=["forge_capitals", "forge_text", "forge_arithmetic"], num_fewshot=None,
            task_manager=TaskManager(include_path=str(harness.SHIPPED_TASKS), include_defaults=False),
            bootstrap_iters=0, log_samples=True,
            limit=5)
    ours_out, theirs_out = outputs["ours"], outputs["theirs"]

    # capitals: one loglikelihood per choice; text: one rolling loglikelihood per document (several windows each)
    compared = 0
    for task in ("forge_capitals", "forge_text"):
        for a, b in zip(ours_out["samples"][task], theirs_out["samples"][task], strict=True):
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                value_a = ra[0][0] if isinstance(ra[0], (tuple, list)) else ra[0]
                value_b = rb[0][0] if isinstance(rb[0], (tuple, list)) else rb[0]
                assert value_a == pytest.approx(value_b, abs=2e-4, rel=1e-5), (task, a["doc"])
                compared += 1
    assert compared == 5 * 4 + 5
    texts = [json.loads(line)["text"] for line in Path(harness.SHIPPED_TASKS / "data/text_test.jsonl").open()]
    assert max(len(ours.tok_encode(t)) for t in texts) > 64, "at least one document needs several windows"
    # generation: the same greedy strings
    ours_gen = [s["resps"][0][0] for s in ours_out["samples"]["forge_arithmetic"]]
    theirs_gen = [s["resps"][0][0] for s in theirs_out["samples"]["forge_arithmetic"]]
    assert ours_gen == theirs_gen
    for task, metrics in theirs_out["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float) and "stderr" not in key:
                assert ours_out["results"][task][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, key)
