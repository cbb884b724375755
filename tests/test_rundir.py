"""A run directory belongs to one run (model/training/rundir.py): fresh runs into old runs, resumes with changed
flags, damaged checkpoints, concurrent writers, Ctrl-C and full disks, each one clear line."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning_fabric as L
import pytest
import torch
import yaml

from model.cli import Interrupted, run_cli
from model.training import rundir
from model.training.rundir import (
    LOCK_NAME,
    StopOnSignal,
    check_writable,
    checkpoint_bytes,
    describe_schedule,
    disk_errors,
    open_run,
)
from model.training.run import save_hparams, save_training_state, warmup_cosine

pytestmark = pytest.mark.usefixtures("one_thread")

# paths that hold no files: these tests check the flags; inputs_of_a_run makes real input files
HPARAMS = {"checkpoint_dir": "checkpoints/base", "data_dir": "data/no-such-dir", "out_dir": "out/run", "lora_r": 8,
           "learning_rate": 0.01, "seed": 7, "micro_batch_size": 2, "max_steps": 6, "eval_interval": 2,
           "save_interval": 2, "warmup_steps": 1, "resume": False, "overwrite": False}


@pytest.fixture
def fabric():
    return L.Fabric(accelerator="cpu", devices=1)


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=HPARAMS["learning_rate"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(1, HPARAMS["max_steps"]))
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0}


def train_step(state: dict, on_forward=None) -> None:
    model, optimizer = state["model"], state["optimizer"]
    generator = torch.Generator().manual_seed(100 + state["step"])  # the data of step s, as a data loader gives it
    x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 3, generator=generator)
    loss = torch.nn.functional.mse_loss(model(x), y)
    if on_forward is not None:
        on_forward(state["step"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    state["scheduler"].step()
    state["step"] += 1


def old_run(fabric, out_dir: Path, steps=(2, 4), hparams=None) -> Path:
    """A run that saved checkpoints at `steps`, as the training scripts leave it."""
    hparams = {**HPARAMS, "out_dir": str(out_dir), **(hparams or {})}
    run = open_run(fabric, out_dir, hparams, resume=False)
    state = make_state()
    run.load(fabric, state, trainable_only=False)
    while state["step"] < max(steps):
        train_step(state)
        if state["step"] in steps:
            save_training_state(fabric, out_dir, state["step"], state, trainable_only=False)
    (out_dir / "metrics.csv").write_text("step,loss\n1,0.5\n")
    run.close()
    return out_dir


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_fresh_run_into_an_old_runs_directory_is_refused(fabric, tmp_path):
    out_dir = old_run(fabric, tmp_path / "run")
    before = snapshot(out_dir)
    with pytest.raises(FileExistsError, match=r"already holds a run \(hparams.yaml, metrics.csv, step-000002,"
                                              r" step-000004\)\. Continue it with --resume true, replace it with"
                                              r" --overwrite true"):
        open_run(fabric, out_dir, {**HPARAMS, "seed": 8}, resume=False)
    assert snapshot(out_dir) == before
    assert not (out_dir / LOCK_NAME).exists()


def test_overwrite_removes_the_old_run_and_keeps_the_users_files(fabric, tmp_path):
    out_dir = old_run(fabric, tmp_path / "run")
    (out_dir / "notes.txt").write_text("mine")
    run = open_run(fabric, out_dir, {**HPARAMS, "seed": 8}, resume=False, overwrite=True)
    assert sorted(p.name for p in out_dir.iterdir()) == [LOCK_NAME, "notes.txt"]
    run.load(fabric, make_state(), trainable_only=False)
    assert yaml.safe_load((out_dir / "hparams.yaml").read_text())["seed"] == 8
    with pytest.raises(ValueError, match="--overwrite true starts the run afresh; it cannot be combined with --resume"):
        open_run(fabric, tmp_path / "other", HPARAMS, resume=True, overwrite=True)


@pytest.mark.parametrize("key, value", [("learning_rate", 0.02), ("seed", 8), ("data_dir", "data/other"),
                                        ("checkpoint_dir", "checkpoints/other"), ("lora_r", 16)])
@pytest.mark.parametrize("resume", [True, "auto"])
def test_resume_with_a_changed_flag_is_refused_and_leaves_the_run_as_it_was(fabric, tmp_path, key, value, resume):
    out_dir = old_run(fabric, tmp_path / "run")
    before = snapshot(out_dir)
    with pytest.raises(ValueError, match=rf"the run in {out_dir} was started with --{key} {HPARAMS[key]} \(now"
                                         rf" {value}\); these shape the model, data or optimizer"):
        open_run(fabric, out_dir, {**HPARAMS, "out_dir": str(out_dir), key: value}, resume=resume)
    assert snapshot(out_dir) == before  # hparams.yaml included


def test_resume_names_every_differing_flag_and_accepts_an_equal_path_spelled_differently(fabric, tmp_path):
    out_dir = old_run(fabric, tmp_path / "run")
    with pytest.raises(ValueError, match=r"--learning_rate 0.01 \(now 0.1\), --micro_batch_size 2 \(now 4\)"):
        open_run(fabric, out_dir, {**HPARAMS, "learning_rate": 0.1, "micro_batch_size": 4}, resume=True)
    run = open_run(fabric, out_dir, {**HPARAMS, "data_dir": "./data//no-such-dir", "resume": True}, resume=True)
    assert run.changed == {}
    run.close()


def test_resume_may_change_what_is_recomputed(fabric, tmp_path, capsys):
    """A run that ran out of memory resumes with more gradient checkpointing: the modes give the same gradients."""
    out_dir = old_run(fabric, tmp_path / "run", hparams={"gradient_checkpointing": "none", "checkpoint_layers": None})
    hparams = {**HPARAMS, "out_dir": str(out_dir), "resume": True, "gradient_checkpointing": "block",
               "checkpoint_layers": 1}
    run = open_run(fabric, out_dir, hparams, resume=True)
    assert run.changed == {"gradient_checkpointing": ("none", "block"), "checkpoint_layers": (None, 1)}
    run.load(fabric, make_state(), trainable_only=False)
    assert "--gradient_checkpointing changed on resume: none -> block" in capsys.readouterr().err
    run.close()
    with pytest.raises(ValueError, match="Only --max_steps, --epochs, --eval_interval, --eval_iters, --save_interval,"
                                         " --gradient_checkpointing, --checkpoint_layers, --checkpoint_rest may change"):
        open_run(fabric, out_dir, {**hparams, "seed": 8}, resume=True)


def test_resume_with_a_larger_max_steps_continues_exactly(fabric, tmp_path, capsys):
    out_dir = old_run(fabric, tmp_path / "run", steps=(2, 4))
    hparams = {**HPARAMS, "out_dir": str(out_dir), "max_steps": 8, "eval_interval": 3, "resume": True}
    run = open_run(fabric, out_dir, hparams, resume=True)
    assert run.changed == {"max_steps": (6, 8), "eval_interval": (2, 3)}
    assert yaml.safe_load((out_dir / "hparams.yaml").read_text())["max_steps"] == 6  # not before the load
    state = make_state(seed=1)
    assert run.load(fabric, state, trainable_only=False, max_steps=8, warmup_steps=1) == out_dir / "step-000004"
    err = capsys.readouterr().err
    assert ("Training continues from step 4 to step 8: the learning rate follows the warmup (1 steps) and cosine"
            " decay recomputed to end at step 8") in err
    assert f"Resumed from {out_dir / 'step-000004'} at step 4" in err
    assert "--max_steps changed on resume: 6 -> 8" in err and "--eval_interval changed on resume: 2 -> 3" in err
    assert yaml.safe_load((out_dir / "hparams.yaml").read_text())["max_steps"] == 8
    assert describe_schedule(4, 8, 1, run.changed) == (
        "Training continues from step 4 to step 8: the learning rate follows the warmup (1 steps) and cosine decay"
        " recomputed to end at step 8")
    assert describe_schedule(8, 8, 1, run.changed) == "The run is already at step 8 of 8: nothing left to train"
    # the weights and optimizer are those of step 4 of an uninterrupted run
    reference = make_state()
    for _ in range(4):
        train_step(reference)
    assert torch.equal(state["model"].weight, reference["model"].weight)
    assert state["optimizer"].state_dict()["state"][0]["exp_avg"].equal(
        reference["optimizer"].state_dict()["state"][0]["exp_avg"])
    run.close()


def inputs_of_a_run(root: Path) -> dict:
    """A checkpoint and prepared data on disk, as a run's flags name them."""
    (root / "ckpt").mkdir()
    (root / "ckpt" / "model_config.yaml").write_text("n_layer: 2\n")
    (root / "ckpt" / "lit_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (root / "data").mkdir()
    for split in ("train", "test"):
        torch.save([{"input_ids": torch.arange(5)}], root / "data" / f"{split}.pt")
    return {"checkpoint_dir": str(root / "ckpt"), "data_dir": str(root / "data")}


@pytest.mark.parametrize("changed", ["data_dir/train.pt", "checkpoint_dir/lit_model.safetensors", "data_dir/test.pt"])
def test_resume_refuses_inputs_whose_contents_changed_under_the_same_path(fabric, tmp_path, changed):
    """A re-prepared data set or a checkpoint fine-tuned in place keeps its path (so its flags compare equal):
    the SHA-256 recorded in inputs.json at the start refuses the resume, in one line, touching nothing."""
    paths = inputs_of_a_run(tmp_path)
    out_dir = old_run(fabric, tmp_path / "run", hparams=paths)
    saved = json.loads((out_dir / "inputs.json").read_text())
    assert sorted(saved) == ["checkpoint_dir/lit_model.safetensors", "checkpoint_dir/model_config.yaml",
                             "data_dir/test.pt", "data_dir/train.pt"]
    hparams = {**HPARAMS, "out_dir": str(out_dir), **paths}
    open_run(fabric, out_dir, hparams, resume=True).close()  # the same files resume
    file = Path(paths[changed.split("/")[0]]) / changed.split("/")[1]
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 1  # one bit, same size, same name
    file.write_bytes(bytes(data))
    before = snapshot(out_dir)
    with pytest.raises(ValueError, match=rf"--resume: the run in {out_dir} was started from other files than these"
                                         rf" \({changed} changed; SHA-256 in .*inputs.json\): resuming would mix two"
                                         r" runs"):
        open_run(fabric, out_dir, hparams, resume="auto")
    assert snapshot(out_dir) == before
    file.unlink()
    with pytest.raises(ValueError, match=rf"\({changed} is gone;"):
        open_run(fabric, out_dir, hparams, resume=True)


def test_a_large_file_is_fingerprinted_by_sampled_pieces_that_include_both_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "FULL_HASH_LIMIT", 4 << 20)
    monkeypatch.setattr(rundir, "SAMPLED_PIECES", 4)
    path = tmp_path / "big.bin"
    data = bytearray(torch.randint(0, 256, (9 << 20,), dtype=torch.uint8).numpy().tobytes())
    path.write_bytes(bytes(data))
    first = rundir.file_fingerprint(path)
    assert first.startswith("sampled:")
    for where in (0, len(data) - 1, 3 << 20):  # the first and last bytes, and a byte inside the second piece
        data[where] ^= 1
        path.write_bytes(bytes(data))
        assert rundir.file_fingerprint(path) != first, where
        data[where] ^= 1
    path.write_bytes(bytes(data) + b"x")  # another size
    assert rundir.file_fingerprint(path) != first
    path.write_bytes(bytes(data[: 4 << 20]))  # at the limit: the whole file
    assert rundir.file_fingerprint(path) == hashlib.sha256(bytes(data[: 4 << 20])).hexdigest()


