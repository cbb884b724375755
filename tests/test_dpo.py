"""finetune/dpo.py end to end on a tiny random SmolLM2 with the real tokenizer: it learns the preferences, its LoRA
run merges like an SFT run, precomputed reference log-probs give the live reference's loss, a killed run resumes to
the same adapter, --method full and --loss orpo start from the right loss, bad input is one `error:` line.
"""

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_script
from hf_models import save_tiny_model
from safetensors.torch import load_file

from model.cli import run_cli
from model.data.preference import collate_pairs, load_pairs
from model.gpt import GPT
from model.lora import LORA_WEIGHTS, inject_lora, load_lora_state_dict
from model.training.preference import orpo_odds_ratio_loss, sequence_logps
from model.weights.convert import convert_hf_checkpoint
from model.weights.load import load_lora_run

dpo = load_script("finetune/dpo.py")
prepare = load_script("scripts/prepare_preferences.py")
merge_lora = load_script("scripts/merge_lora.py")
QUIET = {"eval_interval": 1000, "eval_iters": 2, "micro_batch_size": 2, "global_batch_size": 4, "warmup_steps": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    checkpoint_dir = tmp_path_factory.mktemp("tiny") / "org" / "tiny-smollm2"
    save_tiny_model("smollm2", checkpoint_dir, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_style.yaml"):
        shutil.copy(smollm2_dir / name, checkpoint_dir / name)
    convert_hf_checkpoint(checkpoint_dir)
    return checkpoint_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_dir) -> Path:
    out = tmp_path_factory.mktemp("pref")
    prepare.prepare_preferences(checkpoint_dir=tiny_dir, out_dir=out, num_train=8, num_test=4, max_seq_length=96,
                                tasks="count_words,uppercase")
    return out


def fresh_data(data_dir: Path, tmp_path: Path) -> Path:
    """A copy without a reference cache, for the runs that must not see another test's cache."""
    copy = tmp_path / "data"
    copy.mkdir()
    for name in ("train.pt", "test.pt", "meta.json"):
        shutil.copy(data_dir / name, copy / name)
    return copy


def align(checkpoint_dir, data_dir, out_dir, **flags):
    dpo.setup(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, **{**QUIET, **flags})


def rows(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics.csv", newline="") as fp:
        return list(csv.DictReader(fp))


def column(out_dir: Path, key: str) -> list[float]:
    return [float(row[key]) for row in rows(out_dir) if row[key]]


def test_lora_dpo_learns_the_preferences_and_merges_like_an_sft_run(tiny_dir, data_dir, tmp_path, capsys):
    out_dir = tmp_path / "run"
    align(tiny_dir, data_dir, out_dir, max_steps=10, learning_rate=2e-2, beta=0.5, lora_mlp=True,
          lora_projection=True, eval_interval=5)
    assert rows(out_dir)[0].keys() == set(dpo.METRICS)
    # the reference is the starting policy: every reward is 0 and the loss log 2 before the first step
    assert column(out_dir, "val_loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert column(out_dir, "val_reward_margin")[0] == 0
    margins, accuracies = column(out_dir, "reward_margin"), column(out_dir, "accuracy")
    assert sum(margins[-3:]) / 3 > 0.5 and sum(accuracies[-3:]) / 3 >= 0.75, (margins, accuracies)
    assert sum(column(out_dir, "loss")[-3:]) / 3 < 0.8 * math.log(2)
    assert "reward margin" in capsys.readouterr().err

    # final/ is what finetune/lora.py writes: generate/base.py, eval/tasks.py and merge_lora.py read it as is
    lora_config, adapter = load_lora_run(out_dir / "final")
    hparams = yaml.safe_load((out_dir / "final" / "hparams.yaml").read_text())
    assert hparams["checkpoint_dir"] == str(tiny_dir) and hparams["loss"] == "sigmoid" and lora_config.mlp
    merge_lora.merge(checkpoint_dir=out_dir, out_dir=tmp_path / "merged")
    merged = GPT.from_checkpoint(tmp_path / "merged")
    policy = GPT.from_checkpoint(tiny_dir)
    inject_lora(policy, lora_config)
    load_lora_state_dict(policy, adapter)
    batch = collate_pairs(load_pairs(data_dir / "test.pt"))
    with torch.no_grad():
        expected, _ = sequence_logps(policy.eval(), batch["input_ids"], batch["labels"])
        got, _ = sequence_logps(merged, batch["input_ids"], batch["labels"])
    assert torch.allclose(got, expected, atol=1e-3)


def test_precomputed_reference_gives_the_live_reference_loss(tiny_dir, data_dir, tmp_path, capsys):
    data = fresh_data(data_dir, tmp_path)
    flags = dict(max_steps=3, learning_rate=1e-2, eval_interval=3)
    align(tiny_dir, data, tmp_path / "live", **flags)
    align(tiny_dir, data, tmp_path / "cached", precompute_ref=True, **flags)
    first = capsys.readouterr().err
    assert "Computing the reference log-probs of 8 pairs" in first
    assert len(list((data / "reference").glob("*.pt"))) == 2  # train and test
    for key in ("loss", "reward_chosen", "reward_rejected", "val_loss", "val_reward_margin"):
        assert column(tmp_path / "cached", key) == pytest.approx(column(tmp_path / "live", key), rel=1e-4, abs=1e-6), key
    # a second run reuses the cache without computing anything, and matches the first
    align(tiny_dir, data, tmp_path / "reused", precompute_ref=True, **flags)
    second = capsys.readouterr().err
    assert "Using the reference log-probs cached" in second and "Computing" not in second
    assert column(tmp_path / "reused", "loss") == column(tmp_path / "cached", "loss")
    # another max_seq_length cuts other tokens: another cache entry, not a stale one
    align(tiny_dir, data, tmp_path / "shorter", precompute_ref=True, max_seq_length=60, **flags)
    assert "Computing the reference log-probs" in capsys.readouterr().err


def test_killed_run_resumes_to_the_same_adapter(tiny_dir, data_dir, tmp_path):
    flags = dict(max_steps=4, learning_rate=1e-2, save_interval=2)
    align(tiny_dir, data_dir, tmp_path / "whole", **flags)
    # the run killed after its step-2 checkpoint: what it wrote later is gone
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "whole", killed)
    shutil.rmtree(killed / "step-000004")
    shutil.rmtree(killed / "final")
    align(tiny_dir, data_dir, killed, resume=True, **flags)
    whole, resumed = load_file(tmp_path / "whole" / "final" / LORA_WEIGHTS), load_file(killed / "final" / LORA_WEIGHTS)
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert column(killed, "loss") == column(tmp_path / "whole", "loss")


def test_full_dpo_starts_at_log2_and_writes_a_checkpoint(tiny_dir, data_dir, tmp_path):
    out_dir = tmp_path / "full"
    align(tiny_dir, data_dir, out_dir, method="full", max_steps=2, learning_rate=1e-3)
    # the frozen copy equals the policy at step 0
    assert column(out_dir, "val_loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    aligned, base = GPT.from_checkpoint(out_dir / "final"), GPT.from_checkpoint(tiny_dir)
    assert (out_dir / "final" / "tokenizer.json").is_file()
    changed = [not torch.equal(p, q) for p, q in zip(aligned.state_dict().values(), base.state_dict().values())]
    assert all(changed), "every weight trains"


def test_qlora_reference_is_the_quantized_base(tiny_dir, data_dir, tmp_path):
    out_dir = tmp_path / "qlora"
    align(tiny_dir, data_dir, out_dir, method="qlora", max_steps=1, learning_rate=1e-2)
    # adapters off on the 4-bit base is exactly the starting policy: loss log 2 at step 0
    assert column(out_dir, "val_loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert yaml.safe_load((out_dir / "final" / "hparams.yaml").read_text())["quantize"] == "bnb.nf4"


def test_orpo_loss_is_nll_plus_beta_odds_ratio(tiny_dir, data_dir, tmp_path):
    out_dir = tmp_path / "orpo"
    align(tiny_dir, data_dir, out_dir, loss="orpo", beta=0.5, max_steps=1, eval_iters=1)
    base = GPT.from_checkpoint(tiny_dir)
    # the run cuts the pairs to the tiny model's context, as it does every sequence
    batch = collate_pairs(load_pairs(data_dir / "test.pt")[:2], max_seq_length=base.config.block_size)
    with torch.no_grad():
        logps, tokens = sequence_logps(base, batch["input_ids"], batch["labels"])
    nll = -logps[:2].sum() / tokens[:2].sum()
    odds_ratio = orpo_odds_ratio_loss(logps[:2] / tokens[:2], logps[2:] / tokens[2:]).mean()
    # validation runs one micro-batch of 2 pairs here, so its loss is exactly that batch's
    assert column(out_dir, "val_loss")[0] == pytest.approx((nll + 0.5 * odds_ratio).item(), rel=1e-5)


def cli_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(dpo.setup, args)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_bad_input_is_one_error_line(tiny_dir, data_dir, tmp_path, capsys):
    base = ["--checkpoint_dir", str(tiny_dir), "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "x")]
    assert "--label_smoothing applies to --loss sigmoid and robust" in cli_error(
        capsys, base + ["--loss", "hinge", "--label_smoothing", "0.1"])
    assert "use --method qlora" in cli_error(capsys, base + ["--method", "full", "--quantize", "bnb.nf4"])
    assert "orpo uses no reference" in cli_error(capsys, base + ["--loss", "orpo", "--precompute_ref", "true"])
    assert "too few for one optimizer step" in cli_error(capsys, base + ["--global_batch_size", "64"])
    # SFT data in place of pairs: the error says which script makes pairs
    sft = tmp_path / "sft"
    sft.mkdir()
    torch.save([{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, 2]), "prompt": "a",
                 "response": "b"}], sft / "train.pt")
    shutil.copy(sft / "train.pt", sft / "test.pt")
    error = cli_error(capsys, ["--checkpoint_dir", str(tiny_dir), "--data_dir", str(sft), "--out_dir", str(tmp_path / "y")])
    assert "train.pt: pair 0 lacks the key(s)" in error and "prepare_preferences.py" in error
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
