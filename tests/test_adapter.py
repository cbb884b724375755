"""model/adapter.py: LLaMA-Adapter v1/v2 layers are exact at init, the KV cache changes nothing, exactly the intended
parameters train, and the state dict round-trips."""

import copy

import pytest
import torch

from model import GPT, Config
from model.adapter import (
    AdapterAttention,
    AdapterConfig,
    AdapterV2Linear,
    adapter_state_dict,
    inject_adapter,
    load_adapter_state_dict,
    mark_only_adapter_as_trainable,
)
from model.generate import generate
from model.lora import count_parameters

VOCAB = 96
CONFIGS = {
    "llama-gqa": dict(n_query_groups=2),
    "tied-mqa": dict(n_query_groups=1, tie_embeddings=True),
    "moe": dict(mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2),
    "neox-layernorm-bias": dict(mlp_class_name="GptNeoxMLP", intermediate_size=None, bias=True, lm_head_bias=True,
                                norm_class_name="LayerNorm", parallel_residual=True, shared_attention_norm=True),
    "sliding-window": dict(sliding_window=5),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(**overrides) -> GPT:
    kw = dict(name="tiny", vocab_size=VOCAB, n_layer=3, n_head=4, n_embd=32, intermediate_size=48, block_size=64)
    torch.manual_seed(0)
    model = GPT(Config(**{**kw, **overrides}))
    with torch.no_grad():  # random norms and biases, so that nothing is trivially zero or one
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move the adapter away from its init (the gates off zero), so that it changes the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)


def tokens(seq_len: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ the layers


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", list(CONFIGS))
def test_adapter_at_init_is_exactly_the_base_model(case, version):
    base = tiny_gpt(**CONFIGS[case])
    model = inject_adapter(copy.deepcopy(base), AdapterConfig(prompt_length=5, start_layer=1, version=version))
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))
        perturb(model)
        assert (model(idx) - base(idx)).abs().max() > 1e-2  # and a trained adapter does change it
    if base.config.tie_embeddings:  # v2's head wraps the shared nn.Linear: the head stays tied
        head = model.lm_head.linear if version == 2 else model.lm_head
        assert head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", ["llama-gqa", "tied-mqa", "sliding-window"])
def test_kv_cache_gives_what_recomputing_gives(case, version):
    """The prompt is not in the cache: it is attended to in addition, at the prefill and at every decoding step."""
    model = inject_adapter(tiny_gpt(**CONFIGS[case]), AdapterConfig(prompt_length=4, start_layer=1, version=version))
    perturb(model)
    idx = tokens(12)[:1]
    with torch.no_grad():
        whole = model(idx)
        model.set_kv_cache(batch_size=1)
        pieces = [model(idx[:, :5], torch.arange(5))]
        pieces += [model(idx[:, t:t + 1], torch.tensor([t])) for t in range(5, idx.size(1))]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-5)

    prompt, n = idx[0, :7], 20
    ids = prompt.tolist()
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert list(generate(model, prompt, n, temperature=0.0)) == ids[prompt.numel():]


def expected_trainable(config: Config, adapter_config: AdapterConfig) -> int:
    """v1: per adapted block a prompt (prompt_length x n_embd) and a gate per head. v2 adds a scale and a bias per
    output of every linear (each block's qkv, proj and MLP linears, an MoE's router, the head) and trains every
    normalization parameter (RMSNorm: weight; LayerNorm: weight and bias)."""
    c = config
    adapted_blocks = c.n_layer - adapter_config.start_layer
    total = adapted_blocks * (adapter_config.prompt_length * c.n_embd + c.n_head)
    if adapter_config.version == 1:
        return total
    qkv_out = (c.n_head + 2 * c.n_query_groups) * c.head_size
    mlp_out = {"LLaMAMLP": 2 * c.intermediate_size + c.n_embd, "GptNeoxMLP": c.intermediate_size + c.n_embd,
               "LLaMAMoE": c.n_expert + c.n_expert * (2 * c.intermediate_size + c.n_embd)}[c.mlp_class_name]
    linear_outputs = c.n_layer * (qkv_out + c.n_embd + mlp_out) + c.vocab_size
    norms_per_block = 1 if c.shared_attention_norm else 2
    norm_size = c.n_embd * (2 if c.norm_class_name == "LayerNorm" else 1)
    return total + 2 * linear_outputs + (c.n_layer * norms_per_block + 1) * norm_size


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", ["llama-gqa", "tied-mqa", "moe", "neox-layernorm-bias"])
def test_exactly_the_adapter_trains(case, version):
    model = tiny_gpt(**CONFIGS[case])
    adapter_config = AdapterConfig(prompt_length=5, start_layer=1, version=version)
    frozen_before = count_parameters(model, None)
    inject_adapter(model, adapter_config)
    mark_only_adapter_as_trainable(model)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert count_parameters(model) == expected_trainable(model.config, adapter_config)
    assert trainable == set(adapter_state_dict(model))
    # the adapter's own tensors are all that the model gains (v2's trainable norms were there before)
    added = sum(param.numel() for name, param in model.named_parameters() if ".adapter_" in name)
    assert count_parameters(model, None) == frozen_before + added
    assert not any(isinstance(m, AdapterAttention) for m in model.transformer.h[:1].modules())
    assert all(isinstance(block.attn, AdapterAttention) for block in model.transformer.h[1:])
    assert any(isinstance(m, AdapterV2Linear) for m in model.modules()) == (version == 2)
    if version == 2:  # not a frozen weight among the trainables
        assert not any(name.endswith(("qkv.linear.weight", "wte.weight")) for name in trainable)


def test_adapter_state_dict_round_trip_and_mismatches():
    def injected(**kw):
        return inject_adapter(tiny_gpt(), AdapterConfig(**{"prompt_length": 5, "start_layer": 1, **kw}))

    model = injected(version=2)
    perturb(model)
    copy_ = injected(version=2)
    load_adapter_state_dict(copy_, adapter_state_dict(model))
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(copy_(idx), model(idx))
    trained = adapter_state_dict(injected())
    with pytest.raises(ValueError, match="trained as version 1 but the model has version 2"):
        load_adapter_state_dict(injected(version=2), trained)
    with pytest.raises(ValueError, match=r"prompts in blocks \[1, 2\] but the model in \[2\]"):
        load_adapter_state_dict(injected(start_layer=2), trained)
    with pytest.raises(ValueError, match="adapter_prompt_length=5 but the model has 3"):
        load_adapter_state_dict(injected(prompt_length=3), trained)
    with pytest.raises(ValueError, match="has no adapter"):
        load_adapter_state_dict(tiny_gpt(), trained)
    with pytest.raises(ValueError, match="already has an adapter"):
        inject_adapter(injected(), AdapterConfig())
    with pytest.raises(ValueError, match="the model has 3 blocks"):
        inject_adapter(tiny_gpt(), AdapterConfig(start_layer=3))
    with pytest.raises(ValueError, match="prompt length must be at least 1"):
        AdapterConfig(prompt_length=0)
