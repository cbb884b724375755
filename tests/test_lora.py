"""LoRA and DoRA: exact at init, merged == unmerged, the intended parameters train, DoRA agrees with PEFT in values
and gradients, QLoRA trains on a 4-bit base, and an exported adapter gives our logits under PEFT."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml
from conftest import load_script
from hf_models import VOCAB, save_tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

from model import GPT, Config
from model.cli import run_cli
from model.lora import (
    Dropout,
    LoRAConfig,
    LoRALinear,
    count_parameters,
    inject_lora,
    load_lora_state_dict,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
)
from model.quantize import dequantize_linear, quantize_model
from model.weights.convert import convert_hf_checkpoint
from model.weights.load import load_lora_run

ROOT = Path(__file__).parent.parent
EVERYWHERE = dict(query=True, key=True, value=True, projection=True, mlp=True, head=True)


def tiny_config(**overrides) -> Config:
    kw = dict(name="tiny", vocab_size=VOCAB, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=48,
              block_size=32)
    return Config(**{**kw, **overrides})


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_config(**overrides))
    with torch.no_grad():  # random norms and biases, as in hf_models, so that nothing is trivially zero or one
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def perturb_lora(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move A, B (and the magnitudes) away from their init, so that the update is not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in lora_state_dict(model).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)


def tokens(seq_len: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    checkpoint_dir = tmp_path_factory.mktemp("lora") / "org" / "tiny-llama2"
    save_tiny_model("llama2", checkpoint_dir)
    convert_hf_checkpoint(checkpoint_dir)
    return checkpoint_dir


# ------------------------------------------------------------------------------------------------ the layers


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_lora_at_init_is_exactly_the_base_model(dora, tied):
    base = tiny_gpt(tie_embeddings=tied)
    model = inject_lora(copy.deepcopy(base), LoRAConfig(**EVERYWHERE, dora=dora)).eval()
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))
    if tied:  # LoRA on the head leaves the head's base weight the embedding's
        assert model.lm_head.linear.weight is model.transformer.wte.weight


@pytest.mark.parametrize("dora", [False, True])
def test_lora_at_init_on_a_converted_hf_model(llama_dir, dora):
    base = GPT.from_checkpoint(llama_dir, dtype=torch.float32)
    model = inject_lora(GPT.from_checkpoint(llama_dir, dtype=torch.float32), LoRAConfig(**EVERYWHERE, dora=dora))
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))


MERGE_CASES = {
    "query+value": (dict(query=True, value=True), {}),
    "query+key+value": (dict(query=True, key=True, value=True), {}),
    "key": (dict(query=False, key=True, value=False), {}),
    "projection": (dict(query=False, value=False, projection=True), {}),
    "mlp": (dict(query=False, value=False, mlp=True), {}),
    "head-tied": (dict(query=False, value=False, head=True), dict(tie_embeddings=True)),
    "moe": (dict(query=True, value=True, mlp=True), dict(mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2)),
    "neox-bias": (EVERYWHERE, dict(mlp_class_name="GptNeoxMLP", intermediate_size=None, bias=True, lm_head_bias=True,
                                   norm_class_name="LayerNorm", parallel_residual=True, shared_attention_norm=True)),
}


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merged_equals_unmerged(case, dora):
    lora_kw, config_kw = MERGE_CASES[case]
    base = tiny_gpt(**config_kw)
    model = inject_lora(copy.deepcopy(base), LoRAConfig(**lora_kw, dora=dora))
    perturb_lora(model)
    idx = tokens()
    with torch.no_grad():
        unmerged = model(idx)
        assert (unmerged - base(idx)).abs().max() > 1e-2  # the adapter really changes the model
        merged_model = merge_lora(model)
        merged = merged_model(idx)
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert all(type(m) is torch.nn.Linear for n, m in merged_model.named_modules() if n.endswith(("qkv", "proj", "lm_head")))
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)  # float32 rounding, whatever the kernels
    if case == "head-tied":  # the merged head has its own weight; the embedding is the base's
        assert not merged_model.config.tie_embeddings
        assert merged_model.lm_head.weight is not merged_model.transformer.wte.weight
        assert torch.equal(merged_model.transformer.wte.weight, base.transformer.wte.weight)


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_in_training_follows_the_formula(dora):
    """y = W x + b + (m/n - 1) W d(x) + (m/n) s B A d(x) for DoRA (PEFT's arithmetic), W x + b + s B A d(x) for LoRA,
    with d(x) one dropout mask for all slices."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24)
    layer = LoRALinear(linear, r=4, alpha=8, dropout=0.5, dora=dora, out_slices={"q": (0, 8), "v": (16, 8)}).train()
    perturb_lora(layer)
    x = torch.randn(3, 16)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    dropped = layer.dropout(x)  # the mask itself is tested in test_dropout_*
    with torch.no_grad():
        expected = linear(x)
        for adapter in layer.lora.values():
            W, rows = linear.weight[adapter.rows], adapter.rows
            lora_out = dropped @ adapter.A.T @ adapter.B.T * 2.0
            if dora:
                scale = adapter.magnitude / torch.linalg.norm(W + 2.0 * adapter.B @ adapter.A, dim=1)
                expected[:, rows] += (scale - 1) * (dropped @ W.T) + scale * lora_out
            else:
                expected[:, rows] += lora_out
    assert (out - expected).abs().max() <= 1e-6
    assert torch.equal(out[:, 8:16], linear(x)[:, 8:16])  # the k rows have no adapter


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_dropout_drops_with_probability_p_and_keeps_the_expectation(p):
    """The CPU mask (four 16-bit lanes per 64-bit draw) drops each element with probability p, independently of its
    neighbours (which share a draw), and scales the kept ones so that the expectation is the input."""
    torch.manual_seed(0)
    x = torch.full((1000, 1001), 3.0)  # an odd size: the last draw is only partly used
    out = Dropout(p).train()(x)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - p) < 2e-3  # 9 standard deviations at 1e6 elements
    kept = out[~dropped]
    assert torch.equal(kept, torch.full_like(kept, kept[0].item()))
    assert abs(kept[0].item() * (1 - p) - 3.0) < 1e-3  # the drop probability is p rounded to 1/65536
    assert abs(out.mean().item() - 3.0) < 0.02
    d = dropped.flatten().float()
    for lag in (1, 2, 3, 4):  # lanes of one draw and of the next: no correlation
        assert abs(torch.corrcoef(torch.stack([d[:-lag], d[lag:]]))[0, 1].item()) < 5e-3


