"""Plot a preference run's metrics.csv (finetune/dpo.py): loss, reward margin and preference accuracy, train and
validation.

    python scripts/plot_preferences.py --run_dir out/dpo        # writes out/dpo/preferences.png
"""

import csv
from pathlib import Path
from typing import Optional

from model.cli import run_cli


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} the output directory of a finetune/dpo.py run?")
    with open(path, newline="") as fp:
        return list(csv.DictReader(fp))


def column(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [s for s, _ in points], [v for _, v in points]


def plot_preferences(run_dir: Path, output: Optional[Path] = None) -> None:
    """Write a PNG with three panels: loss, reward margin r(y_w) - r(y_l), and preference accuracy.

    Args:
        run_dir: A finetune/dpo.py output directory with metrics.csv.
        output: The PNG to write; default: `run_dir/preferences.png`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if "reward_margin" not in rows[0]:
        raise ValueError(f"{run_dir / 'metrics.csv'} has no reward_margin column: is it a finetune/dpo.py run?")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("Loss", [("loss", "train", "-"), ("val_loss", "validation", "o--")]),
        ("Reward margin r(y_w) - r(y_l)", [("reward_margin", "train", "-"), ("val_reward_margin", "validation", "o--")]),
        ("Preference accuracy", [("accuracy", "train: r(y_w) > r(y_l)", "-"),
                                 ("val_accuracy", "validation: r(y_w) > r(y_l)", "o--"),
                                 ("val_logp_accuracy", "validation: log pi(y_w) > log pi(y_l)", "s:")]),
    ]
    for ax, (title, series) in zip(axes, panels):
        for key, label, style in series:
            steps, values = column(rows, key)
            ax.plot(steps, values, style, label=label, alpha=0.6 if style == "-" else 1.0)
        ax.set(xlabel="optimizer step", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    output = output or run_dir / "preferences.png"
    fig.savefig(output, dpi=110)
    print(f"Saved {output}")


if __name__ == "__main__":
    run_cli(plot_preferences)
