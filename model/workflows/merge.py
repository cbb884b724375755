"""Model merging: the methods as functions on tensors, their parameter table, and streamed, memory-mapped access
to checkpoints.

Every method takes the tensors of one Hugging Face weight (one per model, same shape) and returns the merged
tensor; scripts/merge_models.py splits our fused tensors (Llama's q/k/v, Phi-3's gate/up) into the tensors the
HF checkpoint has, merges each, and fuses the results back, so a method sees what mergekit (and the model's
authors) see. Each follows mergekit 0.1.5's semantics (tutorials/merge.md says how that was checked); the math is
computed in float32 (mergekit computes in the config's `dtype`).

- linear: a weighted average (Wortsman et al. 2022, "Model soups").
- slerp: spherical interpolation of two models (Shoemake 1985); nuslerp: SLERP of two models or of their task
  vectors, per row or flattened; multislerp: barycentric interpolation of several on the hypersphere;
  karcher: the Riemannian (Karcher) mean on the hypersphere.
- task_arithmetic: base + lambda * sum_i w_i (model_i - base) (Ilharco et al. 2023), and its sparsified variants:
  ties (top-k by magnitude, sign election, disjoint mean; Yadav et al. 2023), dare_ties / dare_linear (random drop;
  Yu et al. 2023), breadcrumbs / breadcrumbs_ties (drop the smallest and the largest outliers; Davari & Belilovsky
  2023), della / della_linear (drop with a probability that falls with the magnitude's rank; Deep et al. 2024).
- model_stock: interpolate between the base and the models' average by their task vectors' angle (Jang et al.
  2024); sce: select by variance, calculate weights from the task vectors' energy, erase minority signs (Wan et al.
  2024); nearswap: take the other model's value where it is within `t` of the base.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
import typing
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open

from model.weights.checkpoint import LIT_INDEX, LIT_WEIGHTS, lit_weight_files

# Entries per piece when a whole-tensor statistic is accumulated: bounds the temporaries to a few MB.
CHUNK = 2**20


def _pieces(*tensors: torch.Tensor):
    """Matching flat float32 pieces of same-shaped tensors, CHUNK entries at a time."""
    flat = [t.reshape(-1) for t in tensors]
    for start in range(0, flat[0].numel(), CHUNK):
        yield [f[start:start + CHUNK].float() for f in flat]


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for (p,) in _pieces(x)]))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([(x * y).sum() for x, y in _pieces(a, b)]).sum()


# ----------------------------------------------------------------------------------------------- interpolations


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


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Interpolate along the great circle between `a` and `b` (each one flat vector), t=0 -> a, t=1 -> b.

    The angle comes from the normalised vectors, the weights apply to the originals, so two unit vectors give a
    unit vector for every t. Nearly colinear or opposite vectors (|cos| > dot_threshold) are interpolated linearly.
    """
    a, b = a.float(), b.float()
    norm_a, norm_b = _norm(a), _norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    # normalised before the product, as mergekit does, so the dot cannot overflow
    dot = torch.stack([(x / norm_a * (y / norm_b)).sum() for x, y in _pieces(a, b)]).sum().clamp(-1, 1)
    t = torch.tensor(t, dtype=torch.float32)
    if dot.abs() > dot_threshold:
        return (1 - t) * a + t * b
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t) * theta) / sin_theta * a + torch.sin(t * theta) / sin_theta * b