def test_dropout_gradient_masks_like_the_forward_and_follows_the_seed():
    x = torch.randn(3, 5, 64, requires_grad=True)
    layer = Dropout(0.25).train()
    torch.manual_seed(7)
    out = layer(x.transpose(0, 1))  # a non-contiguous input
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad.transpose(0, 1), (out.detach() != 0) * torch.tensor(4 / 3))  # p = 0.25: kept x 4/3
    torch.manual_seed(7)
    assert torch.equal(layer(x.transpose(0, 1)), out)
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("dora", [False, True])
def test_only_lora_parameters_train(dora):
    base = tiny_gpt()
    r = 4
    model = inject_lora(copy.deepcopy(base), LoRAConfig(r=r, **EVERYWHERE, dora=dora))
    mark_only_lora_as_trainable(model)
    C, I, V, q, kv = 32, 48, VOCAB, 32, 16  # n_embd, intermediate, vocab, query rows, key/value rows
    # each adapter: A (r, in) + B (out, r), and with DoRA a magnitude per output row
    shapes = [(C, q), (C, kv), (C, kv), (q, C), (C, I), (C, I), (I, C)] * 2 + [(C, V)]
    expected = sum(r * (fan_in + fan_out) + dora * fan_out for fan_in, fan_out in shapes)
    assert count_parameters(model) == expected
    assert count_parameters(model, trainable=False) == count_parameters(base, trainable=None)
    assert all(".lora." in name for name, p in model.named_parameters() if p.requires_grad)
    assert len(lora_state_dict(model)) == (3 if dora else 2) * len(shapes)
    assert "transformer.h.0.attn.qkv.lora.q.A" in lora_state_dict(model)


# ------------------------------------------------------------------------------------------------ against PEFT

PEFT_NAMES = [("attn.qkv.lora.q", "self_attn.q_proj"), ("attn.qkv.lora.k", "self_attn.k_proj"),
              ("attn.qkv.lora.v", "self_attn.v_proj"), ("attn.proj.lora.all", "self_attn.o_proj"),
              ("mlp.fc_1.lora.all", "mlp.gate_proj"), ("mlp.fc_2.lora.all", "mlp.up_proj"),
              ("mlp.proj.lora.all", "mlp.down_proj")]


