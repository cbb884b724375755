"""finetune/lora.py end to end: it learns, it writes a complete run, DoRA/QLoRA/QDoRA merge exactly, a killed run
resumes bitwise, DDP on two CPU processes keeps the ranks in sync, and every bad input is one `error:` line.

The model is a tiny random SmolLM2 with the real SmolLM2 tokenizer, so the data comes from scripts/prepare_tasks.py
as a user's would. Runs are called in-process (`lora.setup`) unless the test is about the process itself: a kill,
DDP's launcher. Torch runs on one thread: on matrices this small a second thread only adds synchronization.
"""

import csv
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, load_script
from hf_models import save_tiny_model
from safetensors.torch import load_file

from model.cli import run_cli
from model.config import Config
from model.data.sft import load_dataset, save_dataset
from model.gpt import GPT
from model.lora import LORA_WEIGHTS
from model.training.run import latest_checkpoint
from model.weights.convert import convert_hf_checkpoint
from model.weights.load import load_model

lora = load_script("finetune/lora.py")
merge_lora = load_script("scripts/merge_lora.py")
generate_base = load_script("generate/base.py")

# what a script started here runs with: one thread, like the in-process runs, so their numbers agree bitwise
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
METRICS_COLUMNS = ["step", "epoch", "loss", "lr", "tokens_per_s", "val_loss", "memory_gb"]
# validate (with its sample generation) only at the first and the last step
QUIET = {"eval_interval": 1000, "eval_iters": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random SmolLM2 (2 layers, n_embd 48, tied head) with the real tokenizer and prompt style."""
    checkpoint_dir = tmp_path_factory.mktemp("tiny") / "org" / "tiny-smollm2"
    save_tiny_model("smollm2", checkpoint_dir, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_style.yaml"):
        shutil.copy(smollm2_dir / name, checkpoint_dir / name)
    convert_hf_checkpoint(checkpoint_dir)
    return checkpoint_dir


@pytest.fixture(scope="module")
def make_data(tmp_path_factory, tiny_dir):
    """make_data(n) -> a data dir with the first n samples of a prepare_tasks.py run as train.pt (4 in test.pt)."""
    prepared = tmp_path_factory.mktemp("tasks")
    load_script("scripts/prepare_tasks.py").prepare_tasks(
        checkpoint_dir=tiny_dir, out_dir=prepared, num_train=64, num_test=16)
    train, test = load_dataset(prepared / "train.pt"), load_dataset(prepared / "test.pt")
    made = {}

    def make(num_train: int) -> Path:
        if num_train not in made:
            made[num_train] = data_dir = tmp_path_factory.mktemp(f"tasks{num_train}")
            save_dataset(train[:num_train], data_dir / "train.pt")
            save_dataset(test[:4], data_dir / "test.pt")
        return made[num_train]

    return make


def finetune(checkpoint_dir: Path, data_dir: Path, out_dir: Path, **flags) -> None:
    lora.setup(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, **{**QUIET, **flags})


def as_cli(**flags) -> list[str]:
    return [arg for key, value in flags.items()
            for arg in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))]


def read_metrics(out_dir: Path) -> tuple[list[str], list[dict]]:
    with open(out_dir / "metrics.csv", newline="") as fp:
        reader = csv.DictReader(fp)
        return reader.fieldnames, list(reader)


def training_rows(out_dir: Path) -> list[dict]:
    return [row for row in read_metrics(out_dir)[1] if row["loss"]]


def cli_error(capsys, function, args: list[str]) -> str:
    """Run `function` as its script's command line does; it must exit 1 with exactly one `error:` line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(function, args)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


# ----------------------------------------------------------------------------------------------- a run


def test_lora_overfits_and_writes_a_complete_run(tiny_dir, make_data, tmp_path, capsys):
    out_dir = tmp_path / "run"
    flags = dict(max_steps=30, micro_batch_size=4, global_batch_size=8, learning_rate=1e-2, warmup_steps=0,
                 lora_dropout=0.0, lora_key=True, lora_projection=True, lora_mlp=True, lora_head=True, save_interval=10)
    finetune(tiny_dir, make_data(8), out_dir, **flags)
    stderr = capsys.readouterr().err

    # the 8 samples are learned: the mean loss of the last 5 steps is under half that of the first 5
    columns, rows = read_metrics(out_dir)
    assert columns == METRICS_COLUMNS
    train = [row for row in rows if row["loss"]]
    assert [int(row["step"]) for row in train] == list(range(1, 31)), "one row per step"
    assert [int(row["step"]) for row in rows if row["val_loss"]] == [0, 30]
    losses = [float(row["loss"]) for row in train]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)

    # only the adapters train: r * (in + out) per adapted slice, counted from the config
    config, r = Config.from_checkpoint(tiny_dir), 8
    C, kv, I = config.n_embd, config.n_query_groups * config.head_size, config.intermediate_size
    V = load_file(tiny_dir / "lit_model.safetensors")["transformer.wte.weight"].shape[0]
    per_block = r * ((C + C) + (C + kv) + (C + kv)  # q, k, v slices of the fused qkv
                     + (C + C)  # attention output projection
                     + (C + I) + (C + I) + (I + C))  # SwiGLU fc_1, fc_2, proj
    expected = config.n_layer * per_block + r * (C + V)
    base = GPT.from_checkpoint(tiny_dir)
    trainable, total = re.search(r"Trainable parameters: ([\d,]+) of ([\d,]+)", stderr).groups()
    assert int(trainable.replace(",", "")) == expected
    assert int(total.replace(",", "")) == expected + sum(p.numel() for p in base.parameters())

    # hparams.yaml holds every flag, with its value
    hparams = yaml.safe_load((out_dir / "hparams.yaml").read_text())
    assert set(hparams) == set(inspect.signature(lora.setup).parameters)
    for key, value in {**flags, **QUIET, "checkpoint_dir": str(tiny_dir), "quantize": None, "dora": False}.items():
        assert hparams[key] == value, key

    # step-*/ and final/ are complete; the checkpoint holds the adapters and nothing of the frozen base
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "final", "hparams.yaml", "inputs.json", "metrics.csv", "step-000010", "step-000020", "step-000030"] + (
        ["tensorboard"] if (out_dir / "tensorboard").exists() else [])
    for step in ("step-000010", "step-000020", "step-000030"):
        assert sorted(p.name for p in (out_dir / step).iterdir()) == ["hparams.yaml", LORA_WEIGHTS, "training_state.pt"]
    assert sorted(p.name for p in (out_dir / "final").iterdir()) == ["hparams.yaml", LORA_WEIGHTS]
    adapter = load_file(out_dir / "final" / LORA_WEIGHTS)
    assert sum(t.numel() for t in adapter.values()) == expected
    assert all(".lora." in key for key in adapter)
    state = torch.load(out_dir / "step-000030" / "training_state.pt", weights_only=True)
    assert set(state["model"]) == set(adapter) and state["step"] == 30
    assert all(torch.equal(state["model"][key], adapter[key]) for key in adapter)
    assert yaml.safe_load((out_dir / "final" / "hparams.yaml").read_text()) == hparams