def test_resume_auto_never_takes_another_runs_checkpoints(fabric, tmp_path):
    out_dir = old_run(fabric, tmp_path / "run")
    with pytest.raises(ValueError, match=r"--seed 7 \(now 99\)"):
        open_run(fabric, out_dir, {**HPARAMS, "seed": 99}, resume="auto")
    # a run directory with no checkpoint and auto: refused too, not silently restarted over it
    (tmp_path / "nockpt").mkdir()
    save_hparams(tmp_path / "nockpt", HPARAMS)
    with pytest.raises(FileExistsError, match="holds a run .* but no checkpoint to resume from"):
        open_run(fabric, tmp_path / "nockpt", HPARAMS, resume="auto")
    # an explicit checkpoint path belongs to its own run: resuming it into a new directory checks that run's flags
    with pytest.raises(ValueError, match=r"--lora_r 8 \(now 4\)"):
        open_run(fabric, tmp_path / "fork", {**HPARAMS, "lora_r": 4}, resume=out_dir / "step-000002")


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(fabric, tmp_path, capsys):
    out_dir = old_run(fabric, tmp_path / "run")
    state_file = out_dir / "step-000004" / "training_state.pt"
    state_file.write_bytes(state_file.read_bytes()[:-100])  # a torn write
    run = open_run(fabric, out_dir, HPARAMS, resume=True)
    state = make_state()
    assert run.load(fabric, state, trainable_only=False) == out_dir / "step-000002"
    assert state["step"] == 2
    assert f"Skipping step-000004: {state_file} is not a complete torch.save archive (truncated or damaged); trying" \
           " step-000002" in capsys.readouterr().err
    run.close()
    # named explicitly, the damaged checkpoint is refused with the good one to use instead
    with pytest.raises(ValueError, match=rf"is not a complete torch.save archive .*; resume from"
                                         rf" {out_dir / 'step-000002'} instead"):
        open_run(fabric, out_dir, HPARAMS, resume=out_dir / "step-000004")


