"""The eval scripts: our lm-eval model equals lm-eval's own HF model on the same weights, perplexity equals the HF
model's loss, multiple choice scores a planted question set exactly as its oracle answers, the judge's two orders
cancel position bias, compare.py loads runs without a merge, and every bad input is one `error:` line.

The model is a tiny random SmolLM2 (a 64-token context, so long texts need several windows) with the real tokenizer.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_script
from hf_models import save_tiny_model

from model.cli import run_cli
from model.data.sft import encode_example, save_dataset
from model.gpt import GPT
from model.lora import LORA_WEIGHTS, LoRAConfig, inject_lora, lora_state_dict
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer
from model.weights.convert import convert_hf_checkpoint
from model.weights.load import load_model_run

harness = load_script("eval/lm_eval_harness.py")
perplexity = load_script("eval/perplexity.py")
multiple_choice = load_script("eval/multiple_choice.py")
judge = load_script("eval/judge.py")
compare = load_script("eval/compare.py")
scoring = load_script("eval/scoring.py")

TEXT_LOCAL = "eval/lm_eval_tasks/data/text_test.jsonl"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    checkpoint_dir = tmp_path_factory.mktemp("tiny") / "org" / "tiny-smollm2"
    save_tiny_model("smollm2", checkpoint_dir, vocab_size=49152, max_position_embeddings=64)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_style.yaml"):
        shutil.copy(smollm2_dir / name, checkpoint_dir / name)
    convert_hf_checkpoint(checkpoint_dir)
    return checkpoint_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_dir) -> Path:
    """A LoRA run directory as finetune/lora.py writes it, with random (non-zero) B so the run changes the logits."""
    run_dir = tmp_path_factory.mktemp("lora-run")
    config = LoRAConfig(r=4, alpha=8.0, query=True, value=True, mlp=True)
    model = inject_lora(GPT.from_checkpoint(tiny_dir), config)
    torch.manual_seed(0)
    weights = {k: torch.randn_like(v) * 0.5 for k, v in lora_state_dict(model).items()}
    from safetensors.torch import save_file

    (run_dir / "final").mkdir()
    save_file(weights, run_dir / "final" / LORA_WEIGHTS)
    (run_dir / "final" / "hparams.yaml").write_text(
        yaml.safe_dump({"checkpoint_dir": str(tiny_dir), "quantize": None, **config.to_hparams()}))
    return run_dir


def cli_error(capsys, function, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(function, args)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------- lm-eval


def test_forge_lm_equals_lm_eval_hf_model_on_the_local_tasks(tiny_dir, tmp_path):
    """Same weights through our GPT (ForgeLM) and through transformers (lm-eval's HFLM, on the convert_to_hf.py
    export): every request of the three shipped tasks gets the same answer, so every metric is the same."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    export = tmp_path / "hf"
    load_script("scripts/convert_to_hf.py").convert_to_hf(tiny_dir, export)
    ours = harness.ForgeLM(GPT.from_checkpoint(tiny_dir), Tokenizer(tiny_dir), batch_size=5)
    theirs = HFLM(pretrained=str(export), device="cpu", dtype="float32", batch_size=3)
    assert ours.max_length == theirs.max_length == 64
    assert ours.prefix_token_id == theirs.prefix_token_id

    outputs = {}
    for name, lm in (("ours", ours), ("theirs", theirs)):
        outputs[name] = lm_eval.simple_evaluate(
            model=lm, tasks=["forge_capitals", "forge_text", "forge_arithmetic"], num_fewshot=None,
            task_manager=TaskManager(include_path=str(harness.SHIPPED_TASKS), include_defaults=False), bootstrap_iters=0, log_samples=True,
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


def test_lm_eval_script_writes_results_and_headline(tiny_dir, tmp_path, capsys):
    value = harness.main(checkpoint_dir=tiny_dir, tasks="forge_capitals", limit=3, out_dir=tmp_path, batch_size=4,
                         bootstrap_iters=0)
    result = json.loads((tmp_path / "lm_eval.json").read_text())
    assert result["results"]["forge_capitals"]["acc_norm,none"] == value
    assert result["n-samples"]["forge_capitals"]["effective"] == 3
    assert last_line(capsys) == f"forge_capitals/acc_norm: {value:.4f}"


def test_lm_eval_unknown_task_is_an_error(tiny_dir, tmp_path, capsys):
    error = cli_error(capsys, harness.main, ["--checkpoint_dir", str(tiny_dir), "--tasks", "forge_capitols",
                                             "--out_dir", str(tmp_path)])
    assert "forge_capitols" in error and "forge_capitals" in error  # the close match is suggested
    assert not (tmp_path / "lm_eval.json").exists()


def test_continuation_scores_do_not_depend_on_batching(tiny_dir):
    model, tokenizer = GPT.from_checkpoint(tiny_dir), Tokenizer(tiny_dir)
    requests = [scoring.encode_pair(tokenizer, "The capital of France is", " Paris"),
                scoring.encode_pair(tokenizer, "A", " long continuation of several tokens here"),
                (list(range(5, 90)), [7, 8, 9])]  # longer than the context: keeps its last 64 tokens
    one = scoring.continuation_logprobs(model, requests, batch_size=1)
    together = scoring.continuation_logprobs(model, requests, batch_size=3)
    for (a, _), (b, _) in zip(one, together):
        assert a == pytest.approx(b, abs=1e-5)
    # against a plain forward pass of the whole (untruncated) first request
    context, continuation = requests[0]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([context + continuation]))[0, :-1].float(), -1)
    expected = sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(continuation))
    assert one[0][0] == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------------------------- perplexity