def generate_lora_model(monkeypatch, lora_dir: Path) -> GPT:
    """The model generate/base.py builds for the run `lora_dir` (base loaded and quantized as trained, adapter
    injected)."""
    built = []
    monkeypatch.setattr(generate_base, "generate_and_print", lambda model, *args: built.append(model))
    generate_base.main(checkpoint_dir=lora_dir, device="cpu")
    return built[0]


@pytest.mark.parametrize("variant", [dict(dora=True), dict(quantize="bnb.nf4"), dict(quantize="bnb.nf4-dq", dora=True)],
                         ids=["dora", "qlora", "qdora"])
def test_dora_qlora_qdora_train_and_merge_into_the_same_function(variant, tiny_dir, make_data, tmp_path, monkeypatch):
    out_dir, merged_dir = tmp_path / "run", tmp_path / "merged"
    finetune(tiny_dir, make_data(8), out_dir, max_steps=3, micro_batch_size=4, global_batch_size=4,
             learning_rate=1e-2, warmup_steps=0, lora_mlp=True, lora_head=True, **variant)
    losses = [float(row["loss"]) for row in training_rows(out_dir)]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    adapter = load_file(out_dir / "final" / LORA_WEIGHTS)
    assert any(key.endswith(".magnitude") for key in adapter) == variant.get("dora", False)

    merge_lora.merge(checkpoint_dir=out_dir, out_dir=merged_dir)
    merged = GPT.from_checkpoint(merged_dir)
    unmerged = generate_lora_model(monkeypatch, out_dir)
    base = load_model(tiny_dir, device="cpu", quantize=variant.get("quantize"))
    tokens = load_dataset(make_data(8) / "train.pt")[0]["input_ids"][None]
    with torch.no_grad():
        merged_logits, unmerged_logits, base_logits = merged(tokens), unmerged(tokens), base(tokens)
    scale = unmerged_logits.abs().max()
    # merged == unmerged up to float32 rounding, and the adapter is far from a no-op at that tolerance
    assert (merged_logits - unmerged_logits).abs().max() < 1e-5 * scale
    assert (unmerged_logits - base_logits).abs().max() > 1e-2 * scale


