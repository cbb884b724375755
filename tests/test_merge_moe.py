"""scripts/merge_moe.py on tiny random SmolLM2-shaped checkpoints with the real tokenizer: identical experts give
the dense model, `hidden` routers separate the experts' prompts, the export is a transformers Mixtral with our
logits, and bad configs fail cleanly."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import load_script
from safetensors.torch import load_file as load_state_dict_file

from model import GPT, Config
from model.cli import run_cli
from model.weights.checkpoint import load_state_dict, save_sharded

moe_script = load_script("scripts/merge_moe.py")
TINY = dict(name="tiny", vocab_size=49152, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=48,
            block_size=256, tie_embeddings=True, rope_base=100000.0)
NUMBER_PROMPTS = ["12 + 45 = 57", "Count: 3, 7, 19, 240", "The total is 1984 and 2001", "99 88 77 66 55"]
SHOUT_PROMPTS = ["WRITE THIS IN CAPITALS PLEASE", "THE QUICK BROWN FOX", "HELLO WORLD AGAIN", "UPPER CASE ONLY"]


def make_checkpoint(directory: Path, seed: int, tokenizer_dir: Path, **overrides) -> Path:
    torch.manual_seed(seed)
    model = GPT(Config(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name or "ln_f" in name else 0.0, 0.2)
    directory.mkdir(parents=True)
    save_sharded(((k, v) for k, v in model.state_dict().items() if k != "lm_head.weight"), directory)
    model.config.save(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_style.yaml"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-models")
    made = {"base": make_checkpoint(root / "base", 0, smollm2_dir)}
    base = load_state_dict(made["base"])
    for seed, name in enumerate(("numbers", "shout"), start=1):
        # fine-tunes: the base with their own changes to every MLP
        torch.manual_seed(seed)
        tuned = {k: v + 0.05 * torch.randn_like(v) if ".mlp." in k else v for k, v in base.items()}
        made[name] = root / name
        shutil.copytree(made["base"], made[name])
        save_sharded(iter(tuned.items()), made[name])
    made["wide"] = make_checkpoint(root / "wide", 5, smollm2_dir, intermediate_size=64)
    return made


def expert(model: Path, positive: list[str], negative: list[str] | None = None) -> dict:
    return {"source_model": str(model), "positive_prompts": positive, **({"negative_prompts": negative} if negative else {})}


def build(tmp_path: Path, name: str = "moe", **spec) -> tuple[Path, dict]:
    """Build as `--config` does (the YAML's keys are the script's flags); return the out_dir and routing.json."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(spec))
    out_dir = tmp_path / name
    run_cli(moe_script.merge_moe, ["--config", str(config), "--out_dir", str(out_dir)])
    routing = out_dir / "routing.json"
    return out_dir, json.loads(routing.read_text()) if routing.is_file() else {}


def test_experts_equal_to_the_base_give_the_dense_models_logits(models, tmp_path):
    out, _ = build(tmp_path, base_model=str(models["base"]), experts_per_token=2, experts=[
        expert(models["base"], NUMBER_PROMPTS), expert(models["base"], SHOUT_PROMPTS), expert(models["base"], ["x y z"])])
    config = Config.from_checkpoint(out)
    assert (config.mlp_class_name, config.n_expert, config.n_expert_per_token, config.hf_architecture) == \
        ("LLaMAMoE", 3, 2, "MixtralForCausalLM")
    assert all((out / name).is_file() for name in ("tokenizer.json", "prompt_style.yaml", "moe_config.yaml", "routing.png"))
    moe, dense = GPT.from_checkpoint(out), GPT.from_checkpoint(models["base"])
    idx = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(moe(idx), dense(idx), atol=1e-5)
    gate = moe.transformer.h[1].mlp.gate.weight
    assert torch.allclose(gate.norm(dim=-1), torch.ones(3), atol=1e-5)  # unit rows


