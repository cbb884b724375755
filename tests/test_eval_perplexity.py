"""eval/perplexity.py: perplexity equals the HF model's loss, a prepared split is scored on its answers only, and
every bad input is one `error:` line.
"""

import json
import math

import pytest
import torch
from conftest import cli_error, last_line, load_script

from model.data.sft import encode_example, save_dataset
from model.gpt import GPT
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer
from model.workflows.evaluate import perplexity_of

perplexity = load_script("eval/perplexity.py")
TEXT_LOCAL = "eval/lm_eval_tasks/data/text_test.jsonl"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_perplexity_equals_the_hf_model_loss(tiny_smollm2_dir, tmp_path, capsys):
    import transformers

    text = "The committee met on Tuesday to discuss the new budget."
    data = tmp_path / "doc.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    value = perplexity.main(checkpoint_dir=tiny_smollm2_dir, data_file=data, out_dir=tmp_path / "out")
    assert last_line(capsys) == f"perplexity: {value:.4f}"

    tokenizer = Tokenizer(tiny_smollm2_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(text, bos=False).tolist()])
    with torch.no_grad():
        loss = hf(input_ids=ids, labels=ids).loss
    assert value == pytest.approx(math.exp(float(loss)), rel=1e-4)
    result = json.loads((tmp_path / "out" / "perplexity.json").read_text())
    assert result["tokens"] == ids.numel() - 1


def test_perplexity_of_a_prepared_split_scores_the_answers_only(tiny_smollm2_dir, tmp_path):
    tokenizer, style = Tokenizer(tiny_smollm2_dir), load_prompt_style(tiny_smollm2_dir)
    samples = [encode_example(tokenizer, style, f"Say the number {n}.", f"The number is {n}.") for n in (3, 41)]
    save_dataset(samples, tmp_path / "test.pt")
    model = GPT.from_checkpoint(tiny_smollm2_dir)
    result = perplexity_of(model, tokenizer, samples=samples)
    # the mean cross-entropy over the labelled positions of both samples
    total, count = 0.0, 0
    for sample in samples:
        logits = model(sample["input_ids"][None])[0, :-1]
        targets = sample["labels"][1:]
        keep = targets != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert perplexity.main(checkpoint_dir=tiny_smollm2_dir, data_dir=tmp_path, out_dir=tmp_path) == \
        pytest.approx(result["perplexity"], rel=1e-6)


def test_perplexity_bad_inputs(tiny_smollm2_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    assert "bad.jsonl, line 2" in cli_error(capsys, perplexity.main, ["--checkpoint_dir", str(tiny_smollm2_dir),
                                                                        "--data_file", str(bad)])
    (tmp_path / "other.jsonl").write_text('{"body": "no text field"}\n')
    assert "'text'" in cli_error(capsys, perplexity.main, ["--checkpoint_dir", str(tiny_smollm2_dir), "--data_file",
                                                           str(tmp_path / "other.jsonl")])
    assert "does not exist" in cli_error(capsys, perplexity.main, ["--checkpoint_dir", str(tiny_smollm2_dir),
                                                                   "--data_file",
                                                                   str(tmp_path / "missing.txt")])
    assert "model_config.yaml" in cli_error(capsys, perplexity.main, ["--checkpoint_dir", str(tmp_path),
                                                                      "--data_file", TEXT_LOCAL])