def test_perplexity_equals_the_hf_model_loss(tiny_dir, tmp_path, capsys):
    import transformers

    text = "The committee met on Tuesday to discuss the new budget."
    data = tmp_path / "doc.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    value = perplexity.main(checkpoint_dir=tiny_dir, data_file=data, out_dir=tmp_path / "out")
    assert last_line(capsys) == f"perplexity: {value:.4f}"

    tokenizer = Tokenizer(tiny_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(text, bos=False).tolist()])
    with torch.no_grad():
        loss = hf(input_ids=ids, labels=ids).loss
    assert value == pytest.approx(math.exp(float(loss)), rel=1e-4)
    result = json.loads((tmp_path / "out" / "perplexity.json").read_text())
    assert result["tokens"] == ids.numel() - 1


def test_perplexity_of_a_prepared_split_scores_the_answers_only(tiny_dir, tmp_path):
    tokenizer, style = Tokenizer(tiny_dir), load_prompt_style(tiny_dir)
    samples = [encode_example(tokenizer, style, f"Say the number {n}.", f"The number is {n}.") for n in (3, 41)]
    save_dataset(samples, tmp_path / "test.pt")
    model = GPT.from_checkpoint(tiny_dir)
    result = perplexity.perplexity_of(model, tokenizer, samples=samples)
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
    assert perplexity.main(checkpoint_dir=tiny_dir, data_dir=tmp_path, out_dir=tmp_path) == \
        pytest.approx(result["perplexity"], rel=1e-6)