def test_hidden_routers_send_each_experts_prompts_to_it(models, tmp_path, capsys):
    spec = dict(base_model=str(models["base"]), gate_mode="hidden",
                experts=[expert(models["numbers"], NUMBER_PROMPTS), expert(models["shout"], SHOUT_PROMPTS)])
    _, routing = build(tmp_path, **spec)
    assert routing["separated_layers"] == 2 and routing["threshold"] == 0.75
    for layer in routing["layers"]:
        # at least 3 of each expert's 4 prompts go to it, in every layer
        assert all(share >= 0.75 for share in layer["own_share"])
        assert [sum(row) for row in layer["routed_to"]] == [4, 4]
    printed = capsys.readouterr().out
    assert "2 of 2 layers separate every expert's prompts" in printed and "warning" not in printed

    # the same prompts for both experts: nothing to tell them apart, and the script says so
    same = dict(spec, experts=[expert(models["numbers"], NUMBER_PROMPTS), expert(models["shout"], NUMBER_PROMPTS)])
    _, routing = build(tmp_path, "same", **same)
    assert routing["separated_layers"] == 0
    assert re.search(r"warning: layer 0: the router cannot separate", capsys.readouterr().out)


def test_moe_exports_to_transformers_mixtral_with_our_logits(models, tmp_path):
    out, _ = build(tmp_path, base_model=str(models["base"]), experts_per_token=1, gate_mode="cheap_embed", experts=[
        expert(models["numbers"], NUMBER_PROMPTS), expert(models["shout"], SHOUT_PROMPTS, negative=NUMBER_PROMPTS)])
    hf_dir = tmp_path / "hf"
    load_script("scripts/convert_to_hf.py").convert_to_hf(checkpoint_dir=out, out_dir=hf_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf_model).__name__ == "MixtralForCausalLM"
    ours = GPT.from_checkpoint(out)
    idx = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf_model(idx).logits - ours(idx)).abs().max() <= 1e-4


@pytest.mark.parametrize("change, message", [
    (lambda s, m: dict(s, experts=[*s["experts"], expert(m["wide"], ["a"])]),
     r"experts\[2\] .*wide.* has another architecture than base_model .*intermediate_size: 48 vs 64"),
    (lambda s, m: dict(s, experts_per_token=3), "experts_per_token=3 must be between 1 and the number of experts"),
    (lambda s, m: dict(s, experts=[s["experts"][0], {"source_model": str(m["shout"])}]),
     r"experts\[1\]: give positive_prompts"),
    (lambda s, m: dict(s, experts=[s["experts"][0], expert(Path("no/such/model"), ["a"])]),
     r"experts\[1\]: source_model 'no/such/model' not found"),
    (lambda s, m: dict(s, gate_mode="learned"), "gate_mode 'learned' is not one of hidden, cheap_embed, random"),
])
def test_bad_moe_configs_fail_with_one_error_line_and_no_output(change, message, models, tmp_path, capsys):
    good = dict(base_model=str(models["base"]),
                experts=[expert(models["numbers"], NUMBER_PROMPTS), expert(models["shout"], SHOUT_PROMPTS)])
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(change(good, models)))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(moe_script.merge_moe, ["--config", str(config), "--out_dir", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 1 and "Traceback" not in stderr and len(errors) == 1, stderr
    assert re.search(message, errors[0]), errors[0]
    assert list(tmp_path.iterdir()) == [config]


def test_lora_router_trains_the_routers_only_and_merges_into_the_moe(models, tmp_path):
    moe, _ = build(tmp_path, base_model=str(models["base"]), gate_mode="random", diagnose=False,
                   experts=[expert(models["numbers"], NUMBER_PROMPTS), expert(models["shout"], SHOUT_PROMPTS)])
    data_dir = tmp_path / "data"
    load_script("scripts/prepare_tasks.py").prepare_tasks(checkpoint_dir=moe, out_dir=data_dir, num_train=16,
                                                          num_test=4)
    lora = load_script("finetune/lora.py")
    run = tmp_path / "run"
    lora.setup(checkpoint_dir=moe, data_dir=data_dir, out_dir=run, lora_router=True, lora_query=False,
               lora_value=False, max_steps=3, micro_batch_size=4, global_batch_size=4, learning_rate=0.05,
               warmup_steps=1, eval_interval=1000, eval_iters=1)
    adapter = load_state_dict_file(run / "final" / "lora.safetensors")
    assert sorted(adapter) == ["transformer.h.0.mlp.gate.weight", "transformer.h.1.mlp.gate.weight"]
    before = load_state_dict(moe)
    assert not torch.allclose(adapter["transformer.h.0.mlp.gate.weight"], before["transformer.h.0.mlp.gate.weight"])

    merged_dir = tmp_path / "merged"
    load_script("scripts/merge_lora.py").merge(checkpoint_dir=run, out_dir=merged_dir)
    merged = load_state_dict(merged_dir)
    for name, tensor in before.items():
        expected = adapter.get(name, tensor)
        assert torch.equal(merged[name], expected), name
