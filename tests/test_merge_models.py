"""scripts/merge_models.py: mergekit 0.1.5's output reproduced on tiny Llama (GQA) and Phi-3 checkpoints, fused
tensors merged per Hugging Face tensor, slices and gradients, the random methods seeded, bad input, and the peak
memory of a streamed merge. The methods themselves: tests/test_merge_methods.py."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_script
from safetensors.torch import load_file

from model import GPT, Config
from model.cli import run_cli
from model.generate import generate
from model.weights.checkpoint import load_state_dict, save_sharded
from model.workflows.merge import linear, slerp, task_arithmetic

ROOT = Path(__file__).parent.parent
merge_script = load_script("scripts/merge_models.py")
mergekit_check = load_script("examples/merge/compare_with_mergekit.py")
MERGEKIT_REFERENCE = ROOT / "tests/data/merge/mergekit-0.1.5.safetensors"
TINY = dict(name="tiny", vocab_size=64, n_layer=3, n_head=2, n_query_groups=1, n_embd=16, intermediate_size=24,
            block_size=64, tie_embeddings=True)


def make_checkpoint(directory: Path, seed: int, **overrides) -> Path:
    """A random Forge checkpoint (random norms too, so a weight taken from the wrong model shows)."""
    torch.manual_seed(seed)
    model = GPT(Config(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name or "ln_f" in name else 0.0, 0.2)
    directory.mkdir(parents=True)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_sharded(iter(state.items()), directory)
    model.config.save(directory)
    (directory / "prompt_style.yaml").write_text("name: chatml\ndefault_system: null\n")
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: make_checkpoint(root / name, seed) for seed, name in enumerate(("base", "a", "b"))}


def run_merge(tmp_path: Path, spec: dict, name: str = "merged") -> Path:
    """Merge as `--config` does: the YAML's keys are the script's flags."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(spec))
    out_dir = tmp_path / name
    run_cli(merge_script.merge_models, ["--config", str(config), "--out_dir", str(out_dir)])
    return out_dir


# ----------------------------------------------------------------------------------------------- the script


@pytest.mark.parametrize("family", ["llama-gqa", "phi-3"])
def test_every_config_equals_mergekit_0_1_5_tensor_by_tensor(family, tmp_path):
    """What examples/merge/compare_with_mergekit.py showed, encoded: its inputs and mergekit 0.1.5's outputs (all
    the deterministic methods, random ones at density 1, slices with filters and gradients) are stored; we
    convert the inputs, merge them with every config, export to HF, and must match (it measured 0.0)."""
    reference = load_file(MERGEKIT_REFERENCE)
    models = {name: {k.split("/", 3)[3]: v for k, v in reference.items() if k.startswith(f"{family}/input/{name}/")}
              for name in mergekit_check.MODELS}
    forge_dirs = mergekit_check.forge_inputs(family, models, tmp_path)
    for label in mergekit_check.METHODS:
        theirs = {k.split("/", 2)[2]: v for k, v in reference.items() if k.startswith(f"{family}/{label}/")}
        ours = mergekit_check.merge_ours(label, forge_dirs, tmp_path / label)
        assert ours.keys() == theirs.keys(), label
        for name, tensor in theirs.items():
            assert torch.allclose(ours[name], tensor, rtol=0, atol=1e-6), (label, name)


def split_qkv(qkv: torch.Tensor) -> list[torch.Tensor]:
    return list(qkv.split((16, 8, 8)))  # TINY: 2 query heads and 1 key/value head of 8


def test_fused_qkv_is_merged_per_hf_tensor(models, tmp_path):
    a, b = load_state_dict(models["a"]), load_state_dict(models["b"])
    spec = {"merge_method": "slerp", "base_model": str(models["a"]), "parameters": {"t": 0.3},
            "models": [{"model": str(models["a"])}, {"model": str(models["b"])}]}
    merged = load_state_dict(run_merge(tmp_path, spec))
    name = "transformer.h.1.attn.qkv.weight"
    per_tensor = torch.cat([slerp(x, y, 0.3) for x, y in zip(split_qkv(a[name]), split_qkv(b[name]))])
    assert torch.allclose(merged[name], per_tensor, atol=1e-6)
    assert not torch.allclose(merged[name], slerp(a[name], b[name], 0.3), atol=1e-4)  # one angle for q, k, v


