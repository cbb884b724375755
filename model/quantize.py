"""bitsandbytes quantization of a loaded model's Linear layers, on the GPU and on the CPU.

Lightning's `BitsandbytesPrecision` plugin refuses the CPU, but bitsandbytes itself quantizes, runs and
backpropagates 4-bit and 8-bit layers there, so the swap is done here, one layer at a time.

Modes (QLoRA, https://arxiv.org/abs/2305.14314; LLM.int8(), https://arxiv.org/abs/2208.07339):
  bnb.nf4 / bnb.fp4        4-bit NormalFloat / FloatingPoint weights, one absmax per 64 weights
  bnb.nf4-dq / bnb.fp4-dq  the same with double quantization: the absmax values are quantized too
  bnb.int8                 int8 weights with fp16 outlier columns (threshold 6.0), frozen
  bnb.int8-training        weights kept in their dtype and trainable; the matmul runs in int8
  ao.nf4                   torchao's NF4Tensor: 4-bit NormalFloat, one absmax per 64 weights, the absmax values
                           quantized to int8 (double quantization); the layer stays an nn.Linear and computes in the
                           input's dtype. The one 4-bit format that shards under FSDP2 (`--strategy fsdp`): the tensor
                           splits along its rows into 4-bit shards and is all-gathered 4-bit.
"""

import logging
from typing import Callable

import torch


class _NoKernelHubNotice(logging.Filter):
    """bitsandbytes announces at import that it could not fetch its AVX512-BF16 inference kernel from the Hugging
    Face hub (the `kernels` package). Forge never takes that path (see `_quantized_linear`): the notice would only
    alarm users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelHubNotice())


class _NoOptionalKernelNotice(logging.Filter):
    """torchao warns at import for each of its optional compiled kernels (mxfp8, CUTLASS) that cannot load, e.g. on a
    CPU-only machine; NF4 uses none of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load")


logging.getLogger("torchao").addFilter(_NoOptionalKernelNotice())

import bitsandbytes as bnb  # noqa: E402  (after the filter it must not print through)

QUANTIZE_MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8", "bnb.int8-training", "ao.nf4")
NF4_BLOCK_SIZE = 64  # weights per absmax, as in QLoRA and bitsandbytes' nf4


def validate_quantize(mode: str | None) -> None:
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ValueError(f"Unknown quantize mode {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")


def quantize_model(
    model: torch.nn.Module,
    mode: str,
    compute_dtype: torch.dtype,
    skip: Callable[[str], bool] | tuple[str, ...] = ("lm_head",),
) -> torch.nn.Module:
    """Replace every plain `torch.nn.Linear` of `model` in place by its bitsandbytes counterpart.

    The weights must already be loaded; each one is quantized on the device it lives on. Layers are swapped
    one at a time and the dense weight is dropped as soon as its layer is replaced, so the peak memory is the
    model plus one layer, not two models. The bias is kept as it is.

    `skip` is a predicate on the module path ("transformer.h.0.attn.proj"), or a tuple of names that skips
    a module whose path is the name or ends with "." + name. Subclasses of Linear (LoRA layers, layers already
    quantized) are left alone. `compute_dtype` is the dtype the 4-bit matmul runs in; int8 modes ignore it.
    """
    validate_quantize(mode)
    if not callable(skip):
        names = skip
        skip = lambda path: any(path == name or path.endswith("." + name) for name in names)  # noqa: E731

    linear_paths = [path for path, module in model.named_modules() if type(module) is torch.nn.Linear]
    for path in linear_paths:
        if skip(path):
            continue
        parent_path, _, child_name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        linear = getattr(parent, child_name)
        if linear.weight.device.type == "meta":
            raise ValueError(f"{path!r} is on the meta device; load the weights before quantizing them")
        setattr(parent, child_name, _quantized_linear(linear, mode, compute_dtype))
        del linear
    return model


def nf4_scaler_block_size(n_blocks: int) -> int:
    """torchao's second-level block: how many absmax values share one int8 scale. 256 as QLoRA where the count
    allows, and otherwise the largest power of two that leaves the count of these blocks a multiple of 8 (or of 2),
    so that a weight splits into equal 4-bit shards on 2, 4 or 8 FSDP processes. The choice depends on the shape
    alone, never on the number of processes: every run quantizes a weight the same way."""
    for multiple in (8, 2, 1):
        for size in (256, 128, 64, 32, 16, 8, 4, 2, 1):
            if n_blocks % (size * multiple) == 0:
                return size
    raise AssertionError("unreachable: size 1 with multiple 1 divides any count")


