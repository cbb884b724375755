"""LLaMA-Adapter (https://arxiv.org/abs/2303.16199) and LLaMA-Adapter V2 (https://arxiv.org/abs/2304.15010) for the
GPT in `gpt.py`.

Adapter (v1): each block from `start_layer` on learns an adaption prompt, `prompt_length` vectors of size n_embd.
The block's own (frozen) qkv projection turns the prompt into keys and values, without RoPE: the prompt has no
position. Every token attends to them, in a softmax of their own, and the result joins the attention output through
a gate per head: y = attention(q, k, v) + gate * attention(q, k_prompt, v_prompt). The gates start at zero, so an
injected model starts out as exactly the base model, and the prompt is brought in gradually as they train (the
paper's zero-init attention, section 3.2; as in lit-gpt, the gate is used as is, without the original code's tanh).

Adapter v2 adds, on every linear layer (the output head and an MoE's router included), a learned scale and bias:
y = scale * (W x + b) + bias, starting at scale 1, bias 0 (section 3.2 of the v2 paper, "bias tuning"), and trains
the normalization layers' parameters too.

Like `model/lora.py`, this works by injection into a loaded GPT: `inject_adapter` swaps each adapted block's
attention for an `AdapterAttention` that reuses its qkv and proj layers, and (v2) wraps the linears in
`AdapterV2Linear`. The base may be quantized first (`model.quantize.quantize_model`). The prompt is not part of the
KV cache: every forward pass projects it (prompt_length more rows through qkv) and attends to it in addition to
the cached positions, which keeps generation free of adapter state at some cost in decoding speed (~15% on a CPU
for SmolLM2-135M with 28 adapted blocks).

An adapter run directory holds `adapter.safetensors` (from `adapter_state_dict`) and `hparams.yaml`, whose adapter
settings use the keys in `HPARAM_KEYS` (`AdapterConfig.to_hparams()` writes them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.gpt import GPT, CausalSelfAttention, RMSNorm

ADAPTER_WEIGHTS = "adapter.safetensors"
HPARAMS = "hparams.yaml"
# AdapterConfig field -> its key in a run's hparams.yaml
HPARAM_KEYS = {"prompt_length": "adapter_prompt_length", "start_layer": "adapter_start_layer",
               "version": "adapter_version"}


@dataclass
class AdapterConfig:
    """The adaption prompt's length, the first block that gets one, and the version (1, or 2 for LLaMA-Adapter V2)."""

    prompt_length: int = 10
    start_layer: int = 2
    version: int = 1

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise ValueError(f"The adapter prompt length must be at least 1, got {self.prompt_length}")
        if self.start_layer < 0:
            raise ValueError(f"The adapter start layer must be >= 0, got {self.start_layer}")
        if self.version not in (1, 2):
            raise ValueError(f"The adapter version must be 1 or 2, got {self.version}")

    def to_hparams(self) -> dict:
        return {HPARAM_KEYS[f.name]: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_hparams(cls, hparams: dict, source: str = HPARAMS) -> "AdapterConfig":
        missing = [key for key in HPARAM_KEYS.values() if key not in hparams]
        if missing:
            raise ValueError(
                f"{source} lacks the adapter settings {', '.join(missing)}; was it written by an adapter run?"
            )
        return cls(**{name: hparams[key] for name, key in HPARAM_KEYS.items()})


class AdapterAttention(CausalSelfAttention):
    """A block's attention plus LLaMA-Adapter's gated attention to a learned prompt. It takes over the original's
    qkv and proj layers (and KV cache) rather than building new ones."""

    def __init__(self, attn: CausalSelfAttention, prompt_length: int) -> None:
        nn.Module.__init__(self)  # not CausalSelfAttention.__init__: that would allocate another qkv and proj
        self.config, self.block_idx = attn.config, attn.block_idx
        self.qkv, self.proj, self.kv_cache = attn.qkv, attn.proj, attn.kv_cache
        c = self.config
        weight = attn.qkv.weight
        # a quantized weight has no dtype to train in: the prompt takes the dtype the layer computes in
        dtype = weight.dtype if weight.is_floating_point() else getattr(attn.qkv, "compute_dtype", None)
        dtype = dtype or torch.float32
        # N(0, 1) as nn.Embedding, which the paper's code and lit-gpt hold the prompt in; it has the scale of the
        # normalized hidden states that qkv usually sees
        self.adapter_prompt = nn.Parameter(torch.randn(prompt_length, c.n_embd, device=weight.device, dtype=dtype))
        self.adapter_gate = nn.Parameter(torch.zeros(c.n_head, device=weight.device, dtype=dtype))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        y = super().attend(q, k, v, mask)
        c = self.config
        B = q.size(0)
        q_size, kv_size = c.n_head * c.head_size, c.n_query_groups * c.head_size
        _, prompt_k, prompt_v = self.qkv(self.adapter_prompt).split((q_size, kv_size, kv_size), dim=-1)
        # (prompt_length, n_query_groups * head_size) -> (B, n_query_groups, prompt_length, head_size), no RoPE
        prompt_k = prompt_k.view(1, -1, c.n_query_groups, c.head_size).transpose(1, 2).expand(B, -1, -1, -1)
        prompt_v = prompt_v.view(1, -1, c.n_query_groups, c.head_size).transpose(1, 2).expand(B, -1, -1, -1)
        # every position sees the whole prompt: no mask
        prompt_y = F.scaled_dot_product_attention(
            q, prompt_k, prompt_v, scale=1.0 / math.sqrt(c.head_size),
            enable_gqa=c.n_query_groups != c.n_head,
        )
        return y + self.adapter_gate.view(1, -1, 1, 1) * prompt_y


class AdapterV2Linear(nn.Module):
    """A frozen linear layer (nn.Linear or a bitsandbytes one) with a learned scale and bias per output:
    y = adapter_scale * linear(x) + adapter_bias."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight
        dtype = weight.dtype if weight.is_floating_point() else getattr(linear, "compute_dtype", None) or torch.float32
        self.adapter_scale = nn.Parameter(torch.ones(self.out_features, device=weight.device, dtype=dtype))
        self.adapter_bias = nn.Parameter(torch.zeros(self.out_features, device=weight.device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_scale * self.linear(x) + self.adapter_bias


def inject_adapter(model: GPT, adapter_config: AdapterConfig) -> GPT:
    """Add the adapter to the blocks `adapter_config.start_layer..n_layer` (and for v2 wrap every linear), in place.
    Quantize the model (if at all) before this.

    With tied embeddings, v2's head wraps the same nn.Linear, whose weight stays the embedding's."""
    if adapter_version(model):
        raise ValueError("The model already has an adapter; inject_adapter must be called once, on the base model")
    n_layer = model.config.n_layer
    if adapter_config.start_layer >= n_layer:
        raise ValueError(
            f"--adapter_start_layer {adapter_config.start_layer} leaves no block to adapt: the model has {n_layer}"
            f" blocks, so it must be below {n_layer}"
        )
    for block in model.transformer.h[adapter_config.start_layer:]:
        # a new module starts in training mode; keep the model's
        block.attn = AdapterAttention(block.attn, adapter_config.prompt_length).train(model.training)
    if adapter_config.version == 2:
        # bitsandbytes' Linear4bit and Linear8bitLt are nn.Linear subclasses too
        paths = [path for path, module in model.named_modules() if isinstance(module, nn.Linear)]
        for path in paths:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            setattr(parent, name, AdapterV2Linear(getattr(parent, name)).train(model.training))
    return model


def adapter_version(model: nn.Module) -> int:
    """2 if the model has AdapterV2Linear layers, 1 if it has only adaption prompts, 0 if it has no adapter."""
    modules = list(model.modules())
    if any(isinstance(m, AdapterV2Linear) for m in modules):
        return 2
    return 1 if any(isinstance(m, AdapterAttention) for m in modules) else 0


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of everything the adapter trains: prompts and gates; for v2 also every linear's scale and
    bias, and the normalization layers' parameters (the paper's "unfrozen norms")."""
    version = adapter_version(model)
    if version == 0:
        return {}
    return {
        name: param for name, param in model.named_parameters()
        if name.rpartition(".")[2].startswith("adapter_")
        or (version == 2 and isinstance(model.get_submodule(name.rpartition(".")[0]), (RMSNorm, nn.LayerNorm)))
    }


def mark_only_adapter_as_trainable(model: nn.Module) -> None:
    """Freeze everything but the adapter (its version is the model's: v2 trains the linears' scales and biases and
    the norms too)."""
    trainable = {id(param) for param in _adapter_parameters(model).values()}
    if not trainable:
        raise ValueError("The model has no adapter; call inject_adapter(model, adapter_config) first")
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors, e.g. `transformer.h.2.attn.adapter_prompt` / `.adapter_gate`, and for v2
    `transformer.h.0.attn.qkv.adapter_scale` / `.adapter_bias`, `transformer.h.0.norm_1.weight`."""
    return {name: param.detach() for name, param in _adapter_parameters(model).items()}


def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy an adapter into a model injected with the same AdapterConfig; a clear ValueError names any difference."""
    expected = adapter_state_dict(model)
    if not expected:
        raise ValueError("The model has no adapter; call inject_adapter(model, adapter_config) before loading one")
    trained_version, model_version = (2 if any(k.endswith(".adapter_scale") for k in keys) else 1
                                      for keys in (state_dict, expected))
    if trained_version != model_version:
        raise ValueError(
            f"The adapter was trained as version {trained_version} but the model has version {model_version}"
        )
    trained_layers, model_layers = (sorted(int(k.split(".")[2]) for k in keys if k.endswith(".adapter_prompt"))
                                    for keys in (state_dict, expected))
    if trained_layers != model_layers:
        raise ValueError(
            f"The adapter has prompts in blocks {trained_layers} but the model in {model_layers}: inject it with the"
            " adapter_start_layer it was trained with (or it was trained on another base model)"
        )
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"The adapter's tensors differ from the model's: {len(missing)} missing (e.g. {sorted(missing)[:3]}),"
            f" {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]}). Was it trained on another base model?"
        )
    for key, tensor in state_dict.items():
        if tensor.shape == expected[key].shape:
            continue
        if key.endswith(".adapter_prompt") and tensor.shape[1:] == expected[key].shape[1:]:
            raise ValueError(f"The adapter was trained with adapter_prompt_length={tensor.shape[0]} but the model has"
                             f" {expected[key].shape[0]}")
        raise ValueError(
            f"{key} has shape {tuple(tensor.shape)} in the adapter but {tuple(expected[key].shape)} in the model;"
            " was it trained on another base model?"
        )
    with torch.no_grad():
        for key, tensor in state_dict.items():
            expected[key].copy_(tensor)


def attach_adapter(model: nn.Module, hparams: dict, weights: dict[str, torch.Tensor]) -> None:
    """Add the adapter a run's hparams describe to `model` and load the run's weights into it."""
    inject_adapter(model, AdapterConfig.from_hparams(hparams))
    load_adapter_state_dict(model, weights)
