"""The GPT model: one implementation for every family in `config.py`.

Llama 2/3.x, Mistral, Mixtral, Phi-1.5/2/3, Falcon, TinyLlama and SmolLM2 differ only in what their config says:
grouped/multi-query attention, a sliding window, full/partial/scaled RoPE, LayerNorm or RMSNorm, parallel or
sequential residuals, a GELU, SwiGLU or mixture-of-experts MLP, tied embeddings.

Weights are named `transformer.wte`, `transformer.h.{i}.{norm_1,attn.qkv,attn.proj,norm_2,mlp.*}`,
`transformer.ln_f` and `lm_head`; `attn.qkv` holds the query, key and value projections stacked as
[all query heads; all key heads; all value heads].
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

from model.config import Config

# --gradient_checkpointing: "selective" computes the outputs of the norms and activations again in the backward pass
# instead of keeping them (a third less at 8B width, for elementwise work: see `RecomputeCheap`); "block" recomputes
# each Block in the backward pass and keeps only its input; "offload" also moves that input to (pinned) CPU memory
# until the backward pass needs it
CHECKPOINTING_MODES = ("none", "selective", "block", "offload")


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=build_norm(config),
            )
        )
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # The RoPE frequencies are a plain float32 cache per device, not buffers: Fabric's bf16-true (and FSDP's buffer
        # dtype) cast every buffer, and bf16 frequencies turn positions into angles off by up to 0.4% (3.7 rad at
        # position 4096), so a run would train on other angles than it is evaluated on.
        self.rope_cache: dict[tuple[torch.device, bool], torch.Tensor] = {}
        self.gradient_checkpointing = "none"
        self.checkpoint_layers: Optional[int] = None
        self.checkpoint_rest = "none"
        self.compiled_blocks: Optional[list[Callable[..., torch.Tensor]]] = None
        self.compiled_selective_blocks: Optional[list[Callable[..., torch.Tensor]]] = None

    @classmethod
    def from_checkpoint(
        cls, checkpoint_dir: Path | str, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
        config: Optional[Config] = None,
    ) -> "GPT":
        """Build the model from `model_config.yaml` and load `lit_model.safetensors`, in eval mode.

        The weights are memory-mapped and assigned, so loading never holds two copies of the model. `dtype=None`
        keeps the dtype the weights were saved in.
        """
        from model.weights.checkpoint import load_state_dict

        checkpoint_dir = Path(checkpoint_dir)
        config = config or Config.from_checkpoint(checkpoint_dir)
        with torch.device("meta"):
            model = cls(config)
        state_dict = load_state_dict(checkpoint_dir, device=device, dtype=dtype)
        model.load_state_dict(state_dict, strict=True, assign=True)
        model.reset_rope(device)
        return model.eval()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        tied = self.config.tie_embeddings
        if tied and "lm_head.weight" not in state_dict and "transformer.wte.weight" in state_dict:
            state_dict = dict(state_dict, **{"lm_head.weight": state_dict["transformer.wte.weight"]})
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if tied and assign:  # assigning gives the head its own Parameter: share the embedding's again
            self.lm_head.weight = self.transformer.wte.weight
        return result

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Drop the cached RoPE frequencies (any forward pass recomputes them in float32 on its device) and, given a
        `device`, compute them there now."""
        self.rope_cache.clear()
        if device is not None:
            self.inv_freq(torch.device(device))

    def inv_freq(self, device: torch.device, long: bool = False) -> torch.Tensor:
        """The float32 RoPE inverse frequencies on `device` (`long`: LongRoPE's long-context factors)."""
        key = (torch.device(device), long)
        if key not in self.rope_cache:
            self.rope_cache[key] = rope_inv_freq(self.config, long=long, device=device)
        return self.rope_cache[key]

    def set_gradient_checkpointing(self, mode: str, layers: Optional[int] = None, rest: str = "none") -> "GPT":
        """`none`, `selective` (the norms' and activations' outputs computed again in the backward pass instead of
        kept), `block` (recompute each Block in the backward pass, keeping only its input) or `offload` (`block`, and
        that input waits in CPU memory, pinned on CUDA). Applies to forward passes with gradients only.

        `layers`: only the first `layers` Blocks are checkpointed as `mode` says, the others as `rest` says (`none`
        or `selective`); the memory kept and the time spent recomputing then fall in between, in proportion. The
        first ones, because the backward pass reaches them last, when the other Blocks' activations are freed: one
        being recomputed then adds nothing to the peak. None: every Block."""
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"Unknown gradient checkpointing {mode!r}; choose one of {', '.join(CHECKPOINTING_MODES)}")
        if layers is not None and not 1 <= layers <= self.config.n_layer:
            raise ValueError(f"checkpoint_layers must be between 1 and the model's {self.config.n_layer} layers, "
                             f"got {layers}")
        if layers is not None and mode == "none":
            raise ValueError("checkpoint_layers needs a gradient checkpointing mode other than none")
        if rest not in ("none", "selective"):
            raise ValueError(f"checkpoint_rest must be none or selective, got {rest!r}")
        if rest != "none" and (layers is None or mode not in ("block", "offload")):
            raise ValueError("checkpoint_rest selective needs checkpoint_layers with gradient checkpointing block or "
                             "offload")
        self.gradient_checkpointing = mode
        self.checkpoint_layers = layers
        self.checkpoint_rest = rest
        return self

    def compile_blocks(self) -> "GPT":
        """`torch.compile` each Block for the forward passes that record gradients (training); evaluation and
        generation (no gradients, or a KV cache) keep the eager Blocks, so they never trigger a compilation.

        Shapes are dynamic, so micro-batches of other lengths reuse one graph instead of compiling again (a batch
        dimension of 1 is specialized: at most one more graph). The compiled Blocks wrap the same modules, so the
        weights, their names and FSDP's hooks stay as they are: call it after `fabric.setup_module`. A checkpointed
        Block (`set_gradient_checkpointing`) recomputes through the compiled Block; under `selective` the compiled
        Block tells inductor which ops it may compute again (`selective_block`). Packed rows (`segment_ids`) run
        the eager Blocks."""
        self.compiled_blocks = [torch.compile(block, dynamic=True) for block in self.transformer.h]
        self.compiled_selective_blocks = [torch.compile(partial(selective_block, block), dynamic=True)
                                          for block in self.transformer.h]
        return self

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        return_hidden: bool = False,
        logits_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        head_fn: Optional[Callable[[torch.Tensor, nn.Module], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Logits `(B, T, vocab_size)` for token ids `idx` `(B, T)`.

        `input_pos` `(T,)` gives the positions of `idx` in the sequence; with a KV cache (`set_kv_cache`) it says
        where to write the new keys and values. Without it, `idx` is a whole sequence starting at position 0.
        With a KV cache, `input_pos` may also be `(B, T)`: each row at its own positions (continuous batching, where
        each row is a request of its own length; see `model.generate.ContinuousBatch`).
        `return_hidden=True` returns the final normalized hidden states `(B, T, n_embd)` (`(N, n_embd)` with
        `logits_mask`) instead of logits: `model.training.loss.head_cross_entropy` turns them into a loss without
        the full-vocabulary logits.
        `logits_mask` `(B, T)` (bool) returns the logits of the masked positions only, `(N, vocab_size)`: the output
        head is a large matmul, and a loss on the responses or a generation's next token needs few positions. It may
        also be those positions' indices into the flattened `(B * T)` positions, `(N,)` (int64): a boolean selection
        on a GPU makes the host wait for its count, indices found on the CPU
        (`model.training.loss.labelled_positions`) do not.
        `segment_ids` `(B, T)` marks packed samples (model/data.py `pack_samples`): each run of equal ids is one
        sample, whose positions restart at 0 and which attends only to itself, so its logits are the ones it gets
        alone. Each sample's attention is computed on its own span: no `(T, T)` mask is ever built.
        `head_fn(hidden, lm_head)` replaces `lm_head(hidden)`, inside the forward pass (under autocast and FSDP's
        unsharded head): `partial(model.training.loss.head_cross_entropy, targets=...)` returns the per-position
        loss without ever holding the full-vocabulary logits.
        """
        T = idx.size(1)
        # the last position, read from the device only when given: a training step makes no host-device sync here
        last = T - 1 if input_pos is None else int(input_pos.max())
        if input_pos is None:
            input_pos = torch.arange(T, device=idx.device)
        if T > self.config.block_size or last >= self.config.block_size:
            raise ValueError(f"Sequence position {last} is beyond the model's block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        rope_pos = input_pos
        cache = self.transformer.h[0].attn.kv_cache
        if cache is not None and cache.pad_lengths is not None:
            # left-padded batch: each sample's positions start after its padding
            rope_pos = (input_pos.unsqueeze(0) - cache.pad_lengths.unsqueeze(1)).clamp(min=0)
        spans = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed samples) are for training; generation with a KV cache takes one sample per row")
            rope_pos = packed_positions(segment_ids)
            spans = segment_spans(segment_ids)
        cos, sin = (t.to(x.dtype) for t in self.rope(rope_pos))
        x = self.transformer.ln_f(self.run_blocks(x, cos, sin, input_pos, spans))
        if logits_mask is not None:
            x = x[logits_mask] if logits_mask.dtype == torch.bool else x.flatten(0, 1).index_select(0, logits_mask)
        if return_hidden:
            return x
        return self.lm_head(x) if head_fn is None else head_fn(x, self.lm_head)

    def run_blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                   spans: Optional[list[list[tuple[int, int]]]] = None) -> torch.Tensor:
        """The hidden states `(B, T, n_embd)` through every Block, checkpointed as `gradient_checkpointing` and
        `checkpoint_layers`/`checkpoint_rest` say when gradients are being recorded (never with a KV cache)."""
        cache = self.transformer.h[0].attn.kv_cache
        training = torch.is_grad_enabled() and cache is None
        # packed rows run eager: their per-sample attention calls are shaped by the sample boundaries, which a
        # compiled Block would guard on and compile again for every layout of samples
        compiled = training and self.compiled_blocks is not None and spans is None
        checkpointed = self.config.n_layer if self.checkpoint_layers is None else self.checkpoint_layers
        for i, block in enumerate(self.transformer.h):
            checkpointing = "none" if not training else (
                self.gradient_checkpointing if i < checkpointed else self.checkpoint_rest)
            if compiled:
                block = (self.compiled_selective_blocks if checkpointing == "selective" else self.compiled_blocks)[i]
            if checkpointing == "block":
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, input_pos, None, spans, use_reentrant=False)
            elif checkpointing == "offload":
                x = OffloadedCheckpoint.apply(block, x, torch.empty(0, requires_grad=True), cos, sin, input_pos, spans)
            elif checkpointing == "selective" and not compiled:
                with RecomputeCheap():
                    x = block(x, cos, sin, input_pos, None, spans)
            else:
                x = block(x, cos, sin, input_pos, None, spans)
        return x

    def rope(self, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 `cos` and `sin` of the rotation angles at positions `input_pos`."""
        long = False
        scaling = self.config.rope_scaling
        attention_factor = 1.0
        if scaling and scaling["type"] == "longrope":
            # Phi-3 128k switches to the long factors once the sequence outgrows the pretraining context
            long = int(input_pos.max()) + 1 > scaling["original_max_seq_len"]
            attention_factor = longrope_attention_factor(scaling)
        freqs = input_pos.to(torch.float32).unsqueeze(-1) * self.inv_freq(input_pos.device, long)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * attention_factor, emb.sin() * attention_factor

    def set_kv_cache(
        self, batch_size: int, max_seq_length: Optional[int] = None, device: torch.device | str | None = None,
        dtype: Optional[torch.dtype] = None, pad_lengths: Optional[torch.Tensor] = None,
    ) -> None:
        """Allocate a KV cache. `pad_lengths` `(batch_size,)`: how many left-padding tokens each sample of a batch
        starts with; they are masked out and each sample's positions start after them."""
        max_seq_length = min(max_seq_length or self.config.block_size, self.config.block_size)
        ref = self.transformer.wte.weight
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(
                batch_size, self.config.n_query_groups, max_seq_length, self.config.head_size,
                device=device or ref.device, dtype=dtype or ref.dtype, pad_lengths=pad_lengths,
            )

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def kv_caches(self) -> list["KVCache"]:
        """Every block's KV cache (set by `set_kv_cache`), for callers that move rows or grow them."""
        return [block.attn.kv_cache for block in self.transformer.h]


class Block(nn.Module):
    def __init__(self, config: Config, block_idx: int) -> None:
        super().__init__()
        self.config = config
        self.norm_1 = build_norm(config)
        self.attn = CausalSelfAttention(config, block_idx)
        self.norm_2 = None if config.shared_attention_norm else build_norm(config)
        self.mlp = build_mlp(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                mask: Optional[torch.Tensor] = None, spans: Optional[list[list[tuple[int, int]]]] = None) -> torch.Tensor:
        x_normed = self.norm_1(x)
        attention_output = self.attn(x_normed, cos, sin, input_pos, mask, spans)
        if self.config.parallel_residual:
            mlp_input = x_normed if self.norm_2 is None else self.norm_2(x)
            return self.mlp(mlp_input) + attention_output + x
        x = x + attention_output
        return x + self.mlp(self.norm_2(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config, block_idx: int) -> None:
        super().__init__()
        self.config = config
        self.block_idx = block_idx
        qkv_size = (config.n_head + 2 * config.n_query_groups) * config.head_size
        self.qkv = nn.Linear(config.n_embd, qkv_size, bias=config.bias)
        self.proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=config.bias)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                mask: Optional[torch.Tensor] = None, spans: Optional[list[list[tuple[int, int]]]] = None) -> torch.Tensor:
        """`mask` `(B, 1, T, T)`, True where a query may attend, overrides the causal mask. `spans`: each row's packed
        samples as `(start, end)` (see `segment_spans`); each attends only within itself."""
        B, T, _ = x.shape
        c = self.config
        q_size, kv_size = c.n_head * c.head_size, c.n_query_groups * c.head_size
        q, k, v = self.qkv(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(B, T, c.n_head, c.head_size).transpose(1, 2)  # (B, n_head, T, head_size)
        k = k.view(B, T, c.n_query_groups, c.head_size).transpose(1, 2)
        # v in its own storage: the attention saves v for its backward pass, and a view would keep the whole qkv
        # output alive with it (10 of its 12 KB per token at 8B width are q and k, which RoPE has copied already)
        v = v.contiguous().view(B, T, c.n_query_groups, c.head_size).transpose(1, 2)
        q = apply_rope(q, cos, sin, c.rope_n_elem)
        k = apply_rope(k, cos, sin, c.rope_n_elem)

        if self.kv_cache is not None:
            k, v = self.kv_cache(input_pos, k, v)
            pad_lengths = self.kv_cache.pad_lengths
            # one new token sees the whole filled cache: it needs a mask only when the window or padding cuts it, or
            # when the rows are at different positions (each then sees only its own filled part)
            per_row = input_pos.dim() == 2
            window_cuts = c.sliding_window is not None and k.size(2) > c.sliding_window
            if T > 1 or per_row or pad_lengths is not None or window_cuts:
                key_pos = torch.arange(k.size(2), device=x.device)
                mask = attention_mask(input_pos, key_pos, c.sliding_window)
                if per_row:
                    mask = mask.unsqueeze(1)  # (B, 1, T, keys): the same for every head
                if pad_lengths is not None:
                    # no attending to padding; a padding position attends to itself so no row is empty (NaN)
                    keep = key_pos.view(1, 1, 1, -1) >= pad_lengths.view(-1, 1, 1, 1)
                    mask = (mask & keep) | (input_pos.view(-1, 1) == key_pos.view(1, -1))
        elif spans is not None:
            y = self.attend_spans(q, k, v, spans)
            return self.proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_size))
        elif mask is None and c.sliding_window is not None and T > c.sliding_window:
            mask = attention_mask(input_pos, input_pos, c.sliding_window)
        y = self.attend(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, c.n_head * c.head_size)
        return self.proj(y)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The heads' outputs `(B, n_head, T, head_size)`; `mask=None` is causal. A method so that LLaMA-Adapter
        (model/adapter.py) can add its prompt's term to it."""
        c = self.config
        # a branch, not an expression: under torch.compile's dynamic shapes the length is symbolic, and SDPA takes a
        # plain bool (a branch on it becomes a guard of the compiled graph)
        is_causal = False
        if mask is None and q.size(2) > 1:
            is_causal = True
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=1.0 / math.sqrt(c.head_size),
            enable_gqa=c.n_query_groups != c.n_head,
        )


    def attend_spans(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     spans: list[list[tuple[int, int]]]) -> torch.Tensor:
        """Padding-free attention over packed samples: each sample's queries attend causally to its own keys only,
        one attention call per sample, so the kernel sees no mask (flash attention stays eligible) and the work
        grows with the sum of the squared sample lengths, not with the squared row length."""
        window = self.config.sliding_window
        rows = []
        for row, row_spans in enumerate(spans):
            pieces = []
            for start, end in row_spans:
                mask = None
                if window is not None and end - start > window:
                    positions = torch.arange(end - start, device=q.device)
                    mask = attention_mask(positions, positions, window)
                pieces.append(self.attend(q[row:row + 1, :, start:end], k[row:row + 1, :, start:end],
                                          v[row:row + 1, :, start:end], mask))
            rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
        return torch.cat(rows)


