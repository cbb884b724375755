"""The merge methods of model/workflows/merge.py on small hand-made tensors: mergekit 0.1.5's kept counts,
rescaling, sign election, the spherical means, model_stock's ratio; the random methods seeded and right in
expectation; parameter values and the YAML schema. tests/test_merge_models.py checks whole merges against
mergekit's own output."""

import math

import pytest
import torch

from model.workflows.merge import (
    METHODS,
    MergeSpec,
    SourceSpec,
    check_spec,
    della_mask,
    gradient_value,
    karcher,
    linear,
    magnitude_mask,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    nuslerp_merge,
    outliers_mask,
    parse_spec,
    resolve_parameter,
    sce,
    sign_agreement,
    slerp,
    sparsify,
    task_arithmetic,
)


def test_slerp_endpoints_unit_norm_and_lerp_fallback():
    torch.manual_seed(0)
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    a_unit, b_unit = a / a.norm(), b / b.norm()
    total = torch.arccos((a_unit * b_unit).sum())
    for t in (0.1, 0.3, 0.5, 0.9):
        mid = slerp(a_unit, b_unit, t)
        assert mid.norm().item() == pytest.approx(1.0, abs=1e-6)  # stays on the sphere
        assert torch.arccos((a_unit * mid).sum().clamp(-1, 1)).item() == pytest.approx(t * total.item(), abs=1e-4)
    nearly_the_same = a + 1e-4 * b
    assert torch.allclose(slerp(a, nearly_the_same, 0.25), 0.75 * a + 0.25 * nearly_the_same)
    opposite = slerp(a, -a * 2, 0.5)  # colinear the other way: lerp too (no division by sin(pi) ~ 0)
    assert torch.isfinite(opposite).all() and torch.allclose(opposite, -0.5 * a, atol=1e-6)


def test_nuslerp_flattened_per_row_and_on_task_vectors():
    torch.manual_seed(1)
    a, b, base = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(nuslerp(a, b, 0.3), slerp(a, b, 0.3), atol=1e-6)
    rows = nuslerp(a, b, 0.3, flatten=False)
    assert torch.allclose(rows, torch.stack([slerp(x, y, 0.3) for x, y in zip(a, b)]), atol=1e-6)
    columns = nuslerp(a, b, 0.3, row_wise=True, flatten=False)
    assert torch.allclose(columns, torch.stack([slerp(x, y, 0.3) for x, y in zip(a.T, b.T)]).T, atol=1e-6)
    # t = w_2 / (w_1 + w_2); with a base the task vectors are interpolated
    assert torch.allclose(nuslerp_merge([a, b], [1.0, 3.0]), slerp(a, b, 0.75), atol=1e-6)
    assert torch.allclose(nuslerp_merge([a, b], [1.0, 1.0], base), base + slerp(a - base, b - base, 0.5), atol=1e-6)


def test_multislerp_and_karcher_on_the_sphere():
    x, y = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    # two orthogonal directions with equal weights: the bisector, at the weighted mean norm
    expected = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2) * 2.0
    assert torch.allclose(multislerp([x, y], [1.0, 1.0]), expected, atol=1e-6)
    assert torch.allclose(karcher([x, y]), expected, atol=1e-5)
    assert torch.equal(multislerp([x], [1.0]), x)
    # the Karcher mean's fixed point: the weighted log maps of the inputs sum to zero at the result
    torch.manual_seed(2)
    points = [torch.randn(10) for _ in range(4)]
    mean = karcher(points, max_iter=50, tol=1e-7)
    direction = mean / mean.norm()
    log_sum = torch.zeros(10)
    for p in points:
        unit = p / p.norm()
        cos = (direction * unit).sum().clamp(-1, 1)
        theta = torch.arccos(cos)
        log_sum += theta / torch.sin(theta) * (unit - cos * direction)
    assert log_sum.norm().item() < 1e-4
    assert mean.norm().item() == pytest.approx(sum(p.norm().item() for p in points) / 4, rel=1e-5)


