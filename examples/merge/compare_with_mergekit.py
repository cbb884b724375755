"""Merge the same tiny random checkpoints with mergekit and with scripts/merge_models.py, compare tensor by tensor,
and store mergekit's outputs as the test suite's reference.

    python examples/merge/compare_with_mergekit.py --mergekit_python /work/venvs/mergekit/bin/python \
        --reference tests/data/merge/mergekit-0.1.5.safetensors

Builds a base and three "fine-tunes" (base + small noise) of two families in float32: Llama with grouped-query
attention (q, k, v fused in our checkpoint, three tensors in theirs) and Phi-3 (gate/up fused in theirs, two
tensors in ours); converts them to Forge checkpoints (scripts/convert_hf_checkpoint.py); runs every config below
through mergekit (installed in a virtual environment of its own: `--mergekit_python`) and through
scripts/merge_models.py; exports ours with scripts/convert_to_hf.py; prints the largest absolute difference per
method and family. The random methods (dare_*, della*) are compared where they are deterministic (density 1);
tests/test_merge_methods.py checks them statistically. `--reference` stores the inputs, the configs and
mergekit's outputs in one small safetensors file, which tests/test_merge_models.py merges again and compares.
"""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
HF_CONFIGS = {
    # 4 query heads sharing 2 key/value heads, tied embeddings (as SmolLM2)
    "llama-gqa": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32, hidden_size=16,
                      intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True),
    "phi-3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], vocab_size=32, hidden_size=16,
                  intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=None, sliding_window=None),
}
MODELS = ("base", "a", "b", "c")
MERGEKIT_RUNNER = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(config))), out,
              MergeOptions(copy_tokenizer=False, quiet=True))
"""
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


def make_inputs(family: str) -> dict[str, dict[str, torch.Tensor]]:
    """The four models' HF tensors, from seeded generators (not transformers' init, so they do not change with its
    version): random weights, norms around 1, and each fine-tune the base plus noise of 1/10 its scale."""
    config = transformers.AutoConfig.for_model(**HF_CONFIGS[family])
    shapes = {k: v.shape for k, v in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()
              if not (config.tie_word_embeddings and k == "lm_head.weight")}
    generator = torch.Generator().manual_seed(0)
    base = {k: (1.0 if "norm" in k else 0.0) + 0.2 * torch.randn(shape, generator=generator)
            for k, shape in shapes.items()}
    models = {"base": base}
    for name in MODELS[1:]:
        models[name] = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    return models


def write_hf(directory: Path, family: str, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(HF_CONFIGS[family], indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def load_script(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_paths(value, paths: dict[str, Path]):
    """A recipe with model names ("base", "a", ...) replaced by directories."""
    if isinstance(value, dict):
        return {k: (str(paths[v]) if k in ("model", "base_model") else with_paths(v, paths)) for k, v in value.items()}
    if isinstance(value, list):
        return [with_paths(v, paths) for v in value]
    return value


def config_of(label: str) -> dict:
    return {"merge_method": label, **METHODS[label], "dtype": "float32"}


def forge_inputs(family: str, models: dict[str, dict[str, torch.Tensor]], root: Path) -> dict[str, Path]:
    """The models as Forge checkpoints, converted by scripts/convert_hf_checkpoint.py."""
    convert = load_script("scripts/convert_hf_checkpoint.py")
    dirs = {name: write_hf(root / family / "forge" / name, family, tensors) for name, tensors in models.items()}
    for directory in dirs.values():
        convert.convert_hf_checkpoint(directory)
    return dirs


def merge_ours(label: str, forge_dirs: dict[str, Path], out_dir: Path) -> dict[str, torch.Tensor]:
    """Merge with scripts/merge_models.py and export with scripts/convert_to_hf.py: the HF tensors."""
    load_script("scripts/merge_models.py").merge_models(out_dir=out_dir / "forge", **with_paths(config_of(label), forge_dirs))
    load_script("scripts/convert_to_hf.py").convert_to_hf(out_dir / "forge", out_dir / "hf")
    return load_file(out_dir / "hf" / "model.safetensors")


def main(mergekit_python: str, work_dir: str, reference: str = "") -> None:
    work = Path(work_dir)
    shutil.rmtree(work, ignore_errors=True)
    stored, rows = {}, {}
    for family in HF_CONFIGS:
        models = make_inputs(family)
        hf_dirs = {name: write_hf(work / family / "hf" / name, family, t) for name, t in models.items()}
        forge_dirs = forge_inputs(family, models, work)
        args = []
        for label in METHODS:
            config = work / family / f"{label}.yaml"
            config.write_text(yaml.safe_dump(with_paths(config_of(label), hf_dirs)))
            args += [str(config), str(work / family / "mergekit" / label)]
        subprocess.run([mergekit_python, "-c", MERGEKIT_RUNNER, *args], check=True)
        for name, tensors in models.items():
            stored.update({f"{family}/input/{name}/{k}": v for k, v in tensors.items()})
        for label in METHODS:
            theirs = {}
            for f in sorted((work / family / "mergekit" / label).glob("*.safetensors")):
                theirs.update(load_file(f))
            ours = merge_ours(label, forge_dirs, work / family / "ours" / label)
            if set(theirs) != set(ours):
                rows[(family, label)] = f"different tensors: {sorted(set(theirs) ^ set(ours))[:4]}"
                continue
            stored.update({f"{family}/{label}/{k}": v for k, v in theirs.items()})
            diff = max((theirs[k] - ours[k]).abs().max().item() for k in theirs)
            rows[(family, label)] = f"{diff:.1e}"
    print("| config | " + " | ".join(HF_CONFIGS) + " |")
    print("|---|" + "---|" * len(HF_CONFIGS))
    for label in METHODS:
        print(f"| {label} | " + " | ".join(rows[(f, label)] for f in HF_CONFIGS) + " |")
    if reference:
        Path(reference).parent.mkdir(parents=True, exist_ok=True)
        save_file(stored, reference, metadata={"mergekit": "0.1.5"})


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit_python", default="/work/venvs/mergekit/bin/python")
    parser.add_argument("--work_dir", default="/tmp/merge-vs-mergekit")
    parser.add_argument("--reference", default="", help="store inputs and mergekit's outputs here for the tests")
    main(**vars(parser.parse_args()))
