"""examples/efficiency_challenge/: every config file loads into the script it is written for (known keys, valid
values), and the dry run calls each script with its config."""

import ast
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, load_script
from jsonargparse import ActionConfigFile, ArgumentParser

CONFIGS = ROOT / "examples" / "efficiency_challenge"
# config -> (script, the function run_cli runs, required flags the config leaves to the command line)
USES = {
    "curate.yaml": ("scripts/curate.py", "curate", ["--data_file", "x.jsonl", "--out_file", "y.jsonl"]),
    "prepare.yaml": ("scripts/prepare_json.py", "prepare_json", ["--data_file", "x.jsonl"]),
    "lora_a100_40gb.yaml": ("finetune/lora.py", "setup", []),
    "qlora_4090_24gb.yaml": ("finetune/lora.py", "setup", []),
    "eval.yaml": ("eval/lm_eval_harness.py", "main", []),
}


def test_every_config_is_covered():
    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == sorted(USES)


def cli_function(script: str):
    """The function a script hands to run_cli, read from its source (the name in `run_cli(name)`)."""
    tree = ast.parse((ROOT / script).read_text(encoding="utf-8"))
    calls = [node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "run_cli"]
    return calls[-1].args[0].id, {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("name", sorted(USES))
def test_config_keys_are_flags_of_its_script(name):
    script, function, _ = USES[name]
    run, functions = cli_function(script)
    assert run == function
    flags = {arg.arg for arg in functions[function].args.args}
    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config and set(config) <= flags, set(config) - flags


@pytest.mark.parametrize("name", [n for n in sorted(USES) if not USES[n][0].startswith("eval/")])
def test_config_values_parse_with_the_scripts_own_types(name):
    """jsonargparse checks each value against the signature (Literal choices, paths, numbers), as run_cli would.
    (The eval scripts are left to the key check above: importing one needs lm_eval's task registry.)"""
    script, function, required = USES[name]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(getattr(load_script(script), function), as_positional=False)
    parsed = parser.parse_args(["--config", str(CONFIGS / name), *required])
    config = yaml.safe_load((CONFIGS / name).read_text())
    for key, value in config.items():
        got = parsed[key]
        assert (str(got) if isinstance(got, Path) else got) == value, key


def test_dry_run_uses_every_config():
    dry_run = (CONFIGS / "dry_run.sh").read_text()
    for name in USES:
        assert f"$CONFIGS/{name}" in dry_run, name
    readme = (CONFIGS / "README.md").read_text()
    assert all(name in readme for name in USES)
