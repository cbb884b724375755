"""Every family we list, built by transformers with random weights, converted by our scripts, gives transformers'
logits; and the export back to transformers gives ours."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from hf_models import VOCAB, hf_configs, save_tiny_model

from model import GPT
from model.weights.convert import convert_hf_checkpoint

ROOT = Path(__file__).parent.parent


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("family", list(hf_configs()))
def test_logits_match_transformers_and_round_trip(family, tmp_path):
    checkpoint_dir = tmp_path / "org" / f"tiny-{family}"
    hf_model, seq_len = save_tiny_model(family, checkpoint_dir)
    convert_hf_checkpoint(checkpoint_dir)
    assert (checkpoint_dir / "model_config.yaml").is_file() and (checkpoint_dir / "lit_model.safetensors").is_file()

    ours = GPT.from_checkpoint(checkpoint_dir, dtype=torch.float32)
    assert not ours.training
    idx = torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(idx).logits
        actual = ours(idx)
    assert actual.shape == (2, seq_len, VOCAB)
    assert (actual - expected).abs().max() <= 1e-4

    out = tmp_path / "hf"
    result = run_script("scripts/convert_to_hf.py", "--checkpoint_dir", str(checkpoint_dir), "--out_dir", str(out))
    assert result.returncode == 0, result.stderr
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == type(hf_model).__name__
    with torch.no_grad():
        round_trip = exported(idx).logits
    assert (round_trip - actual).abs().max() <= 1e-4


def test_convert_cli_with_table_name_and_dtype(tmp_path):
    checkpoint_dir = tmp_path / "org" / "tiny"
    save_tiny_model("smollm2", checkpoint_dir)
    result = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(checkpoint_dir), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    model = GPT.from_checkpoint(checkpoint_dir)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (checkpoint_dir / "prompt_style.yaml").is_file()


def test_one_conversion_writes_the_prompt_style_by_template_then_name(tmp_path):
    """The library's convert_hf_checkpoint (which download.py and convert_hf_checkpoint.py both call) chooses the
    prompt style from the chat template, else from the model's name, and keeps a prompt_style.yaml already there."""
    from model.prompts import load_prompt_style

    by_name = tmp_path / "org" / "smollm2-tiny-instruct"
    save_tiny_model("smollm2", by_name)
    convert_hf_checkpoint(by_name)
    assert load_prompt_style(by_name).name == "chatml"

    by_template = tmp_path / "org" / "tiny-templated"
    save_tiny_model("llama2", by_template)
    config = json.loads((by_template / "tokenizer_config.json").read_text()) \
        if (by_template / "tokenizer_config.json").is_file() else {}
    config["chat_template"] = "{% for m in messages %}<|start_header_id|>{{ m['content'] }}{% endfor %}"
    (by_template / "tokenizer_config.json").write_text(json.dumps(config))
    convert_hf_checkpoint(by_template)
    assert load_prompt_style(by_template).name == "llama3"

    kept = tmp_path / "org" / "tiny-kept"
    save_tiny_model("llama2", kept)
    (kept / "prompt_style.yaml").write_text("name: alpaca\n")
    convert_hf_checkpoint(kept)
    assert (kept / "prompt_style.yaml").read_text() == "name: alpaca\n"


