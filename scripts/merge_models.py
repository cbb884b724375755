"""Merge Forge checkpoints of one architecture into a new checkpoint, from a mergekit-style YAML.

    python scripts/merge_models.py --config examples/merge/slerp.yaml --out_dir checkpoints/merged/smollm2-slerp

Methods (`merge_method`): linear, slerp, task_arithmetic, ties, dare_ties, dare_linear, passthrough; see
tutorials/merge.md for each one's YAML and model/merge.py for the math. The YAML:

    merge_method: ties
    base_model: checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct   # the model the task vectors are taken from
    models:                                                          # or `slices:` (below)
      - model: checkpoints/merged/numbers
        parameters: {weight: 1.0, density: 0.5}                      # a number, a per-layer gradient [0.2, 0.8],
                                                                     # or [{filter: mlp, value: 0.3}, {value: 0.5}]
    parameters: {lambda: 1.0, normalize: true}                       # defaults for every model, and method settings
    dtype: float32                                                   # of the output; default: the base model's
    tokenizer_source: base                                           # base, or a model whose tokenizer to copy
    seed: 0                                                          # DARE's random drops

`slices` builds the output from layer ranges (end exclusive): with passthrough one source per slice, stacked in
order (frankenmerges, self-merges that repeat layers); with the other methods each slice merges its sources'
layers, which must have the same length. Tensors are read one at a time from memory-mapped safetensors, so the
merge needs about one output shard (`--shard_size_mb`) plus one tensor per model of RAM, not the models' size.
The output is a complete checkpoint (weights, model_config.yaml with the new layer count, tokenizer, prompt
style, config.json, and the merge config as merge_config.yaml) that generate/, eval/ and finetune/ read.
"""

import json
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from model.cli import run_cli
from model.config import Config
from model.device import DTYPES
from model.files import atomic_write_text, check_out_dir, publish_dir
from model.weights.checkpoint import copy_checkpoint_files, save_sharded
from model.weights.convert import hf_config_dict
from model.workflows.merge import (
    CheckpointReader,
    dare,
    layer_of,
    linear,
    resolve_model_dir,
    resolve_parameter,
    slerp,
    task_arithmetic,
    ties,
)

# method -> (needs a base model, the parameters it reads, their defaults; None: required)
METHODS = {
    "linear": (False, {"weight": 1.0, "normalize": True}),
    "slerp": (False, {"t": None}),
    "task_arithmetic": (True, {"weight": 1.0, "lambda": 1.0, "normalize": False}),
    "ties": (True, {"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": True}),
    "dare_ties": (True, {"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": True}),
    "dare_linear": (True, {"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": False}),
    "passthrough": (False, {"scale": 1.0}),
}
# how errors name the YAML: its keys are this script's flags, so they may come from --config or the command line
CONFIG_LABEL = "merge config"
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# architecture fields that may differ between the models merged
FREE_CONFIG_FIELDS = {"name", "hf_repo", "n_layer"}


@dataclass
class Source:
    model: str  # the reference as written in the YAML (the key into `models`)
    start: int
    end: int
    parameters: dict = field(default_factory=dict)
    where: str = ""


@dataclass
class OutputTensor:
    name: str
    position: float  # where the tensor sits, 0 (embeddings, first layer) .. 1 (last layer, head), for gradients
    sources: list[tuple[str, str]]  # (model, tensor name in that model), base first where the method has one
    source_params: list[dict]