# ----------------------------------------------------------------------------------------------- resume


def test_packing_trains_on_fewer_rows_and_the_loss_falls(tiny_dir, make_data, tmp_path, capsys):
    data_dir = make_data(8)
    longest = max(len(s["input_ids"]) for s in load_dataset(data_dir / "train.pt"))
    out_dir = tmp_path / "packed"
    finetune(tiny_dir, data_dir, out_dir, max_steps=20, micro_batch_size=4, global_batch_size=4, learning_rate=1e-2,
             warmup_steps=0, lora_dropout=0.0, lora_key=True, lora_projection=True, lora_mlp=True, lora_head=True,
             packing=True, max_seq_length=2 * longest)
    rows = int(re.search(r"Packed 8 samples into (\d+) rows", capsys.readouterr().err).group(1))
    assert rows <= 4  # two or more samples share each row of twice the longest sample's length
    losses = [float(row["loss"]) for row in training_rows(out_dir)]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert yaml.safe_load((out_dir / "hparams.yaml").read_text())["packing"] is True


def test_killed_run_resumes_to_the_same_adapter_and_metrics(tiny_dir, make_data, tmp_path, capsys):
    # 16 samples, 2 micro-batches a step: epochs end at steps 4 and 8, so resuming crosses epochs; dropout is on
    flags = dict(data_dir=make_data(16), checkpoint_dir=tiny_dir, max_steps=10, micro_batch_size=2,
                 global_batch_size=4, learning_rate=1e-2, warmup_steps=2, lora_mlp=True, save_interval=2,
                 eval_interval=5, eval_iters=1)
    reference, out_dir = tmp_path / "uninterrupted", tmp_path / "killed"

    # --resume auto with no checkpoint yet starts fresh
    lora.setup(out_dir=reference, resume="auto", **flags)
    assert "Resumed" not in capsys.readouterr().err
    assert int(read_metrics(reference)[1][0]["step"]) == 0

    command = [sys.executable, str(ROOT / "finetune/lora.py"), *as_cli(out_dir=out_dir, **flags)]
    process = subprocess.Popen(command, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if line.rstrip() == f"Saved a checkpoint to {out_dir / 'step-000004'}":
                process.send_signal(signal.SIGKILL)
                break
        process.wait()
    finally:
        watchdog.cancel()
        process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    assert not (out_dir / "final").exists()
    killed_at = latest_checkpoint(out_dir)
    resume_step = int(killed_at.name.removeprefix("step-"))
    assert resume_step in (4, 6)  # 6 only if the kill lost the race with the next save
    # a save that was killed half-way leaves a temporary directory: resuming must not take it for a checkpoint
    torn = out_dir / f".step-{resume_step + 2:06d}.tmp"
    torn.mkdir(exist_ok=True)
    (torn / "training_state.pt").write_bytes(b"torn")

    lora.setup(out_dir=out_dir, resume=True, **flags)
    assert f"Resumed from {killed_at} at step {resume_step}" in capsys.readouterr().err

    assert (out_dir / "final" / LORA_WEIGHTS).read_bytes() == (reference / "final" / LORA_WEIGHTS).read_bytes()
    assert (out_dir / "step-000010" / "training_state.pt").is_file()
    keys = ("step", "epoch", "loss", "lr", "val_loss")
    resumed_rows = [tuple(row[k] for k in keys) for row in read_metrics(out_dir)[1]]
    assert resumed_rows == [tuple(row[k] for k in keys) for row in read_metrics(reference)[1]]
    assert [int(row["step"]) for row in training_rows(out_dir)] == list(range(1, 11))
    assert not list(out_dir.glob(".*")), "no temporary directory is left behind"
    for step in range(2, 11, 2):
        assert sorted(p.name for p in (out_dir / f"step-{step:06d}").iterdir()) == [
            "hparams.yaml", LORA_WEIGHTS, "training_state.pt"]


def test_a_crash_while_saving_leaves_no_step_dir_without_its_adapter(tiny_dir, make_data, tmp_path, monkeypatch):
    saves = []

    def crash_on_second_save(fabric, model, run_dir, hparams):
        saves.append(run_dir)
        if len(saves) == 2:
            raise KeyboardInterrupt  # as if killed between the training state and the adapter
        save_adapter(fabric, model, run_dir, hparams)

    save_adapter = lora.save_adapter
    monkeypatch.setattr(lora, "save_adapter", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_dir, make_data(8), tmp_path, max_steps=3, micro_batch_size=4, global_batch_size=4,
                 save_interval=1)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    for step_dir in tmp_path.glob("step-*"):
        assert sorted(p.name for p in step_dir.iterdir()) == ["hparams.yaml", LORA_WEIGHTS, "training_state.pt"]


def test_samples_cut_before_their_answer_are_skipped_not_a_nan_loss(tiny_dir, make_data, tmp_path, capsys):
    samples = load_dataset(make_data(8) / "train.pt")
    first_answer_token = sorted(int((s["labels"] != -100).nonzero()[0]) for s in samples)
    max_seq_length = first_answer_token[3] + 1  # keeps an answer token of the 4 samples with the shortest prompts
    # one sample per micro-batch: a micro-batch of a cut sample alone has no target at all
    finetune(tiny_dir, make_data(8), tmp_path, max_steps=8, micro_batch_size=1, global_batch_size=1,
             max_seq_length=max_seq_length)
    kept = sum(index < max_seq_length for index in first_answer_token)
    assert 0 < kept < 8
    assert f"Skipping {8 - kept} of 8 samples of {make_data(8) / 'train.pt'}" in capsys.readouterr().err
    losses = [float(row["loss"]) for row in training_rows(tmp_path)]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)