def test_sharded_output_loads_the_same(tmp_path):
    from model.weights.checkpoint import LIT_INDEX, save_sharded
    from model.weights.convert import HFWeights, hf_to_lit

    checkpoint_dir = tmp_path / "org" / "tiny-sharded"
    save_tiny_model("llama2", checkpoint_dir)
    config = convert_hf_checkpoint(checkpoint_dir)
    single = GPT.from_checkpoint(checkpoint_dir).state_dict()
    (checkpoint_dir / "lit_model.safetensors").unlink()
    save_sharded(hf_to_lit(config, HFWeights(checkpoint_dir)), checkpoint_dir, shard_size_bytes=50_000)
    index = json.loads((checkpoint_dir / LIT_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    sharded = GPT.from_checkpoint(checkpoint_dir).state_dict()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_pytorch_bin_checkpoints_convert(tmp_path):
    checkpoint_dir = tmp_path / "org" / "tiny-bin"
    hf_model, _ = save_tiny_model("llama2", checkpoint_dir)
    (checkpoint_dir / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), checkpoint_dir / "pytorch_model.bin")
    convert_hf_checkpoint(checkpoint_dir)
    idx = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert (GPT.from_checkpoint(checkpoint_dir)(idx) - hf_model(idx).logits).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, [], "does not exist"),
        ("empty", [], "config.json"),
        ("no_weights", [], "No Hugging Face weights"),
        ("corrupt", [], "corrupt"),
        ("wrong_arch", [], "Unsupported architecture"),
        ("ok", ["--dtype", "float8"], "float8"),
        ("ok", ["--model_name", "Llama-9-1T"], "Unknown model name"),
        ("mismatch", ["--model_name", "Llama-2-7b-hf"], "does not match"),
    ],
)
def test_convert_bad_input(tmp_path, setup, args, message):
    checkpoint_dir = tmp_path / "org" / "tiny-bad"
    if setup is not None:
        checkpoint_dir.mkdir(parents=True)
    if setup in ("no_weights", "corrupt", "wrong_arch", "ok", "mismatch"):
        save_tiny_model("llama2", checkpoint_dir)
    if setup == "no_weights":
        (checkpoint_dir / "model.safetensors").unlink()
    if setup == "corrupt":
        (checkpoint_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    if setup == "wrong_arch":
        cfg = json.loads((checkpoint_dir / "config.json").read_text())
        cfg["architectures"] = ["GPT2LMHeadModel"]
        (checkpoint_dir / "config.json").write_text(json.dumps(cfg))
    before = sorted(p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir.exists() else []
    result = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(checkpoint_dir), *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    after = sorted(p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir.exists() else []
    assert after == before, "a failed conversion must not leave files behind"


def test_load_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_hf_checkpoint.py"):
        GPT.from_checkpoint(tmp_path)
    checkpoint_dir = tmp_path / "org" / "tiny"
    save_tiny_model("llama2", checkpoint_dir)
    convert_hf_checkpoint(checkpoint_dir)
    (checkpoint_dir / "lit_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        GPT.from_checkpoint(checkpoint_dir)


def test_convert_to_hf_takes_a_full_fine_tunes_out_dir_and_refuses_an_adapter_run(tmp_path, capsys):
    import shutil

    from conftest import cli_error, load_script

    convert_to_hf = load_script("scripts/convert_to_hf.py").convert_to_hf
    checkpoint_dir = tmp_path / "org" / "tiny"
    save_tiny_model("llama2", checkpoint_dir)
    convert_hf_checkpoint(checkpoint_dir)
    shutil.copytree(checkpoint_dir, tmp_path / "full" / "final")
    convert_to_hf(tmp_path / "full", tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()

    (tmp_path / "lora" / "final").mkdir(parents=True)
    (tmp_path / "lora" / "final" / "lora.safetensors").write_bytes(b"")
    error = cli_error(capsys, convert_to_hf, ["--checkpoint_dir", str(tmp_path / "lora"), "--out_dir",
                                              str(tmp_path / "hf2")])
    assert "is a LoRA/DoRA run, not a checkpoint" in error and "merge_lora.py" in error
    assert not (tmp_path / "hf2").exists()


def test_the_config_comes_from_the_files_not_the_folder_name(tmp_path, capsys):
    # a tiny Llama saved under the name of a model in the table: config.json decides, with a note
    checkpoint_dir = tmp_path / "HuggingFaceTB" / "SmolLM2-135M"
    save_tiny_model("llama2", checkpoint_dir)
    config = convert_hf_checkpoint(checkpoint_dir)
    assert "is named like SmolLM2-135M, but" in capsys.readouterr().out
    hf = json.loads((checkpoint_dir / "config.json").read_text())
    assert (config.n_layer, config.n_embd) == (hf["num_hidden_layers"], hf["hidden_size"])
    GPT.from_checkpoint(checkpoint_dir)


def test_a_config_json_that_does_not_fit_the_tensors_is_one_error_and_writes_nothing(tmp_path):
    checkpoint_dir = tmp_path / "org" / "tiny-edited"
    save_tiny_model("llama2", checkpoint_dir)
    hf = json.loads((checkpoint_dir / "config.json").read_text())
    (checkpoint_dir / "config.json").write_text(json.dumps({**hf, "intermediate_size": hf["intermediate_size"] * 2}))
    before = sorted(p.name for p in checkpoint_dir.iterdir())
    result = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(checkpoint_dir))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: The weights in {checkpoint_dir} do not fit the 'tiny-edited' config:")
    assert "the config expects" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == before


def test_a_killed_conversions_temporary_shards_are_removed_by_the_rerun(tmp_path):
    checkpoint_dir = tmp_path / "org" / "tiny"
    save_tiny_model("llama2", checkpoint_dir)
    stale = checkpoint_dir / ".convert-k1ll3d"  # what a SIGKILL mid-conversion leaves: no lit_model.safetensors yet
    stale.mkdir()
    (stale / "shard-0").write_bytes(b"half a shard")
    convert_hf_checkpoint(checkpoint_dir)
    assert not [p.name for p in checkpoint_dir.iterdir() if p.name.startswith(".")]
    GPT.from_checkpoint(checkpoint_dir)
