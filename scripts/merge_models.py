"""Merge Forge checkpoints of one architecture into a new checkpoint, from a mergekit-style YAML.

    python scripts/merge_models.py --config examples/merge/slerp.yaml --out_dir checkpoints/merged/smollm2-slerp

Methods (`merge_method`), as in mergekit 0.1.5 with its parameter names and defaults: linear, slerp, nuslerp,
multislerp, karcher, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
della_linear, model_stock, sce, nearswap, passthrough; see tutorials/merge.md for each one's YAML and
model/workflows/merge.py for the math. The YAML:

    merge_method: ties
    base_model: checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct   # the model the task vectors are taken from
    models:                                                          # or `slices:` (below)
      - model: checkpoints/merged/numbers
        parameters: {weight: 1.0, density: 0.5}                      # a number, a per-layer gradient [0.2, 0.8],
                                                                     # or [{filter: mlp, value: 0.3}, {value: 0.5}]
    parameters: {lambda: 1.0, normalize: true}                       # defaults for every model, and method settings
    dtype: float32                                                   # of the output; default: the base model's
    tokenizer_source: base                                           # base, or a model whose tokenizer to copy
    seed: 0                                                          # the random methods' drops (DARE, DELLA)

Each weight is merged as the Hugging Face checkpoint has it: our fused tensors (Llama's q/k/v, Phi-3's gate/up
split the other way) are converted to the HF tensors with the weight maps of model/weights/convert.py, merged one
by one, and converted back, so `filter`s name HF modules (self_attn, q_proj, mlp, ...; ours match too).
`slices` builds the output from layer ranges (end exclusive): with passthrough one source per slice, stacked in
order (frankenmerges, self-merges that repeat layers); with the other methods each slice merges its sources'
layers, which must have the same length; a gradient runs over each slice's layers, as in mergekit. Tensors are
read one weight at a time from memory-mapped safetensors and each merged weight is written to disk at once (the
file's header is known from the plan), so the merge holds a few copies of one weight, not the models; the
task-vector methods work on chunks of rows (benchmarks/merge_memory.py measures each method). The output is a complete
checkpoint (weights, model_config.yaml with the new layer count, tokenizer, prompt style, config.json, and the
merge config as merge_config.yaml) that generate/, eval/ and finetune/ read.
"""

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from tqdm import tqdm

from model.cli import run_cli
from model.config import Config
from model.device import DTYPES
from model.files import atomic_write_text, check_out_dir, publish_dir
from model.weights.checkpoint import copy_checkpoint_files
from model.weights.convert import WeightMap, hf_config_dict, weight_maps
from model.workflows.merge import (
    METHODS,
    RANDOM_METHODS,
    REQUIRED,
    CheckpointReader,
    MergeSpec,
    check_spec,
    layer_of,
    merge_weight,
    parse_spec,
    resolve_model_dir,
    resolve_parameter,
    save_streamed,
    weight_generator,
)

# how errors name the YAML: its keys are this script's flags, so they may come from --config or the command line
CONFIG_LABEL = "merge config"
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# architecture fields that may differ between the models merged
FREE_CONFIG_FIELDS = {"name", "hf_repo", "n_layer"}


@dataclass
class Source:
    model: str  # the reference as written in the YAML
    start: int
    end: int  # exclusive; -1 until the model's config is read (`models:` takes every layer)
    parameters: dict
    where: str


@dataclass
class Slice:
    base: Optional[Source]  # the method's base model, None where it has none
    others: list[Source]  # every other model, in the YAML's order
    parameters: dict


