"""finetune/full.py: the loss falls, resume is bitwise exact, bad input is one line, a crash while saving leaves no
incomplete step, and final/ is a checkpoint every script reads."""

import math

import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file
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
    inject_adapter,
    load_adapter_state_dict,
)
from model.cli import run_cli
from model.weights.load import load_adapter_run


@pytest.mark.parametrize("script", ["full"])
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



def test_full_fine_tune_final_is_a_checkpoint(overfit_run, tiny_dir, capsys):
    out_dir, losses = overfit_run("full")
    final = out_dir / "final"
    for name in ("lit_model.safetensors", "model_config.yaml", "tokenizer.json", "prompt_style.yaml", "hparams.yaml"):
        assert (final / name).is_file(), name
    assert sorted(p.name for p in (out_dir / "step-000030").iterdir()) == ["hparams.yaml", "training_state.pt"]
    # the tied head is saved once, as the converter does, and the optimizer saw the shared weight once
    assert "lm_head.weight" not in load_file(final / "lit_model.safetensors")
    model = GPT.from_checkpoint(final)
    assert model.config.tie_embeddings and model.lm_head.weight is model.transformer.wte.weight
    training_state = torch.load(out_dir / "step-000030" / "training_state.pt", weights_only=True)
    assert len(training_state["optimizer"]["param_groups"][0]["params"]) == len(list(model.parameters()))

    # final/ holds the trained weights: its loss on the training set is the trained model's
    next_token_loss = load_script("finetune/full.py").next_token_loss
    batch = load_script("finetune/full.py").get_collate_fn()(torch.load(tiny_dir.parent.parent / "data" / "train.pt", weights_only=True))
    with torch.no_grad():
        assert next_token_loss(model, batch["input_ids"], batch["labels"]) < 0.5 * losses[0]

    # generate/base.py reads the run's out_dir like its final/
    args = ["--prompt", "Repeat the word: apple", "--max_new_tokens", "8", "--temperature", "0"]
    run_cli(load_script("generate/base.py").main, ["--checkpoint_dir", str(out_dir), *args])
    from_run = capsys.readouterr().out
    run_cli(load_script("generate/base.py").main, ["--checkpoint_dir", str(final), *args])
    assert capsys.readouterr().out == from_run and from_run.strip()

    with pytest.raises(SystemExit):
        run_cli(load_script("generate/base.py").main, ["--checkpoint_dir", str(out_dir / "step-000030")])
    assert "training state for --resume only" in capsys.readouterr().err



@pytest.mark.parametrize("script", ["full"])
def test_resume_is_bitwise_exact(script, tiny_dir, tmp_path):
    resume_is_bitwise_exact(script, tiny_dir, tmp_path)


@pytest.mark.parametrize("script", ["full"])
def test_samples_cut_before_their_answer_are_skipped_not_a_nan_loss(script, tiny_dir, tmp_path, capsys):
    samples_cut_before_their_answer_are_skipped_not_a_nan_loss(script, tiny_dir, tmp_path, capsys)


@pytest.mark.parametrize("script", ["full"])
def test_infinite_gradient_stops_and_keeps_the_last_good_checkpoint(script, tiny_dir, tmp_path, capsys):
    infinite_gradient_stops_and_keeps_the_last_good_checkpoint(script, tiny_dir, tmp_path, capsys)


@pytest.mark.parametrize("script, args, message", [
    ("full", ["--quantize", "bnb.nf4"], "quantization freezes the base; use finetune/lora.py --quantize for QLoRA"),
    ("full", ["--max_steps", "1"], "prepare_tasks.py"),
    ("full", ["--global_batch_size", "16"], "train.pt has 8 samples: too few for one optimizer step of"
                                            " --global_batch_size 16 on 1 device(s)"),
])
def test_bad_input_is_one_clear_error(script, args, message, tiny_dir, tmp_path, capsys):
    bad_input_is_one_clear_error(script, args, message, tiny_dir, tmp_path, capsys)


@pytest.mark.parametrize("script, function, crash_at", [("full", "save_hparams", 2)])
def test_a_crash_while_saving_leaves_no_incomplete_step_dir(script, function, crash_at, tiny_dir, tmp_path):
    a_crash_while_saving_leaves_no_incomplete_step_dir(script, function, crash_at, tiny_dir, tmp_path)


@pytest.mark.real_model
@pytest.mark.parametrize("script", ["full"])
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
