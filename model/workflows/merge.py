"""Model merging: the methods as functions on tensors, and streamed, memory-mapped access to checkpoints.

Every method takes the tensors of one weight (one per model, same shape) and returns the merged tensor; the
scripts (scripts/merge_models.py, scripts/merge_moe.py) walk the checkpoints one tensor at a time, so merging never
holds more than one weight per model, plus the output shard being written, in memory.

- linear: a weighted average (Wortsman et al. 2022, "Model soups").
- slerp: spherical interpolation of two models (Shoemake 1985; as popularised by mergekit).
- task_arithmetic: base + sum_i w_i (model_i - base) (Ilharco et al. 2023, "Editing models with task arithmetic").
- ties: trim each task vector to its largest `density` fraction, elect a sign per weight, average only the task
  vectors that agree with it (Yadav et al. 2023, "TIES-Merging").
- dare: drop each task-vector entry with probability 1 - density and rescale the rest by 1 / density, so its
  expectation is unchanged (Yu et al. 2023, "Language models are Super Mario"); then TIES's sign election
  (dare_ties) or a plain sum (dare_linear).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open

from model.weights.checkpoint import LIT_INDEX, LIT_WEIGHTS, lit_weight_files

# Below this angle between two weight vectors SLERP's sin(theta) divides by ~0: interpolate linearly instead.
SLERP_DOT_THRESHOLD = 0.9995


# ----------------------------------------------------------------------------------------------- the methods


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return (1 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = SLERP_DOT_THRESHOLD) -> torch.Tensor:
    """Interpolate along the great circle between `a` and `b` (treated as flat vectors), t=0 -> a, t=1 -> b.

    The angle comes from the normalised vectors; the interpolation weights apply to the originals, so two unit
    vectors give a unit vector for every t. Nearly colinear vectors (|cos| > dot_threshold) fall back to lerp.
    """
    a, b = a.float(), b.float()
    norms = math.sqrt(_dot64(a, a) * _dot64(b, b))
    dot = max(-1.0, min(1.0, _dot64(a, b) / max(norms, 1e-24)))
    if abs(dot) > dot_threshold:
        return lerp(a, b, t)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    s_a = math.sin((1 - t) * theta) / sin_theta
    s_b = math.sin(t * theta) / sin_theta
    return torch.add(a * s_a, b, alpha=s_b)


def _dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = 2**20) -> float:
    """The dot product of two flattened tensors, accumulated in float64 a chunk at a time: exact enough for the
    angle between vectors of billions of entries, without a float64 copy of either."""
    a, b = a.reshape(-1), b.reshape(-1)
    return sum(float((a[i:i + chunk].double() * b[i:i + chunk].double()).sum()) for i in range(0, a.numel(), chunk))


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    merged = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for tensor, weight in zip(tensors, weights):
        merged.add_(tensor.float(), alpha=weight)
    if normalize:
        total = float(sum(weights))
        if total == 0:
            raise ValueError("linear merge with normalize: the weights sum to 0")
        merged /= total
    return merged


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    lambda_: float = 1.0, normalize: bool = False) -> torch.Tensor:
    # one task vector at a time: a merge of n models holds the inputs, the sum and one difference
    merged = torch.zeros(base.shape, dtype=torch.float32)
    for tensor, weight in zip(tensors, weights):
        merged.add_(tensor.float() - base.float(), alpha=weight)
    if normalize:
        if sum(weights) == 0:
            raise ValueError("task arithmetic with normalize: the weights sum to 0")
        merged /= float(sum(weights))
    return merged.mul_(lambda_).add_(base.float())


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude, zero the rest (TIES step 1)."""
    if density >= 1:
        return delta
    k = int(round(density * delta.numel()))
    if k <= 0:
        return torch.zeros_like(delta)
    # the k-th largest magnitude is the threshold; ties at it are kept, as in the paper's top-k
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: zero each entry with probability 1 - density, multiply the kept ones by 1 / density."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def elect_sign(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """Per entry, the sign (+1/-1) of the total weighted task vector mass (TIES step 2, "sum" election)."""
    return torch.where(weighted_deltas.sum(0) >= 0, 1.0, -1.0)


def disjoint_merge(weighted_deltas: torch.Tensor, weights: torch.Tensor, sign: torch.Tensor,
                   normalize: bool = True) -> torch.Tensor:
    """Sum the entries whose sign agrees with the elected one; with `normalize`, divide by the weight of the models
    that contributed to each entry (TIES step 3, the disjoint mean). Trimmed (zero) entries never agree."""
    agrees = torch.sign(weighted_deltas) == sign
    merged = (weighted_deltas * agrees).sum(0)
    if normalize:
        contributors = (weights * agrees).sum(0)
        merged = merged / torch.where(contributors == 0, torch.ones_like(contributors), contributors)
    return merged


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], densities: Sequence[float],
         lambda_: float = 1.0, normalize: bool = True) -> torch.Tensor:
    deltas = [trim_by_magnitude(t.float() - base.float(), d) for t, d in zip(tensors, densities)]
    return base.float() + lambda_ * _sign_consensus(deltas, weights, normalize)


def dare(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], densities: Sequence[float],
         generator: torch.Generator, sign_consensus: bool, lambda_: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """dare_ties (`sign_consensus=True`) or dare_linear: random drop with rescale, then TIES's election or a sum."""
    deltas = [drop_and_rescale(t.float() - base.float(), d, generator) for t, d in zip(tensors, densities)]
    if sign_consensus:
        return base.float() + lambda_ * _sign_consensus(deltas, weights, normalize)
    return base.float() + lambda_ * linear(deltas, weights, normalize)


