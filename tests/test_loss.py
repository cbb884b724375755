"""The chunked head + cross-entropy equals F.cross_entropy on the full logits: losses and gradients, with ignored
targets, a bias, a trainable or a frozen head (whose gradient is formed in the forward pass), and through GPT's
logits_mask."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, Config
from model.training.loss import IGNORE_INDEX, head_cross_entropy, labelled_positions, linear_cross_entropy


def reference(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def inputs(n=37, dim=16, vocab=53, bias=True, ignore=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=generator, requires_grad=True)
    b = torch.randn(vocab, generator=generator, requires_grad=True) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=generator)
    if ignore:
        targets[::4] = IGNORE_INDEX
    return hidden, weight, b, targets


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 100])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_chunked_loss_and_gradients_equal_cross_entropy(chunk_size, bias, ignore, frozen_head):
    hidden, weight, b, targets = inputs(bias=bias, ignore=ignore)
    if frozen_head:
        weight.requires_grad_(False)
        b is None or b.requires_grad_(False)
    params = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]
    upstream = torch.randn(hidden.size(0), generator=torch.Generator().manual_seed(3))
    expected = reference(hidden, weight, b, targets)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), params)
    loss = linear_cross_entropy(hidden, weight, b, targets, chunk_size=chunk_size)
    grads = torch.autograd.grad((loss * upstream).sum(), params)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert loss[targets == IGNORE_INDEX].eq(0).all()
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_mean_over_labelled_positions_and_a_frozen_head():
    hidden, weight, _, targets = inputs(bias=False)
    weight.requires_grad_(False)
    valid = targets != IGNORE_INDEX
    expected = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    loss = linear_cross_entropy(hidden, weight, None, targets, chunk_size=8).sum() / valid.sum()
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-6)


def test_no_gradient_work_without_autograd():
    hidden, weight, b, targets = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, b, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(hidden, weight, b, targets).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_the_full_logits_never_exist_at_once(frozen_head):
    """Every tensor created in the forward and backward passes is at most one chunk of logits (or the weight's size)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden, weight, b, targets = inputs(n=64, vocab=101, bias=not frozen_head)
    weight.requires_grad_(not frozen_head)
    biggest = []

    class Watch(TorchDispatchMode):  # a dispatch mode: it also sees the backward pass's operations
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                biggest.append(out.numel())
            return out

    with Watch():
        loss = linear_cross_entropy(hidden, weight, b, targets, chunk_size=8)
        loss.sum().backward()
    assert len(biggest) > 50 and max(biggest) <= max(8 * 101, weight.numel())  # views of the weight count too
    assert max(biggest) < 64 * 101


@pytest.mark.parametrize("frozen_head", [False, True])
def test_two_head_matmuls_with_a_frozen_head_three_with_a_trainable_one(frozen_head):
    """A frozen head's backward pass recomputes nothing: its logits and its gradient of hidden are both formed in the
    forward pass; a trainable head's backward pass computes each chunk's logits again."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, _, targets = inputs(n=40, bias=False)
    weight.requires_grad_(not frozen_head)
    one_matmul = 2 * 40 * 53 * 16
    with FlopCounterMode(display=False) as forward:
        loss = linear_cross_entropy(hidden, weight, None, targets, chunk_size=10)
    with FlopCounterMode(display=False) as backward:
        torch.autograd.grad(loss.sum(), [t for t in (hidden, weight) if t.requires_grad])
    if frozen_head:
        assert (forward.get_total_flops(), backward.get_total_flops()) == (2 * one_matmul, 0)
    else:  # the logits; then the logits again and the gradient of hidden (the weight's, an in-place addmm_, is not
        # counted by the FLOP counter)
        assert (forward.get_total_flops(), backward.get_total_flops()) == (one_matmul, 2 * one_matmul)


@pytest.mark.parametrize("tied", [False, True])
def test_gpt_hidden_states_at_the_labels_give_the_models_loss(tied):
    torch.manual_seed(0)
    config = Config(name="tiny", vocab_size=97, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
                    intermediate_size=48, block_size=32, tie_embeddings=tied)
    model = GPT(config)
    ids = torch.randint(0, 97, (2, 12))
    targets = torch.randint(0, 97, (2, 12))
    targets[:, :5] = IGNORE_INDEX
    predicting = targets != IGNORE_INDEX
    logits = model(ids, logits_mask=predicting)
    expected = F.cross_entropy(logits.float(), targets[predicting])
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    hidden = model(ids, logits_mask=predicting, return_hidden=True)
    loss = head_cross_entropy(hidden, model.lm_head, targets[predicting]).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


def test_a_head_that_is_not_a_plain_linear_computes_its_logits():
    hidden, weight, _, targets = inputs(bias=False)
    head = nn.Sequential(nn.Linear(16, 53, bias=False))
    head[0].weight.data.copy_(weight.detach())
    torch.testing.assert_close(head_cross_entropy(hidden, head, targets), reference(hidden, weight, None, targets))


def test_head_fn_computes_the_loss_inside_the_forward_pass():
    from functools import partial

    torch.manual_seed(0)
    config = Config(name="tiny", vocab_size=97, n_layer=1, n_head=4, n_embd=32, intermediate_size=48, block_size=32)
    model = GPT(config)
    ids, targets = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))
    predicting = torch.rand(2, 10) > 0.3
    expected = F.cross_entropy(model(ids, logits_mask=predicting).float(), targets[predicting], reduction="none")
    loss = model(ids, logits_mask=predicting, head_fn=partial(head_cross_entropy, targets=targets[predicting]))
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)


def test_labelled_positions_are_the_boolean_selection():
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX  # a row with nothing to learn
    labels[2, -2:] = IGNORE_INDEX
    targets = labels[:, 1:]
    predicting = F.pad(targets != IGNORE_INDEX, (0, 1))
    positions, selected, rows = labelled_positions(labels, torch.device("cpu"))
    assert torch.equal(positions, predicting.flatten().nonzero().squeeze(1))
    assert torch.equal(selected, targets[targets != IGNORE_INDEX])
    assert torch.equal(rows, torch.arange(3).unsqueeze(1).expand(3, 9)[predicting])
    hidden = torch.randn(3, 9, 4)
    assert torch.equal(hidden.flatten(0, 1).index_select(0, positions), hidden[predicting])


# ops whose result the host has to read before it can go on: on a GPU each one waits for the device
HOST_READS = {torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default,
              torch.ops.aten.masked_select.default, torch.ops.aten.item.default}


def host_reads(fn) -> list[tuple]:
    """The ops of `fn()` (run in a dispatch mode) that read device data on the host: a nonzero, `.item()`, a
    boolean selection; each with its input's shape."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            boolean_index = func is torch.ops.aten.index.Tensor and any(
                t is not None and t.dtype == torch.bool for t in args[1])
            if func in HOST_READS or boolean_index:
                seen.append((str(func), tuple(args[0].shape)))
            return func(*args, **(kwargs or {}))

    with Probe():
        fn()
    return seen


