"""bitsandbytes quantization on the CPU.

Error bounds, measured on these shapes (512x256 and 256x512 Gaussian weights, blocksize 64) over six seeds:
  relative Frobenius error of one quantized weight:  NF4 0.092, FP4 0.122, int8 0.007 (+-0.0005)
  relative error of the two-layer MLP's output:      NF4 0.129-0.131, FP4 0.169-0.178, int8 0.010
For isotropic random inputs a layer's relative output error is its weight error, and the two layers' errors
add in quadrature (sqrt(2) * 0.092 = 0.13). The bounds below leave 10-15% headroom.
"""

import copy
import weakref

import bitsandbytes as bnb
import pytest
import torch

from model.quantize import QUANTIZE_MODES, dequantize_linear, quantize_model, validate_quantize

FOUR_BIT_MODES = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq")
WEIGHT_ERROR_BOUND = {"nf4": 0.10, "fp4": 0.135}
MLP_OUTPUT_ERROR_BOUND = {"nf4": 0.15, "fp4": 0.20}


class TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
        self.lm_head = torch.nn.Linear(256, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.mlp(x))


def make_model(dtype: torch.dtype) -> TinyModel:
    torch.manual_seed(0)
    model = TinyModel()
    for name, param in model.named_parameters():
        # LLM weights are close to Gaussian, which is what NF4's levels are built for.
        torch.nn.init.normal_(param, std=0.02 if name.endswith("weight") else 0.01)
    return model.to(dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def quantized_bytes(layer: torch.nn.Module) -> int:
    """Bytes of the quantized weight and of the statistics needed to dequantize it."""
    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        state = weight.quant_state
        total = weight.data.nbytes + state.absmax.nbytes
        if state.nested:
            total += state.state2.absmax.nbytes
        return total
    return weight.data.nbytes + weight.SCB.nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", FOUR_BIT_MODES)
def test_4bit_quantizes_the_weights_and_stays_close(mode, dtype):
    dense = make_model(dtype)
    model = quantize_model(copy.deepcopy(dense), mode, compute_dtype=dtype)
    quant_type = mode.removeprefix("bnb.").removesuffix("-dq")

    for name in ("0", "2"):
        layer, dense_layer = model.mlp.get_submodule(name), dense.mlp.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit)
        weight = layer.weight
        assert weight.quant_state is not None and weight.quant_state.quant_type == quant_type
        assert weight.quant_state.nested == mode.endswith("-dq")
        # two 4-bit values per byte
        assert weight.dtype == torch.uint8 and weight.numel() == dense_layer.weight.numel() // 2
        assert quantized_bytes(layer) < dense_layer.weight.nbytes / (7 if dtype == torch.float32 else 3.5)
        assert torch.equal(layer.bias, dense_layer.bias)

        error = relative_error(dequantize_linear(layer), dense_layer.weight)
        assert 0.05 < error < WEIGHT_ERROR_BOUND[quant_type]
    assert type(model.lm_head) is torch.nn.Linear
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)

    x = torch.randn(8, 256, dtype=dtype)
    with torch.no_grad():
        out, expected = model.mlp(x), dense.mlp(x)
    assert out.dtype == dtype
    assert 0.05 < relative_error(out, expected) < MLP_OUTPUT_ERROR_BOUND[quant_type]


def test_nf4_is_more_accurate_than_fp4_on_gaussian_weights_and_double_quant_is_smaller():
    dense = make_model(torch.float32)
    models = {mode: quantize_model(copy.deepcopy(dense), mode, torch.float32) for mode in FOUR_BIT_MODES}
    errors = {mode: relative_error(dequantize_linear(m.mlp[0]), dense.mlp[0].weight) for mode, m in models.items()}
    # QLoRA, section 3: NF4 is the information-theoretically optimal 4-bit type for normally distributed weights.
    assert errors["bnb.nf4"] < errors["bnb.fp4"] - 0.02
    # Double quantization stores one 8-bit absmax per block instead of an fp32 one, at almost no accuracy cost.
    for quant_type in ("nf4", "fp4"):
        plain, double = models[f"bnb.{quant_type}"].mlp[0], models[f"bnb.{quant_type}-dq"].mlp[0]
        assert quantized_bytes(double) < quantized_bytes(plain)
        assert errors[f"bnb.{quant_type}-dq"] < errors[f"bnb.{quant_type}"] + 0.005


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.fp4-dq"])
def test_backward_reaches_the_input_through_a_frozen_4bit_layer(mode, dtype):
    dense = make_model(dtype)
    model = quantize_model(copy.deepcopy(dense), mode, compute_dtype=dtype)
    x = torch.randn(8, 256, dtype=dtype)
    upstream = torch.randn(8, 256, dtype=dtype)

    grads = []
    for m in (model, dense):
        x_leaf = x.clone().requires_grad_(True)
        (m.mlp(x_leaf) * upstream).sum().backward()
        grads.append(x_leaf.grad)
    assert grads[0] is not None and grads[0].dtype == dtype
    assert relative_error(grads[0], grads[1]) < MLP_OUTPUT_ERROR_BOUND[mode.removeprefix("bnb.")[:3]]
    assert model.mlp[0].weight.grad is None and not model.mlp[0].weight.requires_grad


