"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017, section 3.3).

Train for a short while with the learning rate growing exponentially from `min_lr` to `max_lr`, one optimizer step
per value; smooth the loss with a bias-corrected moving average and stop once it has grown `divergence_factor` times
above the best smoothed loss so far (or turned non-finite). The loss falls fastest a little below the point where
it diverges; the suggestion is `min_loss_lr / suggestion_divisor`, the learning rate of the lowest smoothed loss
divided by 10 (as fastai's `lr_find` suggests): far enough below divergence to survive a whole run, close enough to
train fast. The trainable weights, the optimizer state and the RNG state are restored afterwards, so the search
leaves the model exactly as it found it.
"""

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from model.files import atomic_save_figure


@dataclass
class LRFindResult:
    lrs: list[float] = field(default_factory=list)  # the learning rate of each step taken
    losses: list[float] = field(default_factory=list)  # the raw loss of each step (before that step's update)
    smoothed: list[float] = field(default_factory=list)  # the bias-corrected moving average of `losses`
    diverged_at: Optional[float] = None  # the learning rate at which the search stopped on divergence, if it did
    suggestion_divisor: float = 10.0

    @property
    def min_loss_lr(self) -> float:
        """The learning rate of the lowest smoothed loss."""
        if not self.lrs:
            raise ValueError("The LR range test took no step")
        return self.lrs[min(range(len(self.smoothed)), key=self.smoothed.__getitem__)]

    @property
    def steepest_lr(self) -> float:
        """The learning rate where the smoothed loss falls fastest per decade of learning rate (up to the minimum)."""
        last = min(range(len(self.smoothed)), key=self.smoothed.__getitem__)
        if last < 1:
            return self.lrs[0]
        logs = [math.log10(lr) for lr in self.lrs]
        slopes = [(self.smoothed[i + 1] - self.smoothed[i]) / (logs[i + 1] - logs[i]) for i in range(last)]
        return self.lrs[min(range(len(slopes)), key=slopes.__getitem__)]

    @property
    def suggestion(self) -> float:
        return self.min_loss_lr / self.suggestion_divisor


def lr_schedule(min_lr: float, max_lr: float, num_steps: int) -> list[float]:
    """`num_steps` learning rates growing geometrically from `min_lr` to `max_lr`, both included."""
    if not 0 < min_lr < max_lr:
        raise ValueError(f"The LR range needs 0 < min_lr < max_lr, got {min_lr} and {max_lr}")
    if num_steps < 2:
        raise ValueError(f"The LR range test needs at least 2 steps, got {num_steps}")
    return [min_lr * (max_lr / min_lr) ** (i / (num_steps - 1)) for i in range(num_steps)]


def lr_range_test(
    params: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    loss_step: Callable[[int], float],
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_steps: int = 100,
    smoothing: float = 0.9,
    divergence_factor: float = 4.0,
    suggestion_divisor: float = 10.0,
    log: Optional[Callable[[str], None]] = None,
) -> LRFindResult:
    """Run the range test and restore the weights, the optimizer and the RNG state afterwards.

    `loss_step(i)` runs the forward and backward passes of step i (its micro-batches and gradient accumulation
    included) and returns the loss; this function sets the learning rate, zeroes the gradients before it and
    takes the optimizer step after it. `params` are the weights the optimizer updates: they are copied first
    and written back at the end, whatever happens in between (an exception included)."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"The loss smoothing must be in [0, 1), got {smoothing}")
    if divergence_factor <= 1:
        raise ValueError(f"The divergence factor must be above 1, got {divergence_factor}")
    params = list(params)
    saved_params = [p.detach().clone() for p in params]
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_rng = torch.get_rng_state()
    result = LRFindResult(suggestion_divisor=suggestion_divisor)
    average, best = 0.0, math.inf
    try:
        for step, lr in enumerate(lr_schedule(min_lr, max_lr, num_steps)):
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = float(loss_step(step))
            if not math.isfinite(loss):
                result.diverged_at = lr
                break
            average = smoothing * average + (1 - smoothing) * loss
            smoothed = average / (1 - smoothing ** (step + 1))
            result.lrs.append(lr)
            result.losses.append(loss)
            result.smoothed.append(smoothed)
            if log is not None:
                log(f"step {step + 1}/{num_steps} | lr {lr:.3g} | loss {loss:.4f} | smoothed {smoothed:.4f}")
            best = min(best, smoothed)
            if step > 0 and smoothed > divergence_factor * best:
                result.diverged_at = lr
                break
            optimizer.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, saved in zip(params, saved_params):
                param.copy_(saved)
        optimizer.load_state_dict(saved_optimizer)
        torch.set_rng_state(saved_rng)
    return result


def plot_lr_find(result: LRFindResult, path: Path, title: str = "LR range test") -> None:
    """Loss (raw and smoothed) against the learning rate on a log axis, the suggestion and the divergence marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed loss")
    ax.axvline(result.min_loss_lr, color="C2", linestyle=":", label=f"lowest loss at {result.min_loss_lr:.2g}")
    ax.axvline(result.suggestion, color="C3", linestyle="--",
               label=f"suggested --learning_rate {result.suggestion:.2g}")
    if result.diverged_at is not None:
        ax.axvline(result.diverged_at, color="k", linestyle="-", linewidth=0.8,
                   label=f"diverged at {result.diverged_at:.2g}")
    ax.set_xscale("log")
    lowest = min([loss for loss in result.losses + result.smoothed if math.isfinite(loss)], default=None)
    if lowest is not None:  # the last raw losses of a divergence would squash the interesting part of the curve
        ax.set_ylim(lowest * 0.9, max(result.smoothed[0], lowest) * 1.6)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, path)
