"""A run directory belongs to one run: who may write it, what `--resume` may change, and how a run stops.

    open_run(fabric, out_dir, hparams, resume, overwrite)   before anything is written or loaded (every rank):
        a lock (one process per run directory; a dead process's lock is taken over), the leftovers of an
        interrupted save removed, a fresh run into an old run's directory refused (or, with --overwrite true,
        the old run removed), and on --resume the flags compared with the run's hparams.yaml: what shapes the
        model, the data or the optimizer must be equal, the rest (RESUME_CHANGEABLE) is applied and logged; and
        the contents of the checkpoint and data it reads compared with the run's inputs.json (SHA-256 of each
        file): a resumed run never trains on other weights or samples found under the same paths.
    run.load(fabric, state, trainable_only)                 the newest readable checkpoint (a damaged one is
        skipped with a message), and only then hparams.yaml.
    StopOnSignal, stop.requested(fabric)                   Ctrl-C / SIGTERM: the loop saves a checkpoint at the
        next step boundary and raises stop.interrupted(step, path), one line saying how to resume.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from model.cli import Interrupted
from model.training.run import STEP_DIR_PREFIX, load_training_state, save_hparams, set_rng_state

LOCK_NAME = ".forge.lock"
# the flags a resumed run may change: how long it trains, how often it evaluates and saves, and what it recomputes
# instead of keeping (the checkpointing modes give the same gradients: a run that ran out of memory resumes with
# more of it). Everything else (checkpoint, data, method, adapter shape, batch sizes, seed, precision, quantization,
# optimizer, schedule) shapes the weights, the data order or the optimizer state the checkpoint holds.
RESUME_CHANGEABLE = ("max_steps", "epochs", "eval_interval", "eval_iters", "save_interval", "gradient_checkpointing",
                     "checkpoint_layers", "checkpoint_rest", "resume", "overwrite", "out_dir")
# the SHA-256 of every file the run reads (checkpoint weights and config, train.pt and test.pt), written with
# hparams.yaml and compared on --resume
INPUTS_FILE = "inputs.json"
# a file larger than this is fingerprinted by its size and SAMPLED_PIECES evenly spaced 1 MiB pieces: 64 MiB read per
# weight shard, about 2 GB for a 70B checkpoint instead of 140 GB (a fine-tune or a merge changes every piece)
FULL_HASH_LIMIT = 1 << 30
SAMPLED_PIECES = 64
# what makes a directory a run's: the files and directories a training script writes into --out_dir
RUN_FILES = ("hparams.yaml", INPUTS_FILE, "metrics.csv", "final", "tensorboard")


def _temporary(out_dir: Path) -> list[Path]:
    """The leftovers of an interrupted run: unfinished checkpoint saves and temporary files of atomic writes."""
    return sorted(p for p in Path(out_dir).glob(".*") if p.name != LOCK_NAME
                  and (p.name.endswith(".tmp") or p.name.startswith(".step-")))


def run_contents(out_dir: Path) -> list[str]:
    """The names in `out_dir` that belong to a run (empty for a new directory)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p.name for p in out_dir.iterdir() if p.name in RUN_FILES or p.name.startswith(STEP_DIR_PREFIX))