def test_low_rank_adapter_trains_on_top_of_a_4bit_base():
    dense = make_model(torch.float32).mlp[0]
    base = quantize_model(torch.nn.Sequential(copy.deepcopy(dense)), "bnb.nf4", torch.float32)[0]
    packed_before = base.weight.data.clone()
    torch.manual_seed(1)
    task_delta = torch.randn(512, 4) @ torch.randn(4, 256) * 0.02  # the low-rank update fine-tuning should find
    lora_a = torch.nn.Parameter(torch.randn(4, 256) * 0.01)
    lora_b = torch.nn.Parameter(torch.zeros(512, 4))
    optimizer = torch.optim.Adam([lora_a, lora_b], lr=1e-2)
    x = torch.randn(64, 256)
    target = (dense(x) + x @ task_delta.T).detach()

    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(base(x) + x @ lora_a.T @ lora_b.T, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # measured: 0.41 -> 0.002, against a floor of 0.0009 that is the NF4 error the rank-4 adapter cannot undo
    assert losses[-1] < 0.02 * losses[0]
    assert torch.equal(base.weight.data, packed_before)


def test_compute_dtype_differs_from_the_weights_dtype():
    dense = make_model(torch.float32)
    model = quantize_model(copy.deepcopy(dense), "bnb.nf4", compute_dtype=torch.bfloat16)
    x = torch.randn(8, 256)
    with torch.no_grad():
        out = model.mlp(x)
    assert out.dtype == torch.float32
    assert relative_error(out, dense.mlp(x).detach()) < MLP_OUTPUT_ERROR_BOUND["nf4"]


def test_skip_by_name_or_predicate():
    model = quantize_model(make_model(torch.float32), "bnb.nf4", torch.float32, skip=("2",))
    assert isinstance(model.mlp[0], bnb.nn.Linear4bit)
    assert type(model.mlp[2]) is torch.nn.Linear
    assert isinstance(model.lm_head, bnb.nn.Linear4bit)

    model = quantize_model(make_model(torch.float32), "bnb.nf4", torch.float32, skip=lambda path: path.startswith("mlp"))
    assert type(model.mlp[0]) is torch.nn.Linear and type(model.mlp[2]) is torch.nn.Linear
    assert isinstance(model.lm_head, bnb.nn.Linear4bit)


def test_dense_weights_are_released_layer_by_layer():
    model = make_model(torch.bfloat16)
    dense_weights = [weakref.ref(model.mlp[0].weight), weakref.ref(model.mlp[2].weight)]
    quantize_model(model, "bnb.nf4", torch.bfloat16)
    assert all(ref() is None for ref in dense_weights)


def test_meta_weights_are_refused():
    with torch.device("meta"):
        model = TinyModel()
    with pytest.raises(ValueError, match="meta device"):
        quantize_model(model, "bnb.nf4", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_works_on_the_cpu(dtype):
    dense = make_model(dtype)
    model = quantize_model(copy.deepcopy(dense), "bnb.int8", compute_dtype=dtype)
    layer = model.mlp[0]
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
    assert quantized_bytes(layer) < dense.mlp[0].weight.nbytes / (3.5 if dtype == torch.float32 else 1.8)

    x = torch.randn(8, 256, dtype=dtype)
    x[:, 3] *= 20  # an outlier feature above the 6.0 threshold goes through the fp16 path of LLM.int8()
    grads, outs = [], []
    for m in (model, dense):
        x_leaf = x.clone().requires_grad_(True)
        out = m.mlp(x_leaf)
        out.sum().backward()
        outs.append(out)
        grads.append(x_leaf.grad)
    assert outs[0].dtype == dtype
    assert 0 < relative_error(outs[0], outs[1]) < 0.02
    assert relative_error(grads[0], grads[1]) < 0.02
    # after a forward the row scales live in the layer's matmul state, not on the weight
    assert relative_error(dequantize_linear(layer), dense.mlp[0].weight) < 0.01


def test_int8_training_keeps_trainable_weights():
    dense = make_model(torch.float32)
    model = quantize_model(copy.deepcopy(dense), "bnb.int8-training", compute_dtype=torch.float32)
    layer = model.mlp[0]
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert layer.weight.dtype == torch.float32 and layer.weight.requires_grad
    x = torch.randn(8, 256)
    out = model.mlp(x)
    assert 0 < relative_error(out, dense.mlp(x)) < 0.02
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert torch.equal(dequantize_linear(layer), dense.mlp[0].weight)


def test_dequantize_a_plain_linear_is_its_weight():
    linear = torch.nn.Linear(4, 3).to(torch.bfloat16)
    assert torch.equal(dequantize_linear(linear), linear.weight.float())


def test_invalid_mode_names_the_valid_ones():
    validate_quantize(None)
    for mode in QUANTIZE_MODES:
        validate_quantize(mode)
    with pytest.raises(ValueError, match="bnb.nf4-dq") as error:
        quantize_model(make_model(torch.float32), "nf4", torch.float32)
    assert all(mode in str(error.value) for mode in QUANTIZE_MODES)


# ------------------------------------------------------------------------------------------------ block-wise QLoRA loading


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's materialized tensors hold (4-bit weights with their statistics; meta tensors hold none)."""
    seen, total = set(), 0
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.device.type == "meta" or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += quantized_bytes(module) if isinstance(tensor, bnb.nn.Params4bit) else tensor.nbytes
    return total


@pytest.mark.parametrize("tied", [False, True])
def test_load_quantized_holds_the_quantized_model_plus_one_16bit_block(tmp_path, monkeypatch, tied):
    from safetensors.torch import save_file

    import model.gpt
    import model.quantize
    from model import GPT, Config
    from model.quantize import load_quantized

    config = Config(name="tiny", vocab_size=96, n_layer=4, n_head=4, n_query_groups=2, n_embd=128,
                    intermediate_size=256, block_size=32, tie_embeddings=tied)
    torch.manual_seed(0)
    dense = GPT(config)
    for name, param in dense.named_parameters():
        if param.ndim == 2:
            torch.nn.init.normal_(param, std=0.02)
    state = {k: v.to(torch.bfloat16) for k, v in dense.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, tmp_path / "lit_model.safetensors")

    built, held = [], []

    class RecordedGPT(GPT):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    quantize_block = model.quantize.quantize_model

    def recording_quantize(module, *args, **kwargs):
        held.append(model_bytes(built[0]))  # the block is loaded in 16 bits, about to be quantized
        return quantize_block(module, *args, **kwargs)

    monkeypatch.setattr(model.gpt, "GPT", RecordedGPT)
    monkeypatch.setattr(model.quantize, "quantize_model", recording_quantize)
    loaded = load_quantized(tmp_path, "bnb.nf4", "cpu", config=config)

    block_16bit = sum(p.numel() * 2 for p in dense.transformer.h[0].parameters())
    assert len(held) == config.n_layer
    assert max(held) <= model_bytes(loaded) + block_16bit
    assert model_bytes(loaded) < 0.6 * sum(t.numel() * 2 for t in state.values())
    assert all(isinstance(m.linear if hasattr(m, "linear") else m, bnb.nn.Linear4bit)
               for n, m in loaded.named_modules() if n.endswith(("qkv", "proj", "fc_1", "fc_2")))
    assert loaded.transformer.h[0].attn.qkv.compute_dtype == torch.bfloat16
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tied

    # the same model as quantizing the whole loaded 16-bit model at once
    monkeypatch.undo()
    reference = quantize_model(dense.to(torch.bfloat16), "bnb.nf4", torch.bfloat16).eval()
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), reference(ids), atol=0, rtol=0)


def test_load_quantized_names_a_missing_weight(tmp_path):
    from safetensors.torch import save_file

    from model import GPT, Config
    from model.quantize import load_quantized

    config = Config(name="tiny", vocab_size=96, n_layer=2, n_head=4, n_embd=64, intermediate_size=128, block_size=32)
    state = GPT(config).state_dict()
    del state["transformer.h.1.attn.proj.weight"]
    save_file(state, tmp_path / "lit_model.safetensors")
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.proj\.weight"):
        load_quantized(tmp_path, "bnb.nf4", "cpu", config=config)