def merge_models(
    out_dir: Path,
    merge_method: str,
    models: Optional[list[dict]] = None,
    slices: Optional[list[dict]] = None,
    base_model: Optional[str] = None,
    parameters: Optional[dict] = None,
    dtype: Optional[str] = None,
    tokenizer_source: Optional[str] = None,
    seed: int = 0,
    shard_size_mb: int = 4096,
    dry_run: bool = False,
) -> None:
    """Merge models as a mergekit-style YAML (given with --config) describes, and write the result to `out_dir`.

    Args:
        out_dir: Where to write the merged checkpoint (must not exist yet, or be empty).
        merge_method: linear, slerp, task_arithmetic, ties, dare_ties, dare_linear or passthrough.
        models: The models to merge, `[{model: DIR, parameters: {weight: ..., density: ...}}]` (or give `slices`).
        slices: `[{sources: [{model: DIR, layer_range: [start, end], parameters: {...}}]}]`, stacked in order.
        base_model: The model the task vectors are taken from (task_arithmetic, ties, dare_*), slerp's t=0 end,
            and where passthrough takes the embeddings and head from.
        parameters: Defaults for the models' parameters, and the method's own (t, lambda, normalize). Each is a
            number, a per-layer gradient `[first, ..., last]`, or `[{filter: NAME_PART, value: ...}, {value: ...}]`.
        dtype: The output's dtype (float32, bfloat16, float16); default: the base (or first) model's.
        tokenizer_source: `base`, or the model whose tokenizer and prompt style the output gets.
        seed: Seeds DARE's random drops (per tensor, so the same config gives the same merge).
        shard_size_mb: Write the weights in files of at most this size; the merge holds one such file in RAM.
        dry_run: Check the config, the models' architectures and tensor shapes, print the plan, write nothing.
    """
    spec = {key: value for key, value in dict(
        merge_method=merge_method, models=models, slices=slices, base_model=base_model, parameters=parameters,
        dtype=dtype, tokenizer_source=tokenizer_source, seed=seed).items() if value is not None}
    config = CONFIG_LABEL
    method = merge_method
    if method not in METHODS:
        raise ValueError(f"{config}: merge_method {method!r} is not one of {', '.join(METHODS)}")
    needs_base, defaults = METHODS[method]
    global_params = spec.get("parameters") or {}
    check_parameter_names(global_params, defaults, config, "parameters")

    model_params, slices = read_sources(spec, config, method)
    references = {source.model for sources in slices for source in sources} | set(model_params)
    base_ref = spec.get("base_model")
    if base_ref is not None:
        references.add(base_ref)
    if needs_base and base_ref is None:
        raise ValueError(f"{config}: merge_method {method} needs `base_model` (the model the task vectors start from)")
    dirs = {ref: resolve_model_dir(ref, f"{config}: model {ref!r}") for ref in references}
    configs = {ref: Config.from_checkpoint(path) for ref, path in dirs.items()}
    readers = {ref: CheckpointReader(path) for ref, path in dirs.items()}
    reference_model = base_ref if base_ref is not None else slices[0][0].model
    check_architectures(configs, reference_model, config)

    for i, sources in enumerate(slices):
        check_slice(method, sources, base_ref, configs, config, i)
    plan = plan_tensors(method, slices, base_ref, reference_model, model_params, readers)
    check_shapes(plan, readers)
    # every parameter is resolved before any work, so a bad value fails fast and leaves nothing behind
    tensor_params = [tensor_parameters(method, tensor, global_params, defaults, config) for tensor in plan]

    out_config = replace(configs[reference_model], name=out_dir.name, hf_repo="",
                         n_layer=sum(sources[0].end - sources[0].start for sources in slices))
    dtype = spec.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"{config}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out_dtype = DTYPES[dtype] if dtype else SAFETENSORS_DTYPES[readers[reference_model].dtypes[plan[0].sources[0][1]]]
    tokenizer_dir = pick_tokenizer_dir(spec.get("tokenizer_source"), base_ref, reference_model, dirs, config)

    n_models = f"{len(references)} model{'s' if len(references) > 1 else ''}"
    print(f"{method}: {n_models} -> {out_config.n_layer} layers, {len(plan)} tensors, {out_dtype}")
    if dry_run:
        for tensor in plan:
            print(f"  {tensor.name} <- " + ", ".join(f"{model}:{name}" for model, name in tensor.sources))
        return

    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-merging-"))
    try:
        merged = (
            (tensor.name, merge_tensor(method, tensor, readers, params, seed).to(out_dtype))
            for tensor, params in tqdm(list(zip(plan, tensor_params)), desc="Merging", unit="tensor")
        )
        save_sharded(merged, tmp_dir, shard_size_bytes=shard_size_mb * 2**20)
        out_config.save(tmp_dir)
        copy_checkpoint_files(tokenizer_dir, tmp_dir)
        hf_config = hf_config_dict(out_config)
        hf_config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
        atomic_write_text(tmp_dir / "config.json", json.dumps(hf_config, indent=2))
        atomic_write_text(tmp_dir / "merge_config.yaml", yaml.safe_dump(spec, sort_keys=False))
        check_out_dir(out_dir)
        publish_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"Saved the merged model ({out_config.n_layer} layers) to {out_dir}")