def checkpoints(out_dir: Path) -> list[Path]:
    """The run's step-* checkpoints, newest first."""
    return sorted((p for p in Path(out_dir).glob(f"{STEP_DIR_PREFIX}*") if (p / "training_state.pt").exists()),
                  reverse=True)


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the checkpoint in `path` cannot be loaded (None when it can): a torch.save archive is a zip file whose
    entries carry CRCs, so a truncated or damaged file is found without unpickling it."""
    state = Path(path) / "training_state.pt"
    if state.is_dir():  # a sharded (distributed) checkpoint: torch.distributed.checkpoint writes .metadata last
        return None if (state / ".metadata").is_file() else f"{state} has no .metadata (the save did not finish)"
    if not state.is_file():
        return f"{state} not found"
    if not zipfile.is_zipfile(state):
        return f"{state} is not a complete torch.save archive (truncated or damaged)"
    try:
        with zipfile.ZipFile(state) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{state} is damaged ({e})"
    return f"{state} is damaged (entry {bad} fails its CRC)" if bad else None


class RunLock:
    """`out_dir/.forge.lock` holds the writer's host and PID: created exclusively, removed when the process exits.
    A lock whose process is gone (killed) is stale and taken over."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder == "this process":  # an earlier run in this process that raised: its lock is ours
                    self.held = True
                    atexit.register(self.release)
                    return
                if holder is not None:
                    raise FileExistsError(
                        f"{self.path.parent} is being written by another run ({holder}, lock {self.path}); wait for"
                        " it to finish or choose another --out_dir (delete the lock only if that process is gone)"
                    ) from None
                print(f"Removing the stale lock {self.path} (its process is gone)", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fp:
                fp.write(me)
            self.held = True
            atexit.register(self.release)
            return
        raise FileExistsError(f"Could not take the lock {self.path}: another process took it first")

    def _holder(self) -> Optional[str]:
        """'process N on HOST' while the lock's writer may be alive; None when it is certainly gone."""
        try:
            host, pid = self.path.read_text().split()
            pid = int(pid)
        except (OSError, ValueError):
            return None  # unreadable or half-written: its writer died between creating and writing it
        if host != socket.gethostname():
            return f"process {pid} on {host}"  # another machine's process cannot be checked from here
        if pid == os.getpid():
            return "this process"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # it exists, owned by someone else
        return f"process {pid}"

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


@dataclass
class Run:
    """What `open_run` decided: the checkpoints to resume from (best first), the flags changed on resume."""

    out_dir: Path
    hparams: dict
    candidates: list[Path] = field(default_factory=list)
    changed: dict = field(default_factory=dict)
    lock: Optional[RunLock] = None
    inputs: dict = field(default_factory=dict)

    def load(self, fabric, state: dict, trainable_only: bool, max_steps: Optional[int] = None,
             warmup_steps: int = 0) -> Optional[Path]:
        """Load the newest checkpoint that loads (skipping damaged ones with a message) and its RNG states, then
        write hparams.yaml: a run that fails to resume leaves the run's hparams.yaml as it was. Says what a changed
        --max_steps does to the schedule. Returns the checkpoint loaded."""
        loaded = None
        for i, path in enumerate(self.candidates):
            problem = checkpoint_problem(path)
            if problem is None:
                try:
                    load_training_state(fabric, path, state, trainable_only)
                except Exception as e:  # noqa: BLE001 - every load failure gets the same one-line treatment
                    problem = _load_problem(path, e)
            if problem is None:
                loaded = path
                break
            rest = self.candidates[i + 1:]
            if not rest:
                raise ValueError(f"Cannot resume: {problem}, and there is no earlier checkpoint in {path.parent}")
            _print(fabric, f"Skipping {path.name}: {problem}; trying {rest[0].name}")
        if loaded is not None:
            if state.get("rng") is not None:
                set_rng_state(state["rng"])
            _print(fabric, f"Resumed from {loaded} at step {state['step']}")
        for key, (old, new) in self.changed.items():
            _print(fabric, f"--{key} changed on resume: {old} -> {new}")
        if max_steps is not None and (note := describe_schedule(state["step"], max_steps, warmup_steps, self.changed)):
            _print(fabric, note)
        if fabric.global_rank == 0:
            save_hparams(self.out_dir, self.hparams)
            if self.inputs:
                from model.files import atomic_write_text

                atomic_write_text(self.out_dir / INPUTS_FILE, json.dumps(self.inputs, indent=2) + "\n")
        return loaded


    def close(self) -> None:
        """The run is done: release the directory (also done when the process exits)."""
        if self.lock is not None:
            self.lock.release()


def _load_problem(path: Path, error: Exception) -> str:
    text = str(error)
    if "weights_only" in text or "Weights only load failed" in text:
        return (f"{path / 'training_state.pt'} is not a weights-only file (it pickles Python objects, which Forge"
                " never loads)")
    return f"{path / 'training_state.pt'} could not be loaded ({type(error).__name__}: {text.splitlines()[0]})"


def open_run(fabric, out_dir: Path, hparams: dict, resume, overwrite: bool = False) -> Run:
    """Claim `out_dir` for this run (rank 0 decides, every rank gets the decision or the same error)."""
    outcome: tuple = ("ok", None)
    run = None
    if fabric.global_rank == 0:
        try:
            run = _open_run(Path(out_dir), hparams, resume, overwrite)
            outcome = ("ok", ([str(p) for p in run.candidates], run.changed, run.inputs))
        except (ValueError, FileExistsError, FileNotFoundError) as e:
            outcome = (type(e).__name__, str(e))
    outcome = fabric.broadcast(outcome, src=0)
    kind, value = outcome
    if kind != "ok":
        raise {"ValueError": ValueError, "FileExistsError": FileExistsError,
               "FileNotFoundError": FileNotFoundError}[kind](value)
    if run is None:
        run = Run(Path(out_dir), hparams, [Path(p) for p in value[0]], value[1], inputs=value[2])
    return run


def _open_run(out_dir: Path, hparams: dict, resume, overwrite: bool) -> Run:
    resume_off = resume is False or resume in ("false", "False")
    if overwrite and not resume_off:
        raise ValueError("--overwrite true starts the run afresh; it cannot be combined with --resume")
    check_writable(out_dir)
    inputs = input_fingerprints(hparams)
    lock = RunLock(out_dir)
    lock.acquire()
    try:
        for leftover in _temporary(out_dir):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        found = run_contents(out_dir)
        if resume_off:
            if found and not overwrite:
                raise FileExistsError(
                    f"{out_dir} already holds a run ({', '.join(found)}). Continue it with --resume true, replace it"
                    " with --overwrite true, or choose another --out_dir"
                )
            for name in found:
                path = out_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            return Run(out_dir, hparams, lock=lock, inputs=inputs)
        candidates, run_dir = _resume_candidates(resume, out_dir)
        if not candidates and found:
            raise FileExistsError(
                f"--resume {resume}: {out_dir} holds a run ({', '.join(found)}) but no checkpoint to resume from;"
                " replace it with --overwrite true or choose another --out_dir"
            )
        changed = {}
        if candidates:
            if run_dir != out_dir and run_contents(out_dir):
                raise FileExistsError(f"--resume {resume} continues into --out_dir {out_dir}, which holds another"
                                      " run; choose an empty --out_dir")
            changed = check_resume_flags(run_dir, hparams)
            check_resume_inputs(run_dir, inputs)
        return Run(out_dir, hparams, candidates, changed, lock, inputs)
    except BaseException:
        lock.release()
        raise


def _resume_candidates(resume, out_dir: Path) -> tuple[list[Path], Path]:
    """The checkpoints to try, best first, and the run directory whose hparams.yaml they belong to."""
    if resume is True or resume in ("auto", "true", "True"):
        found = checkpoints(out_dir)
        if not found and resume != "auto":
            raise FileNotFoundError(f"--resume: no checkpoint (step-*/training_state.pt) in {out_dir}")
        return found, out_dir
    path = Path(resume)
    if not (path / "training_state.pt").exists():
        raise FileNotFoundError(f"--resume {path}: {path / 'training_state.pt'} not found")
    problem = checkpoint_problem(path)
    if problem is not None:
        good = [p for p in checkpoints(path.parent) if p != path and checkpoint_problem(p) is None]
        hint = f"; resume from {good[0]} instead" if good else ""
        raise ValueError(f"--resume {path}: {problem}{hint}")
    return [path], path.parent


def _normalized(key: str, value):
    if isinstance(value, str) and (key.endswith(("_dir", "_file", "_path")) or key == "checkpoint"):
        return os.path.normpath(value)
    return value


def check_resume_flags(run_dir: Path, hparams: dict) -> dict:
    """Compare the flags of a resumed run with the run's hparams.yaml: the changed flags that may change are returned
    ({key: (old, new)}); any other difference is refused, naming every differing flag."""
    path = Path(run_dir) / "hparams.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} not found, so the run's flags cannot be checked; start a new run")
    saved = yaml.safe_load(path.read_text()) or {}
    new = {k: (str(v) if isinstance(v, Path) else v) for k, v in hparams.items()}
    differing, changed = [], {}
    for key in [k for k in new if k in saved]:
        old, now = _normalized(key, saved[key]), _normalized(key, new[key])
        if old == now:
            continue
        # a sharded (FSDP) checkpoint reshards onto another number of processes (model.training.fsdp)
        resharded = key in ("devices", "num_nodes") and saved.get("strategy") == new.get("strategy") == "fsdp"
        if key in RESUME_CHANGEABLE or resharded:
            if key not in ("resume", "overwrite", "out_dir"):
                changed[key] = (saved[key], new[key])
        else:
            differing.append(f"--{key} {saved[key]} (now {new[key]})")
    if differing:
        raise ValueError(
            f"--resume: the run in {run_dir} was started with {', '.join(differing)}; these shape the model, data"
            " or optimizer the checkpoint holds. Pass the run's values (see its hparams.yaml), or start a new run in"
            f" another --out_dir. Only {', '.join('--' + k for k in RESUME_CHANGEABLE[:8])} may change"
        )
    return changed