@dataclass
class Unit:
    """One weight map of the output: our tensors, the HF tensors they are made of, and where they come from."""

    weight_map: WeightMap
    out_names: list[str]
    hf_names: list[str]
    t: float  # the gradient position: 0 for embeddings, norm and head, layer index / (slice length - 1) in a slice
    slice: Slice
    offset: Optional[int]  # the layer within the slice, None outside the blocks
    params: list[tuple[dict, dict]] = None  # per HF tensor: the merge's parameters, the per-model lists


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
        merge_method: linear, slerp, nuslerp, multislerp, karcher, task_arithmetic, ties, dare_ties, dare_linear,
            breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock, sce, nearswap or passthrough.
        models: The models to merge, `[{model: DIR, parameters: {weight: ..., density: ...}}]` (or give `slices`).
        slices: `[{sources: [{model: DIR, layer_range: [start, end], parameters: {...}}], parameters: {...}}]`,
            stacked in order.
        base_model: The model the task vectors are taken from (the task-vector methods, model_stock, sce,
            nearswap; nuslerp and multislerp when given) and slerp's t=0 end (without it, the first model).
        parameters: Defaults for the models' parameters, and the method's own (t, lambda, normalize, ...). Each is a
            number, a per-layer gradient `[first, ..., last]`, or `[{filter: NAME_PART, value: ...}, {value: ...}]`.
        dtype: The output's dtype (float32, bfloat16, float16); default: the base (or first) model's. The merge
            itself computes in float32.
        tokenizer_source: `base`, or the model whose tokenizer and prompt style the output gets.
        seed: Seeds the random methods' drops (DARE, DELLA), per weight, so the same config gives the same merge.
        shard_size_mb: Write the weights in files of at most this size.
        dry_run: Check the config, the models' architectures and tensor shapes, print the plan, write nothing.
    """
    data = {key: value for key, value in dict(
        merge_method=merge_method, models=models, slices=slices, base_model=base_model, parameters=parameters,
        dtype=dtype, tokenizer_source=tokenizer_source, seed=seed).items() if value is not None}
    try:
        spec = parse_spec(MergeSpec, data, "")
    except ValueError as e:
        raise ValueError(f"{CONFIG_LABEL}: {e}") from None
    check_spec(spec, CONFIG_LABEL)
    method = METHODS[spec.merge_method]
    if method.base == "required" and spec.base_model is None:
        raise ValueError(f"{CONFIG_LABEL}: merge_method {spec.merge_method} needs `base_model`")

    out_slices = read_slices(spec)
    references = {s.model for sl in out_slices for s in [sl.base, *sl.others] if s is not None}
    if spec.base_model is not None:
        references.add(spec.base_model)
    dirs = {ref: resolve_model_dir(ref, f"{CONFIG_LABEL}: model {ref!r}") for ref in references}
    configs = {ref: Config.from_checkpoint(path) for ref, path in dirs.items()}
    readers = {ref: CheckpointReader(path) for ref, path in dirs.items()}
    reference = spec.base_model if spec.base_model is not None else first_source(out_slices[0]).model
    check_architectures(configs, reference)
    for i, out_slice in enumerate(out_slices):
        check_slice(spec.merge_method, out_slice, configs, i)

    out_config = replace(configs[reference], name=out_dir.name, hf_repo="",
                         n_layer=sum(length(sl) for sl in out_slices))
    units = plan_units(out_config, out_slices)
    check_shapes(units, readers)
    # every parameter is resolved before any work, so a bad value fails fast and leaves nothing behind
    for unit in units:
        unit.params = [unit_parameters(spec, unit, name) for name in unit.hf_names]

    first_tensor = units[0].out_names[0]
    out_dtype = DTYPES[spec.dtype] if spec.dtype else SAFETENSORS_DTYPES[readers[reference].dtypes[first_tensor]]
    tokenizer_dir = pick_tokenizer_dir(spec.tokenizer_source, reference, dirs)

    n_models = f"{len(references)} model{'s' if len(references) > 1 else ''}"
    n_tensors = sum(len(unit.out_names) for unit in units)
    print(f"{spec.merge_method}: {n_models} -> {out_config.n_layer} layers, {n_tensors} tensors, {out_dtype}")
    if dry_run:
        for unit in units:
            for name in unit.out_names:
                print(f"  {name} <- " + ", ".join(f"{s.model}:{source_name(s, unit, name)}"
                                                  for s in unit_sources(unit)))
        return

    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-merging-"))
    try:
        merged = (
            (name, tensor)
            for unit in tqdm(units, desc="Merging", unit="weight")
            for name, tensor in merge_unit(spec, unit, readers)
        )
        planned = [(name, readers[unit_sources(unit)[0].model].shapes[source_name(unit_sources(unit)[0], unit, name)])
                   for unit in units for name in unit.out_names]
        save_streamed(planned, out_dtype, merged, tmp_dir, shard_size_mb * 2**20)
        out_config.save(tmp_dir)
        copy_checkpoint_files(tokenizer_dir, tmp_dir)
        hf_config = hf_config_dict(out_config)
        hf_config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
        atomic_write_text(tmp_dir / "config.json", json.dumps(hf_config, indent=2))
        atomic_write_text(tmp_dir / "merge_config.yaml", yaml.safe_dump(data, sort_keys=False))
        check_out_dir(out_dir)
        publish_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"Saved the merged model ({out_config.n_layer} layers) to {out_dir}")


# ----------------------------------------------------------------------------------------------- the slices


def read_slices(spec: MergeSpec) -> list[Slice]:
    """The output's slices, each with its base source (where the method has one) and the other sources. With
    `models:` one slice over every model's whole depth, the base added where it is not listed (as mergekit does)."""
    method = METHODS[spec.merge_method]
    uses_base = method.base != "unused" and (spec.base_model is not None or spec.merge_method == "slerp")
    if spec.models is not None:
        raw = [([Source(m.model, 0, -1, m.parameters, f"models[{i}]") for i, m in enumerate(spec.models)], {})]
        # as in mergekit, a base_model not listed joins the models, also where the method treats it as any other
        if (spec.base_model is not None and spec.base_model not in [m.model for m in spec.models]
                and spec.merge_method != "passthrough"):
            raw[0][0].append(Source(spec.base_model, 0, -1, {}, "base_model"))
    else:
        raw = [([Source(s.model, s.layer_range[0], s.layer_range[1], s.parameters, f"slices[{i}].sources[{j}]")
                 for j, s in enumerate(sl.sources)], sl.parameters) for i, sl in enumerate(spec.slices)]
    result = []
    for i, (sources, params) in enumerate(raw):
        if not uses_base:
            result.append(Slice(None, sources, params))
            continue
        # slerp without base_model interpolates from the first model, as Forge always did
        base_ref = spec.base_model if spec.base_model is not None else sources[0].model
        bases = [s for s in sources if s.model == base_ref]
        if not bases:
            raise ValueError(f"{CONFIG_LABEL}: slice {i} does not include base_model {base_ref!r},"
                             f" which {spec.merge_method} needs")
        result.append(Slice(bases[0], [s for s in sources if s is not bases[0]], params))
    return result