# ----------------------------------------------------------------------------------------------- reading the YAML


def check_parameter_names(params, defaults: dict, config: str, where: str) -> None:
    if not isinstance(params, dict):
        raise ValueError(f"{config}: {where} must be a mapping, got {params!r}")
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"{config}: {where}: unknown parameters {unknown} for this merge_method; it reads"
                         f" {sorted(defaults)}")


def read_range(value, config: str, where: str) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] < value[1]):
        raise ValueError(f"{config}: {where}.layer_range must be [start, end] with 0 <= start < end, got {value!r}")
    return value[0], value[1]


def read_sources(spec: dict, config: str, method: str) -> tuple[dict[str, dict], list[list[Source]]]:
    """Per-model parameters (from `models`), and the slices: lists of sources whose layers are merged together.
    With `models` (no `slices`) there is one slice over every model's whole depth; its ranges are filled in once the
    models' configs are read (end=-1 until then)."""
    _, defaults = METHODS[method]
    has_models, has_slices = spec.get("models") is not None, spec.get("slices") is not None
    if has_models == has_slices:
        raise ValueError(f"{config}: give exactly one of `models` and `slices`")
    model_params: dict[str, dict] = {}
    if has_models:
        models = spec["models"]
        if not isinstance(models, list) or not models:
            raise ValueError(f"{config}: `models` must be a non-empty list of {{model: ..., parameters: ...}}")
        sources = []
        for i, entry in enumerate(models):
            if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
                raise ValueError(f"{config}: models[{i}] must be {{model: PATH, parameters: {{...}}}}, got {entry!r}")
            params = entry.get("parameters") or {}
            check_parameter_names(params, defaults, config, f"models[{i}].parameters")
            model_params[entry["model"]] = params
            sources.append(Source(entry["model"], 0, -1, params, f"models[{i}]"))
        base = spec.get("base_model")
        if base is not None and base not in model_params and (METHODS[method][0] or method == "slerp"):
            sources.insert(0, Source(base, 0, -1, {}, "base_model"))
        return model_params, [sources]
    slices = spec["slices"]
    if not isinstance(slices, list) or not slices:
        raise ValueError(f"{config}: `slices` must be a non-empty list of {{sources: [...]}}")
    result = []
    for i, entry in enumerate(slices):
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise ValueError(f"{config}: slices[{i}] must be {{sources: [{{model: PATH, layer_range: [start, end]}}]}}")
        sources = []
        for j, source in enumerate(entry["sources"]):
            where = f"slices[{i}].sources[{j}]"
            if not isinstance(source, dict) or "model" not in source or set(source) - {"model", "layer_range", "parameters"}:
                raise ValueError(f"{config}: {where} must be {{model: PATH, layer_range: [start, end], parameters: ...}}")
            if "layer_range" not in source:
                raise ValueError(f"{config}: {where} has no layer_range")
            start, end = read_range(source["layer_range"], config, where)
            params = source.get("parameters") or {}
            check_parameter_names(params, defaults, config, f"{where}.parameters")
            sources.append(Source(source["model"], start, end, params, where))
        result.append(sources)
    return model_params, result


