"""Mechanics the fine-tuning scripts share: batch order, learning-rate schedule, checkpoints that resume exactly,
metrics and the progress line. The training loops themselves stay in the scripts, written out.
"""

from __future__ import annotations

import csv
import io
import math
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from model.files import atomic_save_safetensors, atomic_write_text

STEP_DIR_PREFIX = "step-"
TRAINING_STATE = "training_state.pt"  # a file, or under FSDP a distributed-checkpoint directory


@dataclass
class TrainArgs:
    """The flags every SFT training script shares, typed (the scripts' signatures document them)."""

    checkpoint_dir: Path
    data_dir: Path
    out_dir: Path
    precision: str
    devices: int
    num_nodes: int
    strategy: str
    micro_batch_size: int
    global_batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    max_steps: Optional[int]
    epochs: int
    max_seq_length: Optional[int]
    eval_interval: int
    eval_iters: int
    save_interval: int
    seed: int
    resume: bool | str | Path
    overwrite: bool = False
    packing: bool = False
    gradient_checkpointing: str = "none"
    checkpoint_layers: Optional[int] = None
    checkpoint_rest: str = "none"
    optimizer: str = "adamw"
    group_by_length: bool = True
    compile: bool = False

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> "TrainArgs":
        """The fields of `flags` (a script's `locals()`) that this class holds; the method's own flags stay out."""
        return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name in flags})


# Length grouping sorts samples within windows of this many micro-batches (HF's LengthGroupedSampler uses 50): wide
# enough that neighbours have similar lengths, narrow enough that each window is still a random draw of the data.
MEGA_BATCH_MICRO_BATCHES = 50


def epoch_batches(lengths: list[int], micro_batch_size: int, epoch: int, seed: int,
                  group_by_length: bool = False) -> list[list[int]]:
    """The micro-batches (lists of sample indices) of one epoch, a pure function of `seed + epoch` (so a resumed run
    cuts the same ones): a seeded shuffle, with the batch holding the longest sample moved to the front so that
    running out of memory happens at step 1, not hours in.

    `group_by_length`: a micro-batch is padded to its longest sample, so after the shuffle the samples are sorted by
    length within windows of `MEGA_BATCH_MICRO_BATCHES` micro-batches, cut into micro-batches of similar lengths, and
    the micro-batches' order is shuffled again (seeded): little padding is computed, and the order stays random at
    the scale of whole micro-batches."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        window = micro_batch_size * MEGA_BATCH_MICRO_BATCHES
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)]
    batches = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    if group_by_length:
        batches = [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def gradient_accumulation_iters(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"--global_batch_size {global_batch_size} must be a multiple of --micro_batch_size x devices"
            f" ({micro_batch_size} x {world_size} = {per_step})"
        )
    return global_batch_size // per_step


def with_answers(fabric, samples: list[dict], max_seq_length: int, path: Path) -> list[dict]:
    """The samples that keep an answer token to learn within `max_seq_length`: a micro-batch of samples cut before
    their answer has no target at all, and a NaN loss."""
    kept = [s for s in samples if (s["labels"][1:max_seq_length] != -100).any()]  # position 0 is never predicted
    if not kept:
        raise ValueError(f"--max_seq_length {max_seq_length} cuts off the answer of every sample in {path}; raise it"
                         f" (the longest sample has {max(len(s['input_ids']) for s in samples)} tokens)")
    if len(kept) < len(samples):
        print_rank0(fabric, f"Skipping {len(samples) - len(kept)} of {len(samples)} samples of {path}: no answer token"
                            f" within --max_seq_length {max_seq_length}")
    return kept


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1):
    """LambdaLR multiplier: linear warmup to the peak, then cosine decay to `min_lr_ratio` of it at `max_steps`."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"{STEP_DIR_PREFIX}{step:06d}"


