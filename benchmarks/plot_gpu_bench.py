"""Plot gpu_bench.py's rows: tokens/s against training peak memory, one panel per mode (LoRA, QLoRA), each as a
ratio to HF+PEFT's row of the same mode, with the region of the goal (>= 1.5x its tokens/s at <= 0.5x its memory)
shaded.

    python benchmarks/plot_gpu_bench.py \\
        --results '[benchmarks/results/h200/run1.jsonl,benchmarks/results/h200/run2.jsonl]' \\
        --output tutorials/images/h200_speed_memory.png --title "..."

A row measured in several runs is drawn from the first run that measured it. Rows never measured (an OOM, a
timeout, a row the time budget left out) are listed under the plot. Each row is compared with the HF+PEFT row of
its own file, or of the first file that has one for the mode.
"""

import json
from pathlib import Path

from model.cli import run_cli

NAMES = {"forge": "Forge", "forge_compile": "Forge compiled", "forge_offload": "Forge offload",
         "forge_selective": "Forge selective", "forge_selective_compile": "Forge selective compiled",
         "forge_offload_compile": "Forge offload compiled", "forge_half": "Forge block on half, selective",
         "forge_half_compile": "Forge block on half, selective, compiled", "hf": "HF+PEFT", "hf_liger": "HF+PEFT+Liger",
         "hf_gc": "HF+PEFT checkpointing", "litgpt": "litgpt"}


def read_rows(paths: list[Path]) -> list[tuple[int, dict]]:
    """(file index, row) for every line of every file, in order."""
    rows = []
    for index, path in enumerate(paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: give the gpu_bench.jsonl files that gpu_bench.py wrote")
        rows += [(index, json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return rows


def reference(rows: list[tuple[int, dict]], index: int, mode: str) -> dict:
    """HF+PEFT's row for `mode`: of file `index` if it has one, else of the first file that does."""
    candidates = [(i, r) for i, r in rows if r["engine"] == "hf" and r["mode"] == mode and "error" not in r]
    if not candidates:
        raise ValueError(f"no HF+PEFT row for {mode}: the ratios need one (run gpu_bench.py with --rows hf:{mode})")
    return next((r for i, r in candidates if i == index), candidates[0][1])


def plot_gpu_bench(results: list[Path], output: Path = Path("gpu_bench.png"), title: str = "") -> None:
    """Write a PNG of tokens/s against training peak memory, as ratios to HF+PEFT, per mode.

    Args:
        results: gpu_bench.jsonl files (one per run), the one to draw a repeated row from first.
        output: The PNG to write.
        title: A title over both panels (the GPU and the shape, say).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(results)
    modes = [m for m in ("lora", "qlora") if any(r["mode"] == m for _, r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 5.5), squeeze=False)
    measured = {(r["engine"], r["mode"]) for _, r in rows if "error" not in r}
    failed, drawn = [], set()
    for ax, mode in zip(axes[0], modes):
        ax.fill_between([0, 0.5], 1.5, 2.0, color="tab:green", alpha=0.15, label="goal: >= 1.5x at <= 0.5x")
        for index, row in rows:
            if row["mode"] != mode:
                continue
            name = NAMES.get(row["engine"], row["engine"])
            key = (row["engine"], mode)
            if key not in measured:
                failed.append(f"{name} {mode}: {row['error']}")
            if "error" in row or key in drawn:
                continue
            drawn.add(key)
            ref = reference(rows, index, mode)
            x, y = row["train_peak_gb"] / ref["train_peak_gb"], row["tokens_per_s"] / ref["tokens_per_s"]
            forge = row["engine"].startswith("forge")
            ax.scatter(x, y, color="tab:blue" if forge else "tab:gray", s=40, zorder=3)
            # Forge's labels above their points, the peers' below, so that neighbours do not overlap
            ax.annotate(f"{name}: {row['tokens_per_s']:,.0f} tok/s, {row['train_peak_gb']:.1f} GB", (x, y),
                        textcoords="offset points", xytext=(5, 5 if forge else -11), fontsize=7)
        ax.set_xlim(0, 1.35)
        ax.set_ylim(0.5, 1.7)
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.axvline(1.0, color="gray", lw=0.5)
        ax.set_xlabel("training peak memory / HF+PEFT's")
        ax.set_ylabel("tokens/s / HF+PEFT's")
        ax.set_title({"lora": "LoRA, bf16 base", "qlora": "QLoRA, nf4 base"}[mode])
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    if failed:
        fig.text(0.01, 0.01, "not measured: " + "; ".join(failed), fontsize=7)
    fig.tight_layout(rect=(0, 0.04 if failed else 0, 1, 1))
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    print(f"wrote {output}")


if __name__ == "__main__":
    run_cli(plot_gpu_bench)
