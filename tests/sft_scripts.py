"""What tests/test_finetune_full.py and test_finetune_adapter.py share: a tiny SmolLM2 with 8 samples to overfit,
the scripts run in-process through their CLI, and the checks every SFT script must pass."""

import csv
import math
import re
import shutil

import pytest
import torch
from conftest import load_script
from hf_models import save_tiny_model
from safetensors.torch import load_file

from model.cli import run_cli
from model.data.sft import encode_example, save_dataset
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer
from model.training.run import latest_checkpoint
from model.weights.convert import convert_hf_checkpoint

WORDS = ["apple", "violet", "engine", "planet", "ribbon", "marble", "saddle", "tunnel"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A tiny random 3-block SmolLM2 (tied embeddings, multi-query attention) with the real tokenizer and prompt
    style, beside a prepared data set of 8 samples to overfit: 'Repeat the word: X' -> 'X'. Its weights are drawn
    25 times larger than usual (std 0.5), so that its logits span the range a trained model's do: with std 0.02, no
    hidden state of size 48 moves a logit by more than ~1, and a frozen-base adapter could barely lower the loss."""
    root = tmp_path_factory.mktemp("finetune")
    checkpoint_dir = root / "org" / "tiny-smollm2"
    save_tiny_model("smollm2", checkpoint_dir, vocab_size=49152, num_hidden_layers=3, initializer_range=0.5)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_style.yaml"):
        shutil.copy(smollm2_dir / name, checkpoint_dir / name)
    convert_hf_checkpoint(checkpoint_dir)
    tokenizer, style = Tokenizer(checkpoint_dir), load_prompt_style(checkpoint_dir)
    samples = [encode_example(tokenizer, style, f"Repeat the word: {word}", word) for word in WORDS]
    (root / "data").mkdir()
    save_dataset(samples, root / "data" / "train.pt")
    save_dataset(samples[:2], root / "data" / "test.pt")
    return checkpoint_dir


# "adapter_v2" is finetune/adapter.py with --adapter_version 2
SCRIPT_FLAGS = {"adapter_v2": ["--adapter_version", "2"]}


def load_finetune_script(script: str):
    return load_script(f"finetune/{'adapter' if script == 'adapter_v2' else script}.py")


def finetune(script: str, checkpoint_dir, out_dir, *args: str, data_dir=None, module=None) -> list[float]:
    """Run a fine-tuning script in-process through its CLI (one optimizer step = one epoch of the 8 samples);
    the training losses from metrics.csv. `module`: the script already loaded (and patched)."""
    module = module or load_finetune_script(script)
    run_cli(module.setup, [*SCRIPT_FLAGS.get(script, []),
        "--checkpoint_dir", str(checkpoint_dir), "--data_dir", str(data_dir or checkpoint_dir.parent.parent / "data"),
        "--out_dir", str(out_dir), "--micro_batch_size", "4", "--global_batch_size", "8", "--eval_interval", "1000",
        "--eval_iters", "1", "--warmup_steps", "2", *args,
    ])
    with open(out_dir / "metrics.csv", newline="") as fp:
        return [float(row["loss"]) for row in csv.DictReader(fp) if row["loss"]]


# v1 only adds to the attention output through gates that start at zero: it needs more steps and a higher rate
OVERFIT = {
    "full": ["--max_steps", "30", "--learning_rate", "1e-2"],
    "adapter": ["--max_steps", "60", "--learning_rate", "0.1", "--adapter_start_layer", "0"],
    "adapter_v2": ["--max_steps", "30", "--learning_rate", "5e-2", "--adapter_start_layer", "1"],
}


@pytest.fixture(scope="module")
def overfit_run(tiny_dir, tmp_path_factory):
    """script -> (out_dir, losses) of its overfitting run, each run once for the tests that look at it."""
    runs = {}

    def run(script: str):
        if script not in runs:
            out_dir = tmp_path_factory.mktemp(script)
            runs[script] = out_dir, finetune(script, tiny_dir, out_dir, *OVERFIT[script])
        return runs[script]

    return run



def resume_is_bitwise_exact(script, tiny_dir, tmp_path):
    """6 steps (6 epochs) straight through == 3 steps, then a fresh start resumed from the step-3 checkpoint."""
    args = ["--max_steps", "6", "--save_interval", "3", "--learning_rate", OVERFIT[script][3]]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    losses = finetune(script, tiny_dir, straight, *args)
    resumed.mkdir()
    shutil.copytree(straight / "step-000003", resumed / "step-000003")
    shutil.copy(straight / "metrics.csv", resumed / "metrics.csv")
    for name in ("hparams.yaml", "inputs.json"):  # --resume checks the flags and the input files against them
        shutil.copy(straight / name, resumed / name)
    assert finetune(script, tiny_dir, resumed, *args, "--resume", "true") == losses
    weights = "lit_model.safetensors" if script == "full" else "adapter.safetensors"
    assert (straight / "final" / weights).read_bytes() == (resumed / "final" / weights).read_bytes()


def samples_cut_before_their_answer_are_skipped_not_a_nan_loss(script, tiny_dir, tmp_path, capsys):
    """Half the samples get a prompt too long to leave an answer token within --max_seq_length; one sample per
    micro-batch, so that a cut sample would be a micro-batch without a single target (a NaN loss)."""
    tokenizer, style = Tokenizer(tiny_dir), load_prompt_style(tiny_dir)
    preamble = "Read all of this long preamble first, then do as it says at its very end. " * 2
    samples = [encode_example(tokenizer, style, f"{preamble if i % 2 else ''}Repeat the word: {word}", word)
               for i, word in enumerate(WORDS)]
    first_answer_token = [int((s["labels"] != -100).nonzero()[0]) for s in samples]
    max_seq_length = max(first_answer_token[0::2]) + 1
    assert min(first_answer_token[1::2]) >= max_seq_length
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    save_dataset(samples, data_dir / "train.pt")
    save_dataset(samples[:2], data_dir / "test.pt")
    losses = finetune(script, tiny_dir, tmp_path / "out", "--max_steps", "4", "--micro_batch_size", "1",
                      "--global_batch_size", "1", "--max_seq_length", str(max_seq_length), "--learning_rate",
                      OVERFIT[script][3], data_dir=data_dir)
    stderr = capsys.readouterr().err
    assert f"Skipping 4 of 8 samples of {data_dir / 'train.pt'}" in stderr
    assert f"Skipping 1 of 2 samples of {data_dir / 'test.pt'}" in stderr
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose backward makes every gradient infinite: a finite loss with exploding gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def infinite_gradient_stops_and_keeps_the_last_good_checkpoint(script, tiny_dir, tmp_path, capsys):
    """A finite loss whose gradients are infinite at step 3: the run stops before the optimizer step, with the
    checkpoints of steps 1 and 2 whole and finite."""
    module = load_finetune_script(script)
    next_token_loss, calls = module.next_token_loss, []

    def breaks_at_step_3(model, input_ids, labels, segment_ids=None):
        loss = next_token_loss(model, input_ids, labels, segment_ids)
        if torch.is_grad_enabled():
            calls.append(None)
            if len(calls) == 5:  # two micro-batches a step: the first of step 3
                return InfiniteGradient.apply(loss)
        return loss

    module.next_token_loss = breaks_at_step_3
    with pytest.raises(SystemExit) as exit_info:
        finetune(script, tiny_dir, tmp_path, "--max_steps", "6", "--save_interval", "1", "--learning_rate",
                 OVERFIT[script][3], module=module)
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert re.search(r"error: The gradient norm became (nan|inf) at step 3; .* Lower --learning_rate", stderr), stderr
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000001", "step-000002"]
    assert not (tmp_path / "final").exists()
    state = torch.load(tmp_path / "step-000002" / "training_state.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    if script != "full":
        adapter = load_file(tmp_path / "step-000002" / "adapter.safetensors")
        assert all(torch.equal(state["model"][key], adapter[key]) for key in adapter)


def bad_input_is_one_clear_error(script, args, message, tiny_dir, tmp_path, capsys):
    data_dir = tmp_path / "no-data" if message == "prepare_tasks.py" else None
    with pytest.raises(SystemExit) as exit_info:
        finetune(script, tiny_dir, tmp_path / "out", *args, data_dir=data_dir)
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert message in stderr
    assert len([line for line in stderr.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "out").exists()


def a_crash_while_saving_leaves_no_incomplete_step_dir(script, function, crash_at, tiny_dir, tmp_path):
    """Killed between the training state and the file saved beside it (full: hparams.yaml; adapters: the adapter):
    the step directory is not there, and the previous one is the latest."""
    module = load_finetune_script(script)
    save, saves = getattr(module, function), []

    def crash(*args):
        saves.append(None)
        if len(saves) == crash_at:
            raise KeyboardInterrupt
        save(*args)

    setattr(module, function, crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(script, tiny_dir, tmp_path, "--max_steps", "3", "--save_interval", "1", module=module)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    expected = ["hparams.yaml", "training_state.pt"] if script == "full" else [
        "adapter.safetensors", "hparams.yaml", "training_state.pt"]
    for step_dir in tmp_path.glob("step-*"):
        assert sorted(p.name for p in step_dir.iterdir()) == expected
