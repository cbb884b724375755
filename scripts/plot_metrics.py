"""Plot a fine-tuning run's metrics.csv: training loss (and its moving average), validation loss, learning rate.

    python scripts/plot_metrics.py --run_dir out/lora        # writes out/lora/metrics.png

Several runs can be overlaid to compare them: `--run_dir out/lora --compare out/dora out/qlora`.
"""

import csv
from pathlib import Path
from typing import Optional

from model.cli import run_cli


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} the output directory of a fine-tuning run?")
    with open(path, newline="") as fp:
        return list(csv.DictReader(fp))


def column(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [s for s, _ in points], [v for _, v in points]


def plot_metrics(run_dir: Path, compare: Optional[list[Path]] = None, output: Optional[Path] = None,
                 smooth: int = 10) -> None:
    """Write a PNG with the loss curves (and the learning rate) of `run_dir` and any `compare` runs.

    Args:
        run_dir: A fine-tuning output directory with metrics.csv.
        compare: More run directories to overlay.
        output: The PNG to write; default: `run_dir/metrics.png`.
        smooth: Window of the moving average drawn over the training loss.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run_dir, *(compare or [])]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        rows = read_metrics(run)
        steps, loss = column(rows, "loss")
        line, = ax_loss.plot(steps, loss, alpha=0.3, linewidth=1)
        if len(loss) >= smooth:
            averaged = [sum(loss[i - smooth + 1:i + 1]) / smooth for i in range(smooth - 1, len(loss))]
            ax_loss.plot(steps[smooth - 1:], averaged, color=line.get_color(), label=f"{run.name} train")
        val_steps, val_loss = column(rows, "val_loss")
        ax_loss.plot(val_steps, val_loss, "o--", color=line.get_color(), label=f"{run.name} validation")
        ax_lr.plot(*column(rows, "lr"), color=line.get_color(), label=run.name)
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    output = output or run_dir / "metrics.png"
    fig.savefig(output, dpi=120)
    print(f"Saved {output}")


if __name__ == "__main__":
    run_cli(plot_metrics)
