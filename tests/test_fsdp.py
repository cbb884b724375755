"""`--strategy fsdp` (FSDP2 through Fabric's ModelParallelStrategy, model/training/fsdp.py) run for real on two gloo
CPU processes: the run equals one process training on the same global batch, frozen weights never get a gradient,
the adapter is saved with its true shapes and loads like any run, a run killed after a checkpoint resumes (also on
another number of processes) to the adapter of the uninterrupted run, and bad input is one `error:` line.

The model is the tiny random SmolLM2 of test_finetune_lora.py (2 layers, n_embd 48) with the real tokenizer; the
multi-process runs go through tests/ddp_lora_run.py, which records what each rank did.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_script
from hf_models import save_tiny_model
from safetensors.torch import load_file

from model.cli import run_cli
from model.data.sft import load_dataset, save_dataset
from model.lora import LORA_WEIGHTS
from model.weights.convert import convert_hf_checkpoint
from model.weights.load import load_any

lora = load_script("finetune/lora.py")

SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
# validate only at the first and the last step; no dropout, so that two processes can equal one
QUIET = {"eval_interval": 1000, "eval_iters": 1, "lora_dropout": 0.0}

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
    """16 training samples: micro-batches of 2 make 8, 4 per rank on two processes."""
    prepared, data_dir = tmp_path_factory.mktemp("tasks"), tmp_path_factory.mktemp("tasks16")
    load_script("scripts/prepare_tasks.py").prepare_tasks(
        checkpoint_dir=tiny_dir, out_dir=prepared, num_train=16, num_test=4)
    save_dataset(load_dataset(prepared / "train.pt"), data_dir / "train.pt")
    save_dataset(load_dataset(prepared / "test.pt"), data_dir / "test.pt")
    return data_dir


def as_cli(**flags) -> list[str]:
    return [arg for key, value in flags.items()
            for arg in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))]


def losses(out_dir: Path) -> list[float]:
    with open(out_dir / "metrics.csv", newline="") as fp:
        return [float(row["loss"]) for row in csv.DictReader(fp) if row["loss"]]


def run_lora(tiny_dir, data_dir, out_dir, record_dir, devices, strategy, **flags) -> subprocess.CompletedProcess:
    record_dir.mkdir(exist_ok=True)
    args = as_cli(checkpoint_dir=tiny_dir, data_dir=data_dir, out_dir=out_dir, devices=devices, strategy=strategy,
                  **{**QUIET, **flags})
    return subprocess.run([sys.executable, str(ROOT / "tests/ddp_lora_run.py"), str(record_dir), *args], cwd=ROOT,
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)


LORA_FLAGS = dict(global_batch_size=4, micro_batch_size=2, learning_rate=1e-2, lora_mlp=True, lora_head=True,
                  max_steps=4, save_interval=2)


@pytest.fixture(scope="module")
def one_process_run(tiny_dir, data_dir, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("one") / "run"
    lora.setup(checkpoint_dir=tiny_dir, data_dir=data_dir, out_dir=out_dir, **{**QUIET, **LORA_FLAGS})
    return out_dir


@pytest.fixture(scope="module")
def fsdp_run(tiny_dir, data_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    result = run_lora(tiny_dir, data_dir, root / "run", root / "ranks", 2, "fsdp", **LORA_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", root / "ranks"


def test_fsdp_lora_on_two_processes_equals_one_process(one_process_run, fsdp_run):
    out_dir, record_dir = fsdp_run
    # the same global batch of 4: one process accumulates 2 micro-batches of 2, two processes 1 each
    assert losses(out_dir) == pytest.approx(losses(one_process_run), abs=1e-5)
    expected, final = load_file(one_process_run / "final" / LORA_WEIGHTS), load_file(out_dir / "final" / LORA_WEIGHTS)
    assert final.keys() == expected.keys()
    for key in expected:
        assert final[key].shape == expected[key].shape, key  # the true shapes, not one rank's shard
        torch.testing.assert_close(final[key], expected[key], atol=1e-5, rtol=1e-4)
    assert all(final[key].abs().max() > 0 for key in final if key.endswith(".B")), "the adapter trained"
    # every rank's gathered adapter is the one saved
    for rank in (0, 1):
        adapter = load_file(record_dir / f"rank{rank}.safetensors")
        assert all(torch.equal(adapter[key], final[key]) for key in final), f"rank {rank} differs"


def test_fsdp_frozen_weights_get_no_gradient_on_any_rank(fsdp_run):
    _, record_dir = fsdp_run
    for rank in (0, 1):
        record = json.loads((record_dir / f"rank{rank}.json").read_text())
        assert record["world_size"] == 2 and record["frozen"] > 0
        assert record["frozen_with_grad"] == [], f"rank {rank}"
        assert record["trainable_without_grad"] == [], f"rank {rank}"
        assert len(record["trained_on"]) == 8  # 4 steps x 1 micro-batch of 2: half the global batch


def test_fsdp_checkpoints_are_sharded_and_the_adapter_loads_like_any_run(one_process_run, fsdp_run):
    out_dir, _ = fsdp_run
    for step in ("step-000002", "step-000004"):
        state = out_dir / step / "training_state.pt"
        assert state.is_dir(), "a distributed checkpoint: one shard file per rank, no rank-0 gather"
        assert sorted(p.name for p in state.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
        assert (out_dir / step / LORA_WEIGHTS).is_file()
    loaded, expected = load_any(out_dir / "final"), load_any(one_process_run / "final")
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx), expected.model(idx), atol=1e-4, rtol=1e-4)


def test_fsdp_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_adapter(tiny_dir, data_dir, fsdp_run,
                                                                                  tmp_path):
    out_dir, record_dir = tmp_path / "run", tmp_path / "ranks"
    args = as_cli(checkpoint_dir=tiny_dir, data_dir=data_dir, out_dir=out_dir, devices=2, strategy="fsdp",
                  **{**QUIET, **LORA_FLAGS})
    record_dir.mkdir()
    # a new process group, so the kill reaches both ranks (Fabric starts rank 1 as a child of rank 0)
    process = subprocess.Popen([sys.executable, str(ROOT / "tests/ddp_lora_run.py"), str(record_dir), *args],
                               cwd=ROOT, env=SUBPROCESS_ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in process.stderr:
        if "Saved a checkpoint to" in line and "step-000002" in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out_dir / "final").exists()

    result = run_lora(tiny_dir, data_dir, out_dir, record_dir, 2, "fsdp", resume="auto", **LORA_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr and "step-000002" in result.stderr
    resumed, uninterrupted = load_file(out_dir / "final" / LORA_WEIGHTS), load_file(fsdp_run[0] / "final" / LORA_WEIGHTS)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)
    assert losses(out_dir) == losses(fsdp_run[0])


def test_fsdp_resumes_a_two_process_checkpoint_on_one_process(tiny_dir, data_dir, fsdp_run, tmp_path):
    """DCP reshards on load: the step-2 shards of two ranks continue on one FSDP process to the same adapter."""
    out_dir = tmp_path / "run"
    shutil.copytree(fsdp_run[0] / "step-000002", out_dir / "step-000002")
    for name in ("metrics.csv", "hparams.yaml"):
        shutil.copy(fsdp_run[0] / name, out_dir / name)
    result = run_lora(tiny_dir, data_dir, out_dir, tmp_path / "ranks", 1, "fsdp", resume="auto", **LORA_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, uninterrupted = load_file(out_dir / "final" / LORA_WEIGHTS), load_file(fsdp_run[0] / "final" / LORA_WEIGHTS)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=1e-5)
    assert losses(out_dir) == pytest.approx(losses(fsdp_run[0]), abs=1e-6)


def test_fsdp_full_finetuning_equals_one_process_and_saves_a_plain_checkpoint(tiny_dir, data_dir, tmp_path):
    flags = dict(checkpoint_dir=tiny_dir, data_dir=data_dir, global_batch_size=4, micro_batch_size=2,
                 learning_rate=1e-3, max_steps=2, save_interval=1, eval_interval=1000, eval_iters=1)
    full = load_script("finetune/full.py")
    full.setup(out_dir=tmp_path / "one", **flags)
    result = subprocess.run([sys.executable, str(ROOT / "finetune/full.py"),
                             *as_cli(out_dir=tmp_path / "fsdp", devices=2, strategy="fsdp", **flags)],
                            cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    # the resumable state is sharded; final/ is a plain checkpoint directory with the true shapes
    assert sorted(p.name for p in (tmp_path / "fsdp" / "step-000001" / "training_state.pt").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    expected, saved = (load_file(tmp_path / run / "final" / "lit_model.safetensors") for run in ("one", "fsdp"))
    assert saved.keys() == expected.keys()
    for key in expected:
        assert saved[key].shape == expected[key].shape, key
        torch.testing.assert_close(saved[key], expected[key], atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(saved[key], value) for key, value in load_file(tiny_dir / "lit_model.safetensors").items()
               if key in saved), "the weights trained"
    loaded = load_any(tmp_path / "fsdp" / "final")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(torch.tensor([[1, 2, 3]])),
                                   load_any(tmp_path / "one" / "final").model(torch.tensor([[1, 2, 3]])),
                                   atol=1e-4, rtol=1e-4)


def test_fsdp_dpo_lora_equals_one_process(tiny_dir, tmp_path):
    """DPO's reference under FSDP is the sharded policy with its adapters off: no second model, no gather."""
    data_dir = tmp_path / "pref"
    load_script("scripts/prepare_preferences.py").prepare_preferences(
        checkpoint_dir=tiny_dir, out_dir=data_dir, num_train=8, num_test=4, max_seq_length=96,
        tasks="count_words,uppercase")
    flags = dict(checkpoint_dir=tiny_dir, data_dir=data_dir, global_batch_size=4, micro_batch_size=2,
                 learning_rate=1e-2, max_steps=2, save_interval=2, eval_interval=1000, eval_iters=1, lora_dropout=0.0)
    load_script("finetune/dpo.py").setup(out_dir=tmp_path / "one", **flags)
    result = subprocess.run([sys.executable, str(ROOT / "finetune/dpo.py"),
                             *as_cli(out_dir=tmp_path / "fsdp", devices=2, strategy="fsdp", **flags)],
                            cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    expected, saved = (load_file(tmp_path / run / "final" / LORA_WEIGHTS) for run in ("one", "fsdp"))
    assert saved.keys() == expected.keys()
    for key in expected:
        assert saved[key].shape == expected[key].shape, key
        torch.testing.assert_close(saved[key], expected[key], atol=1e-5, rtol=1e-4)
    assert (tmp_path / "fsdp" / "step-000002" / "training_state.pt").is_dir()


def spawn(script: str, **flags) -> subprocess.CompletedProcess:
    """`script` run as its own process (Fabric then starts the other ranks), with these flags."""
    result = subprocess.run([sys.executable, str(ROOT / script), *as_cli(**flags)], cwd=ROOT, env=SUBPROCESS_ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def killed_after(run_dir: Path, step: str, out_dir: Path) -> Path:
    """What a run killed after checkpoint `step` leaves behind: that checkpoint, metrics.csv, hparams.yaml and
    inputs.json."""
    shutil.copytree(run_dir / step, out_dir / step)
    for name in ("metrics.csv", "hparams.yaml", "inputs.json"):
        shutil.copy(run_dir / name, out_dir / name)
    return out_dir


def assert_same_tensors(saved: dict, expected: dict, atol: float, rtol: float) -> None:
    assert saved.keys() == expected.keys()
    for key in expected:
        assert saved[key].shape == expected[key].shape, key  # the true shapes, not one rank's shard
        torch.testing.assert_close(saved[key], expected[key], atol=atol, rtol=rtol)


@pytest.mark.parametrize("checkpointing", [
    dict(gradient_checkpointing="selective"), dict(gradient_checkpointing="block"),
    dict(gradient_checkpointing="offload"),
    dict(gradient_checkpointing="offload", checkpoint_layers=1, checkpoint_rest="selective")])
def test_fsdp_with_gradient_checkpointing_equals_fsdp_without(checkpointing, tiny_dir, data_dir, fsdp_run, tmp_path):
    """Each Block (or, `selective`, its norms and activations; or only the first Block, the other `selective`)
    recomputed in the backward pass (FSDP all-gathers its shards again for the recompute): the same losses and adapter
    as the run that kept its activations, in fp32."""
    result = run_lora(tiny_dir, data_dir, tmp_path / "run", tmp_path / "ranks", 2, "fsdp", **checkpointing,
                      **LORA_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "run") == pytest.approx(losses(fsdp_run[0]), abs=1e-6)
    assert_same_tensors(load_file(tmp_path / "run" / "final" / LORA_WEIGHTS),
                        load_file(fsdp_run[0] / "final" / LORA_WEIGHTS), atol=1e-6, rtol=1e-5)
    for rank in (0, 1):
        assert json.loads((tmp_path / "ranks" / f"rank{rank}.json").read_text())["frozen_with_grad"] == []


# LLaMA-Adapter V2 from the first block: prompts and gates, a scale and bias on every linear, the norms
ADAPTER_FLAGS = dict(global_batch_size=4, micro_batch_size=2, learning_rate=1e-2, adapter_version=2,
                     adapter_start_layer=0, adapter_prompt_length=4, max_steps=2, save_interval=1, eval_interval=1000,
                     eval_iters=1)


def test_fsdp_adapter_equals_one_process_saves_true_shapes_and_resumes(tiny_dir, data_dir, tmp_path):
    from model.adapter import ADAPTER_WEIGHTS

    flags = dict(checkpoint_dir=tiny_dir, data_dir=data_dir, **ADAPTER_FLAGS)
    load_script("finetune/adapter.py").setup(out_dir=tmp_path / "one", **flags)
    spawn("finetune/adapter.py", out_dir=tmp_path / "fsdp", devices=2, strategy="fsdp", **flags)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    expected, saved = (load_file(tmp_path / run / "final" / ADAPTER_WEIGHTS) for run in ("one", "fsdp"))
    assert_same_tensors(saved, expected, atol=1e-5, rtol=1e-4)
    assert any(key.endswith("adapter_prompt") for key in saved) and any(key.endswith("adapter_scale") for key in saved)
    assert all(saved[key].abs().max() > 0 for key in saved if key.endswith("adapter_gate")), "the gates trained"
    assert (tmp_path / "fsdp" / "step-000001" / "training_state.pt").is_dir()
    # the adapter loads like any run
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(load_any(tmp_path / "fsdp" / "final").model(idx),
                                   load_any(tmp_path / "one" / "final").model(idx), atol=1e-4, rtol=1e-4)

    resumed = killed_after(tmp_path / "fsdp", "step-000001", tmp_path / "resumed")
    result = spawn("finetune/adapter.py", out_dir=resumed, devices=2, strategy="fsdp", resume="auto", **flags)
    assert "Resumed from" in result.stderr
    assert_same_tensors(load_file(resumed / "final" / ADAPTER_WEIGHTS), saved, atol=0, rtol=0)
    assert losses(resumed) == losses(tmp_path / "fsdp")


@pytest.fixture(scope="module")
def classification_dir(tmp_path_factory, tiny_dir) -> Path:
    """24 training texts of two kinds of words, 8 test texts."""
    from model.data.records import write_records

    directory = tmp_path_factory.mktemp("classification")
    words = {"good": "great fine happy nice", "bad": "awful sad poor ugly"}
    rows = [{"text": " ".join(words[label].split()[(i + j) % 4] for j in range(3 + i % 3)), "label": label}
            for i in range(32) for label in [("good", "bad")[i % 2]]]
    write_records(rows, directory / "texts.csv")
    load_script("scripts/prepare_classification.py").prepare_classification(
        checkpoint_dir=tiny_dir, data_file=directory / "texts.csv", out_dir=directory / "prepared", test_fraction=0.25)
    return directory / "prepared"


def test_fsdp_classifier_equals_one_process_saves_true_shapes_and_resumes(tiny_dir, classification_dir, tmp_path):
    from model.workflows.classify import CLASSIFIER_WEIGHTS

    flags = dict(checkpoint_dir=tiny_dir, data_dir=classification_dir, mode="lora", lora_r=4, lora_dropout=0.0,
                 lora_mlp=True, micro_batch_size=2, global_batch_size=4, learning_rate=1e-2, head_learning_rate=1e-2,
                 max_steps=2, save_interval=1, eval_interval=1000, eval_iters=1, feature_batch_size=4)
    load_script("finetune/classify.py").setup(out_dir=tmp_path / "one", **flags)
    spawn("finetune/classify.py", out_dir=tmp_path / "fsdp", devices=2, strategy="fsdp", **flags)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    expected, saved = (load_file(tmp_path / run / "final" / CLASSIFIER_WEIGHTS) for run in ("one", "fsdp"))
    assert_same_tensors(saved, expected, atol=1e-5, rtol=1e-4)
    assert saved["score.weight"].abs().max() > 0, "the head trained"
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "fsdp")]
    assert results[0]["confusion_matrix"] == results[1]["confusion_matrix"]

    resumed = killed_after(tmp_path / "fsdp", "step-000001", tmp_path / "resumed")
    result = spawn("finetune/classify.py", out_dir=resumed, devices=2, strategy="fsdp", resume="auto", **flags)
    assert "Resumed from" in result.stderr
    assert_same_tensors(load_file(resumed / "final" / CLASSIFIER_WEIGHTS), saved, atol=0, rtol=0)


