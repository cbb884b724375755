import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_script
from hf_models import VOCAB, save_tiny_model

from model import GPT, Config
from model.cli import run_cli
from model.generate import generate, sample, until_stop
from model.weights.convert import convert_hf_checkpoint


def greedy_without_cache(model: GPT, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt.tolist()
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[prompt.numel():]


@pytest.mark.parametrize("family", ["llama3.1-scaled-rope", "mistral-sliding-window", "mixtral", "phi-2",
                                    "phi-3-128k-longrope", "falcon-40b"])
def test_kv_cache_gives_the_same_tokens_as_recomputing(family, tmp_path):
    checkpoint_dir = tmp_path / "org" / f"tiny-{family}"
    save_tiny_model(family, checkpoint_dir)
    convert_hf_checkpoint(checkpoint_dir)
    model = GPT.from_checkpoint(checkpoint_dir)
    # the prompt plus generation runs past the sliding window and, for LongRoPE, past the original context
    prompt = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(0))
    n = 30
    cached = list(generate(model, prompt, n, temperature=0.0))
    assert cached == greedy_without_cache(model, prompt, n)
    assert all(block.attn.kv_cache is None for block in model.transformer.h), "the cache is freed after generating"


def test_generate_stops_at_stop_ids_and_checks_the_context():
    torch.manual_seed(0)
    model = GPT(Config(name="t", vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, intermediate_size=32, block_size=32)).eval()
    prompt = torch.tensor([1, 2, 3])
    tokens = list(generate(model, prompt, 10, temperature=0.0))
    first = tokens[0]
    assert list(generate(model, prompt, 10, temperature=0.0, stop_ids={first})) == [first]
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        list(generate(model, prompt, 30))


def test_sample():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample(logits, temperature=0.0).item() == 1
    assert sample(logits, temperature=1.0, top_k=1).item() == 1
    assert sample(logits, temperature=1.0, top_p=0.01).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    # top_p=0.7: token 1 (p~.46) and token 3 (p~.42) reach 0.7; tokens 0 and 2 never appear
    draws = {sample(logits, temperature=1.0, top_p=0.7, generator=g).item() for _ in range(300)}
    assert draws == {1, 3}


def test_until_stop_holds_back_partial_markers():
    pieces = ["Hello", " world", "\nUs", "er: more"]
    assert "".join(until_stop(pieces, ["\nUser:"])) == "Hello world"
    assert "".join(until_stop(["a\nU", "nknown"], ["\nUser:"])) == "a\nUnknown"
    assert list(until_stop(["a", "b"], [])) == ["a", "b"]


def run(script, *args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          input=stdin, timeout=300)


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory, smollm2_dir):
    """A tiny random model that uses the real SmolLM2 tokenizer and prompt style."""
    import shutil

    checkpoint_dir = tmp_path_factory.mktemp("tiny") / "org" / "tiny-smollm2"
    save_tiny_model("smollm2", checkpoint_dir, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_style.yaml"):
        shutil.copy(smollm2_dir / name, checkpoint_dir / name)
    convert_hf_checkpoint(checkpoint_dir)
    return checkpoint_dir


@pytest.mark.parametrize("quantize", [None, "bnb.nf4"])
def test_generate_script_on_tiny_model(tiny_chat_dir, quantize):
    args = ["--checkpoint_dir", str(tiny_chat_dir), "--prompt", "hi", "--max_new_tokens", "5", "--temperature", "0"]
    result = run("generate/base.py", *args, *(["--quantize", quantize] if quantize else []))
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr and "Memory used" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantize", "bnb.nf5"], "bnb.nf4"),
        (["--precision", "64-true"], "precision"),
        (["--max_new_tokens", "100000"], "exceeds the model's context"),
        (["--prompt_style", "nope"], "nope"),
        (["--top_p", "0"], "top_p"),
    ],
)
def test_generate_bad_input(tiny_chat_dir, args, message):
    result = run("generate/base.py", "--checkpoint_dir", str(tiny_chat_dir), *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_missing_checkpoint(tmp_path):
    result = run("generate/base.py", "--checkpoint_dir", str(tmp_path / "nothing"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "download.py" in result.stderr or "convert" in result.stderr


def test_generate_and_chat_on_a_lora_run_equal_its_merge(tiny_lora_run, tmp_path, capsys, monkeypatch):
    """generate/base.py and generate/chat.py take a LoRA run as --checkpoint_dir and answer as the checkpoint that
    scripts/merge_lora.py makes of it."""
    merged = tmp_path / "merged"
    run_cli(load_script("scripts/merge_lora.py").merge, ["--checkpoint_dir", str(tiny_lora_run), "--out_dir",
                                                         str(merged)])
    capsys.readouterr()
    args = ["--prompt", "hi", "--max_new_tokens", "6", "--temperature", "0", "--device", "cpu"]
    replies = {}
    for name, path in (("run", tiny_lora_run), ("merged", merged)):
        run_cli(load_script("generate/base.py").main, ["--checkpoint_dir", str(path), *args])
        replies[name] = capsys.readouterr()
        lines = iter(["hi", "!exit"])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
        run_cli(load_script("generate/chat.py").chat, ["--checkpoint_dir", str(path), *args[2:]])
        replies[f"chat-{name}"] = capsys.readouterr().out
    assert "Loaded the LoRA/DoRA run" in replies["run"].err and "Loaded the checkpoint" in replies["merged"].err
    assert replies["run"].out == replies["merged"].out and replies["run"].out.strip()
    assert replies["chat-run"] == replies["chat-merged"] and "Reply:" in replies["chat-run"]


def test_removed_per_method_flags_are_one_error_line(tiny_lora_run):
    for script in ("generate/base.py", "generate/chat.py", "scripts/merge_lora.py"):
        result = run(script, "--lora_dir", str(tiny_lora_run))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == \
            "error: --lora_dir was removed: pass the run directory as --checkpoint_dir"


@pytest.mark.real_model
def test_real_model_answers_paris(smollm2_dir):
    result = run("generate/base.py", "--checkpoint_dir", str(smollm2_dir), "--prompt", "What is the capital of France?",
                 "--temperature", "0", "--max_new_tokens", "30")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.real_model
def test_real_model_chat_is_multi_turn(smollm2_dir):
    result = run("generate/chat.py", "--checkpoint_dir", str(smollm2_dir), "--temperature", "0",
                 "--max_new_tokens", "30", stdin="What is the capital of France?\nAnd of Germany?\n!exit\n")
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if "Reply:" in line]
    assert len(replies) == 2
    assert "Paris" in replies[0] and "Berlin" in replies[1]


@pytest.mark.real_model
def test_real_model_kv_cache_matches_recompute(smollm2_dir):
    from model import Tokenizer

    model = GPT.from_checkpoint(smollm2_dir, dtype=torch.float32)
    prompt = Tokenizer(smollm2_dir).encode("The three primary colors are")
    assert list(generate(model, prompt, 12, temperature=0.0)) == greedy_without_cache(model, prompt, 12)


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_batched_generation_equals_one_at_a_time(sliding_window):
    from model.generate import generate_batch

    torch.manual_seed(0)
    model = GPT(Config(name="t", vocab_size=VOCAB, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
                       intermediate_size=64, block_size=64, sliding_window=sliding_window)).eval()
    prompts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 6, 1)]
    alone = [list(generate(model, p, 12, temperature=0.0)) for p in prompts]
    assert generate_batch(model, prompts, 12, temperature=0.0) == alone
    # a stop token ends one sample's answer without ending the others'
    stop = alone[1][2]
    expected = [a[: a.index(stop)] if stop in a else a for a in alone]
    assert generate_batch(model, prompts, 12, temperature=0.0, stop_ids={stop}) == expected