def file_fingerprint(path: Path) -> str:
    """SHA-256 of the file's bytes; above FULL_HASH_LIMIT, of its size and SAMPLED_PIECES evenly spaced 1 MiB
    pieces (prefixed "sampled:")."""
    digest, size = hashlib.sha256(), Path(path).stat().st_size
    with open(path, "rb") as fp:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: fp.read(1 << 22), b""):
                digest.update(chunk)
            return digest.hexdigest()
        digest.update(str(size).encode())
        piece = 1 << 20
        for i in range(SAMPLED_PIECES):
            fp.seek((size - piece) * i // (SAMPLED_PIECES - 1))
            digest.update(fp.read(piece))
    return "sampled:" + digest.hexdigest()


def input_fingerprints(hparams: dict) -> dict:
    """{"checkpoint_dir/<file>" or "data_dir/<file>": fingerprint} of what a training run reads: the checkpoint's
    model_config.yaml and weight files, the prepared train.pt and test.pt (files that are absent are left out)."""
    from model.weights.checkpoint import lit_weight_files

    files = {}
    if hparams.get("checkpoint_dir") is not None:
        checkpoint_dir = Path(hparams["checkpoint_dir"])
        try:
            weights = lit_weight_files(checkpoint_dir)
        except FileNotFoundError:
            weights = []
        files.update({f"checkpoint_dir/{p.name}": p for p in [checkpoint_dir / "model_config.yaml", *weights]})
    if hparams.get("data_dir") is not None:
        files.update({f"data_dir/{name}": Path(hparams["data_dir"]) / name for name in ("train.pt", "test.pt")})
    return {key: file_fingerprint(path) for key, path in files.items() if path.is_file()}


def check_resume_inputs(run_dir: Path, inputs: dict) -> None:
    """Refuse to resume when a file the run read has other contents now (a run from before inputs.json existed
    is not checked)."""
    path = Path(run_dir) / INPUTS_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    changed = [key for key in saved if key in inputs and saved[key] != inputs[key]]
    missing = [key for key in saved if key not in inputs]
    if changed or missing:
        what = ", ".join([*(f"{key} changed" for key in changed), *(f"{key} is gone" for key in missing)])
        raise ValueError(
            f"--resume: the run in {run_dir} was started from other files than these ({what}; SHA-256 in {path}):"
            " resuming would mix two runs. Restore the files, or start a new run in another --out_dir"
        )


def describe_schedule(step: int, max_steps: int, warmup_steps: int, changed: dict) -> Optional[str]:
    """What a resumed run does with a changed --max_steps / --epochs: the cosine decay is stretched (or shrunk) to
    end at the new last step, continuing from the step reached."""
    if not ({"max_steps", "epochs"} & set(changed)):
        return None
    if step >= max_steps:
        return f"The run is already at step {step} of {max_steps}: nothing left to train"
    return (f"Training continues from step {step} to step {max_steps}: the learning rate follows the warmup"
            f" ({warmup_steps} steps) and cosine decay recomputed to end at step {max_steps}")


def check_writable(out_dir: Path, needed_bytes: int = 0) -> None:
    """`out_dir` (or the directory it will be created in) must be writable and have `needed_bytes` free."""
    existing = Path(out_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"--out_dir {out_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out_dir {out_dir}: {existing} is not writable by this user")
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise ValueError(f"--out_dir {out_dir}: a checkpoint needs about {_size(needed_bytes)}, but its disk has only"
                         f" {_size(free)} free")


@contextmanager
def disk_errors(out_dir: Path, needed_bytes: int = 0):
    """A write into `out_dir` that fails for lack of space or permission becomes one line naming the path."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            need = f" (a checkpoint needs about {_size(needed_bytes)})" if needed_bytes else ""
            raise ValueError(f"The disk of --out_dir {out_dir} is full{need}: free space there or choose another"
                             " --out_dir, then resume with --resume true") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ValueError(f"Cannot write into --out_dir {out_dir}: {e.strerror} ({e.filename})") from None
        raise


def checkpoint_bytes(model, trainable_only: bool) -> int:
    """About what one resumable checkpoint takes on disk: the saved weights and AdamW's two moments of each
    trainable one."""
    size = 0
    for param in model.parameters():
        bytes_ = param.numel() * param.element_size()
        size += 3 * bytes_ if param.requires_grad else (0 if trainable_only else bytes_)
    return size


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class StopOnSignal:
    """While active, SIGINT (Ctrl-C) and SIGTERM ask the training loop to stop at the next step boundary instead of
    killing it mid-step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: saving a checkpoint at the end of this step (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def requested(self, fabric) -> bool:
        """At a step boundary: whether to save and stop now; with several processes, when any got a signal (every
        rank must call it, so that all save the same step together)."""
        requested = self.received is not None
        if fabric.world_size > 1:
            requested = fabric.strategy.reduce_boolean_decision(requested, all=False)
        return requested

    def interrupted(self, step: int, path: Path) -> Interrupted:
        """The one line that ends a run stopped after saving `path`."""
        return Interrupted(f"Stopped by {self.received or 'a signal to another process'} after step {step}; saved"
                           f" {path}. Run the same command with --resume true to continue exactly from there")


def _print(fabric, message: str) -> None:
    if fabric.global_rank == 0:
        print(message, file=sys.stderr, flush=True)
