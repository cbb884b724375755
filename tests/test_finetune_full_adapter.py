"""LLaMA-Adapter v1/v2 (model/adapter.py) and the full, adapter and adapter_v2 fine-tuning scripts: exact at init,
the KV cache changes nothing, exactly the intended parameters train, the loss falls, resume is bitwise exact, and a
full fine-tune's final/ is a checkpoint that the generation scripts read."""

import copy
import csv
import math
import re
import shutil

import pytest
import torch
from conftest import load_script
from hf_models import save_tiny_model
from safetensors.torch import load_file

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
from model.cli import run_cli
from model.data.sft import encode_example, save_dataset
from model.generate import generate
from model.lora import count_parameters
from model.prompts import load_prompt_style
from model.tokenizer import Tokenizer
from model.training.run import latest_checkpoint
from model.weights.convert import convert_hf_checkpoint
from model.weights.load import load_adapter_run

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


# ------------------------------------------------------------------------------------------------ the scripts

WORDS = ["apple", "violet", "engine", "planet", "ribbon", "marble", "saddle", "tunnel"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A tiny random 3-block SmolLM2 (tied embeddings, multi-query attention) with the real tokenizer and prompt
    style, beside a prepared data set of 8 samples to overfit: 'Repeat the word: X' -> 'X'. Its weights are drawn
    25 times larger than usual (std 0.5), so that its logits span the range a trained model's do: with std 0.02, no
    hidden state of size 48 moves a logit by more than ~1, and a frozen-base adapter could barely lower the loss."""
    root = tmp_path_factory.mktemp("finetune")
    checkpoint_dir = root / "org" / "tiny-smollm2"
    save_tiny_model("smollm2", checkpoint_dir, vocab_size=49152, num_hidden_layers=3, initializer_range=0.5)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_style.yaml"):
        shutil.copy(smollm2_dir / name, checkpoint_dir / name)
    convert_hf_checkpoint(checkpoint_dir)
    tokenizer, style = Tokenizer(checkpoint_dir), load_prompt_style(checkpoint_dir)
    samples = [encode_example(tokenizer, style, f"Repeat the word: {word}", word) for word in WORDS]
    (root / "data").mkdir()
    save_dataset(samples, root / "data" / "train.pt")
    save_dataset(samples[:2], root / "data" / "test.pt")
    return checkpoint_dir


# "adapter_v2" is finetune/adapter.py with --adapter_version 2
SCRIPT_FLAGS = {"adapter_v2": ["--adapter_version", "2"]}


def load_finetune_script(script: str):
    return load_script(f"finetune/{'adapter' if script == 'adapter_v2' else script}.py")


def finetune(script: str, checkpoint_dir, out_dir, *args: str, data_dir=None, module=None) -> list[float]:
    """Run a fine-tuning script in-process through its CLI (one optimizer step = one epoch of the 8 samples);
    the training losses from metrics.csv. `module`: the script already loaded (and patched)."""
    module = module or load_finetune_script(script)
    run_cli(module.setup, [*SCRIPT_FLAGS.get(script, []),
        "--checkpoint_dir", str(checkpoint_dir), "--data_dir", str(data_dir or checkpoint_dir.parent.parent / "data"),
        "--out_dir", str(out_dir), "--micro_batch_size", "4", "--global_batch_size", "8", "--eval_interval", "1000",
        "--eval_iters", "1", "--warmup_steps", "2", *args,
    ])
    with open(out_dir / "metrics.csv", newline="") as fp:
        return [float(row["loss"]) for row in csv.DictReader(fp) if row["loss"]]


# v1 only adds to the attention output through gates that start at zero: it needs more steps and a higher rate
OVERFIT = {
    "full": ["--max_steps", "30", "--learning_rate", "1e-2"],
    "adapter": ["--max_steps", "60", "--learning_rate", "0.1", "--adapter_start_layer", "0"],
    "adapter_v2": ["--max_steps", "30", "--learning_rate", "5e-2", "--adapter_start_layer", "1"],
}


@pytest.fixture(scope="module")
def overfit_run(tiny_dir, tmp_path_factory):
    """script -> (out_dir, losses) of its overfitting run, each run once for the tests that look at it."""
    runs = {}

    def run(script: str):
        if script not in runs:
            out_dir = tmp_path_factory.mktemp(script)
            runs[script] = out_dir, finetune(script, tiny_dir, out_dir, *OVERFIT[script])
        return runs[script]

    return run


@pytest.mark.parametrize("script", list(OVERFIT))
def test_training_loss_falls(script, overfit_run):
    out_dir, losses = overfit_run(script)
    print(f"{script}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == int(OVERFIT[script][1])
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
    if script != "full":  # the adapter is saved with its settings, in final/ and with every checkpoint
        for run_dir in (out_dir / "final", out_dir / f"step-{len(losses):06d}"):
            adapter_config, state_dict = load_adapter_run(run_dir)
            assert adapter_config.version == (2 if script == "adapter_v2" else 1)
            assert adapter_config.start_layer == int(OVERFIT[script][-1])
            assert any(key.endswith(".adapter_gate") and tensor.abs().max() > 0 for key, tensor in state_dict.items())


def test_full_fine_tune_final_is_a_checkpoint(overfit_run, tiny_dir, capsys):
    out_dir, losses = overfit_run("full")
    final = out_dir / "final"
    for name in ("lit_model.safetensors", "model_config.yaml", "tokenizer.json", "prompt_style.yaml", "hparams.yaml"):
        assert (final / name).is_file(), name
    assert sorted(p.name for p in (out_dir / "step-000030").iterdir()) == ["hparams.yaml", "training_state.pt"]
    # the tied head is saved once, as the converter does, and the optimizer saw the shared weight once
    assert "lm_head.weight" not in load_file(final / "lit_model.safetensors")
    model = GPT.from_checkpoint(final)
    assert model.config.tie_embeddings and model.lm_head.weight is model.transformer.wte.weight
    training_state = torch.load(out_dir / "step-000030" / "training_state.pt", weights_only=True)
    assert len(training_state["optimizer"]["param_groups"][0]["params"]) == len(list(model.parameters()))

    # final/ holds the trained weights: its loss on the training set is the trained model's
    next_token_loss = load_script("finetune/full.py").next_token_loss
    batch = load_script("finetune/full.py").get_collate_fn()(torch.load(tiny_dir.parent.parent / "data" / "train.pt", weights_only=True))
    with torch.no_grad():
        assert next_token_loss(model, batch["input_ids"], batch["labels"]) < 0.5 * losses[0]

    # generate/base.py reads the run's out_dir like its final/
    args = ["--prompt", "Repeat the word: apple", "--max_new_tokens", "8", "--temperature", "0"]
    run_cli(load_script("generate/base.py").main, ["--checkpoint_dir", str(out_dir), *args])
    from_run = capsys.readouterr().out
    run_cli(load_script("generate/base.py").main, ["--checkpoint_dir", str(final), *args])
    assert capsys.readouterr().out == from_run and from_run.strip()

    with pytest.raises(SystemExit):
        run_cli(load_script("generate/base.py").main, ["--checkpoint_dir", str(out_dir / "step-000030")])
    assert "training state for --resume only" in capsys.readouterr().err


def test_generate_adapter_uses_the_run(overfit_run, tiny_dir, capsys):
    """generate/base.py finds the base, the version and the adapter's shape in an adapter run's hparams.yaml."""
    out_dir, _ = overfit_run("adapter_v2")
    prompt = "Repeat the word: apple"
    run_cli(load_script("generate/base.py").main,
            ["--checkpoint_dir", str(out_dir), "--prompt", prompt, "--max_new_tokens", "8", "--temperature", "0"])
    captured = capsys.readouterr()
    assert "Loaded the adapter run" in captured.err

    adapter_config, state_dict = load_adapter_run(out_dir / "final")
    model = inject_adapter(GPT.from_checkpoint(tiny_dir), adapter_config)
    load_adapter_state_dict(model, state_dict)
    tokenizer = Tokenizer(tiny_dir)
    prompt_ids = tokenizer.encode(load_prompt_style(tiny_dir).apply(prompt))
    expected = [t for t in generate(model, prompt_ids, 8, temperature=0.0, stop_ids=tokenizer.stop_ids)
                if t not in tokenizer.stop_ids]
    assert captured.out.strip() == tokenizer.decode(expected).strip()


@pytest.mark.parametrize("script", ["full", "adapter", "adapter_v2"])
def test_resume_is_bitwise_exact(script, tiny_dir, tmp_path):
    """6 steps (6 epochs) straight through == 3 steps, then a fresh start resumed from the step-3 checkpoint."""
    args = ["--max_steps", "6", "--save_interval", "3", "--learning_rate", OVERFIT[script][3]]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    losses = finetune(script, tiny_dir, straight, *args)
    resumed.mkdir()
    shutil.copytree(straight / "step-000003", resumed / "step-000003")
    shutil.copy(straight / "metrics.csv", resumed / "metrics.csv")
    shutil.copy(straight / "hparams.yaml", resumed / "hparams.yaml")  # --resume checks the flags against it
    assert finetune(script, tiny_dir, resumed, *args, "--resume", "true") == losses
    weights = "lit_model.safetensors" if script == "full" else "adapter.safetensors"
    assert (straight / "final" / weights).read_bytes() == (resumed / "final" / weights).read_bytes()


@pytest.mark.parametrize("script, args, message", [
    ("full", ["--quantize", "bnb.nf4"], "quantization freezes the base; use finetune/lora.py --quantize for QLoRA"),
    ("full", ["--max_steps", "1"], "prepare_tasks.py"),
    ("adapter", ["--max_steps", "1"], "prepare_tasks.py"),
    ("adapter_v2", ["--adapter_start_layer", "3"], "the model has 3 blocks"),
    ("full", ["--global_batch_size", "16"], "train.pt has 8 samples: too few for one optimizer step of"
                                            " --global_batch_size 16 on 1 device(s)"),
    ("adapter", ["--global_batch_size", "16"], "train.pt has 8 samples: too few for one optimizer step"),
    ("adapter_v2", ["--max_seq_length", "5"], "--max_seq_length 5 cuts off the answer of every sample in"),
    ("adapter", ["--quantize", "bnb.nf5"], "Unknown quantize mode 'bnb.nf5'; choose one of bnb.nf4, "),
])
def test_bad_input_is_one_clear_error(script, args, message, tiny_dir, tmp_path, capsys):
    data_dir = tmp_path / "no-data" if message == "prepare_tasks.py" else None
    with pytest.raises(SystemExit) as exit_info:
        finetune(script, tiny_dir, tmp_path / "out", *args, data_dir=data_dir)
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert message in stderr
    assert len([line for line in stderr.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["full", "adapter", "adapter_v2"])
def test_samples_cut_before_their_answer_are_skipped_not_a_nan_loss(script, tiny_dir, tmp_path, capsys):
    """Half the samples get a prompt too long to leave an answer token within --max_seq_length; one sample per
    micro-batch, so that a cut sample would be a micro-batch without a single target (a NaN loss)."""
    tokenizer, style = Tokenizer(tiny_dir), load_prompt_style(tiny_dir)
    preamble = "Read all of this long preamble first, then do as it says at its very end. " * 2
    samples = [encode_example(tokenizer, style, f"{preamble if i % 2 else ''}Repeat the word: {word}", word)
               for i, word in enumerate(WORDS)]
    first_answer_token = [int((s["labels"] != -100).nonzero()[0]) for s in samples]
    max_seq_length = max(first_answer_token[0::2]) + 1
    assert min(first_answer_token[1::2]) >= max_seq_length
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    save_dataset(samples, data_dir / "train.pt")
    save_dataset(samples[:2], data_dir / "test.pt")
    losses = finetune(script, tiny_dir, tmp_path / "out", "--max_steps", "4", "--micro_batch_size", "1",
                      "--global_batch_size", "1", "--max_seq_length", str(max_seq_length), "--learning_rate",
                      OVERFIT[script][3], data_dir=data_dir)
    stderr = capsys.readouterr().err
    assert f"Skipping 4 of 8 samples of {data_dir / 'train.pt'}" in stderr
    assert f"Skipping 1 of 2 samples of {data_dir / 'test.pt'}" in stderr
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose backward makes every gradient infinite: a finite loss with exploding gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


@pytest.mark.parametrize("script", ["full", "adapter", "adapter_v2"])
def test_infinite_gradient_stops_and_keeps_the_last_good_checkpoint(script, tiny_dir, tmp_path, capsys):
    """A finite loss whose gradients are infinite at step 3: the run stops before the optimizer step, with the
    checkpoints of steps 1 and 2 whole and finite."""
    module = load_finetune_script(script)
    next_token_loss, calls = module.next_token_loss, []

    def breaks_at_step_3(model, input_ids, labels, segment_ids=None):
        loss = next_token_loss(model, input_ids, labels, segment_ids)
        if torch.is_grad_enabled():
            calls.append(None)
            if len(calls) == 5:  # two micro-batches a step: the first of step 3
                return InfiniteGradient.apply(loss)
        return loss

    module.next_token_loss = breaks_at_step_3
    with pytest.raises(SystemExit) as exit_info:
        finetune(script, tiny_dir, tmp_path, "--max_steps", "6", "--save_interval", "1", "--learning_rate",
                 OVERFIT[script][3], module=module)
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert re.search(r"error: The gradient norm became (nan|inf) at step 3; .* Lower --learning_rate", stderr), stderr
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000001", "step-000002"]
    assert not (tmp_path / "final").exists()
    state = torch.load(tmp_path / "step-000002" / "training_state.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    if script != "full":
        adapter = load_file(tmp_path / "step-000002" / "adapter.safetensors")
        assert all(torch.equal(state["model"][key], adapter[key]) for key in adapter)


@pytest.mark.parametrize("script, function, crash_at", [("full", "save_hparams", 2), ("adapter", "save_adapter", 2)])
def test_a_crash_while_saving_leaves_no_incomplete_step_dir(script, function, crash_at, tiny_dir, tmp_path):
    """Killed between the training state and the file saved beside it (full: hparams.yaml; adapters: the adapter):
    the step directory is not there, and the previous one is the latest."""
    module = load_finetune_script(script)
    save, saves = getattr(module, function), []

    def crash(*args):
        saves.append(None)
        if len(saves) == crash_at:
            raise KeyboardInterrupt
        save(*args)

    setattr(module, function, crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(script, tiny_dir, tmp_path, "--max_steps", "3", "--save_interval", "1", module=module)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    expected = ["hparams.yaml", "training_state.pt"] if script == "full" else [
        "adapter.safetensors", "hparams.yaml", "training_state.pt"]
    for step_dir in tmp_path.glob("step-*"):
        assert sorted(p.name for p in step_dir.iterdir()) == expected


@pytest.mark.real_model
def test_real_model_adapter_v2_smoke(smollm2_dir, tiny_dir, tmp_path):
    """Two steps of adapter v2 (the superset of v1) on SmolLM2-135M-Instruct, with its default learning rate and
    start layer; the tiny data set is in its tokenizer. (Full fine-tuning of the real model is left out: on a CPU its
    1.6 GB of training state takes a minute.)"""
    losses = finetune("adapter_v2", smollm2_dir, tmp_path, "--max_steps", "2", data_dir=tiny_dir.parent.parent / "data")
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    adapter_config, state_dict = load_adapter_run(tmp_path / "final")
    assert adapter_config == AdapterConfig(prompt_length=10, start_layer=2, version=2)
    model = inject_adapter(GPT.from_checkpoint(smollm2_dir), adapter_config)
    load_adapter_state_dict(model, state_dict)


@pytest.mark.real_model
@pytest.mark.parametrize("script", ["full", "adapter"])
def test_real_model_one_step(script, smollm2_dir, tiny_dir, tmp_path):
    """One optimizer step of full fine-tuning and of adapter v1 on SmolLM2-135M-Instruct: finite loss, and the
    saved result is usable (full: a checkpoint whose weights moved; adapter: an adapter that loads)."""
    losses = finetune(script, smollm2_dir, tmp_path, "--max_steps", "1", data_dir=tiny_dir.parent.parent / "data")
    assert len(losses) == 1 and math.isfinite(losses[0])
    if script == "full":
        tuned = GPT.from_checkpoint(tmp_path / "final").state_dict()
        base = GPT.from_checkpoint(smollm2_dir).state_dict()
        assert not torch.equal(tuned["transformer.h.0.attn.qkv.weight"], base["transformer.h.0.attn.qkv.weight"])
    else:
        adapter_config, state_dict = load_adapter_run(tmp_path / "final")
        model = inject_adapter(GPT.from_checkpoint(smollm2_dir), adapter_config)
        load_adapter_state_dict(model, state_dict)