# ----------------------------------------------------------------------------------------------- non-finite


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose backward makes every gradient infinite: a finite loss with exploding gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


@pytest.mark.parametrize("broken, message", [
    (lambda loss: loss * math.nan, "The loss became nan at step 3"),
    (InfiniteGradient.apply, "The gradient norm became (nan|inf) at step 3"),
], ids=["loss", "gradient"])
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(broken, message, tiny_dir, make_data, tmp_path,
                                                                      monkeypatch, capsys):
    calls = []

    def breaks_at_step_3(model, input_ids, labels, segment_ids=None):
        loss = next_token_loss(model, input_ids, labels, segment_ids)
        if torch.is_grad_enabled():
            calls.append(None)
            if len(calls) == 3:
                return broken(loss)
        return loss

    next_token_loss = lora.next_token_loss
    monkeypatch.setattr(lora, "next_token_loss", breaks_at_step_3)
    error = cli_error(capsys, lora.setup, as_cli(
        checkpoint_dir=tiny_dir, data_dir=make_data(8), out_dir=tmp_path, max_steps=6, micro_batch_size=4,
        global_batch_size=4, learning_rate=1e-2, save_interval=1, **QUIET))
    assert re.search(message, error), error
    assert "Lower --learning_rate" in error
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000001", "step-000002"]
    assert not (tmp_path / "final").exists()
    state = torch.load(tmp_path / "step-000002" / "training_state.pt", weights_only=True)
    adapter = load_file(tmp_path / "step-000002" / LORA_WEIGHTS)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in [*state["model"].values(), *adapter.values()])
    assert all(torch.equal(state["model"][key], adapter[key]) for key in adapter)


# ----------------------------------------------------------------------------------------------- DDP