@pytest.mark.parametrize("dora", [False, True])
def test_matches_peft_logits_and_gradients(llama_dir, dora):
    import peft

    ours = GPT.from_checkpoint(llama_dir, dtype=torch.float32)
    inject_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.0, query=True, key=True, value=True, projection=True,
                                 mlp=True, dora=dora))
    mark_only_lora_as_trainable(ours)
    perturb_lora(ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="eager")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, use_dora=dora, target_modules=[n.split(".")[1] for _, n in PEFT_NAMES]))
    ours_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    pairs = [
        (f"transformer.h.{i}.{our_name}.{ours_suffix}", f"base_model.model.model.layers.{i}.{hf_name}.{their_suffix}")
        for i in range(ours.config.n_layer) for our_name, hf_name in PEFT_NAMES
        for ours_suffix, their_suffix in (("A", "lora_A.default.weight"), ("B", "lora_B.default.weight"),
                                          ("magnitude", "lora_magnitude_vector.default.weight"))
        if dora or ours_suffix != "magnitude"
    ]
    assert {p for _, p in pairs} == {n for n, p in their_params.items() if p.requires_grad}
    with torch.no_grad():
        for our_name, their_name in pairs:
            their_params[their_name].copy_(ours_params[our_name])

    idx, targets = tokens(16), tokens(16, seed=2)
    our_logits, their_logits = ours(idx), theirs(idx).logits
    assert (our_logits - their_logits).abs().max() <= 1e-5
    F.cross_entropy(our_logits.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(their_logits.flatten(0, 1), targets.flatten()).backward()
    for our_name, their_name in pairs:
        ours_grad, their_grad = ours_params[our_name].grad, their_params[their_name].grad
        assert ours_grad.abs().max() > 0, our_name
        assert (ours_grad - their_grad).abs().max() <= 1e-5, our_name


# ------------------------------------------------------------------------------------------------ QLoRA

# NF4 moves each weight by ~9% (relative Frobenius error, see test_quantize.py); through the six quantized linears
# of this model that moves the logits by 9.8-11.5% (measured over seeds 0-4). The adapter is the same on the 4-bit
# and on the dense base, so the QLoRA model differs from the dense LoRA model only by that base error: measured
# 0.73-0.92 times the base model's own error after the training below, for LoRA and DoRA alike.
NF4_LOGITS_ERROR_BOUND = 0.13


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_nf4_trains_and_merges(dora):
    torch.manual_seed(0)
    dense = GPT(tiny_config(n_embd=64, intermediate_size=128))
    with torch.no_grad():  # LLM weights are close to Gaussian, which NF4's levels are made for
        for name, param in dense.named_parameters():
            if name.endswith("weight") and param.ndim == 2:
                param.normal_(std=0.02)
    lora_config = LoRAConfig(r=4, alpha=8, dropout=0.0, query=True, value=True, mlp=True, dora=dora)
    model = quantize_model(copy.deepcopy(dense), "bnb.nf4", compute_dtype=torch.float32).eval()
    idx, targets = tokens(16), tokens(16, seed=2)
    with torch.no_grad():
        base_error = relative_error(model(idx), dense.eval()(idx))
    inject_lora(model, lora_config)
    mark_only_lora_as_trainable(model)
    qkv = model.transformer.h[0].attn.qkv
    assert isinstance(qkv.linear, bnb.nn.Linear4bit) and qkv.lora.q.A.dtype == torch.float32
    assert count_parameters(model, trainable=None) == count_parameters(inject_lora(copy.deepcopy(dense), lora_config), None)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    initial = {n: t.clone() for n, t in lora_state_dict(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(t, initial[n]) for n, t in lora_state_dict(model).items())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)

    model.eval()
    same_adapter_dense = inject_lora(copy.deepcopy(dense), lora_config)
    load_lora_state_dict(same_adapter_dense, lora_state_dict(model))
    with torch.no_grad():
        unmerged = model(idx)
        dense_logits = same_adapter_dense(idx)
        merged_model = merge_lora(model, dtype=torch.float32)
        merged = merged_model(idx)
    merged_qkv = merged_model.transformer.h[0].attn.qkv
    assert type(merged_qkv) is torch.nn.Linear and merged_qkv.weight.dtype == torch.float32
    # merging the dequantized weight is exact: the merged model is the QLoRA model
    assert (merged - unmerged).abs().max() <= 1e-5
    assert base_error <= NF4_LOGITS_ERROR_BOUND
    assert relative_error(merged, dense_logits) <= 1.1 * base_error


# ------------------------------------------------------------------------------------------------ PEFT export


def save_run(model: GPT, lora_config: LoRAConfig, run_dir: Path, checkpoint_dir: Path = Path("base")) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, run_dir / "lora.safetensors")
    (run_dir / "hparams.yaml").write_text(yaml.safe_dump({**lora_config.to_hparams(), "learning_rate": 3e-4,
                                                          "checkpoint_dir": str(checkpoint_dir)}))


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)