def save_training_state(
    fabric, out_dir: Path, step: int, state: dict, trainable_only: bool, extra: Optional[Callable[[Path], None]] = None
) -> Path:
    """Save everything `--resume` needs into `out_dir/step-NNNNNN/training_state.pt`, atomically: the files are
    written into a temporary directory that is renamed into place only when complete, so a run killed while
    saving leaves the previous checkpoint as the latest. `extra(directory)` adds files that must appear together
    with the checkpoint (a LoRA run's adapter): called on rank 0, or under FSDP on every rank, because gathering
    sharded weights takes all of them (it then writes on rank 0 only).

    Under FSDP `training_state.pt` is a distributed-checkpoint directory: each rank writes its own shards, and no
    rank gathers the model (`model.training.fsdp.save_sharded_state`)."""
    from model.training.fsdp import is_fsdp, save_sharded_state

    final = step_dir(out_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    fabric.barrier()
    sharded = is_fsdp(fabric)
    if sharded:
        save_sharded_state(fabric, tmp / TRAINING_STATE, state, trainable_only)
    else:
        module = getattr(state["model"], "module", state["model"])  # the model inside Fabric's wrapper
        trainable = {name for name, param in module.named_parameters() if param.requires_grad}
        filter_ = {"model": lambda name, _: name in trainable} if trainable_only else None
        fabric.save(tmp / TRAINING_STATE, state, filter=filter_)
    if extra is not None and (sharded or fabric.global_rank == 0):
        extra(tmp)
    fabric.barrier()
    if fabric.global_rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    fabric.barrier()
    return final


def save_final_checkpoint(step_path: Path, config, source_dir: Path, final_dir: Path, hparams: dict, fabric=None,
                          model=None) -> None:
    """A full run's final/: the weights of the checkpoint in `step_path` as a complete checkpoint directory (with the
    tokenizer and prompt style of `source_dir` and the run's hparams.yaml), written all at once.

    The weights come from the training state, which Fabric saved whole, in the training dtype. With `fabric` and
    `model`, call it on every rank: under FSDP the training state is sharded, so the weights are gathered from the
    model one tensor at a time instead (every rank takes part, rank 0 writes); otherwise rank 0 writes."""
    from model.training.fsdp import is_fsdp, stream_full_weights
    from model.weights.checkpoint import write_checkpoint_dir

    def write(tensors):
        write_checkpoint_dir(tensors, config, source_dir, final_dir, extra=lambda directory: save_hparams(directory, hparams))

    if fabric is not None and is_fsdp(fabric):
        stream_full_weights(fabric, getattr(model, "module", model), write)
    elif fabric is None or fabric.global_rank == 0:
        write(iter(torch.load(step_path / TRAINING_STATE, weights_only=True, mmap=True)["model"].items()))


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    steps = sorted(p for p in Path(out_dir).glob(f"{STEP_DIR_PREFIX}*") if (p / TRAINING_STATE).exists())
    return steps[-1] if steps else None


def load_training_state(fabric, path: Path, state: dict, trainable_only: bool) -> None:
    """Restore `state` in place from a checkpoint of `save_training_state`. A sharded (FSDP) checkpoint loads onto
    any number of FSDP processes; a one-file checkpoint and a sharded one do not load into each other's strategy."""
    from model.training.fsdp import is_fsdp, load_sharded_state

    saved_sharded = (path / TRAINING_STATE).is_dir()
    if saved_sharded != is_fsdp(fabric):
        saved, now = ("--strategy fsdp", "another strategy") if saved_sharded else ("another strategy", "--strategy fsdp")
        raise ValueError(f"--resume {path}: the checkpoint was saved with {saved} and this run uses {now}; resume it"
                         " with the strategy it was saved with")
    if saved_sharded:
        load_sharded_state(fabric, path / TRAINING_STATE, state, trainable_only)
    else:
        fabric.load(path / TRAINING_STATE, state, strict=not trainable_only, weights_only=True)


def check_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], checkpoint_dir: Path) -> None:
    """The weights of `checkpoint_dir` must fit the model its model_config.yaml describes, and be finite: one line
    naming the first tensor that does not, instead of a shape error deep in load_state_dict or a NaN loss later."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = [name for name in expected if name not in state_dict and name != "lm_head.weight"]
    unexpected = [name for name in state_dict if name not in expected]
    where = f"{checkpoint_dir}: model_config.yaml does not match the weights"
    if missing or unexpected:
        first = f"{missing[0]} is missing" if missing else f"{unexpected[0]} is not in the model"
        raise ValueError(f"{where} ({first}; {len(missing)} missing, {len(unexpected)} unexpected tensors). Convert"
                         " the checkpoint again, or restore its model_config.yaml")
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{where}: {name} is {list(tensor.shape)} in the weights, {list(expected[name])} in the"
                             " config. Convert the checkpoint again, or restore its model_config.yaml")
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{checkpoint_dir}: the weights hold NaN/inf values ({bad} in {name}); the checkpoint is"
                             " damaged. Download or convert it again")


def save_run_weights(run_dir: Path, tensors: dict[str, torch.Tensor], weights_name: str, hparams: dict) -> None:
    """A run's trained weights and its hparams.yaml, the two files `model.weights.load` reads back."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, run_dir / weights_name)
    save_hparams(run_dir, hparams)