def check_architectures(configs: dict[str, Config], reference: str, config: str) -> None:
    expected = asdict(configs[reference])
    for ref, other in configs.items():
        differences = [f"{key}: {expected[key]!r} vs {value!r}" for key, value in asdict(other).items()
                       if key not in FREE_CONFIG_FIELDS and value != expected[key]]
        if differences:
            raise ValueError(f"{config}: model {ref!r} has another architecture than {reference!r}"
                             f" ({'; '.join(differences)}); only models of one architecture merge")


def check_slice(method: str, sources: list[Source], base: Optional[str], configs: dict[str, Config], config: str,
                index: int) -> None:
    for source in sources:
        n_layer = configs[source.model].n_layer
        if source.end == -1:
            source.end = n_layer
        if source.end > n_layer:
            raise ValueError(f"{config}: {source.where}.layer_range [{source.start}, {source.end}] is out of bounds:"
                             f" model {source.model!r} has {n_layer} layers (0..{n_layer - 1}; the end is exclusive)")
    lengths = {source.end - source.start for source in sources}
    if len(lengths) > 1:
        detail = ", ".join(f"{s.model!r}: {s.end - s.start}" for s in sources)
        raise ValueError(f"{config}: the sources of slice {index} have different numbers of layers ({detail});"
                         f" {method} merges layer by layer")
    models = [source.model for source in sources]
    if method == "passthrough" and len(sources) != 1:
        raise ValueError(f"{config}: passthrough stacks slices; slice {index} has {len(sources)} sources, it needs 1")
    if method == "slerp" and len(set(models)) != 2:
        raise ValueError(f"{config}: slerp interpolates between two models; slice {index} has {len(set(models))}")
    if METHODS[method][0] and base not in models:
        raise ValueError(f"{config}: slice {index} does not include base_model {base!r}, which {method} needs")
    if METHODS[method][0] and len(set(models)) < 2:
        raise ValueError(f"{config}: {method} needs at least one model besides base_model {base!r}")


def plan_tensors(method: str, slices: list[list[Source]], base: Optional[str], reference: str,
                 model_params: dict[str, dict], readers: dict[str, CheckpointReader]) -> list[OutputTensor]:
    """Every output tensor and the source tensors it is merged from, in checkpoint order."""
    n_out = sum(sources[0].end - sources[0].start for sources in slices)

    def ordered(sources: list[Source]) -> list[Source]:
        # the base first (t=0 for slerp); sources of the base model are not task vectors of their own
        if base is None:
            return sources
        return sorted(sources, key=lambda s: s.model != base)

    if method == "passthrough":
        outer_sources = [Source(reference, 0, 0)]
    else:
        outer_sources = ordered([Source(s.model, 0, 0, model_params.get(s.model, s.parameters)) for s in slices[0]])
    reference_reader = readers[reference]
    block_names = [layer_of(name)[1] for name in reference_reader.keys() if layer_of(name) and layer_of(name)[0] == 0]
    outer_names = [name for name in reference_reader.keys() if layer_of(name) is None]
    plan: list[OutputTensor] = []

    def outer(name: str, position: float) -> OutputTensor:
        return OutputTensor(name, position, [(s.model, name) for s in outer_sources], [s.parameters for s in outer_sources])

    plan += [outer(name, 0.0) for name in outer_names if name.startswith("transformer.wte")]
    out_layer = 0
    for sources in slices:
        sources = ordered(sources)
        for offset in range(sources[0].end - sources[0].start):
            position = out_layer / max(n_out - 1, 1)
            for suffix in block_names:
                plan.append(OutputTensor(
                    f"transformer.h.{out_layer}.{suffix}", position,
                    [(s.model, f"transformer.h.{s.start + offset}.{suffix}") for s in sources],
                    [{**model_params.get(s.model, {}), **s.parameters} for s in sources],
                ))
            out_layer += 1
    plan += [outer(name, 1.0) for name in outer_names if not name.startswith("transformer.wte")]
    return plan