def nuslerp(a: torch.Tensor, b: torch.Tensor, t: float, row_wise: bool = False, flatten: bool = True,
            eps: float = 1e-8) -> torch.Tensor:
    """SLERP over the whole tensor (`flatten`), over each row (the last dimension), or over each column
    (`row_wise`, mergekit's name: vectors along the first dimension). Colinear vectors are interpolated linearly."""
    shape = a.shape
    a, b = a.float(), b.float()
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    unit_a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    unit_b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (unit_a * unit_b).sum(-1, keepdim=True).clamp(-1, 1)
    del unit_a, unit_b
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * a + t * b, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: Optional[torch.Tensor] = None,
                  row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """nuslerp of two models with t = w_2 / (w_1 + w_2); with a base, of their task vectors, added to the base."""
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        return nuslerp(tensors[0], tensors[1], t, row_wise, flatten)
    base = base.float()
    return base + nuslerp(tensors[0].float() - base, tensors[1].float() - base, t, row_wise, flatten)


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: Optional[torch.Tensor] = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere: project the unit vectors onto the tangent space at their
    weighted mean direction, average there, map back (exponential map), and scale to the weighted mean norm.
    With a base, of the task vectors. One model's vector at a time: no stack of all of them."""
    if len(tensors) == 1:
        return tensors[0].float()
    shape = tensors[0].shape

    def vector(i: int) -> torch.Tensor:
        x = tensors[i].float().reshape(-1)
        return x - base.float().reshape(-1) if base is not None else x

    w = torch.tensor(weights, dtype=torch.float32)
    if normalize_weights:
        w = w / w.sum()
    norms = [torch.linalg.vector_norm(vector(i)) for i in range(len(tensors))]
    mean = torch.zeros(tensors[0].numel(), dtype=torch.float32)
    for i, norm in enumerate(norms):
        mean += vector(i) / (norm + eps) * w[i]
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ValueError("multislerp: the weighted sum of the unit task vectors is zero (opposite vectors whose"
                             " weights balance out); change the weights")
        result = (vector(0) * w[0] + vector(1) * w[1]).view(shape)
        return result + base.float() if base is not None else result
    mean /= mean_norm
    tangent_mean = torch.zeros_like(mean)
    for i, norm in enumerate(norms):
        unit = vector(i) / (norm + eps)
        unit -= (unit * mean).sum() * mean
        tangent_mean += unit * w[i]
        del unit
    tangent_norm = torch.linalg.vector_norm(tangent_mean) + eps
    result = mean.mul_(torch.cos(tangent_norm)).add_(tangent_mean * (torch.sin(tangent_norm) / tangent_norm))
    del tangent_mean
    result = result.mul_(sum(n * wi for n, wi in zip(norms, w))).view(shape)
    return result + base.float() if base is not None else result