def to_nf4(weight: torch.Tensor):
    """`weight` as torchao's NF4Tensor (blocks of NF4_BLOCK_SIZE, see `nf4_scaler_block_size`)."""
    try:
        from torchao.quantization import to_nf4 as torchao_to_nf4
    except ImportError as error:
        raise ValueError(f"--quantize ao.nf4 needs torchao ({error}): pip install 'forge-llm[qlora-fsdp]'") from None

    if weight.numel() % NF4_BLOCK_SIZE:
        raise ValueError(f"--quantize ao.nf4 quantizes blocks of {NF4_BLOCK_SIZE} weights, and a weight of shape"
                         f" {tuple(weight.shape)} does not split into them")
    n_blocks = weight.numel() // NF4_BLOCK_SIZE
    return torchao_to_nf4(weight.contiguous(), NF4_BLOCK_SIZE, nf4_scaler_block_size(n_blocks))


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether `tensor` (or a DTensor's local shard) is a torchao NF4Tensor, without importing torchao needlessly."""
    local = getattr(tensor, "_local_tensor", tensor)
    return type(local).__name__ == "NF4Tensor"


def _quantized_linear(linear: torch.nn.Linear, mode: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    has_bias = linear.bias is not None
    weight = linear.weight.data
    if mode == "ao.nf4":
        # the same nn.Linear: F.linear on an NF4Tensor dequantizes it to the input's dtype (torchao's LinearNF4)
        linear.weight = torch.nn.Parameter(to_nf4(weight), requires_grad=False)
        return linear
    # Built on the meta device so that no second dense weight is ever allocated.
    if mode.startswith("bnb.int8"):
        trainable = mode == "bnb.int8-training"
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias,
            has_fp16_weights=trainable, threshold=6.0, device="meta",
        )
        if trainable:
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=linear.weight.requires_grad, has_fp16_weights=True)
        else:
            # LLM.int8() row-wise absmax quantization, computed from fp16 as bitsandbytes does itself.
            int8_weight, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
            layer.weight = bnb.nn.Int8Params(
                int8_weight, requires_grad=False, has_fp16_weights=False, CB=int8_weight, SCB=row_scales
            )
    else:
        quant_type = mode.removeprefix("bnb.").removesuffix("-dq")
        double_quant = mode.endswith("-dq")
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
            compress_statistics=double_quant, quant_type=quant_type, device="meta",
        )
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its inference kernel at the first eval
        # forward: that asserts on shapes whose out_features is not a multiple of 32, and a repacked layer later
        # trained backpropagates nothing through its kernel (no autograd). Keep the portable dequantize + matmul.
        layer.support_avx512bf16_for_cpu = False
        # `Params4bit.to(device)` is where bitsandbytes quantizes, on "cpu" as well as "cuda".
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type, module=layer
        ).to(weight.device)
    if has_bias:
        layer.bias = linear.bias
    return layer


def is_quantized_linear(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (what `quantize_model` puts in place of nn.Linear)."""
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def weight_numel(param: torch.nn.Parameter) -> int:
    """The number of weights a parameter stands for: a 4-bit weight packs two per byte."""
    return param.quant_state.shape.numel() if isinstance(param, bnb.nn.Params4bit) else param.numel()


def dequantize_linear(layer: torch.nn.Module) -> torch.Tensor:
    """The dense (out_features, in_features) float32 weight of a plain, 4-bit or 8-bit Linear layer."""
    weight = layer.weight
    if is_nf4(weight):
        return weight.get_original_weight().float()
    if isinstance(weight, bnb.nn.Params4bit):
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight for its inference kernel on the first
            # eval forward; undo it in place, exactly as bitsandbytes does before saving a state dict.
            weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if isinstance(weight, bnb.nn.Int8Params) and weight.dtype == torch.int8:
        # The first forward moves the row scales from the weight into the layer's matmul state.
        row_scales = weight.SCB if weight.SCB is not None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, row_scales).float()
    return weight.detach().float()


def load_quantized(
    checkpoint_dir, mode: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype = torch.bfloat16, config=None,
):
    """A GPT whose Blocks' linears are quantized with `mode`, loaded block by block from the memory-mapped checkpoint.

    The model is built on the meta device; each Block's weights are read from `lit_model.safetensors`, moved to
    `device` in `dtype` and quantized there before the next Block is read, so loading never holds more than the
    quantized model plus one 16-bit Block (an 8B model: about 6 GB instead of 16). The embedding, final norm and head
    stay in `dtype`, unquantized. The 4-bit layers compute in `compute_dtype`, bfloat16 by default whatever the
    training precision: a float32 dequantize-and-matmul costs twice as much for no accuracy 4-bit weights could use.
    """
    from contextlib import ExitStack
    from pathlib import Path

    from safetensors import safe_open

    from model.config import Config
    from model.gpt import GPT
    from model.weights.checkpoint import lit_weight_files

    validate_quantize(mode)
    checkpoint_dir = Path(checkpoint_dir)
    config = config or Config.from_checkpoint(checkpoint_dir)
    with torch.device("meta"):
        model = GPT(config)
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(path, framework="pt", device="cpu")) for path in lit_weight_files(checkpoint_dir)]
        where = {key: f for f in files for key in f.keys()}

        def load(module: torch.nn.Module, prefix: str, names=None) -> None:
            tensors = {}
            for name in names or module.state_dict():
                if prefix + name not in where:
                    raise ValueError(f"{checkpoint_dir} lacks the weight {prefix + name}; is it a {config.name} checkpoint?")
                tensor = where[prefix + name].get_tensor(prefix + name)
                tensors[name] = tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype)
            module.load_state_dict(tensors, strict=names is None, assign=True)

        load(model.transformer.wte, "transformer.wte.")
        load(model.transformer.ln_f, "transformer.ln_f.")
        if config.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
            if model.lm_head.bias is not None:
                load(model.lm_head, "lm_head.", names=["bias"])
        else:
            load(model.lm_head, "lm_head.")
        for i, block in enumerate(model.transformer.h):
            load(block, f"transformer.h.{i}.")
            quantize_model(block, mode, compute_dtype, skip=())
    model.reset_rope()
    return model.eval()
