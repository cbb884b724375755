"""model.weights.load: one loader for a checkpoint or any fine-tuning run, told apart by its files."""

import shutil

import pytest
import torch

from model.gpt import GPT
from model.lora import LORA_WEIGHTS
from model.weights.load import RUN_KINDS, detect, load_any

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_lora_run_loads_like_its_merge(tiny_smollm2_dir, tiny_lora_run):
    from model.lora import merge_lora

    loaded = load_any(tiny_lora_run)
    run_model = loaded.model
    assert loaded.checkpoint_dir == tiny_smollm2_dir and loaded.run_dir == tiny_lora_run / "final"
    assert loaded.kind == "LoRA/DoRA run" and loaded.hparams["lora_r"] == 4
    merged = merge_lora(load_any(tiny_lora_run / "final").model)
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        assert torch.allclose(run_model(ids), merged(ids), atol=1e-4)
        assert not torch.allclose(run_model(ids), GPT.from_checkpoint(tiny_smollm2_dir)(ids), atol=1e-2)


def test_detect_tells_checkpoints_and_runs_apart(tiny_smollm2_dir, tiny_lora_run, tmp_path):
    assert detect(tiny_smollm2_dir) == (None, tiny_smollm2_dir)
    for path in (tiny_lora_run, tiny_lora_run / "final"):
        kind, directory = detect(path)
        assert kind.weights == LORA_WEIGHTS and directory == tiny_lora_run / "final"
    # a full fine-tune's out_dir: its final/ is a checkpoint
    (tmp_path / "full").mkdir()
    shutil.copytree(tiny_smollm2_dir, tmp_path / "full" / "final")
    assert detect(tmp_path / "full") == (None, tmp_path / "full" / "final")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        detect(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect(tmp_path / "missing")
    (tmp_path / "step-000010").mkdir()
    (tmp_path / "step-000010" / "training_state.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="training state for --resume only"):
        detect(tmp_path / "step-000010")


def test_every_run_kind_is_detected_by_its_weights_file(tmp_path):
    for kind in RUN_KINDS:
        run_dir = tmp_path / kind.weights / "final"
        run_dir.mkdir(parents=True)
        (run_dir / kind.weights).write_bytes(b"")
        assert detect(run_dir.parent) == (kind, run_dir)