def first_source(out_slice: Slice) -> Source:
    return out_slice.base if out_slice.base is not None else out_slice.others[0]


def length(out_slice: Slice) -> int:
    source = first_source(out_slice)
    return source.end - source.start


def check_architectures(configs: dict[str, Config], reference: str) -> None:
    expected = asdict(configs[reference])
    for ref, other in configs.items():
        differences = [f"{key}: {expected[key]!r} vs {value!r}" for key, value in asdict(other).items()
                       if key not in FREE_CONFIG_FIELDS and value != expected[key]]
        if differences:
            raise ValueError(f"{CONFIG_LABEL}: model {ref!r} has another architecture than {reference!r}"
                             f" ({'; '.join(differences)}); only models of one architecture merge")


def check_slice(method_name: str, out_slice: Slice, configs: dict[str, Config], index: int) -> None:
    method = METHODS[method_name]
    sources = [s for s in [out_slice.base, *out_slice.others] if s is not None]
    for source in sources:
        n_layer = configs[source.model].n_layer
        if source.end == -1:
            source.end = n_layer
        if source.end > n_layer:
            raise ValueError(f"{CONFIG_LABEL}: {source.where}.layer_range [{source.start}, {source.end}] is out of"
                             f" bounds: model {source.model!r} has {n_layer} layers (0..{n_layer - 1}; the end is"
                             f" exclusive)")
    if len({s.end - s.start for s in sources}) > 1:
        detail = ", ".join(f"{s.model!r}: {s.end - s.start}" for s in sources)
        raise ValueError(f"{CONFIG_LABEL}: the sources of slice {index} have different numbers of layers ({detail});"
                         f" {method_name} merges layer by layer")
    n = len(out_slice.others)
    besides = " besides base_model" if out_slice.base is not None else ""
    if n < method.min_models or method.max_models is not None and n > method.max_models:
        count = (f"exactly {method.min_models}" if method.min_models == method.max_models
                 else f"at least {method.min_models}")
        raise ValueError(f"{CONFIG_LABEL}: {method_name} needs {count} model{'s' if method.min_models > 1 else ''}"
                         f"{besides} per slice; slice {index} has {n}")


def plan_units(out_config: Config, out_slices: list[Slice]) -> list[Unit]:
    """Every weight map of the output, in checkpoint order, with the slice and layer it comes from."""
    layer_slices = [(sl, offset) for sl in out_slices for offset in range(length(sl))]
    units = []
    for weight_map in weight_maps(out_config):
        located = layer_of(weight_map.lit[0])
        if located is None:
            # embeddings come from the first slice's models, the final norm and head from the last one's (t = 0)
            out_slice = out_slices[0] if "wte" in weight_map.lit[0] else out_slices[-1]
            units.append(Unit(weight_map, weight_map.lit, weight_map.hf, 0.0, out_slice, None))
            continue
        out_slice, offset = layer_slices[located[0]]
        n = length(out_slice)
        units.append(Unit(weight_map, weight_map.lit, weight_map.hf, offset / (n - 1) if n > 1 else 1.0, out_slice,
                          offset))
    return units


def unit_sources(unit: Unit) -> list[Source]:
    return [s for s in [unit.slice.base, *unit.slice.others] if s is not None]


def source_name(source: Source, unit: Unit, out_name: str) -> str:
    """The name in `source`'s checkpoint of an output tensor: the same, with the source's layer index."""
    if unit.offset is None:
        return out_name
    _, suffix = layer_of(out_name)
    return f"transformer.h.{source.start + unit.offset}.{suffix}"