def test_perplexity_bad_inputs(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    assert "bad.jsonl, line 2" in cli_error(capsys, perplexity.main, ["--checkpoint_dir", str(tiny_dir),
                                                                        "--data_file", str(bad)])
    (tmp_path / "other.jsonl").write_text('{"body": "no text field"}\n')
    assert "'text'" in cli_error(capsys, perplexity.main, ["--checkpoint_dir", str(tiny_dir), "--data_file",
                                                           str(tmp_path / "other.jsonl")])
    assert "does not exist" in cli_error(capsys, perplexity.main, ["--checkpoint_dir", str(tiny_dir), "--data_file",
                                                                   str(tmp_path / "missing.txt")])
    assert "model_config.yaml" in cli_error(capsys, perplexity.main, ["--checkpoint_dir", str(tmp_path),
                                                                      "--data_file", TEXT_LOCAL])


# ----------------------------------------------------------------------------------------------- multiple choice


class Oracle(torch.nn.Module):
    """A model whose logits we control: after "Answer:" it puts all its mass on the letter `answers` names for the
    question being asked (the last one in the prompt), whatever the few-shot examples before it say."""

    def __init__(self, tokenizer: Tokenizer, answers: dict[str, str]) -> None:
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.config = type("Config", (), {"block_size": 2048})()
        self.transformer = torch.nn.ModuleDict({"wte": torch.nn.Embedding(1, 1)})

    def forward(self, idx, input_pos=None, logits_mask=None):
        logits = torch.zeros(*idx.shape, self.tokenizer.vocab_size)
        for row in range(idx.size(0)):
            for t in range(idx.size(1)):
                if logits_mask is not None and not logits_mask[row, t]:
                    continue
                text = self.tokenizer.decode(idx[row, :t + 1])
                if text.endswith("Answer:"):
                    question = text.split("\n\n")[-1].split("\n")[0]
                    letter_id = self.tokenizer.encode(f" {self.answers[question]}", bos=False)[-1]
                    logits[row, t, letter_id] = 20.0
        return logits[logits_mask] if logits_mask is not None else logits


PLANTED = [  # question, choices, answer: 2 to 5 choices, every letter used
    ("Which is a fruit?", ["apple", "chair"], "A"),
    ("Which is a colour?", ["table", "green", "seven"], "B"),
    ("Which is a number?", ["cloud", "river", "twelve", "stone"], "C"),
    ("Which is an animal?", ["spoon", "paper", "glass", "tiger"], "D"),
    ("Which is a planet?", ["mars", "shoe", "lamp", "door", "cake"], "A"),
    ("Which is a metal?", ["wood", "silk", "wool", "clay", "iron"], "E"),
]


def write_csv(path: Path, rows, header: bool = True) -> Path:
    import csv

    with open(path, "w", newline="") as fp:
        writer = csv.writer(fp)
        if header:
            writer.writerow(["question", "A", "B", "C", "D", "answer"])
        for question, choices, answer in rows:
            writer.writerow([question, *choices, answer])
    return path


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_multiple_choice_scores_a_planted_set_by_construction(tiny_dir, tmp_path, capsys, monkeypatch, num_fewshot):
    tokenizer = Tokenizer(tiny_dir)
    csv_file = write_csv(tmp_path / "planted.csv", PLANTED, header=num_fewshot == 0)
    # the oracle knows the right answer to four questions and a wrong one to two
    believed = {q: a for q, _, a in PLANTED} | {"Which is a colour?": "C", "Which is a metal?": "A"}
    oracle = Oracle(tokenizer, believed)
    monkeypatch.setattr(multiple_choice, "load_model_run", lambda *args: (oracle, tiny_dir, None))
    value = multiple_choice.main(csv_file=csv_file, checkpoint_dir=tiny_dir, num_fewshot=num_fewshot, batch_size=4,
                                 out_dir=tmp_path)
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


def test_multiple_choice_bad_csv(tiny_dir, tmp_path, capsys):
    def error_for(text: str) -> str:
        (tmp_path / "q.csv").write_text(text)
        return cli_error(capsys, multiple_choice.main, ["--checkpoint_dir", str(tiny_dir), "--csv_file",
                                                        str(tmp_path / "q.csv"), "--out_dir", str(tmp_path / "out")])

    assert "q.csv, line 3" in error_for("question,A,B,C,D,answer\nQ1,a,b,c,d,A\nQ2,a,b,c,d,E\n")
    assert "line 2" in error_for("Q1,a,b,c,d,A\nQ2,a,B\n")
    assert "choice C is empty" in error_for("Q1,a,b,,d,A\n")
    assert "no questions" in error_for("question,A,B,C,D,answer\n")
    assert "does not exist" in cli_error(capsys, multiple_choice.main, ["--checkpoint_dir", str(tiny_dir),
                                                                        "--csv_file", str(tmp_path / "none.csv")])
    write_csv(tmp_path / "two.csv", PLANTED[:2])
    assert "--num_fewshot 3" in cli_error(capsys, multiple_choice.main, [
        "--checkpoint_dir", str(tiny_dir), "--csv_file", str(tmp_path / "two.csv"), "--num_fewshot", "3",
        "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- judge


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


def test_judge_both_orders_cancel_position_bias(tiny_dir, lora_run, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(6)))
    answers = {tiny_dir.name: [f"base answer {i}" for i in range(6)],
               lora_run.name: [f"good answer {i}" if i < 4 else f"base answer {i}" for i in range(6)]}
    args = dict(prompts_file=prompts, judge_dir=tiny_dir, model_a=tiny_dir, model_b=lora_run, out_dir=tmp_path)

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


def test_judge_errors(tiny_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("What is two plus two?\nName a colour.\n")
    args = ["--prompts_file", str(tmp_path / "p.txt"), "--judge_dir", str(tiny_dir), "--model_a", str(tiny_dir),
            "--model_b", str(tiny_dir), "--max_new_tokens", "4", "--out_dir", str(tmp_path / "out")]
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


# ----------------------------------------------------------------------------------------------- compare


def test_compare_scores_a_base_and_its_lora_run_without_merging(tiny_dir, lora_run, tmp_path, capsys):
    csv_file = write_csv(tmp_path / "planted.csv", PLANTED)
    value = compare.main(models=[f"base={tiny_dir}", str(lora_run)], metrics="perplexity,multiple_choice",
                         ppl_file=Path(TEXT_LOCAL), mc_csv=csv_file, out_dir=tmp_path / "cmp", batch_size=4)
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    table = result["table"]
    assert list(table) == ["base", lora_run.name]
    # each column equals its own script's number for that model; the LoRA run changes the model
    for name, flags in (("base", {"checkpoint_dir": tiny_dir}), (lora_run.name, {"lora_dir": lora_run})):
        expected = perplexity.main(**flags, data_file=Path(TEXT_LOCAL), out_dir=tmp_path / name)
        assert table[name]["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert table["base"]["perplexity"] != pytest.approx(table[lora_run.name]["perplexity"], rel=1e-3)
    assert out[-1] == f"perplexity_change: {value:+.4f}"
    assert value == pytest.approx(table[lora_run.name]["perplexity"] - table["base"]["perplexity"], abs=1e-4)
    markdown = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert markdown[0] == "| model | perplexity ↓ | multiple_choice ↑ |" and len(markdown) == 4
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_lora_run_loads_like_its_merge(tiny_dir, lora_run):
    from model.lora import merge_lora

    run_model, checkpoint_dir, run_dir = load_model_run(lora_dir=lora_run)
    assert checkpoint_dir == tiny_dir and run_dir == lora_run / "final"
    merged = merge_lora(load_model_run(lora_dir=lora_run)[0])
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        assert torch.allclose(run_model(ids), merged(ids), atol=1e-4)
        assert not torch.allclose(run_model(ids), GPT.from_checkpoint(tiny_dir)(ids), atol=1e-2)


def test_compare_bad_inputs(tiny_dir, tmp_path, capsys):
    assert "'accuracy'" in cli_error(capsys, compare.main, ["--models", f"[{tiny_dir}]", "--metrics", "accuracy"])
    assert "--mc_csv" in cli_error(capsys, compare.main, ["--models", f"[{tiny_dir}]", "--metrics", "multiple_choice"])
    assert "neither a checkpoint" in cli_error(capsys, compare.main, ["--models", f"[a={tmp_path}]"])
    assert "named 'x'" in cli_error(capsys, compare.main, ["--models", f"[x={tiny_dir}, x={tiny_dir}]"])