@pytest.mark.parametrize("script", ["finetune/lora.py", "finetune/full.py", "finetune/adapter.py"])
def test_a_training_micro_batch_reads_nothing_from_the_device(script):
    """The training loops keep the labels on the CPU: a micro-batch's forward and backward pass (LoRA, full or
    adapter; dropout on) read nothing on the host but the selection of the labels' positions, which the CPU makes:
    on a GPU, no host-device sync per micro-batch."""
    from conftest import load_script
    from model.adapter import AdapterConfig, inject_adapter
    from model.lora import LoRAConfig, inject_lora, mark_only_lora_as_trainable

    module = load_script(script)
    torch.manual_seed(0)
    model = GPT(Config(name="t", vocab_size=50, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
                       intermediate_size=64, block_size=32))
    if script.endswith("lora.py"):
        inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.05, mlp=True))
        mark_only_lora_as_trainable(model)
    elif script.endswith("adapter.py"):
        inject_adapter(model, AdapterConfig(prompt_length=4, start_layer=1, version=2))
    model.train()
    input_ids = torch.randint(0, 50, (2, 16))
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX

    reads = host_reads(lambda: module.next_token_loss(model, input_ids, labels).backward())
    # the one selection of the (CPU) labels: (B, T - 1)
    assert reads == [("aten.nonzero.default", (2, 15))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_run.sh check runs it on a GPU)")
def test_a_training_micro_batch_makes_no_host_sync_on_cuda():
    """The same on a GPU, counted by CUDA: a LoRA micro-batch (token ids to the device, forward, backward) with the
    labels on the CPU makes the host wait for the device nowhere (`set_sync_debug_mode("error")` raises if it
    does)."""
    from conftest import load_script
    from model.device import to_device
    from model.lora import LoRAConfig, inject_lora, mark_only_lora_as_trainable

    lora = load_script("finetune/lora.py")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(Config(name="t", vocab_size=50, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
                       intermediate_size=64, block_size=32))
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.05, mlp=True))
    mark_only_lora_as_trainable(model)
    model.to(device).train()
    input_ids = torch.randint(0, 50, (2, 16))
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX
    lora.next_token_loss(model, to_device(input_ids, device), labels).backward()  # warm-up: the allocator, the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lora.next_token_loss(model, to_device(input_ids, device), labels).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
