"""benchmarks/plot_gpu_bench.py: the H200 rows kept in benchmarks/results/h200/ plot, each against the right HF+PEFT
row, and a file without one is refused."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = [ROOT / "benchmarks/results/h200/run1.jsonl", ROOT / "benchmarks/results/h200/run2.jsonl"]


def load_plot_module():
    spec = importlib.util.spec_from_file_location("plot_gpu_bench", ROOT / "benchmarks/plot_gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_row_is_compared_with_its_own_runs_hf_row_or_the_first_one():
    plot = load_plot_module()
    rows = plot.read_rows(RESULTS)
    hf_lora = next(r for i, r in rows if i == 0 and r["engine"] == "hf" and r["mode"] == "lora")
    assert plot.reference(rows, 1, "lora") is hf_lora  # run 2 has no HF+PEFT row: run 1's
    own = [(0, {**hf_lora, "tokens_per_s": 1.0}), (1, {**hf_lora, "tokens_per_s": 2.0})]
    assert plot.reference(own, 1, "lora")["tokens_per_s"] == 2.0
    with pytest.raises(ValueError, match="no HF\\+PEFT row for qlora"):
        plot.reference([(0, hf_lora)], 0, "qlora")


def test_the_h200_rows_plot(tmp_path):
    plot = load_plot_module()
    plot.plot_gpu_bench(RESULTS, tmp_path / "h200.png", title="H200")
    assert (tmp_path / "h200.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = tmp_path / "none.jsonl"
    with pytest.raises(FileNotFoundError, match="none.jsonl not found"):
        plot.read_rows([missing])