def run_continuous(batch, arrivals: dict[int, list[tuple]]) -> dict:
    """Drive a ContinuousBatch: before step s, add the requests `arrivals[s]`; returns each key's tokens."""
    out: dict = {}
    step = 0
    while len(batch) or any(s >= step for s in arrivals):
        for key, prompt, n, kwargs in arrivals.pop(step, []):
            batch.add(key, prompt, n, **kwargs)
        for key, token, _ in batch.step() if len(batch) else []:
            out.setdefault(key, []).append(token)
        step += 1
    return out


@pytest.mark.parametrize("family", ["llama3.1-scaled-rope", "mistral-sliding-window", "mixtral", "phi-2", "falcon-40b"])
def test_continuous_batch_equals_one_at_a_time(family, tmp_path):
    """Requests of different lengths join a running decode at different steps and leave when they end; each
    gets the tokens `generate` gives it alone, rows are reused, and the cache is freed when the batch empties."""
    from model.generate import ContinuousBatch

    checkpoint_dir = tmp_path / "org" / f"tiny-{family}"
    save_tiny_model(family, checkpoint_dir)
    convert_hf_checkpoint(checkpoint_dir)
    model = GPT.from_checkpoint(checkpoint_dir)
    prompts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 11, 6, 1, 8)]
    lengths = [14, 5, 20, 9, 12]
    alone = [list(generate(model, p, n, temperature=0.0)) for p, n in zip(prompts, lengths)]
    # 0 and 1 start together, 2 joins mid-decode, 3 and 4 join after 1 has left (reusing its row)
    arrivals = {0: [0, 1], 3: [2], 7: [3, 4]}
    arrivals = {s: [(k, prompts[k], lengths[k], {"temperature": 0.0}) for k in keys] for s, keys in arrivals.items()}
    batch = ContinuousBatch(model)
    assert run_continuous(batch, arrivals) == dict(enumerate(alone))
    assert model.kv_caches() == [None] * model.config.n_layer

    # a stop token ends one request (its stop token included) and the others go on
    stop = alone[2][4]
    batch = ContinuousBatch(model, stop_ids={stop})
    out = run_continuous(batch, {0: [(k, prompts[k], lengths[k], {"temperature": 0.0}) for k in range(5)]})
    assert out == {k: a[: a.index(stop) + 1] if stop in a else a for k, a in enumerate(alone)}


def test_continuous_batch_sampling_follows_each_requests_generator():
    """A seeded request samples the same tokens whether it runs alone or next to others with other settings."""
    from model.generate import ContinuousBatch

    torch.manual_seed(0)
    model = GPT(Config(name="t", vocab_size=VOCAB, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
                       intermediate_size=64, block_size=64)).eval()
    prompt, other = torch.tensor([1, 2, 3]), torch.tensor([5, 4])

    def seeded():
        return {"temperature": 0.8, "top_p": 0.9, "generator": torch.Generator().manual_seed(7)}

    alone = run_continuous(ContinuousBatch(model), {0: [(0, prompt, 10, seeded())]})
    together = run_continuous(ContinuousBatch(model), {
        0: [(1, other, 6, {"temperature": 0.0}), (0, prompt, 10, seeded())],
        2: [(2, other, 8, {"temperature": 1.5, "generator": torch.Generator().manual_seed(1)})],
    })
    assert together[0] == alone[0] and together[1] == list(generate(model, other, 6, temperature=0.0))


def test_continuous_batch_refuses_a_request_beyond_the_context():
    from model.generate import ContinuousBatch

    model = GPT(Config(name="t", vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, intermediate_size=32,
                       block_size=32)).eval()
    batch = ContinuousBatch(model)
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        batch.add("a", torch.tensor([1, 2, 3]), 30)
    assert len(batch) == 0
