"""What a Block keeps for its backward pass: the RMSNorm and SwiGLU autograd functions give the gradients of the
expressions they replace while keeping less, the attention keeps v without the whole qkv output, and the outputs of
the norms and activations, and LoRA dropout's dropped copies of them, are computed again in the backward pass
(`RecomputeCheap`) with the same gradients."""

import weakref

import pytest
import torch
import torch.nn.functional as F

from model import Config
from model.gpt import CausalSelfAttention, GPT, RecomputeCheap, RMSNormFunction, SwiGLUFunction, swiglu
from model.lora import Dropout, LoRAConfig, inject_lora, mark_only_lora_as_trainable
from tests.test_checkpointing import SETUPS, VOCAB, loss_and_grads


def saved_storages(fn) -> dict[int, int]:
    """`fn()`'s output and the bytes of every distinct storage autograd saved while it ran."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, saved


def grads(fn, inputs: list[torch.Tensor], grad_output: torch.Tensor) -> list:
    for tensor in inputs:
        tensor.grad = None
    out = fn(*inputs)
    out.backward(grad_output)
    return [out.detach()] + [None if t.grad is None else t.grad.clone() for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [True, False])
def test_rms_norm_function_gives_the_gradients_of_the_expression(dtype, train_weight):
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 48) * 3).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(48)).to(dtype).requires_grad_(train_weight)
    grad_output = torch.randn(3, 7, 48).to(dtype)

    def expression(x, weight):
        return weight * F.rms_norm(x.float(), (48,), eps=1e-5).to(x.dtype)

    expected = grads(expression, [x, weight], grad_output)
    actual = grads(lambda x, weight: RMSNormFunction.apply(x, weight, 1e-5), [x, weight], grad_output)
    assert (actual[2] is None) == (not train_weight)
    torch.testing.assert_close(actual[0], expected[0], atol=0, rtol=0)
    # float32: to rounding; bf16: the same float32 formula before the cast, so at most one bf16 step apart
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
    for got, want in zip(actual[1:], expected[1:]):
        if want is not None:
            torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_function_gives_the_gradients_of_the_expression_exactly(dtype):
    torch.manual_seed(0)
    gate, up = (torch.randn(2, 5, 40).to(dtype).requires_grad_() for _ in range(2))
    grad_output = torch.randn(2, 5, 40).to(dtype)
    expected = grads(lambda gate, up: F.silu(gate) * up, [gate, up], grad_output)
    actual = grads(SwiGLUFunction.apply, [gate, up], grad_output)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_the_functions_keep_only_their_inputs():
    x = torch.randn(4, 6, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(32, dtype=torch.bfloat16)
    _, saved = saved_storages(lambda: RMSNormFunction.apply(x, weight, 1e-5))
    # x and one float32 scale per position (the expression keeps a float32 copy of x: twice x's bytes in bf16)
    assert sorted(saved.values()) == sorted([4 * 6 * 4, x.nbytes, weight.nbytes])

    gate, up = (torch.randn(4, 6, 80, requires_grad=True) for _ in range(2))
    _, saved = saved_storages(lambda: SwiGLUFunction.apply(gate, up))
    assert sorted(saved.values()) == [gate.nbytes, up.nbytes]  # not silu(gate)


def test_attention_keeps_v_without_the_qkv_output():
    config = Config(name="tiny", vocab_size=50, n_layer=1, n_head=4, n_query_groups=2, n_embd=64,
                    intermediate_size=96, block_size=32)
    attention = CausalSelfAttention(config, 0)
    x = torch.randn(2, 16, 64, requires_grad=True)
    cos, sin = GPT(config).rope(torch.arange(16))
    out, saved = saved_storages(lambda: attention(x, cos, sin, torch.arange(16)))
    for weight in attention.parameters():  # the weights are kept anyway
        saved.pop(weight.untyped_storage().data_ptr())
    qkv_bytes = 2 * 16 * (4 + 2 * 2) * config.head_size * 4
    v_bytes = 2 * 16 * 2 * config.head_size * 4
    assert qkv_bytes not in saved.values()
    assert v_bytes in saved.values()
    out.sum().backward()  # and the backward pass runs from what was kept
    assert x.grad is not None


@pytest.mark.parametrize("setup", [*SETUPS, "layernorm_gelu", "bf16_autocast"])
def test_selective_gives_the_loss_and_gradients_of_none_bit_for_bit(setup):
    """Norm and activation outputs computed again in the backward pass: the same loss and gradients, exactly, for
    every fine-tuning method, packed rows, a mixture of experts, LayerNorm + GELU (Phi, Falcon) and bf16 autocast."""
    overrides = dict(norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP") if setup == "layernorm_gelu" else {}
    base_setup = "lora" if setup in ("layernorm_gelu", "bf16_autocast") else setup
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup == "bf16_autocast"):
        loss, grads = loss_and_grads(base_setup, "none", **overrides)
        selective_loss, selective_grads = loss_and_grads(base_setup, "selective", **overrides)
    torch.testing.assert_close(selective_loss, loss, atol=0, rtol=0)
    assert grads.keys() == selective_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(selective_grads[name], grad, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("mlp", ["LLaMAMLP", "GptNeoxMLP"])
def test_selective_keeps_no_norm_or_activation_output(mlp, monkeypatch):
    """All-linear LoRA, bf16: without recomputation a Block keeps its two norm outputs and the MLP's activation
    output (which the next LoRA layers save for their A gradients); `selective` keeps none of them, they are freed
    after the forward pass and computed once each in the backward pass."""
    norm = "RMSNorm" if mlp == "LLaMAMLP" else "LayerNorm"
    config = Config(name="tiny", vocab_size=VOCAB, n_layer=2, n_head=4, n_query_groups=2, n_embd=64,
                    intermediate_size=160, block_size=64, norm_class_name=norm, mlp_class_name=mlp)
    torch.manual_seed(0)
    model = GPT(config).to(torch.bfloat16)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, key=True, projection=True, mlp=True))
    mark_only_lora_as_trainable(model)
    model.train()
    T = 16
    x = torch.randn(1, T, 64, dtype=torch.bfloat16)
    cos, sin = (t.to(torch.bfloat16) for t in model.rope(torch.arange(T)))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def kept(mode: str, after_forward=lambda: None) -> int:
        model.set_gradient_checkpointing(mode)
        out, saved = saved_storages(lambda: model.run_blocks(x, cos, sin, torch.arange(T)))
        after_forward()
        out.sum().backward()  # the backward pass runs from what was kept
        return sum(size for ptr, size in saved.items() if ptr not in weights)

    outputs, freed, computed = [], [], []
    register = RecomputeCheap.register

    def recording(output, fn, *inputs):
        if output.requires_grad:
            outputs.append(weakref.ref(output))

        def counted(*args):
            computed.append(fn)
            return fn(*args)

        return register(output, counted, *inputs)

    monkeypatch.setattr(RecomputeCheap, "register", staticmethod(recording))
    before = kept("none")
    outputs.clear()
    after = kept("selective", lambda: freed.extend(ref() is None for ref in outputs))
    per_layer = 2 * T * 64 * 2 + T * 160 * 2  # two norm outputs and the activation's, bf16
    # but the first norm's output: its input (the frozen embeddings') needs no gradient, so nothing keeps it
    assert before - after == config.n_layer * per_layer - T * 64 * 2
    assert len(freed) == 3 * config.n_layer - 1 and all(freed)
    # each computed once in the backward pass, though the second norm's output feeds (and is saved by) two LoRA layers
    assert len(computed) == len(freed)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA's dropout path (benchmarks/gpu_run.sh check runs it on a GPU)"))])
def test_selective_keeps_no_dropped_copy_nor_mask_of_lora_dropout(device):
    """All-linear LoRA with dropout 0.1, bf16: without recomputation each adapter keeps its dropped copy of the input
    and the dropout its mask; under `selective` the Blocks keep exactly what they keep without dropout (the generator
    state is all that stays), the dropped copies are freed after the forward pass and computed once each in the
    backward pass (their inputs, norm and activation outputs, computed again first), and the loss, the gradients and
    the generator's next numbers are those of `none`, exactly."""
    config = Config(name="tiny", vocab_size=VOCAB, n_layer=2, n_head=4, n_query_groups=2, n_embd=64,
                    intermediate_size=160, block_size=64)
    T = 16
    x = torch.randn(1, T, 64, dtype=torch.bfloat16).to(device)

    def run(mode: str, dropout: float, after_forward=lambda: None):
        torch.manual_seed(0)
        model = GPT(config).to(device, torch.bfloat16)
        inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, key=True, projection=True, mlp=True))
        mark_only_lora_as_trainable(model)
        with torch.no_grad():  # B = 0 at init would give A no gradient
            for name, param in model.named_parameters():
                if name.endswith(".B"):
                    param.normal_(0, 0.1)
        model.train().set_gradient_checkpointing(mode)
        positions = torch.arange(T, device=device)
        cos, sin = (t.to(torch.bfloat16) for t in model.rope(positions))
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        torch.manual_seed(1)
        out, saved = saved_storages(lambda: model.run_blocks(x, cos, sin, positions))
        after_forward()
        out.float().square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        kept = sum(size for ptr, size in saved.items() if ptr not in weights)
        return kept, out.detach(), grads, torch.rand(4, device=device)

    outputs, computed = [], []
    register = RecomputeCheap.register

    def recording(output, fn, *inputs):
        if output.requires_grad:
            outputs.append((fn.__name__, weakref.ref(output)))

        def counted(*args):
            computed.append(fn.__name__)
            return fn(*args)

        return register(output, counted, *inputs)

    kept_none, out, grads, after = run("none", 0.1)
    kept_undropped = run("selective", 0.0)[0]
    freed, draws = [], []
    keep = Dropout.keep
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RecomputeCheap, "register", staticmethod(recording))
        patch.setattr(Dropout, "keep", lambda self, x: (draws.append(x.shape), keep(self, x))[1])
        kept, selective_out, selective_grads, selective_after = run(
            "selective", 0.1, lambda: freed.extend(ref() is None for _, ref in outputs))
    assert kept == kept_undropped < 0.6 * kept_none
    dropped = [name for name, _ in outputs if name == "dropped"]
    assert len(dropped) == 5 * config.n_layer - 1  # qkv, proj, fc_1, fc_2, proj of the MLP; not the first qkv's
    if device == "cpu":  # each mask drawn in the forward pass and once more in the backward pass, not twice more
        assert len(draws) == 2 * (5 * config.n_layer - 1) + 1
    assert len(freed) == len(outputs) and all(freed)
    assert sorted(computed) == sorted(name for name, _ in outputs)  # each once
    torch.testing.assert_close(selective_out, out, atol=0, rtol=0)
    assert grads.keys() == selective_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(selective_grads[name], grad, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(selective_after, after, atol=0, rtol=0)


def test_an_input_changed_in_place_after_the_forward_pass_is_an_error():
    gate, up = (torch.randn(3, 8, requires_grad=True) for _ in range(2))
    weight = torch.randn(4, 8, requires_grad=True)
    with RecomputeCheap():
        g, u = gate * 1, up * 1
        out = F.linear(RecomputeCheap.register(SwiGLUFunction.apply(g, u), swiglu, g, u), weight)
    with torch.no_grad():
        u.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", ["llama-gqa", "moe", "neox-layernorm-bias"])
def test_selective_gives_the_adapters_gradients_of_none_bit_for_bit(case, version):
    """LLaMA-Adapter v1 and v2 (whose norms and linears carry trainable scales and biases): the same, exactly."""
    from model.adapter import AdapterConfig, inject_adapter, mark_only_adapter_as_trainable
    from tests.test_adapter import CONFIGS, perturb, tiny_gpt, tokens

    results = []
    for mode in ("none", "selective"):
        model = inject_adapter(tiny_gpt(**CONFIGS[case]), AdapterConfig(prompt_length=5, start_layer=1, version=version))
        perturb(model)
        mark_only_adapter_as_trainable(model)
        idx = tokens()
        loss = F.cross_entropy(model.train().set_gradient_checkpointing(mode)(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (selective_loss, selective_grads) = results
    torch.testing.assert_close(selective_loss, loss, atol=0, rtol=0)
    assert grads.keys() == selective_grads.keys() and all(grad is not None for grad in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(selective_grads[name], grad, atol=0, rtol=0, msg=name)