def karcher(tensors: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The equal-weight Karcher (Riemannian) mean of the directions, scaled by the mean norm: start from the
    normalised Euclidean mean of the unit vectors, then move along the mean of the log maps until it is < tol.
    The unit vectors are made when needed, not kept."""
    if len(tensors) == 1:
        return tensors[0].float()
    tensors = [t.float() for t in tensors]
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [_norm(t) for t in tensors]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]

    def unit(j: int) -> torch.Tensor:
        return tensors[valid[j]] / norms[valid[j]]

    mean = torch.zeros_like(tensors[0])
    for j, weight in enumerate(weights):
        mean += weight * unit(j)
    mean_norm = _norm(mean)
    mean = unit(0) if mean_norm.item() < tol else mean.div_(mean_norm)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for j, weight in enumerate(weights):
            u = unit(j)
            dot = _dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            u -= dot * mean
            tangent += weight * (theta / torch.sin(theta)) * u
            del u
        tangent_norm = _norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = mean.mul_(torch.cos(tangent_norm)).add_(torch.sin(tangent_norm) * tangent.div_(tangent_norm))
        del tangent
        unit_norm = _norm(mean)
        if unit_norm.item() > tol:
            mean.div_(unit_norm)
    # mergekit scales by every input's norm with the unnormalised weights, zero tensors included
    return mean.mul_(sum(alpha * norm for alpha, norm in zip(alphas, norms)))


# ----------------------------------------------------------------------------------------------- task vectors


def _row_view(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of a weight (a 1-D tensor is one row): the unit the task-vector methods are processed in."""
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() >= 2 else tensor.reshape(1, -1)


def _row_chunks(rows: torch.Tensor) -> list[slice]:
    step = max(1, CHUNK // max(rows.shape[1], 1))
    return [slice(i, min(i + step, rows.shape[0])) for i in range(0, rows.shape[0], step)]


class TaskVector:
    """model - base (or a given delta), computed a chunk of rows at a time and never held whole: merging n models
    holds the inputs, the output and a few chunks, not n float32 copies of the weight."""

    def __init__(self, tensor: torch.Tensor, base: Optional[torch.Tensor] = None) -> None:
        self.rows = _row_view(tensor)
        self.base = _row_view(base) if base is not None else None
        self.chunks = _row_chunks(self.rows)
        self.numel = tensor.numel()

    def chunk(self, rows: slice) -> torch.Tensor:
        delta = self.rows[rows].float()
        return delta - self.base[rows].float() if self.base is not None else delta


def _value_at_rank(task_vector: TaskVector, rank: int) -> tuple[torch.Tensor, int]:
    """The magnitude of ascending rank `rank` (0-based) and how many magnitudes are smaller, from two histogram
    passes over the bits of the float32 magnitudes (in order for non-negative floats): no sort, no copy."""

    def histogram(high: Optional[int]) -> torch.Tensor:
        counts = torch.zeros(32768 if high is None else 65536, dtype=torch.int64)
        for rows in task_vector.chunks:
            bits = task_vector.chunk(rows).abs().view(torch.int32).reshape(-1)
            counts += torch.bincount(bits >> 16 if high is None else bits[(bits >> 16) == high] & 0xFFFF,
                                     minlength=counts.numel())
        return counts.cumsum(0)

    cumulative = histogram(None)
    high = int(torch.searchsorted(cumulative, torch.tensor(rank), right=True))
    below = int(cumulative[high - 1]) if high else 0
    cumulative = histogram(high)
    low = int(torch.searchsorted(cumulative, torch.tensor(rank - below), right=True))
    below += int(cumulative[low - 1]) if low else 0
    return torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32)[0], below


class Sparsifier:
    """One task vector's mask, mergekit 0.1.5's way, applied a chunk of rows at a time (in order, once per pass):

    - magnitude (TIES): keep the max(1, int(density * n)) largest magnitudes;
    - magnitude_outliers (Model Breadcrumbs): drop the int(gamma * n) largest, keep the int(density * n) next;
    - random (DARE): keep each entry with probability density;
    - della_magprune (DELLA): in each row, keep with probability density - epsilon (smallest magnitude) rising
      linearly with the rank to density + epsilon (largest).

    Magnitudes are ranked in ascending order, ties by flat index, so a tie at the threshold keeps the later
    entries (mergekit leaves ties to torch.argsort's unspecified order). With `rescale`, the kept entries are
    multiplied so that the task vector keeps its L1 norm (mergekit's `rescale`; the DARE paper's 1/density is
    this in expectation). A density of 1 or more keeps everything and does not rescale.
    """

    def __init__(self, method: Optional[str], task_vector: TaskVector, density: float = 1.0, rescale: bool = False,
                 seed: int = 0, gamma: float = 0.01, epsilon: float = 0.15, keep: Optional[int] = None) -> None:
        self.method, self.task_vector, self.density, self.epsilon, self.seed = method, task_vector, density, epsilon, seed
        self.identity = method is None or density >= 1 and keep is None
        self.empty = False
        self.window = None
        n = task_vector.numel
        if self.identity:
            return
        if method == "magnitude":
            # `keep` overrides the count (SCE's selection): keep it exactly, none if 0
            k = max(1, int(density * n)) if keep is None else keep
            self.empty = (density <= 0 if keep is None else keep <= 0) or n == 0
            self.window = (n - k, n)
        elif method == "magnitude_outliers":
            keep = int(density * n)
            drop_small = max(0, n - keep - int(gamma * n))
            self.window = (drop_small, drop_small + keep)
            self.empty = keep <= 0
        elif method == "della_magprune":
            self.empty = density <= 0
            if not self.empty and (density + epsilon >= 1 or density - epsilon <= 0):
                raise ValueError(f"della: density +/- epsilon must lie in (0, 1), got density {density},"
                                 f" epsilon {epsilon}")
        if self.window is not None and not self.empty:
            lo, hi = self.window
            self.low = _value_at_rank(task_vector, lo)
            self.high = _value_at_rank(task_vector, hi - 1)
        self.scale = None
        if rescale and not self.empty:
            before, after = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
            self.start_pass()
            for rows in task_vector.chunks:
                delta = task_vector.chunk(rows)
                before += delta.abs().sum()
                after += (delta * self.mask(delta)).abs().sum()
            before, after = before.float(), after.float()
            if before >= 1e-7 and after >= 1e-7:
                self.scale = before / after

    def start_pass(self) -> None:
        """Masks are made in chunk order: the tie counters and the random generator start over."""
        self.tied_low = self.tied_high = 0
        self.generator = torch.Generator().manual_seed(self.seed)

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        if self.empty:
            return torch.zeros(delta.shape, dtype=torch.bool)
        if self.method == "random":
            return torch.bernoulli(torch.full(delta.shape, float(self.density)), generator=self.generator).bool()
        magnitude = delta.abs()
        if self.method == "della_magprune":
            ranks = torch.argsort(torch.argsort(magnitude, dim=1), dim=1).float() + 1
            low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
            probability = (self.density - self.epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * self.epsilon
            return torch.bernoulli(probability, generator=self.generator).bool()
        (lo, hi), (v_lo, below_lo), (v_hi, below_hi) = self.window, self.low, self.high
        at_low, at_high = magnitude == v_lo, magnitude == v_hi
        # the rank of a tied entry is the number of smaller ones plus its place among the ties so far
        place_low = at_low.reshape(-1).cumsum(0).view(at_low.shape) - 1 + self.tied_low
        place_high = at_high.reshape(-1).cumsum(0).view(at_high.shape) - 1 + self.tied_high
        self.tied_low += int(at_low.sum())
        self.tied_high += int(at_high.sum())
        above = (magnitude > v_lo) | (at_low & (place_low >= lo - below_lo))
        return above & ((magnitude < v_hi) | (at_high & (place_high < hi - below_hi)))

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return delta
        masked = delta * self.mask(delta)
        return masked * self.scale if self.scale is not None else masked


def _whole_mask(method: str, delta: torch.Tensor, density: float, seed: int = 0, **kw) -> torch.Tensor:
    task_vector = TaskVector(delta)
    sparsifier = Sparsifier(method, task_vector, density, seed=seed, **kw)
    sparsifier.start_pass()
    return torch.cat([sparsifier.mask(task_vector.chunk(rows)) for rows in task_vector.chunks]).view(delta.shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: the max(1, int(density * n)) largest magnitudes (none at density 0)."""
    return _whole_mask("magnitude", delta, density)


def outliers_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the int(gamma * n) largest magnitudes, then keep the int(density * n) next ones
    (fewer outliers dropped where both do not fit)."""
    return _whole_mask("magnitude_outliers", delta, density, gamma=gamma)


def della_mask(delta: torch.Tensor, density: float, epsilon: float, seed: int) -> torch.Tensor:
    """DELLA's MagPrune mask (see Sparsifier)."""
    return _whole_mask("della_magprune", delta, density, seed=seed, epsilon=epsilon)


def sparsify(delta: torch.Tensor, density: float, method: str, rescale: bool = False, seed: int = 0,
             gamma: float = 0.01, epsilon: float = 0.15) -> torch.Tensor:
    """One whole task vector trimmed by `method` (magnitude, random, magnitude_outliers, della_magprune)."""
    if density >= 1:
        return delta
    task_vector = TaskVector(delta)
    sparsifier = Sparsifier(method, task_vector, density, rescale, seed, gamma, epsilon)
    sparsifier.start_pass()
    return torch.cat([sparsifier.apply(task_vector.chunk(rows)) for rows in task_vector.chunks]).view(delta.shape)


def sign_agreement(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES's election by total mass: per entry the sign (+1 at 0) of the summed weighted task vectors, and which
    task vectors agree with it (zero entries never do)."""
    elected = torch.where(weighted_deltas.sum(0) >= 0, 1.0, -1.0)
    return torch.sign(weighted_deltas) == elected


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    densities: Optional[Sequence[float]] = None, sparsification: Optional[str] = None,
                    consensus: bool = False, normalize: bool = False, rescale: bool = False, lambda_: float = 1.0,
                    gammas: Optional[Sequence[float]] = None, epsilons: Optional[Sequence[float]] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """mergekit's generalized task arithmetic: base + lambda * mix(w_i * sparsify(model_i - base)), where mix is
    a sum (divided by sum w_i with `normalize`) or, with `consensus`, TIES's disjoint sum over the task vectors
    that agree with the elected sign (divided by the agreeing weights with `normalize`). task_arithmetic, ties,
    dare_*, breadcrumbs*, della* are this with their sparsification, consensus and defaults. Computed a chunk of
    rows at a time; the random masks take one seed per model from `generator`."""
    n = len(tensors)
    task_vectors = [TaskVector(t, base) for t in tensors]
    seeds = [int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else 0 for _ in tensors]
    sparsifiers = [Sparsifier(sparsification, tv, densities[i] if densities else 1.0, rescale, seeds[i],
                              gammas[i] if gammas else 0.01, epsilons[i] if epsilons else 0.15)
                   for i, tv in enumerate(task_vectors)]
    for sparsifier in sparsifiers:
        sparsifier.start_pass()
    base_rows = _row_view(base)
    out = torch.empty(base_rows.shape, dtype=torch.float32)
    w = torch.tensor(list(weights), dtype=torch.float32).view(n, 1, 1)
    for rows in task_vectors[0].chunks:
        deltas = torch.stack([s.apply(tv.chunk(rows)) for s, tv in zip(sparsifiers, task_vectors)])
        deltas.mul_(w)
        if consensus:
            agrees = sign_agreement(deltas)
            mixed = (deltas * agrees).sum(0)
            divisor = (w * agrees).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(0)
            divisor = w.sum(0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed /= divisor
        if lambda_ != 1:
            mixed *= lambda_
        out[rows] = base_rows[rows].float() + mixed
    return out.view(base.shape)


def _parts(rows: torch.Tensor, per_row: bool) -> list[tuple[slice, slice]]:
    """(rows, columns) pieces of a 2-D view: whole rows at a time (statistics per row), or column ranges of its
    single row (statistics of the whole tensor)."""
    if per_row:
        return [(chunk, slice(None)) for chunk in _row_chunks(rows)]
    return [(slice(None), slice(c, c + CHUNK)) for c in range(0, rows.shape[1], CHUNK)]


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: t = k cos / (1 + (k - 1) cos), where cos is the mean pairwise cosine between the k task
    vectors (of the whole tensor, or of each row with `filter_wise`); t * average + (1 - t) * base. Where the
    denominator vanishes, the base. Computed in pieces: the task vectors are never held whole."""
    view = _row_view if filter_wise else (lambda t: t.reshape(1, -1))
    w0, ws = view(base), [view(t) for t in tensors]
    parts = _parts(w0, filter_wise)
    k = len(ws)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    squares = torch.zeros(k, w0.shape[0])
    dots = torch.zeros(len(pairs), w0.shape[0])
    for rows, cols in parts:
        offsets = [w[rows, cols].float() - w0[rows, cols].float() for w in ws]
        for i, offset in enumerate(offsets):
            squares[i, rows] += offset.square().sum(-1)
        for p, (i, j) in enumerate(pairs):
            dots[p, rows] += (offsets[i] * offsets[j]).sum(-1)
    norms = squares.sqrt()
    cos = torch.stack([(dots[p] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1) for p, (i, j) in enumerate(pairs)])
    cos = cos.mean(dim=0).unsqueeze(-1)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, k * cos / torch.where(singular, 1, denominator))
    out = torch.empty(w0.shape, dtype=torch.float32)
    for rows, cols in parts:
        average = sum(w[rows, cols].float() for w in ws) / k
        out[rows, cols] = t[rows] * average + (1 - t[rows]) * w0[rows, cols].float()
    return out.view(base.shape)


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE: keep the int(select_topk * nonzero) entries whose values vary most across the models, weight each task
    vector by its mean squared entry (normalised to sum 1), and average the ones that agree with TIES's elected
    sign, by those weights. In chunks of rows; the selection by histogram, as TIES's."""
    task_vectors = [TaskVector(t, base) for t in tensors]
    chunks = task_vectors[0].chunks
    selector = None
    if select_topk < 1:
        variance = torch.empty(task_vectors[0].rows.shape, dtype=torch.float32)
        for rows in chunks:
            variance[rows] = torch.var(torch.stack([tv.chunk(rows) for tv in task_vectors]), dim=0, unbiased=False)
        keep = int(torch.count_nonzero(variance) * select_topk) if select_topk > 0 else 0
        selected = TaskVector(variance)
        selector = Sparsifier("magnitude", selected, keep=keep)

    def deltas(rows: slice) -> torch.Tensor:
        stacked = torch.stack([tv.chunk(rows) for tv in task_vectors])
        return stacked * selector.mask(selected.chunk(rows)) if selector is not None else stacked

    energy = torch.zeros(len(tensors), dtype=torch.float64)
    if selector is not None:
        selector.start_pass()
    for rows in chunks:
        energy += deltas(rows).square().reshape(len(tensors), -1).sum(dim=1)
    energy = (energy / task_vectors[0].numel).float()
    total = energy.sum().item()
    weights = torch.full_like(energy, 1 / len(tensors)) if abs(total) < 1e-6 else energy / total
    if selector is not None:
        selector.start_pass()
    base_rows = _row_view(base)
    out = torch.empty(base_rows.shape, dtype=torch.float32)
    for rows in chunks:
        chunk = deltas(rows)
        erased = weights.view(-1, 1, 1) * sign_agreement(chunk)
        out[rows] = base_rows[rows].float() + (chunk * erased).sum(0) / erased.sum(0).clamp(min=1e-6)
    return out.view(base.shape)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """Interpolate towards `other` by min(1, t / |other - base|): entries closer than `t` are swapped in."""
    base, other = base.float(), other.float()
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * other + (1 - weight) * base


# ----------------------------------------------------------------------------------------------- the method table

REQUIRED = "required"


@dataclass(frozen=True)
class Parameter:
    kind: type  # float, bool or int
    default: Any = REQUIRED
    per_model: bool = False  # one value per model (weight, density), else one for the merge (t, normalize)


@dataclass(frozen=True)
class Method:
    base: str  # "required", "optional" (nuslerp, multislerp: task vectors when given) or "unused"
    parameters: dict[str, Parameter]
    min_models: int = 1  # models besides the base
    max_models: Optional[int] = None
    sparsification: Optional[str] = None  # the task-vector methods: how each task vector is trimmed
    consensus: bool = False  # ... and whether TIES's sign election mixes them


def _task_vectors(sparsification: Optional[str], consensus: bool, normalize: bool, rescale: bool,
                  **extra: Parameter) -> Method:
    # mergekit requires `weight`; 1 is our default, so a YAML without weights sums the task vectors
    parameters = {"weight": Parameter(float, 1.0, True), "int8_mask": Parameter(bool, False),
                  "normalize": Parameter(bool, normalize), "rescale": Parameter(bool, rescale),
                  "lambda": Parameter(float, 1.0)}
    if sparsification is not None:
        parameters["density"] = Parameter(float, 1.0, True)
    return Method("required", {**parameters, **extra}, sparsification=sparsification, consensus=consensus)


# mergekit 0.1.5's methods with its parameter names and defaults (arcee_fusion and ram are left out)
METHODS: dict[str, Method] = {
    "linear": Method("unused", {"weight": Parameter(float, 1.0, True), "normalize": Parameter(bool, True)}),
    "slerp": Method("optional", {"t": Parameter(float)}, 1, 1),
    "nuslerp": Method("optional", {"weight": Parameter(float, 1.0, True), "nuslerp_row_wise": Parameter(bool, False),
                                   "nuslerp_flatten": Parameter(bool, True)}, 2, 2),
    "multislerp": Method("optional", {"weight": Parameter(float, 1.0, True),
                                      "normalize_weights": Parameter(bool, True), "eps": Parameter(float, 1e-8)}),
    "karcher": Method("unused", {"max_iter": Parameter(int, 10), "tol": Parameter(float, 1e-5)}),
    "task_arithmetic": _task_vectors(None, False, normalize=False, rescale=False),
    "ties": _task_vectors("magnitude", True, normalize=True, rescale=False),
    "dare_ties": _task_vectors("random", True, normalize=False, rescale=True),
    "dare_linear": _task_vectors("random", False, normalize=False, rescale=True),
    "breadcrumbs": _task_vectors("magnitude_outliers", False, normalize=False, rescale=False,
                                 gamma=Parameter(float, 0.01, True)),
    "breadcrumbs_ties": _task_vectors("magnitude_outliers", True, normalize=False, rescale=False,
                                      gamma=Parameter(float, 0.01, True)),
    "della": _task_vectors("della_magprune", True, normalize=True, rescale=True,
                           epsilon=Parameter(float, 0.15, True)),
    "della_linear": _task_vectors("della_magprune", False, normalize=False, rescale=True,
                                  epsilon=Parameter(float, 0.15, True)),
    "model_stock": Method("required", {"filter_wise": Parameter(bool, False)}, 2),
    "sce": Method("required", {"int8_mask": Parameter(bool, False), "select_topk": Parameter(float, 1.0)}),
    "nearswap": Method("required", {"t": Parameter(float)}, 1, 1),
    "passthrough": Method("unused", {"scale": Parameter(float, 1.0, True)}, 1, 1),
}
RANDOM_METHODS = {name for name, m in METHODS.items() if m.sparsification in ("random", "della_magprune")}


def merge_weight(method: str, base: Optional[torch.Tensor], tensors: Sequence[torch.Tensor], params: dict[str, Any],
                 per_model: dict[str, list], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One weight merged by `method`: `base` (None where the method has none), the other models' `tensors`,
    the merge's parameters and the per-model ones (lists in the order of `tensors`). int8_mask only saves memory
    in mergekit; the masks here are booleans, so it changes nothing."""
    if method == "linear":
        return linear(tensors, per_model["weight"], params["normalize"])
    if method == "passthrough":
        scale = per_model["scale"][0]
        return tensors[0] if scale == 1 else tensors[0].float() * scale
    if method == "slerp":
        return slerp(base, tensors[0], params["t"])
    if method == "nuslerp":
        return nuslerp_merge(tensors, per_model["weight"], base, params["nuslerp_row_wise"], params["nuslerp_flatten"])
    if method == "multislerp":
        return multislerp(tensors, per_model["weight"], base, params["normalize_weights"], params["eps"])
    if method == "karcher":
        return karcher(tensors, params["max_iter"], params["tol"])
    if method == "model_stock":
        return model_stock(base, tensors, params["filter_wise"])
    if method == "sce":
        return sce(base, tensors, params["select_topk"])
    if method == "nearswap":
        return nearswap(base, tensors[0], params["t"])
    spec = METHODS[method]
    return task_arithmetic(base, tensors, per_model["weight"], per_model.get("density"), spec.sparsification,
                           spec.consensus, params["normalize"], params["rescale"], params["lambda"],
                           per_model.get("gamma"), per_model.get("epsilon"), generator)


def weight_generator(seed: int, name: str) -> torch.Generator:
    """The random methods' generator for one weight, seeded by its name: the same masks whatever the order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


# ----------------------------------------------------------------------------------------------- parameter values


def gradient_value(values: Sequence[float], t: float) -> float:
    """mergekit's per-layer gradient: `values` spread evenly over t in [0, 1], linear in between."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return float((1 - frac) * values[i0] + frac * values[i1])


def filter_matches(pattern: str, names: Sequence[str]) -> bool:
    """A `filter` is a part of the tensor's name, Hugging Face's (self_attn, q_proj, mlp) or ours (attn.qkv)."""
    return pattern == "*" or any(pattern in name for name in names)


def resolve_parameter(value, kind: type, names: Sequence[str], t: float, where: str):
    """A parameter's value for one weight (known by `names`) at gradient position t: a number (or bool), a list of
    numbers (a gradient over the slice's layers), or a list of `{filter: name-part, value: ...}` tried in order,
    where an entry without `filter` matches every tensor. None when no entry matches (the next source applies)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            if set(entry) - {"filter", "value"} or "value" not in entry:
                raise ValueError(f"{where}: each filtered entry needs `value` (and optionally `filter`), got {entry!r}")
            if entry.get("filter") is None or filter_matches(str(entry["filter"]), names):
                return resolve_parameter(entry["value"], kind, names, t, where)
        return None
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and is_number and float(value).is_integer():
        return int(value)
    if kind is float and is_number:
        return float(value)
    if kind is float and isinstance(value, list) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return gradient_value(value, t)
    expected = {bool: "true or false", int: "an integer", float: "a number, a list of numbers (a gradient)"}[kind]
    raise ValueError(f"{where}: expected {expected} or a list of {{filter, value}}, got {value!r}")


# ----------------------------------------------------------------------------------------------- the YAML schema


@dataclass
class SourceSpec:
    """One model in `models:`, or one source of a slice (with `layer_range`, end exclusive)."""

    model: str
    layer_range: Optional[list[int]] = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSpec:
    sources: list[SourceSpec]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeSpec:
    """A mergekit-style merge config."""

    merge_method: str
    models: Optional[list[SourceSpec]] = None
    slices: Optional[list[SliceSpec]] = None
    base_model: Optional[str] = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    seed: int = 0


def _typed(hint, value, where: str):
    """`value` checked against (and built into) the type `hint`; one error line naming the YAML key otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None:
            return None
        return _typed(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(hint):
        return parse_spec(hint, value, where)
    if origin is list:
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where} must be a non-empty list, got {value!r}")
        return [_typed(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping of name: value, got {value!r}")
        return dict(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ValueError(f"{where} must be {'an integer' if hint is int else 'a string'}, got {value!r}")
    return value


def parse_spec(cls, data, where: str):
    """A dataclass of the schema above from a YAML mapping: unknown keys, missing keys and wrong types fail with
    one line naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping with keys {[f.name for f in dataclasses.fields(cls)]}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; the keys are {list(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{key} is required")
            continue
        values[name] = _typed(hints[name], data[name], key)
    return cls(**values)


def check_spec(spec: MergeSpec, label: str) -> None:
    """What the types cannot say: the method exists, `models` xor `slices`, layer ranges, parameter names."""
    if spec.merge_method not in METHODS:
        raise ValueError(f"{label}: merge_method {spec.merge_method!r} is not one of {', '.join(METHODS)}")
    if (spec.models is None) == (spec.slices is None):
        raise ValueError(f"{label}: give exactly one of `models` and `slices`")
    method = METHODS[spec.merge_method]
    known = sorted(method.parameters)

    per_model = sorted(name for name, p in method.parameters.items() if p.per_model)

    def check_names(params: dict, where: str, per_model_only: bool = False) -> None:
        for name in params:
            if name not in method.parameters or per_model_only and not method.parameters[name].per_model:
                kind = "per-model " if per_model_only else ""
                raise ValueError(f"{label}: {where}.{name}: {spec.merge_method} has no such {kind}parameter; its"
                                 f" {kind}parameters are {per_model if per_model_only else known}")

    check_names(spec.parameters, "parameters")
    for i, source in enumerate(spec.models or []):
        if source.layer_range is not None:
            raise ValueError(f"{label}: models[{i}].layer_range: layer ranges belong in `slices`")
        check_names(source.parameters, f"models[{i}].parameters", per_model_only=True)
    for i, entry in enumerate(spec.slices or []):
        check_names(entry.parameters, f"slices[{i}].parameters")
        for j, source in enumerate(entry.sources):
            where = f"slices[{i}].sources[{j}]"
            value = source.layer_range
            if value is None:
                raise ValueError(f"{label}: {where}.layer_range is required")
            if (len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                    or not 0 <= value[0] < value[1]):
                raise ValueError(f"{label}: {where}.layer_range must be [start, end] with 0 <= start < end, got {value!r}")
            check_names(source.parameters, f"{where}.parameters", per_model_only=True)
    if spec.dtype is not None and spec.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{label}: dtype {spec.dtype!r} is not one of float32, bfloat16, float16")


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


SAFETENSORS_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def save_streamed(planned: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                  tensors: Iterator[tuple[str, torch.Tensor]], checkpoint_dir: Path, shard_size_bytes: int) -> None:
    """Write tensors whose names and shapes are known in advance straight into `lit_model.safetensors` (or
    shards of at most `shard_size_bytes`, with an index): each file's header goes first, so only the tensor being
    written is in memory, never a shard. `checkpoint_dir` is a fresh directory published whole afterwards."""
    shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    size = 0
    for name, shape in planned:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), nbytes))
        size += nbytes
    files = [LIT_WEIGHTS] if len(shards) == 1 else [f"lit_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                     for i in range(len(shards))]
    tensors = iter(tensors)
    for file, shard in zip(files, shards):
        header, offset = {}, 0
        for name, shape, nbytes in shard:
            header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with open(checkpoint_dir / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape, _ in shard:
                got, tensor = next(tensors)
                if got != name or tuple(tensor.shape) != shape:
                    raise RuntimeError(f"expected {name} {list(shape)}, got {got} {list(tensor.shape)}")
                f.write(tensor.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
    if len(files) > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for name, _, _ in shard}
        (checkpoint_dir / LIT_INDEX).write_text(json.dumps({"weight_map": weight_map}, indent=2))


LAYER_TENSOR = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


def layer_of(tensor_name: str) -> Optional[tuple[int, str]]:
    """(layer index, the name inside the block) for a block's tensor, None for embeddings, final norm and head."""
    match = LAYER_TENSOR.match(tensor_name)
    return (int(match.group(1)), match.group(2)) if match else None


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
        f" it with `python scripts/download.py --repo_id {reference}`, or merge a LoRA run into a checkpoint first"
        f" with `python scripts/merge_lora.py`."
    )