def test_kept_counts_at_awkward_densities_and_ties_at_the_threshold():
    torch.manual_seed(3)
    delta = torch.randn(8, 8)
    # mergekit 0.1.5 keeps max(1, int(density * n)): 1 of 64 at 0.004 (round would keep 0), 44 at 0.7 (round: 45)
    assert magnitude_mask(delta, 0.004).sum().item() == 1
    assert magnitude_mask(delta, 0.004)[delta.abs() == delta.abs().max()].item()
    assert magnitude_mask(delta, 0.7).sum().item() == 44
    kept = delta.abs()[magnitude_mask(delta, 0.7)]
    assert kept.min() >= delta.abs()[~magnitude_mask(delta, 0.7)].max()
    assert not magnitude_mask(delta, 0.0).any()
    # ten entries tied at the threshold: exactly k kept, the later flat indices (ascending rank, ties by index)
    tied = torch.tensor([5.0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0.5])
    assert magnitude_mask(tied, 0.25).tolist() == [True] + [False] * 8 + [True, True, False]
    # chunked selection equals a sort on a tensor of many rows with many ties (bf16-like values)
    many = torch.randint(-50, 50, (3000, 700)).float() / 8
    order = torch.sort(many.abs().reshape(-1), stable=True).indices
    for density in (0.01, 0.37, 0.9):
        k = max(1, int(density * many.numel()))
        expected = torch.zeros(many.numel(), dtype=torch.bool)
        expected[order[-k:]] = True
        assert torch.equal(magnitude_mask(many, density).reshape(-1), expected)
    # breadcrumbs: drop int(gamma n) largest and keep int(density n) after the smallest are dropped
    values = torch.arange(1.0, 101.0)
    mask = outliers_mask(values, 0.5, 0.1)
    assert mask.sum().item() == 50 and mask[40:90].all() and not mask[90:].any() and not mask[:40].any()
    # density + gamma > 1: fewer outliers dropped (5, not 10), the density holds
    assert outliers_mask(values, 0.95, 0.1).tolist() == [True] * 95 + [False] * 5


def test_rescale_keeps_the_l1_norm_and_density_one_changes_nothing():
    delta = torch.tensor([4.0, -2.0, 1.0, -1.0])
    assert torch.equal(sparsify(delta, 0.5, "magnitude"), torch.tensor([4.0, -2.0, 0, 0]))
    rescaled = sparsify(delta, 0.5, "magnitude", rescale=True)  # L1 8 over the kept 6
    assert torch.allclose(rescaled, torch.tensor([16 / 3, -8 / 3, 0, 0])) and rescaled.abs().sum().item() == pytest.approx(8)
    assert torch.equal(sparsify(delta, 0.0, "magnitude", rescale=True), torch.zeros(4))  # nothing kept: no rescale
    for method in ("magnitude", "random", "magnitude_outliers", "della_magprune"):
        assert sparsify(delta, 1.0, method, rescale=True) is delta


def test_ties_trims_elects_the_sign_and_takes_the_disjoint_mean():
    base = torch.full((5,), 10.0)
    a = base + torch.tensor([3.0, -1.0, 0.5, 2.0, 1.0])
    b = base + torch.tensor([-2.0, -2.0, 1.0, 0.1, -4.0])
    c = base + torch.tensor([-2.0, 0.2, 0.1, 0.3, 3.5])
    assert sign_agreement(torch.tensor([[1.0, -3.0], [-2.0, 1.0]])).tolist() == [[False, True], [True, False]]

    def ties(weights, **kw):
        return task_arithmetic(base, [a, b, c], weights, [0.4] * 3, "magnitude", consensus=True, **kw) - base

    # int(0.4 * 5) = 2 kept each; b's two -2 tie for its second place and the later one is kept
    # trimmed: a [3, 0, 0, 2, 0], b [0, -2, 0, 0, -4], c [-2, 0, 0, 0, 3.5]
    # elected signs: [+ (3-2), -, + (0 >= 0), +, - (-4+3.5)]; mean over the agreeing, non-zero entries
    assert torch.equal(ties([1.0] * 3, normalize=True), torch.tensor([3.0, -2.0, 0.0, 2.0, -4.0]))
    assert ties([1.0, 1.0, 2.0], normalize=True)[0].item() == pytest.approx(-2.0)  # weights vote and average
    assert torch.equal(ties([1.0, 1.0, 2.0]), torch.tensor([-4.0, -2.0, 0.0, 2.0, 7.0]))  # normalize off: the sum
    assert torch.equal(ties([1.0] * 3, normalize=True, lambda_=0.5), torch.tensor([1.5, -1.0, 0.0, 1.0, -2.0]))
    # task arithmetic: base + lambda * sum w_i (m_i - base), divided by sum w_i with normalize
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert torch.equal(task_arithmetic(torch.ones(2), [x, y], [0.5, 1.0], lambda_=2.0), torch.tensor([5.0, -4.0]))
    assert torch.equal(linear([x, y], [1.0, 3.0]), torch.tensor([2.5, -1.0]))
    assert torch.equal(linear([x, y], [1.0, 3.0], normalize=False), torch.tensor([10.0, -4.0]))