EXPORT_CASES = {
    # family: LoRA settings (fused HF layers: Phi-3's qkv_proj and gate_up_proj, Falcon's query_key_value)
    "llama2": dict(query=True, key=True, value=True, projection=True, mlp=True),
    "llama2-dora": dict(query=True, value=True, projection=True, mlp=True, dora=True),
    "smollm2-tied-head": dict(query=True, value=True, head=True, dora=True),
    "mistral-sliding-window": dict(query=True, value=True, mlp=True),
    "mixtral": dict(query=True, key=True, value=True, projection=True, dora=True),
    "phi-2": dict(query=True, key=True, value=True, projection=True, mlp=True, dora=True),
    "phi-3-4k": dict(query=True, value=True, mlp=True),
    "phi-3-4k-dora": dict(query=True, key=True, value=True, projection=True, mlp=True, dora=True),
    "falcon-40b": dict(query=True, key=True),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_peft_reproduces_our_logits(case, tmp_path):
    import peft

    family = case.removesuffix("-dora").removesuffix("-tied-head")
    checkpoint_dir = tmp_path / "org" / f"tiny-{family}"
    _, seq_len = save_tiny_model(family, checkpoint_dir)
    convert_hf_checkpoint(checkpoint_dir)
    lora_config = LoRAConfig(r=4, alpha=6, dropout=0.1, **EXPORT_CASES[case])
    ours = inject_lora(GPT.from_checkpoint(checkpoint_dir, dtype=torch.float32), lora_config)
    perturb_lora(ours)
    save_run(ours, lora_config, tmp_path / "run", checkpoint_dir)

    hf_dir, adapter_dir = tmp_path / "hf", tmp_path / "adapter"
    if case == "llama2":  # the command lines, once
        for script, args in (("scripts/convert_to_hf.py", ["--checkpoint_dir", checkpoint_dir, "--out_dir", hf_dir]),
                             ("scripts/export_peft.py", ["--checkpoint_dir", tmp_path / "run", "--out_dir", adapter_dir])):
            result = run_script(script, *map(str, args))
            assert result.returncode == 0, result.stderr
    else:
        load_script("scripts/convert_to_hf.py").convert_to_hf(checkpoint_dir, hf_dir)
        load_script("scripts/export_peft.py").export_peft(tmp_path / "run", adapter_dir)

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    theirs = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    ours.eval()
    idx = tokens(seq_len)
    with torch.no_grad():
        our_logits, their_logits = ours(idx), theirs(idx).logits
        with theirs.disable_adapter():
            base_logits = theirs(idx).logits
    assert (our_logits - base_logits).abs().max() > 1e-2
    assert (our_logits - their_logits).abs().max() <= 1e-4

    saved_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved_config["r"] == 4 and saved_config["lora_alpha"] == 6 and saved_config["task_type"] == "CAUSAL_LM"
    assert saved_config["use_dora"] == lora_config.dora
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    if case == "llama2-dora":
        prefix = "base_model.model.model.layers.0"
        assert saved_config["target_modules"] == ["down_proj", "gate_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
        assert {f"{prefix}.self_attn.q_proj.lora_A.weight", f"{prefix}.self_attn.q_proj.lora_B.weight",
                f"{prefix}.self_attn.q_proj.lora_magnitude_vector"} <= keys
        assert not any("k_proj" in key for key in keys)
    if case == "phi-3-4k":  # q and v share the fused layer: rank 2r; gate and up likewise
        assert saved_config["rank_pattern"] == {"qkv_proj": 8, "gate_up_proj": 8}
        assert saved_config["alpha_pattern"] == {"qkv_proj": 12, "gate_up_proj": 12}


def test_export_refuses_what_peft_cannot_express(tmp_path, capsys):
    def checkpoint(family: str, **overrides) -> Path:
        # the export reads only the config: a config file is a checkpoint enough
        checkpoint_dir = tmp_path / family
        checkpoint_dir.mkdir()
        tiny_config(**overrides).save(checkpoint_dir)
        return checkpoint_dir

    def run_dir(name: str, checkpoint_dir: Path, lora_config: LoRAConfig) -> Path:
        with torch.device("meta"):
            model = inject_lora(GPT(Config.from_checkpoint(checkpoint_dir)), lora_config)
        directory = tmp_path / name
        save_run(model.to_empty(device="cpu"), lora_config, directory, checkpoint_dir)
        return directory

    export_peft = load_script("scripts/export_peft.py").export_peft
    phi3 = checkpoint("phi3", hf_architecture="Phi3ForCausalLM")
    partial_dora = run_dir("partial-dora", phi3, LoRAConfig(query=True, value=True, dora=True))
    with pytest.raises(SystemExit) as exit_info:  # the command line: one error line, exit status 1, no output
        run_cli(export_peft, ["--checkpoint_dir", str(partial_dora), "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert "error: DoRA on only part of model.layers.0.self_attn.qkv_proj" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    mixtral = checkpoint("mixtral", hf_architecture="MixtralForCausalLM", mlp_class_name="LLaMAMoE", n_expert=2,
                         n_expert_per_token=1)
    experts = run_dir("experts", mixtral, LoRAConfig(mlp=True))
    with pytest.raises(ValueError, match="Mixtral's experts"):
        export_peft(experts, tmp_path / "out")


# ------------------------------------------------------------------------------------------------ bad input


def test_adapter_mismatches_are_named():
    trained = inject_lora(tiny_gpt(), LoRAConfig(r=4))
    with pytest.raises(ValueError, match="trained with r=4 but the model has r=8"):
        load_lora_state_dict(inject_lora(tiny_gpt(), LoRAConfig(r=8)), lora_state_dict(trained))
    with pytest.raises(ValueError, match="trained with dora=False but the model has dora=True"):
        load_lora_state_dict(inject_lora(tiny_gpt(), LoRAConfig(r=4, dora=True)), lora_state_dict(trained))
    with pytest.raises(ValueError, match=r"1?\d missing .*attn\.qkv\.lora\.k\.A"):
        load_lora_state_dict(inject_lora(tiny_gpt(), LoRAConfig(r=4, key=True)), lora_state_dict(trained))
    with pytest.raises(ValueError, match="no LoRA layers"):
        load_lora_state_dict(tiny_gpt(), lora_state_dict(trained))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(trained, LoRAConfig())
    with pytest.raises(ValueError, match="rank r must be positive"):
        LoRAConfig(r=0)


def test_load_lora_run_names_what_is_missing(tmp_path):
    model = inject_lora(tiny_gpt(), LoRAConfig(r=4, dora=True))
    perturb_lora(model)
    with pytest.raises(FileNotFoundError, match="hparams.yaml not found"):
        load_lora_run(tmp_path)
    save_run(model, LoRAConfig(r=4, dora=True), tmp_path)
    lora_config, state_dict = load_lora_run(tmp_path)
    assert lora_config == LoRAConfig(r=4, dora=True)
    assert all(torch.equal(state_dict[k], v) for k, v in lora_state_dict(model).items())

    (tmp_path / "lora.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lora.safetensors not found"):
        load_lora_run(tmp_path)
    save_run(model, LoRAConfig(r=4, dora=True), tmp_path / "other")
    (tmp_path / "other" / "hparams.yaml").write_text(yaml.safe_dump({"lora_r": 4, "lora_alpha": 8}))
    with pytest.raises(ValueError, match="lacks the LoRA settings lora_dropout"):
        load_lora_run(tmp_path / "other")


def test_dequantized_base_is_read_not_written():
    """DoRA and merging read a 4-bit base only through dequantize_linear; the packed weight never changes."""
    torch.manual_seed(0)
    layer = quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), "bnb.nf4", compute_dtype=torch.float32)[0]
    packed = layer.weight.data.clone()
    lora = LoRALinear(layer, r=4, alpha=8, dora=True)
    assert torch.allclose(lora.lora.all.magnitude, torch.linalg.norm(dequantize_linear(layer), dim=1))
    lora.merged_weight()
    lora(torch.randn(2, 64)).sum().backward()
    assert torch.equal(layer.weight.data, packed)


# ------------------------------------------------------------------------------------------------ the lean LoRA layer


def per_slice_reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The layer as it was written before: one A and one B GEMM per slice, the output assembled by concatenation."""
    out = layer.linear(x)
    dropped = layer.dropout(x)
    pieces, end = [], 0
    for adapter in layer.lora.values():
        if adapter.start > end:
            pieces.append(out[..., end:adapter.start])
        update = F.linear(F.linear(dropped, adapter.A), adapter.B) * layer.scaling
        pieces.append(out[..., adapter.rows] + update)
        end = adapter.start + adapter.size
    pieces.append(out[..., end:])
    return torch.cat(pieces, dim=-1)


@pytest.mark.parametrize("slices", [None, {"q": (0, 8), "v": (12, 4)}, {"q": (0, 8), "k": (8, 4), "v": (12, 4)}])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_one_a_gemm_and_in_place_updates_equal_the_per_slice_layer(slices, dropout, quantized, fused, monkeypatch):
    """Both ways the layer adds its update: `LoRAUpdate` (GEMMs that add into the output) and, under autocast or with
    adapters in another dtype than the output, autograd through in-place additions (forced here with fp32 numerics)."""
    if not fused:
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: True)
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16, bias=True)
    if quantized:
        linear = quantize_model(torch.nn.Sequential(linear), "bnb.nf4", torch.float32)[0]
    layer = LoRALinear(linear, r=4, alpha=8, dropout=dropout, out_slices=slices).train()
    perturb_lora(layer)
    x = torch.randn(2, 5, 64, requires_grad=True)
    results = []
    for forward in (layer, lambda inputs: per_slice_reference(layer, inputs)):
        torch.manual_seed(1)
        out = forward(x)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 16)).sum(), [x, *layer.lora.parameters()])
        results.append((out, grads))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


def test_the_update_trains_the_adapters_of_a_layer_whose_input_needs_no_gradient():
    """The first Block under LoRA: its input needs no gradient, so `LoRAUpdate` keeps no A for it; A and B still get
    the reference layer's gradients."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 16), r=4, alpha=8, out_slices={"q": (0, 8), "v": (12, 4)}).train()
    perturb_lora(layer)
    x = torch.randn(2, 5, 64)
    grads = [torch.autograd.grad((forward(x) * torch.linspace(-1, 1, 16)).sum(), list(layer.lora.parameters()))
             for forward in (layer, lambda inputs: per_slice_reference(layer, inputs))]
    for grad, expected in zip(*grads):
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("out_features", [24, 40, 100])
def test_a_4bit_layer_of_any_shape_runs_in_eval_and_then_trains(out_features):
    """bitsandbytes' AVX512-BF16 CPU path repacks the weight at the first eval forward, which asserts unless
    out_features is a multiple of 32 and afterwards gives no gradient through the layer: Forge's 4-bit layers keep
    the portable path, so evaluation, training and dequantization agree on every shape and every CPU."""
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(64, out_features))
    layer = quantize_model(copy.deepcopy(dense), "bnb.nf4", torch.float32)[0].eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        evaluated = layer(x)
    reference = F.linear(x, dequantize_linear(layer), layer.bias)
    torch.testing.assert_close(evaluated, reference, atol=1e-5, rtol=1e-5)
    lora = LoRALinear(layer, r=2, alpha=4).train()
    inputs = x.clone().requires_grad_(True)
    lora(inputs).sum().backward()
    torch.testing.assert_close(inputs.grad, dequantize_linear(layer).sum(0).expand(3, -1), atol=1e-5, rtol=1e-5)


def test_importing_the_library_prints_nothing_from_bitsandbytes():
    result = subprocess.run([sys.executable, "-c", "import model.lora, model.quantize"], capture_output=True, text=True,
                            cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and "kernels" not in result.stderr + result.stdout
