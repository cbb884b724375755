"""model/training/lr_find.py and scripts/lr_find.py: the LR range test suggests a learning rate below the point where
training diverges, stops there, and leaves the weights, the optimizer and the RNG exactly as it found them."""

import json
import math
import shutil

import pytest
import torch
from conftest import load_script
from hf_models import save_tiny_model

from model.training.lr_find import LRFindResult, lr_range_test, lr_schedule, plot_lr_find
from model.weights.convert import convert_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def quadratic_problem(curvature: float, dim: int = 8):
    """Loss 1 + 0.5 * curvature * |w - target|^2 (+ a little noise). Gradient descent on it converges for lr < 2 /
    curvature and diverges above: a problem whose divergence point is known."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(dim))
    target = torch.randn(dim)

    def loss_step(step: int) -> float:
        # a floor of 1 (the noise a real loss never goes below), and a draw from the RNG
        loss = 1.0 + 0.5 * curvature * ((weight - target) ** 2).sum() + 0.01 * torch.rand(())
        loss.backward()
        return loss.item()

    return weight, loss_step


@pytest.mark.parametrize("curvature", [0.5, 4.0, 50.0])
def test_suggestion_lands_below_the_known_divergence_point(curvature):
    weight, loss_step = quadratic_problem(curvature)
    optimizer = torch.optim.SGD([weight], lr=1e-6)
    result = lr_range_test([weight], optimizer, loss_step, min_lr=1e-5, max_lr=1e3, num_steps=120)
    diverges_above = 2.0 / curvature
    assert result.diverged_at is not None and result.diverged_at > diverges_above  # it stopped on divergence...
    assert len(result.lrs) < 120  # ...before the end of the range
    assert result.suggestion < diverges_above
    assert result.min_loss_lr < result.diverged_at
    # the suggestion is in the useful range: within two decades below divergence, not at the start of the sweep
    assert result.suggestion > diverges_above / 100


def test_weights_optimizer_and_rng_are_unchanged_after_the_search():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    inputs, targets = torch.randn(32, 6), torch.randn(32, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # a step before the search, so the optimizer has state (moments, step count) to keep
    torch.nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    optimizer_before = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                        for k, s in optimizer.state_dict()["state"].items()}
    rng_before = torch.get_rng_state()

    def loss_step(step: int) -> float:
        noise = 0.01 * torch.randn_like(targets)
        loss = torch.nn.functional.mse_loss(model(inputs), targets + noise)
        loss.backward()
        return loss.item()

    result = lr_range_test(model.parameters(), optimizer, loss_step, min_lr=1e-4, max_lr=10.0, num_steps=30)
    assert len(result.lrs) > 5
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    state = optimizer.state_dict()["state"]
    for key, saved in optimizer_before.items():
        for name, value in saved.items():
            assert torch.equal(torch.as_tensor(state[key][name]), torch.as_tensor(value)), (key, name)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(p.grad is None for p in model.parameters())
    assert all(group["lr"] == 1e-3 for group in optimizer.param_groups)


def test_weights_are_restored_when_the_loss_step_fails():
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)

    def loss_step(step: int) -> float:
        if step == 3:
            raise RuntimeError("out of memory")
        loss = (weight ** 2).sum()
        loss.backward()
        return loss.item()

    with pytest.raises(RuntimeError, match="out of memory"):
        lr_range_test([weight], optimizer, loss_step, min_lr=0.01, max_lr=1.0, num_steps=10)
    assert torch.equal(weight.detach(), torch.ones(4))


def test_a_non_finite_loss_stops_the_search():
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)

    def loss_step(step: int) -> float:
        loss = (weight ** 2).sum() * (math.inf if step == 5 else 1.0)
        loss.backward()
        return loss.item()

    result = lr_range_test([weight], optimizer, loss_step, min_lr=1e-3, max_lr=1e-1, num_steps=20)
    assert len(result.lrs) == 5 and result.diverged_at == pytest.approx(lr_schedule(1e-3, 1e-1, 20)[5])


@pytest.mark.parametrize("kwargs, match", [
    ({"min_lr": 1.0, "max_lr": 0.1}, "0 < min_lr < max_lr"),
    ({"num_steps": 1}, "at least 2 steps"),
    ({"smoothing": 1.0}, "smoothing"),
    ({"divergence_factor": 1.0}, "divergence factor"),
])
def test_bad_settings_are_errors(kwargs, match):
    weight = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=match):
        lr_range_test([weight], torch.optim.SGD([weight], lr=0.1), lambda step: 0.0, **kwargs)


def test_schedule_is_geometric_from_min_to_max():
    lrs = lr_schedule(1e-5, 1e-1, 5)
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-1)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(lrs, lrs[1:]))


def test_plot_is_written(tmp_path):
    result = LRFindResult(lrs=[1e-4, 1e-3, 1e-2], losses=[2.0, 1.0, 5.0], smoothed=[2.0, 1.5, 2.5], diverged_at=1e-2)
    plot_lr_find(result, tmp_path / "plot" / "lr_find.png")
    assert (tmp_path / "plot" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert result.suggestion == pytest.approx(1e-4)


@pytest.mark.parametrize("method", ["lora", "full", "adapter"])
def test_script_builds_each_method_and_saves_no_weights(method, tiny_checkpoint_and_data, tmp_path):
    checkpoint_dir, data_dir = tiny_checkpoint_and_data
    files_before = {p: p.stat().st_mtime_ns for p in checkpoint_dir.rglob("*")}
    out_dir = tmp_path / method
    suggestion = load_script("scripts/lr_find.py").lr_find(
        checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, method=method, precision="32-true",
        micro_batch_size=2, global_batch_size=2, num_steps=6, min_lr=1e-5, max_lr=1e-1, adapter_start_layer=1,
        suggestion_divisor=4)
    summary = json.loads((out_dir / "lr_find.json").read_text())
    assert summary["suggested_learning_rate"] == suggestion == pytest.approx(summary["min_loss_lr"] / 4)
    assert len(summary["lrs"]) == len(summary["losses"]) >= 2
    assert sorted(p.name for p in out_dir.iterdir()) == ["lr_find.json", "lr_find.png"]
    assert {p: p.stat().st_mtime_ns for p in checkpoint_dir.rglob("*")} == files_before


def test_checkpointed_search_gives_the_same_curve(tiny_checkpoint_and_data, tmp_path):
    """--gradient_checkpointing (so an 8B search fits where its run fits) changes memory, not the losses."""
    checkpoint_dir, data_dir = tiny_checkpoint_and_data
    curves = {}
    for mode in ("none", "block"):
        load_script("scripts/lr_find.py").lr_find(
            checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=tmp_path / mode, precision="32-true",
            lora_mlp=True, micro_batch_size=2, global_batch_size=4, num_steps=5, min_lr=1e-4, max_lr=1e-1,
            gradient_checkpointing=mode)
        curves[mode] = json.loads((tmp_path / mode / "lr_find.json").read_text())["losses"]
    assert len(curves["none"]) >= 2
    assert curves["block"] == pytest.approx(curves["none"], rel=1e-5)


@pytest.fixture(scope="module")
def tiny_checkpoint_and_data(tmp_path_factory, smollm2_dir):
    """A tiny random SmolLM2 (2 layers) with the real tokenizer and prompt style, and 8 task samples for it."""
    root = tmp_path_factory.mktemp("lr_find")
    checkpoint_dir = root / "org" / "tiny-smollm2"
    save_tiny_model("smollm2", checkpoint_dir, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_style.yaml"):
        shutil.copy(smollm2_dir / name, checkpoint_dir / name)
    convert_hf_checkpoint(checkpoint_dir)
    load_script("scripts/prepare_tasks.py").prepare_tasks(checkpoint_dir=checkpoint_dir, out_dir=root / "data",
                                                          num_train=8, num_test=2)
    return checkpoint_dir, root / "data"