def test_ddp_on_two_cpu_processes_splits_the_data_and_keeps_the_ranks_in_sync(tiny_dir, make_data, tmp_path):
    out_dir, record_dir = tmp_path / "run", tmp_path / "ranks"
    record_dir.mkdir()
    data_dir = make_data(32)
    # 32 samples / micro-batches of 2 = 16, 8 per rank; global batch 8 = 2 micro-batches x 2 ranks x 2 accumulated
    flags = as_cli(checkpoint_dir=tiny_dir, data_dir=data_dir, out_dir=out_dir, devices=2, strategy="ddp",
                   global_batch_size=8, micro_batch_size=2, learning_rate=1e-2, lora_mlp=True, save_interval=2, **QUIET)
    result = subprocess.run([sys.executable, str(ROOT / "tests/ddp_lora_run.py"), str(record_dir), *flags], cwd=ROOT,
                            env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    # epochs=1: 8 micro-batches per rank / 2 accumulated = 4 optimizer steps
    assert [int(row["step"]) for row in training_rows(out_dir)] == [1, 2, 3, 4]
    assert result.stderr.count("Saved the adapter to") == 1 and result.stderr.count("Trainable parameters") == 1
    assert sorted(p.name for p in out_dir.iterdir() if p.name != "tensorboard") == [
        "final", "hparams.yaml", "inputs.json", "metrics.csv", "step-000002", "step-000004"]
    for step in ("step-000002", "step-000004"):
        assert sorted(p.name for p in (out_dir / step).iterdir()) == ["hparams.yaml", LORA_WEIGHTS, "training_state.pt"]

    ranks = [json.loads((record_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # each rank trains on its own 16 samples; together, the whole training set once
    assert [len(r["trained_on"]) for r in ranks] == [16, 16]
    trained_on = sorted(ranks[0]["trained_on"] + ranks[1]["trained_on"])
    assert trained_on == sorted(sample["input_ids"].tolist() for sample in load_dataset(data_dir / "train.pt"))

    # the gradients are all-reduced: both ranks hold the same adapter, the one saved
    final = load_file(out_dir / "final" / LORA_WEIGHTS)
    assert all(t.abs().max() > 0 for key, t in final.items() if key.endswith(".B")), "the adapter trained"
    for rank in (0, 1):
        adapter = load_file(record_dir / f"rank{rank}.safetensors")
        assert adapter.keys() == final.keys()
        assert all(torch.equal(adapter[key], final[key]) for key in final), f"rank {rank} differs"


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def finished_run(tiny_dir, make_data, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("finished")
    finetune(tiny_dir, make_data(8), out_dir, max_steps=1, micro_batch_size=4, global_batch_size=4)
    return out_dir


@pytest.mark.parametrize("flags, message", [
    ({"data_dir": "missing"},
     r"missing/train.pt does not exist\. Prepare the data first, e\.g\. `python scripts/prepare_tasks\.py"),
    ({"data_dir": "other_tokenizer"}, r"train.pt: sample 0 has the token id 50000, beyond the tokenizer's 49152 tokens:"
                                      r" the data was prepared with another tokenizer"),
    ({"quantize": "bnb.nf4", "strategy": "fsdp"}, r"--quantize bnb.nf4 cannot be combined with --strategy fsdp"),
    ({"global_batch_size": 6, "micro_batch_size": 4},
     r"--global_batch_size 6 must be a multiple of --micro_batch_size x devices \(4 x 1 = 4\)"),
    ({"global_batch_size": 16, "micro_batch_size": 4},
     r"train.pt has 8 samples: too few for one optimizer step of --global_batch_size 16 on 1 device\(s\)"),
    ({"max_seq_length": 20}, r"--max_seq_length 20 cuts off the answer of every sample in .*train.pt; raise it"),
    ({"quantize": "bnb.nf5"}, r"Unknown quantize mode 'bnb.nf5'; choose one of bnb.nf4, "),
    ({"lora_query": False, "lora_value": False}, r"LoRA is enabled on no layer"),
    ({"resume": True}, r"--resume: no checkpoint \(step-\*/training_state.pt\) in"),
], ids=["missing-data", "other-tokenizer", "qlora-fsdp", "batch-sizes", "too-little-data", "answers-cut-off",
        "unknown-quantize", "no-target", "resume-none"])
def test_finetune_bad_input_is_one_error_line(flags, message, tiny_dir, make_data, tmp_path, capsys):
    other = tmp_path / "other_tokenizer"
    other.mkdir()
    sample = {"input_ids": torch.tensor([1, 2, 50000]), "labels": torch.tensor([-100, 2, 50000]), "prompt": "a",
              "response": "b"}
    save_dataset([sample], other / "train.pt")
    save_dataset([sample], other / "test.pt")
    if "data_dir" in flags:
        flags = {**flags, "data_dir": tmp_path / flags["data_dir"]}
    args = as_cli(**{"checkpoint_dir": tiny_dir, "data_dir": make_data(8), "out_dir": tmp_path / "run",
                     "max_steps": 1, "micro_batch_size": 4, "global_batch_size": 4, **flags})
    error = cli_error(capsys, lora.setup, args)
    assert re.search(message, error), error


def test_finetune_script_exits_1_without_a_traceback(tiny_dir, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "finetune/lora.py"), "--checkpoint_dir", str(tiny_dir),
                             "--data_dir", str(tmp_path / "nothing")], cwd=ROOT, env=SUBPROCESS_ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "prepare_tasks.py" in result.stderr


def test_merge_refuses_an_adapter_of_another_rank(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run / "final", run_dir)
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    (run_dir / "hparams.yaml").write_text(yaml.safe_dump({**hparams, "lora_r": 4}))
    error = cli_error(capsys, merge_lora.merge, ["--checkpoint_dir", str(run_dir), "--out_dir", str(tmp_path / "merged")])
    assert "trained with r=8 but the model has r=4" in error
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_a_non_empty_out_dir(finished_run, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    error = cli_error(capsys, merge_lora.merge, ["--checkpoint_dir", str(finished_run), "--out_dir", str(tmp_path)])
    assert f"{tmp_path} is not empty" in error
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# ----------------------------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_real_model_finetunes_and_generates_with_the_adapter(smollm2_dir, tmp_path, capsys):
    data_dir, out_dir = tmp_path / "tasks", tmp_path / "run"
    load_script("scripts/prepare_tasks.py").prepare_tasks(checkpoint_dir=smollm2_dir, out_dir=data_dir, num_train=8,
                                                          num_test=2)
    finetune(smollm2_dir, data_dir, out_dir, max_steps=2, micro_batch_size=2, global_batch_size=2, max_seq_length=96)
    losses = [float(row["loss"]) for row in training_rows(out_dir)]
    # a pretrained model predicts these answers far better than chance (ln 49152 = 10.8)
    assert len(losses) == 2 and all(loss < 6 for loss in losses), losses
    result = subprocess.run([sys.executable, str(ROOT / "generate/base.py"), "--checkpoint_dir", str(out_dir),
                             "--prompt", "Convert this sentence to uppercase: the cat sat", "--temperature", "0",
                             "--max_new_tokens", "12"], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


# ----------------------------------------------------------------------------------------------- runs you can trust
@pytest.mark.parametrize("flag, value", [("global_batch_size", "-4"), ("max_steps", "-3"), ("max_steps", "0"),
                                         ("max_seq_length", "0"), ("max_seq_length", "-5"), ("micro_batch_size", "0"),
                                         ("eval_interval", "0"), ("eval_iters", "0"), ("save_interval", "0"),
                                         ("epochs", "0"), ("warmup_steps", "-1"), ("lora_r", "0")])
def test_an_invalid_number_is_one_line_and_writes_nothing(flag, value, tiny_dir, make_data, tmp_path, capsys):
    out_dir = tmp_path / "out"
    error = cli_error(capsys, lora.setup, ["--checkpoint_dir", str(tiny_dir), "--data_dir", str(make_data(8)),
                                           "--out_dir", str(out_dir), f"--{flag}", value])
    assert error.startswith(f"error: --{flag} must be a ")
    assert error.endswith(f" integer, got {value}")
    assert not out_dir.exists()


def test_a_run_directory_belongs_to_its_run(finished_run, tiny_dir, make_data, tmp_path, capsys):
    out_dir = tmp_path / "run"
    shutil.copytree(finished_run, out_dir)
    flags = ["--checkpoint_dir", str(tiny_dir), "--data_dir", str(make_data(8)), "--out_dir", str(out_dir),
             "--micro_batch_size", "4", "--global_batch_size", "4", "--eval_interval", "1000", "--eval_iters", "1"]
    hparams = (out_dir / "hparams.yaml").read_bytes()
    error = cli_error(capsys, lora.setup, [*flags, "--max_steps", "1"])
    assert f"{out_dir} already holds a run" in error and "--resume true" in error and "--overwrite true" in error
    for changed, named in [(["--learning_rate", "0.01"], "--learning_rate 0.0003 (now 0.01)"),
                           (["--lora_r", "4"], "--lora_r 8 (now 4)"), (["--seed", "1"], "--seed 1337 (now 1)"),
                           (["--data_dir", str(make_data(16))], f"--data_dir {make_data(8)} (now {make_data(16)})")]:
        error = cli_error(capsys, lora.setup, [*flags, "--max_steps", "1", "--resume", "true", *changed])
        assert f"the run in {out_dir} was started with {named}" in error
        assert (out_dir / "hparams.yaml").read_bytes() == hparams
    # the same --data_dir prepared again with other samples: the flags are equal, the contents are not
    train_file = make_data(8) / "train.pt"
    original = train_file.read_bytes()
    try:
        train_file.write_bytes((make_data(16) / "train.pt").read_bytes())
        error = cli_error(capsys, lora.setup, [*flags, "--max_steps", "3", "--resume", "true"])
    finally:
        train_file.write_bytes(original)
    assert f"the run in {out_dir} was started from other files than these (data_dir/train.pt changed;" in error
    assert (out_dir / "hparams.yaml").read_bytes() == hparams
    # a longer run continues from the checkpoint and says what the schedule does
    run_cli(lora.setup, [*flags, "--max_steps", "3", "--resume", "true"])
    err = capsys.readouterr().err
    assert "--max_steps changed on resume: 1 -> 3" in err
    assert "Training continues from step 1 to step 3: the learning rate follows the warmup (10 steps) and cosine" in err
    assert yaml.safe_load((out_dir / "hparams.yaml").read_text())["max_steps"] == 3
    assert [int(row["step"]) for row in training_rows(out_dir)] == [1, 2, 3]
    # --overwrite true starts afresh in place
    run_cli(lora.setup, [*flags, "--max_steps", "1", "--overwrite", "true"])
    assert sorted(p.name for p in out_dir.iterdir() if p.name != "tensorboard") == [
        "final", "hparams.yaml", "inputs.json", "metrics.csv", "step-000001"]
    assert [int(row["step"]) for row in training_rows(out_dir)] == [1]


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tiny_dir, make_data, tmp_path, capsys):
    flags = dict(data_dir=make_data(16), checkpoint_dir=tiny_dir, max_steps=6, micro_batch_size=2,
                 global_batch_size=4, learning_rate=1e-2, warmup_steps=2, save_interval=100, eval_interval=1000,
                 eval_iters=1)
    reference, out_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    lora.setup(out_dir=reference, **flags)
    command = [sys.executable, str(ROOT / "finetune/lora.py"), *as_cli(out_dir=out_dir, **flags)]
    process = subprocess.Popen(command, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        seen = []
        for line in process.stderr:
            seen.append(line)
            if line.startswith("step 2/6 |"):
                process.send_signal(signal.SIGINT)  # during step 3: no checkpoint is due before step 6
        process.wait()
    finally:
        watchdog.cancel()
        process.kill()
        process.stderr.close()
    assert process.returncode == 130, "".join(seen)
    stopped = re.fullmatch(rf"Stopped by SIGINT after step (\d); saved {re.escape(str(out_dir))}/step-00000(\d)\. Run the"
                           r" same command with --resume true to continue exactly from there\n", seen[-1])
    assert stopped is not None and stopped[1] == stopped[2], seen[-1]
    assert "Traceback" not in "".join(seen) and not (out_dir / ".forge.lock").exists()
    lora.setup(out_dir=out_dir, resume=True, **flags)
    assert f"at step {stopped[1]}" in capsys.readouterr().err
    assert (out_dir / "final" / LORA_WEIGHTS).read_bytes() == (reference / "final" / LORA_WEIGHTS).read_bytes()


def test_gradient_checkpointing_trains_exactly_as_without(tiny_dir, make_data, tmp_path):
    """--gradient_checkpointing selective, block and offload recompute (part of) the Blocks in the backward pass: the
    run's losses are those of a run without, to float32 rounding (packed rows, QLoRA and dropout included), also
    with --checkpoint_layers (only the first Blocks; the others selective)."""
    flags = dict(max_steps=3, micro_batch_size=4, global_batch_size=4, learning_rate=1e-2, warmup_steps=0,
                 lora_dropout=0.1, lora_mlp=True, packing=True, quantize="bnb.nf4", eval_interval=100)
    runs = {}
    for mode in ("none", "selective", "block", "offload"):
        finetune(tiny_dir, make_data(8), tmp_path / mode, gradient_checkpointing=mode, **flags)
        runs[mode] = [float(row["loss"]) for row in training_rows(tmp_path / mode)]
    assert len(runs["none"]) == 3
    for mode in ("selective", "block", "offload"):
        assert runs[mode] == pytest.approx(runs["none"], rel=1e-5), mode
    finetune(tiny_dir, make_data(8), tmp_path / "first", gradient_checkpointing="offload", checkpoint_layers=1,
              checkpoint_rest="selective", **flags)
    assert [float(row["loss"]) for row in training_rows(tmp_path / "first")] == pytest.approx(runs["none"], rel=1e-5)
    assert yaml.safe_load((tmp_path / "first" / "hparams.yaml").read_text())["checkpoint_layers"] == 1


def test_a_run_resumes_with_more_gradient_checkpointing(tiny_dir, make_data, tmp_path, capsys):
    """Out of memory at step 3: the run resumes from its step-2 checkpoint with `offload` on the first Block and
    `selective` on the other, and ends at the adapter of the run that never stopped (to float32 rounding)."""
    flags = dict(max_steps=4, micro_batch_size=2, global_batch_size=4, learning_rate=1e-2, warmup_steps=1,
                 lora_dropout=0.1, lora_mlp=True, save_interval=2, eval_interval=100)
    data_dir = make_data(8)
    reference, out_dir = tmp_path / "uninterrupted", tmp_path / "resumed"
    finetune(tiny_dir, data_dir, reference, **flags)
    shutil.copytree(reference, out_dir)
    for later in ("step-000004", "final"):  # as if it had died in step 3
        shutil.rmtree(out_dir / later)
    capsys.readouterr()
    finetune(tiny_dir, data_dir, out_dir, resume=True, gradient_checkpointing="offload", checkpoint_layers=1,
             checkpoint_rest="selective", **flags)
    err = capsys.readouterr().err
    assert "--gradient_checkpointing changed on resume: none -> offload" in err
    assert f"Resumed from {out_dir / 'step-000002'} at step 2" in err
    expected, resumed = (load_file(d / "final" / LORA_WEIGHTS) for d in (reference, out_dir))
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_compile_trains_two_steps_and_tokens_per_s_counts_real_tokens(tiny_dir, make_data, tmp_path, monkeypatch):
    """--compile true trains through the compiled Blocks (validation stays eager), and the throughput counts each
    micro-batch's real tokens, not the padded batch's positions."""
    torch._dynamo.reset()
    counted = []
    update = lora.Throughput.update
    monkeypatch.setattr(lora.Throughput, "update", lambda self, tokens: (counted.append(tokens), update(self, tokens)))
    data_dir = make_data(8)
    out_dir = tmp_path / "compiled"
    finetune(tiny_dir, data_dir, out_dir, max_steps=2, micro_batch_size=2, global_batch_size=2, compile=True)
    losses = [float(row["loss"]) for row in training_rows(out_dir)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert (out_dir / "final" / LORA_WEIGHTS).is_file()
    assert yaml.safe_load((out_dir / "hparams.yaml").read_text())["compile"] is True

    block_size = Config.from_checkpoint(tiny_dir).block_size
    lengths = [min(len(s["input_ids"]), block_size) for s in load_dataset(data_dir / "train.pt")]
    batches = lora.epoch_batches(lengths, 2, 0, seed=1337, group_by_length=True)[:2]
    assert counted == [sum(lengths[i] for i in batch) for batch in batches]  # the padding is not counted