def test_slerp_script_endpoints_and_per_layer_gradient(models, tmp_path):
    a, b = load_state_dict(models["a"]), load_state_dict(models["b"])
    spec = {"merge_method": "slerp", "base_model": str(models["a"]), "parameters": {"t": 0.0},
            "models": [{"model": str(models["a"])}, {"model": str(models["b"])}]}
    at_a = load_state_dict(run_merge(tmp_path, spec, "t0"))
    assert at_a.keys() == a.keys() and all(torch.allclose(at_a[k], a[k], atol=1e-6) for k in a)
    at_b = load_state_dict(run_merge(tmp_path, dict(spec, parameters={"t": 1.0}), "t1"))
    assert all(torch.allclose(at_b[k], b[k], atol=1e-6) for k in a)
    # mergekit's slices form, t from 0 at the first layer to 1 at the last, attention only; MLPs at 0.5
    sliced = {"merge_method": "slerp", "base_model": str(models["a"]),
              "slices": [{"sources": [{"model": str(models["a"]), "layer_range": [0, 3]},
                                      {"model": str(models["b"]), "layer_range": [0, 3]}]}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]}}
    out = run_merge(tmp_path, sliced, "gradient")
    merged = load_state_dict(out)
    qkv = "transformer.h.{}.attn.qkv.weight"
    assert torch.allclose(merged[qkv.format(0)], a[qkv.format(0)], atol=1e-6)
    assert torch.allclose(merged[qkv.format(2)], b[qkv.format(2)], atol=1e-6)
    middle = [slerp(x, y, 0.5) for x, y in zip(split_qkv(a[qkv.format(1)]), split_qkv(b[qkv.format(1)]))]
    assert torch.allclose(merged[qkv.format(1)], torch.cat(middle), atol=1e-6)
    fc = "transformer.h.0.mlp.fc_1.weight"
    assert torch.allclose(merged[fc], slerp(a[fc], b[fc], 0.5), atol=1e-6)
    assert (out / "prompt_style.yaml").is_file()
    assert yaml.safe_load((out / "merge_config.yaml").read_text()) == dict(sliced, seed=0)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_are_seeded(method, models, tmp_path):
    base = load_state_dict(models["base"])
    spec = {"merge_method": method, "base_model": str(models["base"]), "seed": 3,
            "models": [{"model": str(models["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": str(models["b"]), "parameters": {"weight": 0.4, "density": 0.7}}]}
    merged = load_state_dict(run_merge(tmp_path, spec))
    again = load_state_dict(run_merge(tmp_path, spec, "again"))
    other = load_state_dict(run_merge(tmp_path, dict(spec, seed=4), "other"))
    name = "transformer.h.1.mlp.proj.weight"
    assert set(merged) == set(base)
    assert all(torch.equal(merged[k], again[k]) for k in merged) and not torch.equal(merged[name], other[name])
    delta = merged[name] - base[name]
    assert 0 < (delta == 0).float().mean().item() < 0.5  # some entries dropped by both models


def test_linear_and_task_arithmetic_through_the_script(models, tmp_path):
    base, a, b = (load_state_dict(models[name]) for name in ("base", "a", "b"))
    weighted = [{"model": str(models["a"]), "parameters": {"weight": 0.6}},
                {"model": str(models["b"]), "parameters": {"weight": 0.4}}]
    merged = load_state_dict(run_merge(tmp_path, {"merge_method": "linear", "models": weighted}, "linear"))
    tasks = load_state_dict(run_merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                                                 "models": weighted, "parameters": {"lambda": 0.5}}, "tasks"))
    # a base_model not among the models joins them where the method has no base (mergekit does the same)
    with_base = load_state_dict(run_merge(tmp_path, {"merge_method": "linear", "base_model": str(models["base"]),
                                                     "models": weighted}, "with_base"))
    for name in ("transformer.h.1.mlp.proj.weight", "transformer.h.0.attn.qkv.weight", "transformer.wte.weight"):
        assert torch.allclose(merged[name], linear([a[name], b[name]], [0.6, 0.4]), atol=1e-6)
        assert torch.allclose(with_base[name], linear([a[name], b[name], base[name]], [0.6, 0.4, 1.0]), atol=1e-6)
        assert torch.allclose(tasks[name], task_arithmetic(base[name], [a[name], b[name]], [0.6, 0.4], lambda_=0.5),
                              atol=1e-6)


def test_passthrough_self_merge_repeats_layers_loads_and_generates(models, tmp_path):
    spec = {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": str(models["a"]), "layer_range": [0, 2]}]},
                       {"sources": [{"model": str(models["a"]), "layer_range": [1, 3]}]}]}
    out = run_merge(tmp_path, spec)
    config = Config.from_checkpoint(out)
    assert config.n_layer == 4 and config.name == "merged"
    merged = GPT.from_checkpoint(out)
    source = GPT.from_checkpoint(models["a"])
    # the same function as running the source's blocks 0, 1, 1, 2
    stacked = GPT(config).eval()
    stacked.load_state_dict(merged.state_dict())
    stacked.transformer.h = torch.nn.ModuleList([source.transformer.h[i] for i in (0, 1, 1, 2)])
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(idx), stacked(idx), atol=1e-5)
    tokens = list(generate(merged, idx[0], max_new_tokens=5, temperature=0))
    assert len(tokens) == 5 and all(0 <= t < 64 for t in tokens)