def test_a_checkpoint_that_is_not_weights_only_is_refused_in_one_line(fabric, tmp_path):
    out_dir = old_run(fabric, tmp_path / "run", steps=(2,))
    torch.save({"step": 2, "payload": Path("not a tensor")}, out_dir / "step-000002" / "training_state.pt")
    run = open_run(fabric, out_dir, HPARAMS, resume=True)
    with pytest.raises(ValueError, match=r"Cannot resume: .*training_state.pt is not a weights-only file \(it pickles"
                                         r" Python objects, which Forge never loads\)"):
        run.load(fabric, make_state(), trainable_only=False)
    run.close()


def _holder(out_dir: Path) -> subprocess.Popen:
    """Another process that holds the run directory's lock until it is killed."""
    code = ("import sys, time; from model.training.rundir import RunLock; RunLock(sys.argv[1]).acquire();"
            " print('locked', flush=True); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", code, str(out_dir)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert process.stdout.readline().strip() == "locked"
    return process


def test_two_runs_cannot_write_one_directory_and_a_dead_runs_lock_is_taken_over(fabric, tmp_path, capsys):
    out_dir = tmp_path / "run"
    first = _holder(out_dir)
    try:
        with pytest.raises(FileExistsError, match=rf"{out_dir} is being written by another run \(process {first.pid},"
                                                  r" lock .*\.forge\.lock\); wait for it to finish"):
            open_run(fabric, out_dir, HPARAMS, resume=False)
        assert sorted(p.name for p in out_dir.iterdir()) == [LOCK_NAME]
    finally:
        first.kill()
        first.wait()
    # its process is gone (SIGKILL: no cleanup ran), so the lock is stale
    assert (out_dir / LOCK_NAME).exists()
    run = open_run(fabric, out_dir, HPARAMS, resume=False)
    assert "Removing the stale lock" in capsys.readouterr().err
    assert (out_dir / LOCK_NAME).read_text().split()[1] == str(os.getpid())
    run.close()
    assert not (out_dir / LOCK_NAME).exists()


def test_leftovers_of_an_interrupted_save_are_removed_by_the_next_run(fabric, tmp_path):
    out_dir = old_run(fabric, tmp_path / "run")
    (out_dir / ".step-000006.tmp").mkdir()
    (out_dir / ".step-000006.tmp" / "training_state.pt").write_bytes(b"half")
    (out_dir / ".metrics.csv.abc.tmp").write_text("step")
    run = open_run(fabric, out_dir, HPARAMS, resume=True)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [LOCK_NAME, "hparams.yaml", "metrics.csv", "step-000002", "step-000004"])
    run.close()