def check_shapes(units: list[Unit], readers: dict[str, CheckpointReader]) -> None:
    for unit in units:
        for out_name in unit.out_names:
            seen = []
            for source in unit_sources(unit):
                name = source_name(source, unit, out_name)
                if name not in readers[source.model]:
                    raise ValueError(f"model {source.model!r} has no tensor {name!r} (needed for {out_name})")
                seen.append((source.model, name, readers[source.model].shapes[name]))
            for model, name, shape in seen[1:]:
                if shape != seen[0][2]:
                    raise ValueError(f"shape mismatch for {out_name}: {seen[0][0]!r}:{seen[0][1]} is"
                                     f" {list(seen[0][2])}, {model!r}:{name} is {list(shape)}")


def pick_tokenizer_dir(value: Optional[str], reference: str, dirs: dict[str, Path]) -> Path:
    if value is None or value == "base":
        return dirs[reference]
    if value in dirs:
        return dirs[value]
    if value == "union":
        raise ValueError(f"{CONFIG_LABEL}: tokenizer_source: union is not supported: Forge merges models that share"
                         " one vocabulary (mergekit's union builds a new tokenizer and re-orders each model's embedding"
                         " rows); give `base` or one of the merged models")
    raise ValueError(f"{CONFIG_LABEL}: tokenizer_source must be `base` or one of the merged models {sorted(dirs)},"
                     f" got {value!r}")


# ----------------------------------------------------------------------------------------------- merging


def unit_parameters(spec: MergeSpec, unit: Unit, hf_name: str) -> tuple[dict, dict]:
    """The method's parameters for one HF tensor: the merge's as values, the per-model ones as lists over the
    non-base models. Like mergekit, a value comes from the first of: the source's parameters, the slice's, the
    top-level `parameters`, the method's default (a filtered list that matches nothing falls through)."""
    method = METHODS[spec.merge_method]
    names = [hf_name, *unit.out_names]

    def value(name: str, layers: list[tuple[dict, str]]) -> Any:
        parameter = method.parameters[name]
        for params, where in layers:
            if name in params:
                resolved = resolve_parameter(params[name], parameter.kind, names, unit.t,
                                             f"{CONFIG_LABEL}: {where}.{name}")
                if resolved is not None:
                    return resolved
        if parameter.default == REQUIRED:
            raise ValueError(f"{CONFIG_LABEL}: {spec.merge_method} needs the parameter `{name}` for {hf_name}"
                             f" (in `parameters` or the models' parameters)")
        return parameter.default

    shared = [(unit.slice.parameters, "slice parameters"), (spec.parameters, "parameters")]
    params = {name: value(name, shared) for name, p in method.parameters.items() if not p.per_model}
    per_model = {name: [value(name, [(s.parameters, f"{s.where}.parameters"), *shared]) for s in unit.slice.others]
                 for name, p in method.parameters.items() if p.per_model}
    if spec.merge_method == "slerp" and not 0 <= params["t"] <= 1:
        raise ValueError(f"{CONFIG_LABEL}: slerp's t must be in [0, 1], got {params['t']} for {hf_name}")
    for i, density in enumerate(per_model.get("density", [])):
        if not 0 <= density <= 1:
            raise ValueError(f"{CONFIG_LABEL}: density must be in [0, 1], got {density} for {hf_name}")
        epsilon = per_model.get("epsilon", [None] * (i + 1))[i]
        if epsilon is not None and 0 < density < 1 and not 0 < density - epsilon < density + epsilon < 1:
            raise ValueError(f"{CONFIG_LABEL}: {spec.merge_method} needs density +/- epsilon in (0, 1), got density"
                             f" {density} and epsilon {epsilon} for {hf_name}")
    return params, per_model


def merge_unit(spec: MergeSpec, unit: Unit, readers: dict[str, CheckpointReader]):
    """(name, tensor) for each of the unit's output tensors: the sources' tensors converted to the HF ones, each
    merged, converted back."""
    hf = {}
    for source in unit_sources(unit):
        tensors = [readers[source.model].get(source_name(source, unit, name)) for name in unit.out_names]
        hf[id(source)] = unit.weight_map.to_hf(tensors)
    merged = []
    for k, hf_name in enumerate(unit.hf_names):
        base = hf[id(unit.slice.base)][k] if unit.slice.base is not None else None
        others = [hf[id(source)][k] for source in unit.slice.others]
        generator = weight_generator(spec.seed, hf_name) if spec.merge_method in RANDOM_METHODS else None
        params, per_model = unit.params[k]
        merged.append(merge_weight(spec.merge_method, base, others, params, per_model, generator))
    del hf
    return zip(unit.out_names, unit.weight_map.to_lit(merged))


if __name__ == "__main__":
    run_cli(merge_models)