def _sign_consensus(deltas: list[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    weight = torch.tensor(weights, dtype=torch.float32).view(-1, *[1] * deltas[0].dim())
    weighted = torch.stack(deltas) * weight
    return disjoint_merge(weighted, weight.expand_as(weighted), elect_sign(weighted), normalize)


# ----------------------------------------------------------------------------------------------- parameters


LAYER_TENSOR = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
# mergekit users filter by Hugging Face module names; these are ours
FILTER_ALIASES = {"self_attn": "attn", "input_layernorm": "norm_1", "post_attention_layernorm": "norm_2",
                  "embed_tokens": "wte", "q_proj": "attn.qkv", "k_proj": "attn.qkv", "v_proj": "attn.qkv",
                  "o_proj": "attn.proj", "gate_proj": "mlp.fc_1", "up_proj": "mlp.fc_2", "down_proj": "mlp.proj"}


def gradient_value(values: Sequence[float], position: float) -> float:
    """A per-layer "gradient": `values` are anchors spread evenly from the first layer (position 0) to the last
    (position 1); a layer between anchors gets the linear interpolation."""
    if len(values) == 1:
        return float(values[0])
    x = position * (len(values) - 1)
    i = min(int(math.floor(x)), len(values) - 2)
    return float(values[i] + (x - i) * (values[i + 1] - values[i]))


def filter_matches(pattern: str, tensor_name: str) -> bool:
    return pattern in tensor_name or FILTER_ALIASES.get(pattern, pattern) in tensor_name


def resolve_parameter(value, tensor_name: str, position: float, where: str) -> float:
    """A parameter's value for one tensor at a layer position in [0, 1]. `value` is a number, a list of numbers (a
    gradient over the layers), or a list of `{filter: name-part, value: number or list}` tried in order, where an
    entry without `filter` matches every tensor."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}: expected a number, a list of numbers or a list of {{filter, value}}, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return gradient_value(value, position)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise ValueError(f"{where}: each filtered entry needs `value` (and optionally `filter`), got {entry!r}")
            if "filter" not in entry or filter_matches(str(entry["filter"]), tensor_name):
                return resolve_parameter(entry["value"], tensor_name, position, where)
        raise ValueError(f"{where}: no entry matches tensor {tensor_name!r}; add one without `filter` as the default")
    raise ValueError(f"{where}: expected a number, a list of numbers or a list of {{filter, value}}, got {value!r}")


# ----------------------------------------------------------------------------------------------- streamed I/O


class CheckpointReader:
    """One tensor at a time from a Forge checkpoint's safetensors file(s), memory-mapped.

    Each read opens the file, copies the one tensor out and closes it again, so the pages it touched are unmapped:
    a merge over several large checkpoints keeps only the tensors it is working on resident."""

    def __init__(self, checkpoint_dir: Path | str) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.key_to_file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        if (self.checkpoint_dir / LIT_INDEX).is_file() and not (self.checkpoint_dir / LIT_WEIGHTS).is_file():
            weight_map = json.loads((self.checkpoint_dir / LIT_INDEX).read_text())["weight_map"]
            files = sorted({self.checkpoint_dir / name for name in weight_map.values()})
        else:
            files = lit_weight_files(self.checkpoint_dir)
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"Checkpoint shard {path} is missing")
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        self.key_to_file[key] = path
                        sliced = f.get_slice(key)
                        self.shapes[key] = tuple(sliced.get_shape())
                        self.dtypes[key] = sliced.get_dtype()
            except SafetensorError as e:
                raise ValueError(f"{path} is not a valid safetensors file ({e}); convert or download it again") from e

    def __contains__(self, name: str) -> bool:
        return name in self.key_to_file

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.key_to_file[name], framework="pt") as f:
            return f.get_tensor(name)


def layer_of(tensor_name: str) -> Optional[tuple[int, str]]:
    """(layer index, the name inside the block) for a block's tensor, None for embeddings, final norm and head."""
    match = LAYER_TENSOR.match(tensor_name)
    return (int(match.group(1)), match.group(2)) if match else None


# ----------------------------------------------------------------------------------------------- configs and outputs




def resolve_model_dir(reference, where: str) -> Path:
    """A model named in a merge config: a Forge checkpoint directory, as given or under checkpoints/ (so
    `HuggingFaceTB/SmolLM2-135M-Instruct` works as in mergekit configs)."""
    if not isinstance(reference, str) or not reference:
        raise ValueError(f"{where} must be a checkpoint directory, got {reference!r}")
    for candidate in (Path(reference), Path("checkpoints") / reference):
        if (candidate / "model_config.yaml").is_file():
            return candidate
    if (Path(reference) / "hparams.yaml").is_file():
        raise FileNotFoundError(f"{where} is a fine-tuning run, not a checkpoint; merge it into one first with"
                                f" `python scripts/merge_lora.py --checkpoint_dir {reference} --out_dir DIR`")
    raise FileNotFoundError(
        f"{where} not found (no model_config.yaml in {reference} or checkpoints/{reference}). Download and convert"
        f" it with `python scripts/download.py --repo_id {reference}`, or merge a LoRA run into a checkpoint first with `python scripts/merge_lora.py`."
    )