def test_sigint_mid_step_saves_a_checkpoint_that_resumes_exactly(fabric, tmp_path, capsys):
    reference = make_state()
    for _ in range(6):
        train_step(reference)

    out_dir = tmp_path / "run"
    run = open_run(fabric, out_dir, HPARAMS, resume=False)
    state = make_state()
    run.load(fabric, state, trainable_only=False)
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job

    def ctrl_c_in_step_3(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as stopped, StopOnSignal() as stop:
        while state["step"] < 6:
            train_step(state, on_forward=ctrl_c_in_step_3)  # the step in progress completes
            if stop.requested(fabric):
                path = save_training_state(fabric, out_dir, state["step"], state, trainable_only=False)
                raise stop.interrupted(state["step"], path)
    assert str(stopped.value) == (f"Stopped by SIGINT after step 3; saved {out_dir / 'step-000003'}. Run the same"
                                  " command with --resume true to continue exactly from there")
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored
    run.close()

    run = open_run(fabric, out_dir, {**HPARAMS, "resume": True}, resume=True)
    resumed = make_state(seed=5)
    run.load(fabric, resumed, trainable_only=False)
    while resumed["step"] < 6:
        train_step(resumed)
    assert torch.equal(resumed["model"].weight, reference["model"].weight)
    assert torch.equal(resumed["model"].bias, reference["model"].bias)
    run.close()


def test_an_interrupted_run_is_one_line_and_exit_130(capsys):
    def train():
        """Train."""
        raise Interrupted("Stopped by SIGTERM after step 3; saved out/step-000003.")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(train, [])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "Stopped by SIGTERM after step 3; saved out/step-000003.\n"


def test_an_unwritable_or_full_out_dir_is_one_line_naming_the_path_and_the_space(tmp_path, monkeypatch):
    class Usage:
        free = 10 * 2**20

    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(ValueError, match=rf"--out_dir {tmp_path / 'a' / 'b'}: a checkpoint needs about 1.5 GB, but"
                                         r" its disk has only 10.0 MB free"):
        check_writable(tmp_path / "a" / "b", needed_bytes=int(1.5 * 2**30))
    check_writable(tmp_path / "a" / "b", needed_bytes=2**20)
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=rf"--out_dir {tmp_path / 'a'}: {tmp_path} is not writable by this user"):
        check_writable(tmp_path / "a")
    assert not (tmp_path / "a").exists()

    with pytest.raises(ValueError, match=r"The disk of --out_dir out/x is full \(a checkpoint needs about 2.0 KB\)"):
        with disk_errors(Path("out/x"), needed_bytes=2048):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ValueError, match=r"Cannot write into --out_dir out/x: Read-only file system \(out/x/f\)"):
        with disk_errors(Path("out/x")):
            raise OSError(errno.EROFS, "Read-only file system", "out/x/f")


def test_checkpoint_bytes_counts_the_trainable_weights_and_both_adam_moments():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))
    model[0].requires_grad_(False)
    trainable, frozen = (10 * 2 + 2) * 4, (10 * 10 + 10) * 4
    assert checkpoint_bytes(model, trainable_only=True) == 3 * trainable
    assert checkpoint_bytes(model, trainable_only=False) == 3 * trainable + frozen


def test_the_lock_is_released_when_the_process_exits(tmp_path):
    out_dir = tmp_path / "run"
    code = "import sys; from model.training.rundir import RunLock; RunLock(sys.argv[1]).acquire(); sys.exit(1)"
    subprocess.run([sys.executable, "-c", code, str(out_dir)], check=False, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    time.sleep(0.05)
    assert out_dir.is_dir() and not (out_dir / LOCK_NAME).exists()
