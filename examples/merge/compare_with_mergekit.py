"""Merge the same tiny random checkpoints with mergekit and with scripts/merge_models.py and compare tensor by tensor.

    python examples/merge/compare_with_mergekit.py --mergekit_yaml /work/venvs/mergekit/bin/mergekit-yaml --work_dir /tmp/mk

Builds a base and three "fine-tunes" (base + small noise) of two families, Llama with grouped-query attention (q,
k, v fused in our checkpoint) and Phi-3 (gate/up fused in theirs), in float32; converts them to Forge checkpoints
(scripts/convert_hf_checkpoint.py); runs every YAML below through mergekit-yaml (mergekit installed in a virtual
environment of its own) and through scripts/merge_models.py, exports ours with scripts/convert_to_hf.py, and prints
the largest absolute difference per method and family. The random methods (dare_*, della*) are compared where
they are deterministic (density 1); tests/test_merge_methods.py checks them statistically.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import transformers
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from hf_models import hf_configs  # noqa: E402

FAMILIES = {
    "llama-gqa": dict(name="smollm2"),  # 3 query heads, 1 key/value head, tied embeddings
    "phi-3": dict(name="phi-3-4k"),
}
GTA = {"weight": 0.6, "density": 0.45}
METHODS = {
    "linear": dict(models=[{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.3}}]),
    "slerp": dict(base_model="a", models=[{"model": "a"}, {"model": "b"}], parameters={"t": [0.1, 0.9]}),
    "nuslerp": dict(models=[{"model": "a", "parameters": {"weight": 0.3}}, {"model": "b", "parameters": {"weight": 0.5}}]),
    "nuslerp-base-rows": dict(merge_method="nuslerp", base_model="base", parameters={"nuslerp_flatten": False},
                              models=[{"model": "a", "parameters": {"weight": 0.3}},
                                      {"model": "b", "parameters": {"weight": 0.5}}]),
    "multislerp": dict(base_model="base", models=[{"model": m, "parameters": {"weight": w}}
                                                  for m, w in (("a", 0.2), ("b", 0.5), ("c", 0.3))]),
    "karcher": dict(models=[{"model": "a"}, {"model": "b"}, {"model": "c"}]),
    "task_arithmetic": dict(base_model="base", parameters={"lambda": 0.8},
                            models=[{"model": m, "parameters": {"weight": 0.5}} for m in "abc"]),
    "ties": dict(base_model="base", models=[{"model": m, "parameters": GTA} for m in "abc"]),
    "ties-rescale-int8": dict(merge_method="ties", base_model="base",
                              parameters={"rescale": True, "int8_mask": True, "normalize": False, "lambda": 1.3},
                              models=[{"model": m, "parameters": {"weight": 0.5, "density": d}}
                                      for m, d in (("a", 0.004), ("b", 0.7), ("c", 0.33))]),
    "breadcrumbs": dict(base_model="base", models=[{"model": m, "parameters": {**GTA, "gamma": 0.05}} for m in "abc"]),
    "breadcrumbs_ties": dict(base_model="base", models=[{"model": m, "parameters": {**GTA, "gamma": 0.05}}
                                                        for m in "abc"]),
    "dare_ties-density1": dict(merge_method="dare_ties", base_model="base",
                               models=[{"model": m, "parameters": {"weight": 0.5, "density": 1.0}} for m in "abc"]),
    "della-density1": dict(merge_method="della", base_model="base",
                           models=[{"model": m, "parameters": {"weight": 0.5, "density": 1.0}} for m in "abc"]),
    "model_stock": dict(base_model="base", models=[{"model": m} for m in "abc"]),
    "model_stock-filter_wise": dict(merge_method="model_stock", base_model="base", parameters={"filter_wise": True},
                                    models=[{"model": m} for m in "abc"]),
    "sce": dict(base_model="base", parameters={"select_topk": 0.5}, models=[{"model": m} for m in "abc"]),
    "nearswap": dict(base_model="base", parameters={"t": 0.01}, models=[{"model": "base"}, {"model": "a"}]),
    "passthrough": dict(slices=[{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                                {"sources": [{"model": "b", "layer_range": [1, 2]}]}]),
    "ties-slices-filter": dict(merge_method="ties", base_model="base", slices=[{"sources": [
        {"model": "base", "layer_range": [0, 2]},
        {"model": "a", "layer_range": [0, 2], "parameters": {"weight": 1.0,
                                                              "density": [{"filter": "q_proj", "value": 0.2},
                                                                          {"filter": "mlp", "value": [0.3, 0.9]},
                                                                          {"value": 0.6}]}},
        {"model": "b", "layer_range": [0, 2], "parameters": {"weight": 0.5, "density": 0.5}}]}]),
}


def load_script(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_models(family: str, root: Path) -> dict[str, Path]:
    config, _ = hf_configs()[FAMILIES[family]["name"]]
    config.architectures = [config.__class__.__name__.replace("Config", "ForCausalLM")]
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    dirs = {}
    for i, name in enumerate(["base", "a", "b", "c"]):
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for key, p in base.state_dict().items():
                noise = 0 if name == "base" else torch.randn(p.shape, generator=generator) * 0.02
                p.copy_(base_state[key] + noise)
        hf_dir = root / family / "hf" / name
        base.save_pretrained(hf_dir)
        forge_dir = root / family / "forge" / name
        forge_dir.mkdir(parents=True)
        for f in ("config.json", "model.safetensors"):
            shutil.copy2(hf_dir / f, forge_dir / f)
        dirs[name] = hf_dir
    return dirs


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def with_paths(value, paths: dict[str, Path]):
    if isinstance(value, dict):
        return {k: (str(paths[v]) if k in ("model", "base_model") else with_paths(v, paths)) for k, v in value.items()}
    if isinstance(value, list):
        return [with_paths(v, paths) for v in value]
    return value


def main(mergekit_yaml: str, work_dir: str) -> None:
    work = Path(work_dir)
    shutil.rmtree(work, ignore_errors=True)
    convert = load_script("scripts/convert_hf_checkpoint.py")
    merge = load_script("scripts/merge_models.py")
    to_hf = load_script("scripts/convert_to_hf.py")
    results = {}
    for family in FAMILIES:
        hf_dirs = make_models(family, work)
        forge_dirs = {name: work / family / "forge" / name for name in hf_dirs}
        for d in forge_dirs.values():
            convert.convert_hf_checkpoint(d)
        for label, recipe in METHODS.items():
            config = {"merge_method": label, **recipe, "dtype": "float32"}
            theirs, ours = work / family / "mergekit" / label, work / family / "ours" / label
            yaml_mk = work / family / f"{label}.mergekit.yaml"
            yaml_mk.write_text(yaml.safe_dump(with_paths(config, hf_dirs)))
            run = subprocess.run([mergekit_yaml, str(yaml_mk), str(theirs), "--no-copy-tokenizer", "--quiet"],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                results[(family, label)] = "mergekit failed: " + run.stderr.strip().splitlines()[-1]
                continue
            merge.merge_models(out_dir=ours, **with_paths(config, forge_dirs))
            to_hf.convert_to_hf(ours, work / family / "ours-hf" / label)
            a, b = hf_tensors(theirs), hf_tensors(work / family / "ours-hf" / label)
            a.pop("lm_head.weight", None) if "lm_head.weight" not in b else None
            if set(a) != set(b):
                results[(family, label)] = f"different tensors: {sorted(set(a) ^ set(b))[:4]}"
                continue
            diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            scale = max(a[k].float().abs().max().item() for k in a)
            results[(family, label)] = f"{diff:.2e} (largest entry {scale:.2f})"
    print("| method | " + " | ".join(FAMILIES) + " |")
    print("|---|" + "---|" * len(FAMILIES))
    for label in METHODS:
        print(f"| {label} | " + " | ".join(results[(f, label)] for f in FAMILIES) + " |")
    (work / "results.json").write_text(json.dumps({f"{f}/{m}": r for (f, m), r in results.items()}, indent=2))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit_yaml", default="/work/venvs/mergekit/bin/mergekit-yaml")
    parser.add_argument("--work_dir", default="/tmp/merge-vs-mergekit")
    main(**vars(parser.parse_args()))