def test_method_defaults_are_mergekits():
    # (normalize, rescale) defaults of mergekit 0.1.5's generalized task arithmetic methods
    expected = {"task_arithmetic": (False, False), "ties": (True, False), "dare_ties": (False, True),
                "dare_linear": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
                "della": (True, True), "della_linear": (False, True)}
    for name, (normalize, rescale) in expected.items():
        params = METHODS[name].parameters
        assert (params["normalize"].default, params["rescale"].default) == (normalize, rescale), name
        assert params["lambda"].default == 1.0 and params["int8_mask"].default is False
    assert METHODS["breadcrumbs"].parameters["gamma"].default == 0.01
    assert METHODS["della"].parameters["epsilon"].default == 0.15
    assert METHODS["linear"].parameters["normalize"].default is True


def test_dare_is_seeded_and_right_in_expectation():
    torch.manual_seed(4)
    delta = torch.randn(200, 50)
    dropped = sparsify(delta, 0.3, "random", seed=1)
    assert torch.equal(dropped, sparsify(delta, 0.3, "random", seed=1))
    assert not torch.equal(dropped, sparsify(delta, 0.3, "random", seed=2))
    kept = dropped != 0
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert torch.equal(dropped[kept], delta[kept])
    rescaled = sparsify(delta, 0.3, "random", rescale=True, seed=1)
    assert rescaled.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    # entries drop independently: 20000 stacked copies are 20000 merges; without the global rescale each kept
    # entry is delta, so E[dare_linear] = base + sum w_i d_i delta_i
    base = torch.randn(6, 4)
    tuned = [base + torch.randn(6, 4), base + torch.randn(6, 4)]
    n, weights, densities = 20000, [0.7, 0.5], [0.4, 0.6]
    samples = task_arithmetic(base.expand(n, 6, 4), [t.expand(n, 6, 4) for t in tuned], weights, densities,
                              "random", generator=torch.Generator().manual_seed(0))
    expected = base + sum(w * d * (t - base) for w, d, t in zip(weights, densities, tuned))
    variance = sum(w**2 * (t - base) ** 2 * d * (1 - d) for w, t, d in zip(weights, tuned, densities))
    assert ((samples.mean(0) - expected).abs() <= 4.5 * (variance / n).sqrt() + 1e-6).all()


def test_della_keeps_larger_magnitudes_more_often():
    rows = torch.arange(1.0, 11.0).repeat(5000, 1)  # ranks 1..10 in every row
    mask = della_mask(rows, 0.5, 0.2, seed=0)
    rate = mask.float().mean(0)
    expected = 0.3 + torch.arange(10) / 9 * 0.4  # density - epsilon .. density + epsilon, linear in the rank
    assert ((rate - expected).abs() < 0.03).all()
    assert torch.equal(mask, della_mask(rows, 0.5, 0.2, seed=0))
    with pytest.raises(ValueError, match="density \\+/- epsilon must lie in"):
        della_mask(rows, 0.1, 0.15, seed=0)


def test_model_stock_ratio_from_the_angle():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2, 0.0, 0.0])  # 60 degrees
    cos = 0.5
    t = 2 * cos / (1 + cos)
    assert torch.allclose(model_stock(base, [a, b]), t * (a + b) / 2, atol=1e-6)
    # opposite task vectors: denominator 1 + cos = 0, the base stays
    assert torch.equal(model_stock(base + 1, [base + 1 + a, base + 1 - a]), base + 1)
    rows = torch.stack([a, a])
    filtered = model_stock(torch.zeros(2, 4), [rows, torch.stack([b, a])], filter_wise=True)
    assert torch.allclose(filtered[0], t * (a + b) / 2, atol=1e-6) and torch.allclose(filtered[1], a, atol=1e-6)