def save_hparams(out_dir: Path, hparams: dict) -> None:
    """Every flag of the run, so later scripts (merge, generate, export) never ask the user to repeat them."""
    plain = {k: _plain(v) for k, v in hparams.items()}
    atomic_write_text(Path(out_dir) / "hparams.yaml", yaml.safe_dump(plain, sort_keys=False))


def _plain(value):
    """A flag's value as YAML writes it: paths as strings, validated numbers (PositiveInt is an int subclass) as
    plain numbers."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool) and type(value) is not int:
        return int(value)
    if isinstance(value, float) and type(value) is not float:
        return float(value)
    return value


class MetricsLogger:
    """Appends one row per logged step to `metrics.csv` (and to TensorBoard when it is installed).

    On resume, rows after the resumed step are dropped first, so a run killed after logging past its last
    checkpoint does not end up with duplicated steps."""

    def __init__(self, out_dir: Path, fieldnames: list[str], resume_step: Optional[int], enabled: bool = True):
        self.path = Path(out_dir) / "metrics.csv"
        self.fieldnames = fieldnames
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.path.is_file():
            text = self.path.read_text()
            # a row torn by a kill mid-append lacks its line end: dropped with the rows after the checkpoint
            complete = text[:text.rfind("\n") + 1]
            rows = [r for r in csv.DictReader(io.StringIO(complete, newline=""))
                    if _step(r) is not None and _step(r) <= resume_step]
        # rewritten through a temporary file: a kill here leaves the old file whole, never a truncated one
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        except ImportError:
            pass

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as fp:
            csv.DictWriter(fp, fieldnames=self.fieldnames).writerow({k: row.get(k, "") for k in self.fieldnames})
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["step"])


def _step(row: dict) -> Optional[int]:
    try:
        return int(row["step"])
    except (TypeError, ValueError, KeyError):
        return None


@dataclass
class Throughput:
    """Training speed in real tokens per second and the time left, over the steps of this process (resumed steps
    excluded).

    `update` takes the real tokens of a micro-batch (padding excluded: a padded position costs compute but is not
    data). tokens/s divides them by training time only: time spent inside `paused()` (validation, saving a
    checkpoint) is left out. The ETA divides wall-clock time, pauses included, by the steps done, because the steps
    left will validate and save as often. `clock` is injectable for tests."""

    start_step: int
    max_steps: int
    clock: Callable[[], float] = time.perf_counter
    tokens: int = 0
    started: float = 0.0
    paused_s: float = 0.0

    def __post_init__(self):
        self.started = self.clock()

    def update(self, tokens: int) -> None:
        self.tokens += tokens

    @contextmanager
    def paused(self):
        """Time spent in this block counts for the ETA but not for tokens/s."""
        start = self.clock()
        try:
            yield
        finally:
            self.paused_s += self.clock() - start

    def tokens_per_s(self) -> float:
        return self.tokens / max(self.clock() - self.started - self.paused_s, 1e-9)

    def eta_s(self, step: int) -> float:
        done = max(1, step - self.start_step)
        return (self.clock() - self.started) / done * (self.max_steps - step)

    def line(self, step: int, loss: float, lr: float, memory_gb: float) -> str:
        return (f"step {step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {self.tokens_per_s():,.0f} tok/s"
                f" | ETA {_duration(self.eta_s(step))} | mem {memory_gb:.2f} GB")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def print_rank0(fabric, *args, **kwargs) -> None:
    if fabric.global_rank == 0:
        print(*args, **kwargs, file=sys.stderr, flush=True)
