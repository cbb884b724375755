"""finetune/adapter.py (--adapter_version 1 and 2): the loss falls, the adapter is saved with its settings, resume is
bitwise exact, bad input is one line, a crash while saving leaves no incomplete step, and generate/ reads the run."""

import math

import pytest
import torch
from conftest import load_script
from sft_scripts import (  # noqa: F401  (tiny_dir, overfit_run: fixtures)
    OVERFIT,
    a_crash_while_saving_leaves_no_incomplete_step_dir,
    bad_input_is_one_clear_error,
    finetune,
    infinite_gradient_stops_and_keeps_the_last_good_checkpoint,
    load_finetune_script,
    overfit_run,
    resume_is_bitwise_exact,
    samples_cut_before_their_answer_are_skipped_not_a_nan_loss,
    tiny_dir,
)

from model import GPT
from model.adapter import (
    AdapterConfig,
    inject_adapter,
    load_adapter_state_dict,
)
from model.cli import run_cli
from model.generate import generate
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer
from model.weights.load import load_adapter_run


@pytest.mark.parametrize("script", ["adapter", "adapter_v2"])
def test_training_loss_falls(script, overfit_run):
    out_dir, losses = overfit_run(script)
    print(f"{script}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == int(OVERFIT[script][1])
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
    if script != "full":  # the adapter is saved with its settings, in final/ and with every checkpoint
        for run_dir in (out_dir / "final", out_dir / f"step-{len(losses):06d}"):
            adapter_config, state_dict = load_adapter_run(run_dir)
            assert adapter_config.version == (2 if script == "adapter_v2" else 1)
            assert adapter_config.start_layer == int(OVERFIT[script][-1])
            assert any(key.endswith(".adapter_gate") and tensor.abs().max() > 0 for key, tensor in state_dict.items())



def test_generate_adapter_uses_the_run(overfit_run, tiny_dir, capsys):
    """generate/base.py finds the base, the version and the adapter's shape in an adapter run's hparams.yaml."""
    out_dir, _ = overfit_run("adapter_v2")
    prompt = "Repeat the word: apple"
    run_cli(load_script("generate/base.py").main,
            ["--checkpoint_dir", str(out_dir), "--prompt", prompt, "--max_new_tokens", "8", "--temperature", "0"])
    captured = capsys.readouterr()
    assert "Loaded the adapter run" in captured.err

    adapter_config, state_dict = load_adapter_run(out_dir / "final")
    model = inject_adapter(GPT.from_checkpoint(tiny_dir), adapter_config)
    load_adapter_state_dict(model, state_dict)
    tokenizer = Tokenizer(tiny_dir)
    prompt_ids = tokenizer.encode(load_prompt_style(tiny_dir).apply(prompt))
    expected = [t for t in generate(model, prompt_ids, 8, temperature=0.0, stop_ids=tokenizer.stop_ids)
                if t not in tokenizer.stop_ids]
    assert captured.out.strip() == tokenizer.decode(expected).strip()


@pytest.mark.parametrize("script", ["adapter", "adapter_v2"])
def test_resume_is_bitwise_exact(script, tiny_dir, tmp_path):
    resume_is_bitwise_exact(script, tiny_dir, tmp_path)


@pytest.mark.parametrize("script", ["adapter", "adapter_v2"])
def test_samples_cut_before_their_answer_are_skipped_not_a_nan_loss(script, tiny_dir, tmp_path, capsys):
    samples_cut_before_their_answer_are_skipped_not_a_nan_loss(script, tiny_dir, tmp_path, capsys)


@pytest.mark.parametrize("script", ["adapter", "adapter_v2"])
def test_infinite_gradient_stops_and_keeps_the_last_good_checkpoint(script, tiny_dir, tmp_path, capsys):
    infinite_gradient_stops_and_keeps_the_last_good_checkpoint(script, tiny_dir, tmp_path, capsys)


@pytest.mark.parametrize("script, args, message", [
    ("adapter", ["--max_steps", "1"], "prepare_tasks.py"),
    ("adapter_v2", ["--adapter_start_layer", "3"], "the model has 3 blocks"),
    ("adapter", ["--global_batch_size", "16"], "train.pt has 8 samples: too few for one optimizer step"),
    ("adapter_v2", ["--max_seq_length", "5"], "--max_seq_length 5 cuts off the answer of every sample in"),
    ("adapter", ["--quantize", "bnb.nf5"], "Unknown quantize mode 'bnb.nf5'; choose one of bnb.nf4, "),
])
def test_bad_input_is_one_clear_error(script, args, message, tiny_dir, tmp_path, capsys):
    bad_input_is_one_clear_error(script, args, message, tiny_dir, tmp_path, capsys)


@pytest.mark.parametrize("script, function, crash_at", [("adapter", "save_adapter", 2)])
def test_a_crash_while_saving_leaves_no_incomplete_step_dir(script, function, crash_at, tiny_dir, tmp_path):
    a_crash_while_saving_leaves_no_incomplete_step_dir(script, function, crash_at, tiny_dir, tmp_path)


@pytest.mark.real_model
def test_real_model_adapter_v2_smoke(smollm2_dir, tiny_dir, tmp_path):
    """Two steps of adapter v2 (the superset of v1) on SmolLM2-135M-Instruct, with its default learning rate and
    start layer; the tiny data set is in its tokenizer. (Full fine-tuning of the real model is left out: on a CPU its
    1.6 GB of training state takes a minute.)"""
    losses = finetune("adapter_v2", smollm2_dir, tmp_path, "--max_steps", "2", data_dir=tiny_dir.parent.parent / "data")
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    adapter_config, state_dict = load_adapter_run(tmp_path / "final")
    assert adapter_config == AdapterConfig(prompt_length=10, start_layer=2, version=2)
    model = inject_adapter(GPT.from_checkpoint(smollm2_dir), adapter_config)
    load_adapter_state_dict(model, state_dict)


@pytest.mark.real_model
@pytest.mark.parametrize("script", ["adapter"])
def test_real_model_one_step(script, smollm2_dir, tiny_dir, tmp_path):
    """One optimizer step of full fine-tuning and of adapter v1 on SmolLM2-135M-Instruct: finite loss, and the
    saved result is usable (full: a checkpoint whose weights moved; adapter: an adapter that loads)."""
    losses = finetune(script, smollm2_dir, tmp_path, "--max_steps", "1", data_dir=tiny_dir.parent.parent / "data")
    assert len(losses) == 1 and math.isfinite(losses[0])
    if script == "full":
        tuned = GPT.from_checkpoint(tmp_path / "final").state_dict()
        base = GPT.from_checkpoint(smollm2_dir).state_dict()
        assert not torch.equal(tuned["transformer.h.0.attn.qkv.weight"], base["transformer.h.0.attn.qkv.weight"])
    else:
        adapter_config, state_dict = load_adapter_run(tmp_path / "final")
        model = inject_adapter(GPT.from_checkpoint(smollm2_dir), adapter_config)
        load_adapter_state_dict(model, state_dict)
