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

from model import GPT, Config
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
    result = run_script("scripts/convert_to_hf.py", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == type(hf_model).__name__
    with torch.no_grad():
        round_trip = exported(idx).logits
    assert (round_trip - actual).abs().max() <= 1e-4


def test_sliding_window_really_limits_attention(tmp_path):
    """Changing a token outside the window must not change the last position's logits (and must inside it)."""
    config = Config(name="sw", vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, intermediate_size=32, sliding_window=4,
                    hf_architecture="MistralForCausalLM", block_size=64)
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, VOCAB, (1, 12))
    far, near = idx.clone(), idx.clone()
    far[0, 7] = (far[0, 7] + 1) % VOCAB  # 4 positions before the last: outside a window of 4
    near[0, 8] = (near[0, 8] + 1) % VOCAB
    with torch.no_grad():
        base, out_far, out_near = model(idx)[0, -1], model(far)[0, -1], model(near)[0, -1]
    assert torch.equal(base, out_far)
    assert not torch.allclose(base, out_near)


def test_convert_cli_with_table_name_and_dtype(tmp_path):
    checkpoint_dir = tmp_path / "org" / "tiny"
    save_tiny_model("smollm2", checkpoint_dir)
    result = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(checkpoint_dir), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    model = GPT.from_checkpoint(checkpoint_dir)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (checkpoint_dir / "prompt_style.yaml").is_file()


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


def test_named_configs():
    assert Config.from_name("meta-llama/Llama-3.2-1B") == Config.from_name("Llama-3.2-1B")
    mistral = Config.from_name("Mistral-7B-v0.1")
    assert mistral.sliding_window == 4096 and mistral.n_query_groups == 8
    assert Config.from_name("Mistral-7B-Instruct-v0.2").sliding_window is None
    assert Config.from_name("Llama-3.1-8B-Instruct").rope_scaling["type"] == "llama3"
    falcon = Config.from_name("falcon-7b")
    assert falcon.n_query_groups == 1 and falcon.parallel_residual and falcon.shared_attention_norm
    assert Config.from_name("Mixtral-8x7B-Instruct-v0.1").n_expert == 8
    with pytest.raises(ValueError, match="Unknown model name"):
        Config.from_name("Llama-9-1T")


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


@pytest.mark.parametrize("name", ["Llama-2-70b-chat-hf", "Llama-3.2-1B", "Mistral-7B-v0.1", "Mixtral-8x7B-v0.1", "phi-2",
                                  "Phi-3-mini-128k-instruct", "falcon-7b", "falcon-40b", "SmolLM2-135M"])
def test_named_config_survives_the_hf_config_round_trip(name):
    from model.weights.convert import hf_config_dict

    config = Config.from_name(name)
    derived = Config.from_hf_config(hf_config_dict(config), name=config.name)
    derived.hf_repo = config.hf_repo
    assert derived == config


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
