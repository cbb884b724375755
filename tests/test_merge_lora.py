"""scripts/merge_lora.py writes its checkpoint all at once: a kill mid-write leaves no checkpoint anyone would trust,
and the next merge removes what the killed one left."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_script
from hf_models import save_tiny_model

from model.config import Config
from model.files import atomic_save_safetensors
from model.gpt import GPT
from model.lora import LORA_WEIGHTS, LoRAConfig, inject_lora, lora_state_dict
from model.training.run import save_hparams
from model.weights import checkpoint
from model.weights.checkpoint import load_state_dict
from model.weights.convert import convert_hf_checkpoint

merge_lora = load_script("scripts/merge_lora.py")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A tiny base checkpoint and a LoRA run on it with non-zero adapter weights (as a trained run leaves them)."""
    base = tmp_path_factory.mktemp("base") / "org" / "tiny"
    save_tiny_model("llama2", base)
    convert_hf_checkpoint(base)
    lora_config = LoRAConfig(r=2, alpha=4, query=True, value=True)
    model = GPT(Config.from_checkpoint(base))
    inject_lora(model, lora_config)
    torch.manual_seed(0)
    adapter = {name: torch.randn_like(t) for name, t in lora_state_dict(model).items()}
    run = tmp_path_factory.mktemp("run")
    (run / "final").mkdir()
    atomic_save_safetensors(adapter, run / "final" / LORA_WEIGHTS)
    save_hparams(run / "final", {"checkpoint_dir": str(base), **lora_config.to_hparams()})
    return run


def test_a_kill_mid_merge_leaves_no_checkpoint_and_the_rerun_cleans_up(lora_run, tmp_path, monkeypatch):
    out_dir = tmp_path / "merged"
    real_save = checkpoint.save_sharded

    def killed_after_the_weights(tensors, directory):
        real_save(tensors, directory)
        raise KeyboardInterrupt  # killed before model_config.yaml and the tokenizer are written

    monkeypatch.setattr(checkpoint, "save_sharded", killed_after_the_weights)
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # SIGKILL: no cleanup runs
    with pytest.raises(KeyboardInterrupt):
        merge_lora.merge(checkpoint_dir=lora_run, out_dir=out_dir)
    monkeypatch.undo()
    # no checkpoint at out_dir, only a hidden temporary directory that no script reads as a checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.tmp"]
    merge_lora.merge(checkpoint_dir=lora_run, out_dir=out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # the rerun removed it
    assert {"lit_model.safetensors", "model_config.yaml"} <= {p.name for p in out_dir.iterdir()}
    base = Path((lora_run / "final" / "hparams.yaml").read_text().split("checkpoint_dir: ")[1].split("\n")[0])
    merged, original = load_state_dict(out_dir), load_state_dict(base)
    assert merged.keys() == original.keys()
    assert not torch.equal(merged["transformer.h.0.attn.qkv.weight"], original["transformer.h.0.attn.qkv.weight"])
