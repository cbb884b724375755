"""LoRA (https://arxiv.org/abs/2106.09685) and DoRA (https://arxiv.org/abs/2402.09353) for the GPT in `gpt.py`.

LoRA freezes a linear layer's weight W and learns a low-rank update: y = W x + b + (alpha / r) * B A dropout(x), with
A (r, in) and B (out, r). B starts at zero, so an injected model starts out as exactly the base model.

DoRA splits the updated weight into a direction and a learned magnitude per output row:
W' = m * (W + s B A) / ||W + s B A||_row. The norm is treated as a constant (detached from the graph, section 4.3 of
the paper), which is what PEFT does too; the forward below follows PEFT's arithmetic step by step so that outputs
and gradients agree with a PEFT DoRA model on the same weights.

The fused `attn.qkv` layer gets one A/B pair per enabled projection (q, k, v), each writing only its own rows of the
output, so an adapter maps 1:1 onto PEFT's q_proj/k_proj/v_proj adapters. The base layer may be a bitsandbytes 4-bit
or 8-bit layer from `model.quantize.quantize_model` (QLoRA: quantize first, then inject); its weight is only ever
read through `dequantize_linear`.

A LoRA run directory holds `lora.safetensors` (from `lora_state_dict`) and `hparams.yaml`, whose LoRA settings use
the keys in `HPARAM_KEYS` (`LoRAConfig.to_hparams()` writes them).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.gpt import GPT, RecomputeCheap
from model.quantize import dequantize_linear, weight_numel

LORA_WEIGHTS = "lora.safetensors"
HPARAMS = "hparams.yaml"
# LoRAConfig field -> its key in a run's hparams.yaml
HPARAM_KEYS = {
    "r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "query": "lora_query", "key": "lora_key",
    "value": "lora_value", "projection": "lora_projection", "mlp": "lora_mlp", "head": "lora_head", "dora": "dora",
    "router": "lora_router",
}
# settings added after runs were saved without them: such runs had them off
OPTIONAL_HPARAM_KEYS = {"lora_router"}
# an MoE router's weight; trained in full (not low-rank) with `router`, and saved beside the LoRA tensors
ROUTER_SUFFIX = ".mlp.gate.weight"


class Dropout(nn.Module):
    """`nn.Dropout` whose mask costs a quarter of the random draws on the CPU.

    PyTorch's CPU dropout draws one number from its Mersenne Twister per element (`bernoulli_`), at ~10 ns each that
    is the most expensive op of a LoRA step on a small model (29% of a SmolLM2-135M step at dropout 0.05 in bf16 by
    `torch.profiler`; tutorials/performance.md). Here one 64-bit draw gives the keep/drop decision of four elements: each 16-bit
    lane is kept when it is at least `p` of the way up its range, so the drop probability is `p` rounded to 1/65536,
    and the kept elements are scaled by the inverse of the exact keep probability (the expectation is unchanged). On
    other devices, whose dropout kernels draw in parallel, and inside compiled code (inductor draws its own random
    numbers, and the in-place draw cannot be traced inside `--gradient_checkpointing selective`'s checkpoint), this
    is `F.dropout`.

    Under `--gradient_checkpointing selective` (eager, on the CPU or CUDA) neither the dropped copy nor the mask is
    kept for the backward pass: the random number generator's state before the draw is, and the backward pass draws
    the same mask again from it once (`ReplayedDropout`, `DropoutReplay`), both for the dropped copy, which it
    computes again from the input (a norm's or the activation's output, itself computed again, or the attention's
    output, which the attention keeps), and for the dropout's own gradient. The same draws, so the same numbers as
    without.
    """

    LANES = 65536

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * self.LANES)
        self.scale = self.LANES / (self.LANES - self.threshold)  # 1 / the exact keep probability

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type not in ("cpu", "cuda") or torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)
        if x.requires_grad and RecomputeCheap.active is not None:
            replay = DropoutReplay(self, rng_state(x.device))
            return RecomputeCheap.register(ReplayedDropout.apply(x, replay), replay.dropped, x)
        if x.device.type == "cuda":
            return F.dropout(x, self.p, training=True)
        keep = self.keep(x)
        return torch.where(keep, x * self.scale, 0)

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """The CPU mask: True where an element of `x` is kept."""
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # 64 uniform bits each
        return bits.view(torch.int16)[:n].view(x.shape) >= self.threshold - self.LANES // 2

    def draw(self, x: torch.Tensor, state: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The dropped `x` and the mask, drawn as `forward` draws them (F.dropout's kernel on CUDA); from `state`
        without moving the generator on, if given."""
        with replaying(x.device, state):
            if x.device.type == "cuda":
                return torch.ops.aten.native_dropout(x, self.p, True)
            keep = self.keep(x)
            return torch.where(keep, x * self.scale, 0), keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator that dropout on `device` draws from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextmanager
def replaying(device: torch.device, state: Optional[torch.Tensor]):
    """Draw from `state` (if given) and leave the generator as it was."""
    if state is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        if cuda:
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


class DropoutReplay:
    """One draw of `Dropout` under `selective`: the generator's state before it, and the mask drawn again in the
    backward pass. The adapter's backward pass needs the dropped copy first (`dropped`, computed again from the
    input); the dropout's own backward pass then takes the mask that drawing it left (`mask`), so each mask is drawn
    once more, not twice."""

    def __init__(self, dropout: Dropout, state: torch.Tensor) -> None:
        self.dropout, self.state = dropout, state
        self.keep: Optional[torch.Tensor] = None

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        dropped, self.keep = self.dropout.draw(x, self.state)
        return dropped

    def mask(self, x: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The mask of this draw: the one `dropped` left, else drawn again (from `x` on CUDA, whose kernel assigns
        its random numbers by the input's layout; from the state and the number of elements of `like` on the CPU)."""
        keep, self.keep = self.keep, None
        if keep is not None:
            return keep
        if like.device.type == "cuda":
            return self.dropout.draw(x, self.state)[1]
        with replaying(like.device, self.state):
            return self.dropout.keep(like)


class ReplayedDropout(torch.autograd.Function):
    """`Dropout` that keeps only the generator's state for the backward pass, which draws the mask again from it:
    the gradient is the one autograd computes through the same draw (`where(keep, grad, 0) * scale` on the CPU,
    `native_dropout_backward` on CUDA).

    On CUDA the input is saved for a mask that has to be drawn again from it (when the adapter did not need the
    dropped copy first), as `torch.utils.checkpoint` replays dropout; under `selective` that keeps it only if it is
    kept anyway (a norm's or the activation's output is computed again; the attention's output is what the attention
    keeps). This CUDA path has not run on a GPU yet."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, replay: DropoutReplay) -> torch.Tensor:
        ctx.replay = replay
        if x.device.type == "cuda":
            ctx.save_for_backward(x)
        return replay.dropout.draw(x)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        replay = ctx.replay
        keep = replay.mask(ctx.saved_tensors[0] if grad.device.type == "cuda" else None, grad)
        if grad.device.type == "cuda":
            return torch.ops.aten.native_dropout_backward(grad, keep, 1 / (1 - replay.dropout.p)), None
        return torch.where(keep, grad, 0) * replay.dropout.scale, None


@dataclass
class LoRAConfig:
    """Which linears get LoRA, and its hyperparameters. `mlp` covers every linear of the MLP, each expert's of an MoE;
    `router` trains an MoE's routers in full (alone, it trains the routers only, e.g. after scripts/merge_moe.py)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False
    mlp: bool = False
    head: bool = False
    dora: bool = False
    router: bool = False

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not any((self.query, self.key, self.value, self.projection, self.mlp, self.head, self.router)):
            raise ValueError("LoRA is enabled on no layer: set at least one of query, key, value, projection, mlp, head,"
                             " router")

    def to_hparams(self) -> dict:
        return {HPARAM_KEYS[f.name]: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_hparams(cls, hparams: dict, source: str = HPARAMS) -> "LoRAConfig":
        missing = [key for key in HPARAM_KEYS.values() if key not in hparams and key not in OPTIONAL_HPARAM_KEYS]
        if missing:
            raise ValueError(f"{source} lacks the LoRA settings {', '.join(missing)}; was it written by a LoRA run?")
        return cls(**{name: hparams[key] for name, key in HPARAM_KEYS.items() if key in hparams})


class LoRAAdapter(nn.Module):
    """The update of the output rows [start, start + size) of one linear layer: B (size, r) @ A (r, in_features), and
    with DoRA the magnitude of each of those rows."""

    def __init__(self, in_features: int, start: int, size: int, r: int, dora: bool, device, dtype) -> None:
        super().__init__()
        self.start, self.size = start, size
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        # A as nn.Linear's default init and B = 0, as in the paper and PEFT: the update starts at exactly zero
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(size, r, device=device, dtype=dtype))
        # filled in by LoRALinear from the base weight's row norms
        self.magnitude = nn.Parameter(torch.empty(size, device=device, dtype=dtype)) if dora else None

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.size)


class LoRAUpdate(torch.autograd.Function):
    """`out[..., rows_i] += scaling * x A_i^T B_i^T` for each adapter i, in place: one GEMM for the A of every slice
    (q, k and v of a fused qkv), then one GEMM per B that adds into its rows of the base output (`addmm_`, the
    scaling and the addition done by the GEMM itself: no update tensor, no slicing and concatenating).

    Autograd through the same in-place additions on slices would clone the whole output gradient (its CopySlices
    step) and scale it once per adapter; here the gradient of `out` passes through as it is and the scaling lands on
    the (tokens, r) products. Saved for the backward pass: `x` and the (tokens, r per adapter) low-rank activations,
    as before. The base layer's backward (nn.Linear or bitsandbytes) stays autograd's, and its own output is never
    needed by it, so writing into that output is safe."""

    @staticmethod
    def forward(ctx, out, x, A, rows, r, scaling, *Bs):
        flat_x, flat_out = x.reshape(-1, x.size(-1)), out.view(-1, out.size(-1))
        low_rank = flat_x @ A.t()
        for i, (B, (start, stop)) in enumerate(zip(Bs, rows)):
            flat_out[:, start:stop].addmm_(low_rank[:, i * r:(i + 1) * r], B.t(), alpha=scaling)
        ctx.mark_dirty(out)
        # A only for the input's gradient: the first Block's input needs none under LoRA
        ctx.save_for_backward(x, A if ctx.needs_input_grad[1] else None, low_rank, *Bs)
        ctx.rows, ctx.r, ctx.scaling = rows, r, scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        x, A, low_rank, *Bs = ctx.saved_tensors
        r, scaling = ctx.r, ctx.scaling
        flat_grad, flat_x = grad.reshape(-1, grad.size(-1)), x.reshape(-1, x.size(-1))
        grad_Bs, grad_low = [], []
        for i, (B, (start, stop)) in enumerate(zip(Bs, ctx.rows)):
            rows_grad = flat_grad[:, start:stop]
            needed = ctx.needs_input_grad[6 + i]
            grad_Bs.append((rows_grad.t() @ low_rank[:, i * r:(i + 1) * r]).mul_(scaling) if needed else None)
            grad_low.append(rows_grad @ B)
        grad_low = (grad_low[0] if len(grad_low) == 1 else torch.cat(grad_low, dim=1)).mul_(scaling)
        grad_A = grad_low.t() @ flat_x if ctx.needs_input_grad[2] else None
        grad_x = (grad_low @ A).view_as(x) if ctx.needs_input_grad[1] else None
        return grad, grad_x, grad_A, None, None, None, *grad_Bs


class LoRALinear(nn.Module):
    """A frozen linear layer (`self.linear`: nn.Linear, bnb Linear4bit or Linear8bitLt) plus LoRA/DoRA adapters.

    `out_slices` maps a name to the `(start, size)` output rows its adapter updates; by default one adapter named
    "all" covers every row. Rows outside every slice pass through unchanged.
    """

    def __init__(
        self, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0, dora: bool = False,
        out_slices: Optional[dict[str, tuple[int, int]]] = None, dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.r, self.alpha, self.scaling, self.dora = r, alpha, alpha / r, dora
        self.adapters_enabled = True  # False: the base layer alone (see `lora_disabled`)
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        out_slices = out_slices or {"all": (0, self.out_features)}
        # kept in row order, which the forward relies on to assemble the output
        ordered = sorted(out_slices.items(), key=lambda item: item[1][0])
        end = 0
        for _, (start, size) in ordered:
            if start < end or size <= 0 or start + size > self.out_features:
                raise ValueError(f"LoRA slices {out_slices} overlap or fall outside the {self.out_features} output rows")
            end = start + size
        weight = linear.weight
        # A 4-bit or int8 weight has no dtype to train in: the adapter takes the dtype the layer computes in
        dtype = dtype or (weight.dtype if weight.is_floating_point() else getattr(linear, "compute_dtype", None) or torch.float32)
        self.lora = nn.ModuleDict({
            name: LoRAAdapter(self.in_features, start, size, r, dora, weight.device, dtype)
            for name, (start, size) in ordered
        })
        # On the meta device (a model built before its weights are loaded) the magnitudes come with the adapter's state dict
        if dora and weight.device.type != "meta":
            base_weight = dequantize_linear(linear)
            with torch.no_grad():
                for adapter in self.lora.values():
                    adapter.magnitude.copy_(torch.linalg.norm(base_weight[adapter.rows], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if not self.adapters_enabled:
            return out
        adapters = list(self.lora.values())
        dropped = self.dropout(x.to(adapters[0].A.dtype))
        if self.dora:
            return self._dora_forward(out, dropped)
        # bitsandbytes' autograd functions return views that autograd forbids writing into: copy their output once
        if type(self.linear) is not nn.Linear:
            out = out.clone()
        A = adapters[0].A if len(adapters) == 1 else torch.cat([adapter.A for adapter in adapters])
        rows = tuple((adapter.start, adapter.start + adapter.size) for adapter in adapters)
        # torch.compile stops its graph at `mark_dirty`: compiled Blocks take the autograd path below, whose scaling
        # and additions inductor fuses by itself
        fused = out.dtype == A.dtype and not torch.is_autocast_enabled(out.device.type)
        if fused and not torch.compiler.is_compiling():
            return LoRAUpdate.apply(out, dropped, A, rows, self.r, self.scaling, *(a.B for a in adapters))
        # adapters in another dtype than the base output, autocast, or compiled: the same update through autograd
        low_rank = F.linear(dropped, A)
        for i, (adapter, (start, stop)) in enumerate(zip(adapters, rows)):
            update = F.linear(low_rank[..., i * self.r:(i + 1) * self.r], adapter.B)
            target = out if adapter.size == self.out_features else out[..., start:stop]
            target.add_(update.to(out.dtype), alpha=self.scaling)
        return out

    def _dora_forward(self, out: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        base_weight = dequantize_linear(self.linear).to(dropped.dtype)
        pieces, end = [], 0
        for adapter in self.lora.values():
            if adapter.start > end:
                pieces.append(out[..., end:adapter.start])
            rows = out[..., adapter.rows]
            lora_out = F.linear(F.linear(dropped, adapter.A), adapter.B)
            update = self._dora_update(adapter, base_weight[adapter.rows], rows, dropped, lora_out)
            pieces.append(rows + update.to(out.dtype))
            end = adapter.start + adapter.size
        if end < self.out_features:
            pieces.append(out[..., end:])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def _dora_update(
        self, adapter: LoRAAdapter, weight: torch.Tensor, base_out: torch.Tensor, dropped: torch.Tensor,
        lora_out: torch.Tensor,
    ) -> torch.Tensor:
        """DoRA's output minus the base output: (m / ||W + s B A|| - 1) W x + m / ||W + s B A|| * s B A x, as PEFT
        computes it (`peft.tuners.lora.dora.DoraLinearLayer.forward`)."""
        norm = torch.linalg.norm(weight + self.scaling * (adapter.B @ adapter.A).detach(), dim=1).to(weight.dtype)
        scale = (adapter.magnitude / norm.detach()).view(1, -1)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            # x was not dropped: reuse the base output, less the bias that DoRA does not rescale
            bias = self.linear.bias
            base = base_out - bias[adapter.rows] if bias is not None else base_out
        else:
            # the rescaled base term must see the same dropped-out input as the LoRA term
            base = F.linear(dropped, weight)
        return (scale - 1) * base + scale * lora_out * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The dense float32 weight W' with `F.linear(x, W', bias) == self(x)` (in eval mode)."""
        weight = dequantize_linear(self.linear)
        pieces, end = [], 0
        for adapter in self.lora.values():
            if adapter.start > end:
                pieces.append(weight[end:adapter.start])
            rows = weight[adapter.rows] + self.scaling * (adapter.B.float() @ adapter.A.float())
            if self.dora:
                rows = (adapter.magnitude.float() / torch.linalg.norm(rows, dim=1)).unsqueeze(1) * rows
            pieces.append(rows)
            end = adapter.start + adapter.size
        pieces.append(weight[end:])
        return torch.cat(pieces).detach()


def lora_targets(model: GPT, lora_config: LoRAConfig) -> dict[str, Optional[dict[str, tuple[int, int]]]]:
    """Module path -> output slices (None: the whole layer) of every linear that `lora_config` puts LoRA on."""
    c = model.config
    q_size, kv_size = c.n_head * c.head_size, c.n_query_groups * c.head_size
    qkv_slices = {
        name: rows for name, rows, enabled in (
            ("q", (0, q_size), lora_config.query),
            ("k", (q_size, kv_size), lora_config.key),
            ("v", (q_size + kv_size, kv_size), lora_config.value),
        ) if enabled
    }
    targets: dict[str, Optional[dict[str, tuple[int, int]]]] = {}
    for i, block in enumerate(model.transformer.h):
        if qkv_slices:
            targets[f"transformer.h.{i}.attn.qkv"] = qkv_slices
        if lora_config.projection:
            targets[f"transformer.h.{i}.attn.proj"] = None
        if lora_config.mlp:
            for name, module in block.mlp.named_modules():
                # An MoE's router gets no LoRA, as in lit-gpt and PEFT's Mixtral recipes: a low-rank update of an
                # (n_expert, n_embd) matrix saves nothing; `router` trains it in full instead.
                if isinstance(module, nn.Linear) and name != "gate":
                    targets[f"transformer.h.{i}.mlp.{name}"] = None
    if lora_config.head:
        targets["lm_head"] = None
    return targets


def inject_lora(model: GPT, lora_config: LoRAConfig, dtype: Optional[torch.dtype] = None) -> GPT:
    """Wrap the linears chosen by `lora_config` in LoRALinear, in place. Quantize the model (if at all) before this.

    The adapters take `dtype`, by default the base weight's (a quantized layer's compute dtype). With tied embeddings
    the head's LoRALinear wraps the same nn.Linear, whose weight stays the embedding's."""
    if any(isinstance(module, LoRALinear) for module in model.modules()):
        raise ValueError("The model already has LoRA layers; inject_lora must be called once, on the base model")
    for path, out_slices in lora_targets(model, lora_config).items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        lora_linear = LoRALinear(
            getattr(parent, name), lora_config.r, lora_config.alpha, lora_config.dropout, lora_config.dora,
            out_slices=out_slices, dtype=dtype,
        )
        # a new module starts in training mode; keep the model's (dropout must stay off in an eval-mode model)
        setattr(parent, name, lora_linear.train(model.training))
    return model


@contextmanager
def lora_disabled(model: nn.Module):
    """Within the block the model computes as its base, every adapter skipped: DPO's reference model without a
    second copy of the weights in memory."""
    layers = [module for module in model.modules() if isinstance(module, LoRALinear)]
    for layer in layers:
        layer.adapters_enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapters_enabled = True


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze everything but the LoRA matrices and the DoRA magnitudes."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRAAdapter):
            for param in module.parameters():
                param.requires_grad_(True)


def mark_routers_as_trainable(model: nn.Module) -> None:
    """Train every MoE router (`transformer.h.{i}.mlp.gate`) in full, beside whatever LoRA trains."""
    routers = [param for name, param in model.named_parameters() if name.endswith(ROUTER_SUFFIX)]
    if not routers:
        raise ValueError("--lora_router trains the routers of a mixture-of-experts model, and this model has none"
                         " (make one with scripts/merge_moe.py)")
    for param in routers:
        param.requires_grad_(True)
        # tagged, so lora_state_dict saves exactly the routers a run trains (a fresh model's all require grad)
        param.trained_router = True


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, e.g. `transformer.h.0.attn.qkv.lora.q.A` / `.B` / `.magnitude`, `lm_head.lora.all.A`,
    and the MoE routers being trained (`transformer.h.0.mlp.gate.weight`)."""
    adapters = {
        f"{path}.{name}": param.detach()
        for path, module in model.named_modules() if isinstance(module, LoRAAdapter)
        for name, param in module.named_parameters()
    }
    routers = {name: param.detach() for name, param in model.named_parameters()
               if name.endswith(ROUTER_SUFFIX) and getattr(param, "trained_router", False)}
    return {**adapters, **routers}


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy an adapter into a model injected with the same LoRAConfig; a clear ValueError names any difference.
    Trained routers in the adapter replace the model's."""
    routers = {key: tensor for key, tensor in state_dict.items() if key.endswith(ROUTER_SUFFIX)}
    if routers:
        load_routers(model, routers)
        state_dict = {key: tensor for key, tensor in state_dict.items() if key not in routers}
        if not state_dict:
            return
    expected = lora_state_dict(model)
    expected = {key: tensor for key, tensor in expected.items() if not key.endswith(ROUTER_SUFFIX)}
    if not expected:
        raise ValueError("The model has no LoRA layers; call inject_lora(model, lora_config) before loading an adapter")
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    trained_dora, model_dora = (any(k.endswith(".magnitude") for k in keys) for keys in (state_dict, expected))
    if trained_dora != model_dora:
        raise ValueError(f"The adapter was trained with dora={trained_dora} but the model has dora={model_dora}")
    if missing or unexpected:
        raise ValueError(
            f"The adapter's LoRA layers differ from the model's: {len(missing)} missing (e.g. {sorted(missing)[:3]}),"
            f" {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]}). Inject LoRA with the query/key/value/"
            "projection/mlp/head settings it was trained with."
        )
    for key, tensor in state_dict.items():
        if tensor.shape == expected[key].shape:
            continue
        if key.endswith(".A") and tensor.shape[0] != expected[key].shape[0]:
            raise ValueError(f"The adapter was trained with r={tensor.shape[0]} but the model has r={expected[key].shape[0]}")
        raise ValueError(
            f"{key} has shape {tuple(tensor.shape)} in the adapter but {tuple(expected[key].shape)} in the model;"
            " was it trained on another base model?"
        )
    with torch.no_grad():
        for key, tensor in state_dict.items():
            expected[key].copy_(tensor)


def load_routers(model: nn.Module, routers: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, tensor in routers.items():
        if key not in params or params[key].shape != tensor.shape:
            shape = tuple(params[key].shape) if key in params else "absent"
            raise ValueError(f"The adapter's router {key} {tuple(tensor.shape)} does not fit the model ({shape}); was it"
                             " trained on another MoE?")
    with torch.no_grad():
        for key, tensor in routers.items():
            params[key].copy_(tensor)


def attach_lora(model: nn.Module, hparams: dict, weights: dict[str, torch.Tensor]) -> None:
    """Wrap `model` with the LoRA layers a run's hparams describe and load the run's adapter weights into them."""
    inject_lora(model, LoRAConfig.from_hparams(hparams))
    load_lora_state_dict(model, weights)


def merge_lora(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding its merged weight, in place, so the model computes the
    same function without adapters.

    The merged weight takes `dtype`, by default the base weight's dtype, or for a quantized base the adapter's dtype
    (the base is dequantized, merged and kept dense). A merged head no longer shares the embedding's weight, so a
    tied GPT's config is replaced by an untied one.
    """
    paths = [path for path, module in model.named_modules() if isinstance(module, LoRALinear)]
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        lora_linear: LoRALinear = getattr(parent, name)
        base = lora_linear.linear
        target_dtype = dtype or (
            base.weight.dtype if base.weight.is_floating_point() else next(iter(lora_linear.lora.values())).A.dtype
        )
        merged = nn.Linear(lora_linear.in_features, lora_linear.out_features, bias=base.bias is not None, device="meta")
        merged.weight = nn.Parameter(lora_linear.merged_weight().to(device=base.weight.device, dtype=target_dtype))
        if base.bias is not None:
            merged.bias = nn.Parameter(base.bias.detach().to(target_dtype))
        setattr(parent, name, merged)
    if isinstance(model, GPT) and model.config.tie_embeddings and "lm_head" in paths:
        model.config = replace(model.config, tie_embeddings=False)
    return model


def count_parameters(model: nn.Module, trainable: Optional[bool] = True) -> int:
    """Trainable parameters (`trainable=True`), frozen ones (`False`) or all (`None`); shared weights count once."""
    total = 0
    for param in model.parameters():
        if trainable is None or param.requires_grad == trainable:
            total += weight_numel(param)
    return total