def check_shapes(plan: list[OutputTensor], readers: dict[str, CheckpointReader]) -> None:
    for tensor in plan:
        (first_model, first_name), shapes = tensor.sources[0], []
        for model, name in tensor.sources:
            if name not in readers[model]:
                raise ValueError(f"model {model!r} has no tensor {name!r} (needed for {tensor.name})")
            shapes.append(readers[model].shapes[name])
        for (model, name), shape in zip(tensor.sources, shapes):
            if shape != shapes[0]:
                raise ValueError(f"shape mismatch for {tensor.name}: {first_model!r}:{first_name} is {list(shapes[0])},"
                                 f" {model!r}:{name} is {list(shape)}")


def pick_tokenizer_dir(value, base: Optional[str], reference: str, dirs: dict[str, Path], config: str) -> Path:
    if value is None or value == "base":
        return dirs[base if base is not None else reference]
    if value in dirs:
        return dirs[value]
    raise ValueError(f"{config}: tokenizer_source must be `base` or one of the merged models {sorted(dirs)}, got"
                     f" {value!r} (merging vocabularies is not supported: the models must share one tokenizer)")


# ----------------------------------------------------------------------------------------------- merging


def tensor_parameters(method: str, tensor: OutputTensor, global_params: dict, defaults: dict, config: str) -> dict:
    """The method's parameters for one output tensor: per-model ones as lists (over the fine-tunes for the
    task-vector methods, whose first source is the base), the others as numbers."""
    def param(name: str, params: dict) -> float:
        value = params.get(name, global_params.get(name, defaults[name]))
        if value is None:
            raise ValueError(f"{config}: {method} needs the parameter `{name}` (in `parameters`)")
        return resolve_parameter(value, tensor.name, tensor.position, f"{config}: parameter {name}")

    if method == "passthrough":
        return {"scale": param("scale", tensor.source_params[0])}
    if method == "slerp":
        t = param("t", {})
        if not 0 <= t <= 1:
            raise ValueError(f"{config}: slerp's t must be in [0, 1], got {t} for {tensor.name}")
        return {"t": t}
    normalize = bool(global_params.get("normalize", defaults["normalize"]))
    if method == "linear":
        return {"weights": [param("weight", p) for p in tensor.source_params], "normalize": normalize}
    tuned_params = tensor.source_params[1:]
    result = {"weights": [param("weight", p) for p in tuned_params], "lambda_": param("lambda", {}),
              "normalize": normalize}
    if method != "task_arithmetic":
        result["densities"] = [param("density", p) for p in tuned_params]
        for density in result["densities"]:
            if not 0 <= density <= 1:
                raise ValueError(f"{config}: density must be in [0, 1], got {density} for {tensor.name}")
    return result


def merge_tensor(method: str, tensor: OutputTensor, readers: dict[str, CheckpointReader], params: dict,
                 seed: int) -> torch.Tensor:
    tensors = [readers[model].get(name) for model, name in tensor.sources]
    if method == "passthrough":
        return tensors[0] if params["scale"] == 1 else tensors[0].float() * params["scale"]
    if method == "slerp":
        return slerp(tensors[0].float(), tensors[1].float(), params["t"])
    if method == "linear":
        return linear(tensors, params["weights"], params["normalize"])
    # the task-vector methods: the base is first, every other source is a fine-tune
    base, tuned = tensors[0], tensors[1:]
    if method == "task_arithmetic":
        return task_arithmetic(base, tuned, **params)
    if method == "ties":
        return ties(base, tuned, **params)
    # one generator per tensor, seeded by its name: the same drops whatever the order or the shard layout
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(tensor.name.encode()))
    return dare(base, tuned, generator=generator, sign_consensus=method == "dare_ties", **params)


if __name__ == "__main__":
    run_cli(merge_models)