def attention_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: Optional[int]) -> torch.Tensor:
    """Boolean `(T_query, T_key)` mask, True where a query may attend: causal, and within the sliding window."""
    distance = query_pos.unsqueeze(-1) - key_pos.unsqueeze(0)
    mask = distance >= 0
    if sliding_window is not None:
        mask &= distance < sliding_window
    return mask


def sample_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """True `(B, T)` where a packed sample begins: a row's first token and every change of segment id."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def packed_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """For rows of packed samples `(B, T)`: each token's position within its own sample `(B, T)`."""
    index = torch.arange(segment_ids.size(1), device=segment_ids.device).expand_as(segment_ids)
    # the index of the latest sample start at or before each token
    sample_start = torch.where(sample_starts(segment_ids), index, torch.zeros_like(index)).cummax(dim=1).values
    return index - sample_start


def segment_spans(segment_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Each row's samples as `(start, end)` index pairs, padding (id -1) included as a sample of its own. One copy
    to the host per forward pass: the attention calls are shaped by it."""
    starts = sample_starts(segment_ids).cpu()
    T = segment_ids.size(1)
    spans = []
    for row in starts:
        bounds = [*row.nonzero().flatten().tolist(), T]
        spans.append(list(zip(bounds[:-1], bounds[1:])))
    return spans


class OffloadedCheckpoint(torch.autograd.Function):
    """A Block recomputed in the backward pass whose input waits in CPU memory meanwhile (Unsloth's offloaded
    gradient checkpointing): device memory for activations stops growing with the number of layers.

    `torch.utils.checkpoint` keeps its inputs on the device, so this is a reentrant checkpoint of its own: it saves
    the RNG and autocast state, reruns the block under them and backpropagates through it. `trigger` is an empty
    tensor that requires grad, so the backward pass runs even when the block's input needs no gradient (frozen
    embeddings under LoRA) and the block's own parameters still get theirs.
    """

    @staticmethod
    def forward(ctx, block, x, trigger, cos, sin, input_pos, spans):
        ctx.block, ctx.spans, ctx.device = block, spans, x.device
        ctx.x_requires_grad = x.requires_grad
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
        with torch.no_grad():
            out = block(x, cos, sin, input_pos, None, spans)
        if x.device.type == "cuda":
            saved = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
            saved.copy_(x, non_blocking=True)
        else:
            saved = x.detach().clone()
        ctx.offloaded = saved
        ctx.save_for_backward(cos, sin, input_pos)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin, input_pos = ctx.saved_tensors
        x = ctx.offloaded.to(ctx.device, non_blocking=True).requires_grad_(ctx.x_requires_grad)
        del ctx.offloaded
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.block(x, cos, sin, input_pos, None, ctx.spans)
        torch.autograd.backward(out, grad_out)
        return None, x.grad if ctx.x_requires_grad else None, None, None, None, None, None


class RecomputeCheap:
    """`--gradient_checkpointing selective` for eager Blocks: while a Block runs forward, the outputs of its norms and
    of its MLP's activation, which the next linear layer keeps for the backward pass (a LoRA layer for its A gradient,
    a trained weight for its own), are not kept but computed again when the backward pass needs them, from inputs
    that the norm's and the activation's own backward passes keep anyway. At Llama-3.1-8B width with LoRA on every
    linear that is 44 KB per token and layer (the SwiGLU output 28, the two norm outputs 8 each) of about 137, for one
    `silu * up` and two norms more per layer in the backward pass. With LoRA dropout the adapters keep their dropped
    copies of those outputs instead, and the dropout its mask: neither is kept either (`model.lora.Dropout` keeps the
    random number generator's state and draws the mask again from it). The gradients are the same bit for bit: the
    same ops run on the same inputs. An output that needs no gradient (the first norm's, under LoRA with frozen
    embeddings) is kept as before: nothing else keeps its input.

    A module marks such an output with `RecomputeCheap.register(output, fn, *inputs)`; the saved-tensor hooks then
    keep `fn` and `inputs` in place of any tensor that autograd saves from the output's storage (views included). An
    input that is itself such an output is not kept either: it is computed again first. Outside a
    `with RecomputeCheap()` `register` does nothing."""

    active: Optional["RecomputeCheap"] = None

    def __init__(self) -> None:
        # storage address -> (output, its version, how to compute it): holding the output keeps the address from
        # being reused inside the Block, and the registry is emptied when the Block returns
        self.recipes: dict[int, tuple[torch.Tensor, int, Recomputed]] = {}
        # saved-tensor hooks do not nest (the innermost ones see every tensor): hooks already in place (a
        # measurement's, `torch.autograd.graph.save_on_cpu`) still get every tensor this does not replace (torch
        # before 2.8 cannot say which hooks are in place: there they see none of a Block's tensors)
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        try:
            self.outer = top(False) if top is not None else None  # False: ignore_is_tracing
        except TypeError:  # the versions without that argument
            self.outer = top()
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def __enter__(self) -> "RecomputeCheap":
        self.hooks.__enter__()
        RecomputeCheap.active = self
        return self

    def __exit__(self, *exc) -> None:
        RecomputeCheap.active = None
        self.recipes.clear()
        self.hooks.__exit__(*exc)

    @staticmethod
    def register(output: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        active = RecomputeCheap.active
        if active is not None and output.requires_grad:
            recipe = Recomputed(fn, tuple(active.view_of(t) or t for t in inputs), output.storage_offset())
            active.recipes[output.untyped_storage().data_ptr()] = (output, output._version, recipe)
        return output

    def view_of(self, tensor: torch.Tensor) -> Optional["RecomputedView"]:
        """What stands in for `tensor` if it is (a view of) a registered output not changed in place since."""
        recipe = self.recipes.get(tensor.untyped_storage().data_ptr())
        if recipe is None or recipe[0]._version != recipe[1]:
            return None
        return RecomputedView(recipe[2], tensor.shape, tensor.stride(), tensor.storage_offset())

    def pack(self, tensor: torch.Tensor):
        view = self.view_of(tensor)
        if view is None:  # unknown, or changed in place since
            return tensor if self.outer is None else self.outer[0](tensor)
        view.recipe.saved()
        return view

    def unpack(self, packed) -> torch.Tensor:
        if isinstance(packed, RecomputedView):
            return packed.recipe.view(packed.shape, packed.stride, packed.offset)
        return packed if self.outer is None else self.outer[1](packed)


# what a compiled Block under `selective` may compute again in the backward pass: the elementwise ops and reductions
# of the norms (RMSNorm: cast, square, mean, rsqrt, scale) and of the MLP's activation (silu or gelu, and the
# product). The outputs of every other op (matmuls, attention, RoPE's and the residual's sums, 4-bit dequantization)
# are kept when the backward pass needs them: a sum made recomputable would have the partitioner keep its inputs
# (RoPE's: the whole qkv output) instead of its output.
CHEAP_OPS = {getattr(torch.ops.aten, op).default for op in ("silu", "gelu", "rsqrt", "_to_copy", "native_layer_norm")} | {
    torch.ops.aten.mul.Tensor, torch.ops.aten.mean.dim, torch.ops.aten.pow.Tensor_Scalar}


def selective_policy(ctx, op, *args, **kwargs) -> torch.utils.checkpoint.CheckpointPolicy:
    policy = torch.utils.checkpoint.CheckpointPolicy
    return policy.PREFER_RECOMPUTE if op in CHEAP_OPS else policy.MUST_SAVE


def selective_block(block: Block, *args) -> torch.Tensor:
    """`block(*args)` for torch.compile under `selective`: a checkpoint whose policy lets the partitioner compute the
    outputs of cheap ops again in the backward pass instead of keeping them (what `RecomputeCheap` does for eager
    Blocks), keeping the same bytes (`benchmarks/memory.py --compiled true`)."""
    return torch.utils.checkpoint.checkpoint(
        block, *args, use_reentrant=False,
        context_fn=partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, selective_policy))


class Recomputed:
    """An output that `RecomputeCheap` computes again in the backward pass, shared by every saved view of it (a norm's
    output is saved by each LoRA layer it feeds): computed for the first of them, kept until the last is unpacked.
    An input may be a `RecomputedView` of another such output (LoRA dropout's input is a norm's output): it counts as
    one more pending view of that output once this one is saved, and is computed again first."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: tuple, offset: int) -> None:
        self.fn, self.inputs, self.offset = fn, inputs, offset
        self.versions = tuple(t._version if isinstance(t, torch.Tensor) else None for t in inputs)
        # the backward pass may run under another autocast state than the forward pass did
        first = inputs[0]
        self.device = first.device.type if isinstance(first, torch.Tensor) else first.recipe.device
        self.autocast = (torch.is_autocast_enabled(self.device), torch.get_autocast_dtype(self.device))
        self.pending = 0  # saved views not unpacked yet
        self.output: Optional[torch.Tensor] = None
        self.attached = False  # saved at least once (then its recomputed inputs wait for it)

    def saved(self) -> None:
        """One more saved view of this output; the first one makes it a pending view of each recomputed input."""
        if not self.attached:
            self.attached = True
            for t in self.inputs:
                if isinstance(t, RecomputedView):
                    t.recipe.saved()
        self.pending += 1

    def view(self, shape: torch.Size, stride: tuple[int, ...], offset: int) -> torch.Tensor:
        output = self.output
        if output is None:
            if any(isinstance(t, torch.Tensor) and t._version != v for t, v in zip(self.inputs, self.versions)):
                raise RuntimeError("An input of a recomputed activation was modified in place after the forward pass")
            inputs = [t.recipe.view(t.shape, t.stride, t.offset) if isinstance(t, RecomputedView) else t
                      for t in self.inputs]
            enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(self.device, dtype=dtype, enabled=enabled):
                output = self.output = self.fn(*inputs)
        self.pending -= 1
        if self.pending <= 0:
            self.output = None
        return output.as_strided(shape, stride, output.storage_offset() + offset - self.offset)


class RecomputedView(NamedTuple):
    """What `RecomputeCheap` keeps in place of a saved tensor: a view of a `Recomputed` output."""

    recipe: Recomputed
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int


class KVCache(nn.Module):
    """Keys and values of past positions, `(B, n_query_groups, max_seq_length, head_size)`.

    A forward pass over `n` rows uses the cache rows `first_row .. first_row + n - 1` (`first_row` is 0 unless a
    caller prefills one request into its own row of a running batch)."""

    def __init__(self, batch_size, n_query_groups, max_seq_length, head_size, device, dtype, pad_lengths=None) -> None:
        super().__init__()
        shape = (batch_size, n_query_groups, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.pad_lengths = None if pad_lengths is None else pad_lengths.to(device)
        self.first_row = 0

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = int(input_pos.max()) + 1
        if end > self.k.size(2):
            raise ValueError(f"Position {end - 1} does not fit the KV cache of length {self.k.size(2)}")
        rows = slice(self.first_row, self.first_row + k.size(0))
        if input_pos.dim() == 2:  # (B, T): each row writes at its own positions
            index = input_pos[:, None, :, None].expand(-1, k.size(1), -1, k.size(3))
            self.k[rows].scatter_(2, index, k.to(self.k.dtype))
            self.v[rows].scatter_(2, index, v.to(self.v.dtype))
        else:
            self.k[rows].index_copy_(2, input_pos, k.to(self.k.dtype))
            self.v[rows].index_copy_(2, input_pos, v.to(self.v.dtype))
        # attend only over the filled part of the cache (a row behind the others masks the rest out)
        return self.k[rows, :, :end], self.v[rows, :, :end]

    def grow(self, batch_size: int, max_seq_length: int) -> None:
        """Make room for at least `batch_size` rows of `max_seq_length` positions, keeping what is cached."""
        old_rows, _, old_length, _ = self.k.shape
        if batch_size <= old_rows and max_seq_length <= old_length:
            return
        shape = (max(batch_size, old_rows), self.k.size(1), max(max_seq_length, old_length), self.k.size(3))
        for name in ("k", "v"):
            grown = self.k.new_zeros(shape)
            grown[:old_rows, :, :old_length] = getattr(self, name)
            setattr(self, name, grown)

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of row `source` into row `target` (a finished request's row reused)."""
        self.k[target, :, :length] = self.k[source, :, :length]
        self.v[target, :, :length] = self.v[source, :, :length]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RecomputeCheap.register(RMSNormFunction.apply(x, self.weight, self.eps), self.recompute, x)

    def recompute(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)[0]

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RMSNormFunction(torch.autograd.Function):
    """`weight * rms_norm(x.float()).to(x.dtype)`: normalized in float32, scaled in the input dtype, as the reference
    Llama implementation does, keeping for the backward pass only `x` and one float32 scale per position. Autograd
    through the same expression keeps a float32 copy of `x` (twice its bytes in bf16: 16 KB per token at 8B width,
    for each of a Block's two norms); the gradients are the same expression's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # the gradient reaches the float32 normalization through the cast to x's dtype, as it would in autograd
            g = (grad * weight).to(x.dtype).float()
            grad_x = ((g - normed * (g * normed).mean(-1, keepdim=True)) * rstd).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, x.size(-1)).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized and scaled `x`, and its float32 reciprocal RMS per position."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def build_norm(config: Config) -> nn.Module:
    if config.norm_class_name == "RMSNorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return LayerNorm(config.n_embd, eps=config.norm_eps)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` whose output a Block computes again in the backward pass (`RecomputeCheap`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RecomputeCheap.register(super().forward(x), super().forward, x)


class GptNeoxMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x)
        return self.proj(RecomputeCheap.register(self.activation(hidden), self.activation, hidden))

    def activation(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(hidden, approximate=self.approximate)


class LLaMAMLP(nn.Module):
    """SwiGLU: proj(silu(fc_1(x)) * fc_2(x)); fc_1 is HF's gate_proj, fc_2 its up_proj."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.fc_2 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc_1(x), self.fc_2(x)
        return self.proj(RecomputeCheap.register(SwiGLUFunction.apply(gate, up), swiglu, gate, up))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SwiGLUFunction(torch.autograd.Function):
    """`silu(gate) * up`, keeping only `gate` and `up` for the backward pass, which computes `silu(gate)` again.
    Autograd through the same expression also keeps `silu(gate)`: one more intermediate-size activation per token
    (28 KB at 8B width, a quarter of the MLP's). The gradients are the ones autograd computes, op for op."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


class LLaMAMoE(nn.Module):
    """Sparse mixture of SwiGLU experts (Mixtral): each token goes to its top-k experts, weighted by the
    router's softmax renormalized over those k."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(LLaMAMLP(config) for _ in range(config.n_expert))
        self.n_expert_per_token = config.n_expert_per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(-1, C)
        router = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        probs, indices = torch.topk(router, self.n_expert_per_token, dim=-1)
        probs = (probs / probs.sum(dim=-1, keepdim=True)).to(x.dtype)
        y = torch.zeros_like(x)
        for expert_idx, expert in enumerate(self.experts):
            token_idx, slot = torch.where(indices == expert_idx)
            if token_idx.numel():
                y.index_add_(0, token_idx, expert(x[token_idx]) * probs[token_idx, slot, None])
        return y.view(B, T, C)


def build_mlp(config: Config) -> nn.Module:
    return {"GptNeoxMLP": GptNeoxMLP, "LLaMAMLP": LLaMAMLP, "LLaMAMoE": LLaMAMoE}[config.mlp_class_name](config)


def rope_inv_freq(config: Config, long: bool = False, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE inverse frequencies for the rotated dimensions, with Llama 3.1 or LongRoPE scaling if configured."""
    n_elem = config.rope_n_elem
    exponent = torch.arange(0, n_elem, 2, device=device, dtype=torch.float32) / n_elem
    scaling = config.rope_scaling
    if scaling and scaling["type"] == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], device=device, dtype=torch.float32)
        return 1.0 / (factors * config.rope_base**exponent)
    inv_freq = 1.0 / (config.rope_base**exponent)
    if scaling and scaling["type"] == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_seq_len"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= context / high) & (wavelen <= context / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def longrope_attention_factor(scaling: dict) -> float:
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    factor = scaling.get("factor", 1.0)
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(scaling["original_max_seq_len"]))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_elem: int) -> torch.Tensor:
    """Rotate the first `n_elem` dims of each head (the "rotate half" convention of HF checkpoints)."""
    if n_elem == 0:
        return x
    if n_elem < x.size(-1):  # partial rotary (Phi): the remaining dims pass through unrotated
        return torch.cat((apply_rope(x[..., :n_elem], cos, sin, n_elem), x[..., n_elem:]), dim=-1)
    if cos.dim() == 3:  # per-sample positions (B, T, n_elem): broadcast over the heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