def test_sce_selects_by_variance_weights_by_energy_and_erases_minority_signs():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 2.0, -1.0, 0.5]), torch.tensor([1.0, -4.0, 3.0, 0.5])
    # variances [0, 9, 4, 0]: select_topk 0.5 keeps int(2 nonzero * 0.5) = 1 entry, the second
    merged = sce(base, [a, b], select_topk=0.5)
    # kept: a [0, 2, 0, 0], b [0, -4, 0, 0]; energies 1 and 4 -> weights 0.2, 0.8; elected sign -; only b agrees
    assert torch.allclose(merged, torch.tensor([0.0, -4.0, 0.0, 0.0]))
    full = sce(base, [a, b])
    wa, wb = (a**2).mean() / ((a**2).mean() + (b**2).mean()), (b**2).mean() / ((a**2).mean() + (b**2).mean())
    assert torch.allclose(full[0], (wa * 1 + wb * 1) / (wa + wb)) and torch.allclose(full[2], torch.tensor(3.0))


def test_nearswap_swaps_close_values():
    base, other = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.05, 0.5, -2.0])
    # weight min(1, t / |diff|): 1 for the close entry, 0.2 and 0.05 for the others
    assert torch.allclose(nearswap(base, other, 0.1), torch.tensor([0.05, 0.1, -0.1]))


def test_parameters_as_gradients_and_filters():
    assert gradient_value([0.0, 1.0], 0.25) == 0.25
    assert gradient_value([0.0, 1.0, 0.0], 0.75) == 0.5
    assert gradient_value([0.2, 0.4, 0.8], 1.0) == pytest.approx(0.8)
    value = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.3}, {"value": 0.5}]
    q = ["model.layers.2.self_attn.q_proj.weight", "transformer.h.2.attn.qkv.weight"]
    assert resolve_parameter(value, float, q, 0.5, "t") == 0.5
    assert resolve_parameter(value, float, ["model.layers.2.mlp.up_proj.weight"], 0.5, "t") == 0.3
    assert resolve_parameter(value, float, ["model.norm.weight"], 1.0, "t") == 0.5
    assert resolve_parameter(value[:2], float, ["model.norm.weight"], 1.0, "t") is None  # the next source applies
    assert resolve_parameter(True, bool, q, 0.0, "normalize") is True
    assert resolve_parameter(3, int, q, 0.0, "max_iter") == 3
    with pytest.raises(ValueError, match="normalize: expected true or false"):
        resolve_parameter(1.0, bool, q, 0.0, "normalize")
    with pytest.raises(ValueError, match="t: expected a number"):
        resolve_parameter("half", float, q, 0.0, "t")


@pytest.mark.parametrize("data, message", [
    ({"models": [{"model": "a"}]}, "merge_method is required"),
    ({"merge_method": "ties", "modles": []}, "unknown key 'modles'"),
    ({"merge_method": "ties", "models": "a"}, "models must be a non-empty list"),
    ({"merge_method": "ties", "models": [{"model": "a", "weight": 1}]}, r"models\[0\]: unknown key 'weight'"),
    ({"merge_method": "ties", "models": [{"parameters": {}}]}, r"models\[0\].model is required"),
    ({"merge_method": "ties", "seed": "one"}, "seed must be an integer"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": [1]}]}, r"models\[0\].parameters must be a mapping"),
])
def test_schema_errors_name_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(MergeSpec, data, "")


@pytest.mark.parametrize("spec, message", [
    (MergeSpec("frankenstein", models=[SourceSpec("a")]), "merge_method 'frankenstein' is not one of linear"),
    (MergeSpec("ties"), "give exactly one of `models` and `slices`"),
    (MergeSpec("ties", models=[SourceSpec("a", parameters={"densty": 0.5})]),
     r"models\[0\].parameters.densty: ties has no such per-model parameter"),
    (MergeSpec("ties", models=[SourceSpec("a", parameters={"lambda": 0.5})]), "no such per-model parameter"),
    (MergeSpec("slerp", models=[SourceSpec("a")], parameters={"weight": 1}), "parameters.weight: slerp has no such"),
    (MergeSpec("ties", models=[SourceSpec("a", layer_range=[0, 2])]), "layer ranges belong in `slices`"),
    (MergeSpec("ties", models=[SourceSpec("a")], dtype="int8"), "dtype 'int8' is not one of"),
])
def test_spec_checks(spec, message):
    with pytest.raises(ValueError, match=message):
        check_spec(spec, "merge config")
