import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, load_script
from hf_models import save_tiny_model

from model import GPT

download = load_script("scripts/download.py")


def test_files_to_download_prefers_safetensors_and_skips_duplicates():
    files = ["config.json", "consolidated.safetensors", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "original/consolidated.00.pth", "tokenizer.json", "tokenizer_config.json", "README.md"]
    assert download.files_to_download(files) == [
        "config.json", "tokenizer.json", "tokenizer_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert download.files_to_download(["config.json", "pytorch_model.bin", "tokenizer.model"]) == [
        "config.json", "tokenizer.model", "pytorch_model.bin"]
    with pytest.raises(ValueError, match="no safetensors"):
        download.files_to_download(["config.json", "README.md"])


def test_download_fetches_only_the_needed_files_and_converts(tmp_path, monkeypatch):
    import huggingface_hub

    hub_repo = tmp_path / "hub"
    save_tiny_model("llama2", hub_repo)
    (hub_repo / "consolidated.safetensors").write_bytes(b"not needed")
    requested = {}

    def fake_snapshot_download(repo_id, local_dir, allow_patterns, token):
        requested.update(repo_id=repo_id, files=allow_patterns, token=token)
        os.makedirs(local_dir, exist_ok=True)
        for name in allow_patterns:
            shutil.copy(hub_repo / name, local_dir / name)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: sorted(os.listdir(hub_repo)))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    download.download("my-org/tiny-llama", checkpoint_dir=tmp_path / "checkpoints")
    assert requested == {"repo_id": "my-org/tiny-llama", "files": ["config.json", "generation_config.json", "model.safetensors"],
                         "token": "hf_secret"}
    GPT.from_checkpoint(tmp_path / "checkpoints" / "my-org" / "tiny-llama")
    # the same conversion as scripts/convert_hf_checkpoint.py, prompt style included
    assert (tmp_path / "checkpoints" / "my-org" / "tiny-llama" / "prompt_style.yaml").is_file()


def test_gated_repo_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(self, repo_id):
        error = GatedRepoError.__new__(GatedRepoError)  # as raised by the Hub for a licence not yet accepted
        Exception.__init__(error, "403 gated")
        raise error

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", gated)
    with pytest.raises(ValueError, match="is gated. Accept its licence"):
        download.download("meta-llama/Llama-3.2-1B", checkpoint_dir=tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--repo_id", "HuggingFaceTB/SmolLM2-135M"], "Could not reach the Hugging Face Hub"),
    (["--repo_id", "SmolLM2"], "ORG/NAME"),
])
def test_download_errors_exit_non_zero(args, message, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(ROOT / "scripts/download.py"), *args, "--checkpoint_dir", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_list_names_every_config():
    result = subprocess.run([sys.executable, str(ROOT / "scripts/download.py"), "--repo_id", "list"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "meta-llama/Llama-3.1-8B-Instruct" in result.stdout and "tiiuae/falcon-180B" in result.stdout