def cli_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(merge_script.merge_models, args)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("change, message", [
    (lambda s, m: dict(s, merge_method="frankenstein"), "merge_method 'frankenstein' is not one of linear, slerp"),
    (lambda s, m: dict(s, models=[*s["models"], {"model": str(m["wide"])}]),
     "has another architecture than .*n_embd: 16 vs 32"),
    (lambda s, m: dict(s, models=[*s["models"], {"model": "nowhere/missing"}]), "model 'nowhere/missing' not found"),
    (lambda s, m: dict(s, models=[*s["models"], {"model": str(m["run"])}]),
     "is a fine-tuning run, not a checkpoint; merge it into one first with `python scripts/merge_lora.py"),
    (lambda s, m: {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(m["a"]), "layer_range": [1, 4]}]}]},
     r"slices\[0\].sources\[0\].layer_range \[1, 4\] is out of bounds: model .* has 3 layers"),
    (lambda s, m: dict(s, parameters={"t": 0.5}), r"parameters.t: ties has no such parameter"),
    (lambda s, m: dict(s, models=[{"model": str(m["a"]), "density": 0.5}]), r"models\[0\]: unknown key 'density'"),
    (lambda s, m: dict(s, tokenizer_source="union"), "tokenizer_source: union is not supported"),
    (lambda s, m: dict(s, merge_method="della", models=[{"model": str(m["a"]), "parameters": {"density": 0.1}}]),
     r"della needs density \+/- epsilon in \(0, 1\), got density 0.1 and epsilon 0.15"),
    (lambda s, m: dict(s, merge_method="nearswap", models=[{"model": str(m["a"])}]), "nearswap needs the parameter `t`"),
    (lambda s, m: dict(s, merge_method="model_stock", models=[{"model": str(m["a"])}]), "model_stock needs at least 2 models besides base_model"),
    (lambda s, m: {k: v for k, v in s.items() if k != "base_model"}, "ties needs `base_model`"),
    (lambda s, m: dict(s, models=[{"model": str(m["a"]), "parameters": {"density": 1.5}}]), "density must be in"),
])
def test_bad_configs_fail_with_one_error_line_and_no_output(change, message, models, tmp_path, capsys):
    all_models = dict(models, wide=models["a"].parent / "wide", run=models["a"].parent / "lora-run")
    if not all_models["wide"].exists():
        make_checkpoint(all_models["wide"], 9, n_embd=32)
        all_models["run"].mkdir()
        (all_models["run"] / "hparams.yaml").write_text("lora_r: 8\n")
    good = {"merge_method": "ties", "base_model": str(models["base"]),
            "models": [{"model": str(models["a"]), "parameters": {"density": 0.5}}]}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(change(good, all_models)))
    error = cli_error(capsys, ["--config", str(config), "--out_dir", str(tmp_path / "out")])
    assert re.search(message, error), error
    assert list(tmp_path.iterdir()) == [config]  # no output, no temporary directory


def test_shape_mismatch_names_the_tensor_and_leaves_nothing(models, tmp_path, capsys):
    # same config, but a checkpoint whose tensor was tampered with: caught before anything is written
    odd = tmp_path / "odd"
    make_checkpoint(odd, 5)
    state = load_state_dict(odd)
    state["transformer.h.1.attn.proj.weight"] = torch.zeros(16, 8)
    save_sharded(iter(state.items()), odd)
    config = tmp_path / "odd.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(models["a"])}, {"model": str(odd)}]}))
    error = cli_error(capsys, ["--config", str(config), "--out_dir", str(tmp_path / "out")])
    assert "transformer.h.1.attn.proj.weight" in error and "[16, 16]" in error and "[16, 8]" in error
    assert not (tmp_path / "out").exists()


MEMORY_PROBE = """
import sys, yaml
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.conftest import load_script
merge = load_script("scripts/merge_models.py")
spec = yaml.safe_load(open(sys.argv[1]))
def status_kb(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])
# a first merge loads whatever torch loads lazily; then the peak is reset and the second merge measured alone
merge.merge_models(out_dir=Path(sys.argv[2] + "-warmup"), shard_size_mb=8, **spec)
open("/proc/self/clear_refs", "w").write("5")
before = status_kb("VmRSS")
merge.merge_models(out_dir=Path(sys.argv[2]), shard_size_mb=8, **spec)
print("GROWTH_KB", status_kb("VmHWM") - before)
"""


def test_streamed_merge_peaks_well_below_the_models_size(tmp_path):
    big = dict(n_layer=12, n_embd=256, n_head=4, intermediate_size=1024, vocab_size=512)
    a, b = make_checkpoint(tmp_path / "a", 0, **big), make_checkpoint(tmp_path / "b", 1, **big)
    both_kb = sum((d / "lit_model.safetensors").stat().st_size for d in (a, b)) // 1024
    config = tmp_path / "linear.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]}))
    probe = tmp_path / "probe.py"
    probe.write_text(MEMORY_PROBE.format(root=str(ROOT)))
    result = subprocess.run([sys.executable, str(probe), str(config), str(tmp_path / "out")], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    growth_kb = int(result.stdout.split("GROWTH_KB")[1])
    # loading both would need both_kb (88 MB); streaming needs an 8 MB shard plus a few tensors (measured: 10 MB)
    assert growth_kb < 0.25 * both_kb, (growth_kb, both_kb)
    merged = load_state_dict(tmp_path / "out")
    name = "transformer.h.5.mlp.fc_2.weight"
    assert torch.allclose(merged[name], (load_state_dict(a)[name] + load_state_dict(b)[name]) / 2)