# QLoRA with torchao's NF4Tensor, the 4-bit format that FSDP2 shards (model/quantize.py, ao.nf4)
QLORA_FLAGS = dict(global_batch_size=4, micro_batch_size=2, learning_rate=1e-2, lora_mlp=True, max_steps=2,
                   save_interval=1, quantize="ao.nf4")


def test_fsdp_qlora_nf4_equals_one_process_saves_true_shapes_and_resumes(tiny_dir, data_dir, tmp_path):
    """Every rank quantizes each Block as one process does and keeps its 4-bit rows; the 2-process run equals the
    one-process QLoRA run with the same NF4 weights, frozen 4-bit weights get no gradient, and it resumes."""
    lora.setup(checkpoint_dir=tiny_dir, data_dir=data_dir, out_dir=tmp_path / "one", **{**QUIET, **QLORA_FLAGS})
    result = run_lora(tiny_dir, data_dir, tmp_path / "fsdp", tmp_path / "ranks", 2, "fsdp", **QLORA_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    saved = load_file(tmp_path / "fsdp" / "final" / LORA_WEIGHTS)
    assert_same_tensors(saved, load_file(tmp_path / "one" / "final" / LORA_WEIGHTS), atol=1e-5, rtol=1e-4)
    for rank in (0, 1):
        record = json.loads((tmp_path / "ranks" / f"rank{rank}.json").read_text())
        assert record["frozen_with_grad"] == [] and record["trainable_without_grad"] == [], f"rank {rank}"

    resumed = killed_after(tmp_path / "fsdp", "step-000001", tmp_path / "resumed")
    result = run_lora(tiny_dir, data_dir, resumed, tmp_path / "ranks", 2, "fsdp", resume="auto", **QLORA_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr
    assert_same_tensors(load_file(resumed / "final" / LORA_WEIGHTS), saved, atol=0, rtol=0)


def test_fsdp_qdora_nf4_equals_one_process(tiny_dir, data_dir, tmp_path):
    """QDoRA: the magnitudes start from the norms of the dequantized NF4 rows on every rank, as in one process."""
    flags = {**QLORA_FLAGS, "dora": True, "max_steps": 1}
    lora.setup(checkpoint_dir=tiny_dir, data_dir=data_dir, out_dir=tmp_path / "one", **{**QUIET, **flags})
    result = run_lora(tiny_dir, data_dir, tmp_path / "fsdp", tmp_path / "ranks", 2, "fsdp", **flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert_same_tensors(load_file(tmp_path / "fsdp" / "final" / LORA_WEIGHTS),
                        load_file(tmp_path / "one" / "final" / LORA_WEIGHTS), atol=1e-5, rtol=1e-4)


def cli_error(capsys, function, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(function, args)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("flags, message", [
    ({"devices": 4096, "strategy": "fsdp"}, r"--devices 4096 is more than this machine has: \d+ CPU core\(s\) and no GPU"),
    ({"strategy": "fsdp", "precision": "16-mixed"}, r"--precision 16-mixed needs a gradient scaler for sharded"),
    ({"strategy": "fsdp", "quantize": "bnb.nf4"}, r"--quantize bnb.nf4 cannot be combined with --strategy fsdp: FSDP2"),
    ({"script": "finetune/adapter.py", "strategy": "fsdp", "quantize": "bnb.nf4"},
     r"--quantize cannot be combined with --strategy fsdp in finetune/adapter.py"),
    ({"script": "finetune/classify.py", "strategy": "fsdp", "mode": "features"},
     r"--mode features extracts the features and fits the regression in one process"),
], ids=["too-many-devices", "16-mixed", "bnb-quantize", "adapter-quantize", "classify-features"])
def test_fsdp_bad_input_is_one_error_line(flags, message, tiny_dir, data_dir, tmp_path, capsys):
    import re

    flags = dict(flags)
    script = load_script(flags.pop("script", "finetune/lora.py"))
    error = cli_error(capsys, script.setup, as_cli(checkpoint_dir=tiny_dir, data_dir=data_dir, out_dir=tmp_path / "o",
                                                   **flags))
    assert re.search(message, error), error
    assert not (tmp_path / "o").exists()
