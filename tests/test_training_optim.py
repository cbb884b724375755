"""--optimizer: every choice trains; the fused AdamW is AdamW; the 8-bit ones follow it closely and keep 1-byte moments."""

import pytest
import torch

from model.training.optim import OPTIMIZERS, build_optimizer


def train(name: str, steps: int = 20) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 256) * 0.1)
    target = torch.randn(64, 256) * 0.1
    optimizer = build_optimizer(name, [weight], lr=1e-2, weight_decay=0.01, betas=(0.9, 0.95))
    for _ in range(steps):
        loss = (weight - target).pow(2).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (weight - target).pow(2).sum().detach(), optimizer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_like_adamw(name):
    reference, _ = train("adamw")
    loss, optimizer = train(name)
    start = (torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.1).pow(2).sum()
    assert loss < 0.5 * start
    if name == "adamw_fused":
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    else:
        assert loss == pytest.approx(reference.item(), rel=0.1)
    if name.endswith("8bit"):
        state = next(iter(optimizer.state.values()))
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_an_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="adamw_fused, adamw8bit, paged_adamw8bit"):
        build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], lr=1.0)
