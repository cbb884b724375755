"""model/tokenizer.py on tiny tokenizers built here: a byte-level BPE tokenizer.json and a sentencepiece model."""

import json
import shutil

import pytest
import sentencepiece
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from model.tokenizer import Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LINES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def square(x):\n    return x * x  # a comment",
    "Unicode: naïve café, 日本語, emojis 🤗🚀 and tabs\there.",
] * 10


def write_json(path, content):
    path.write_text(json.dumps(content), encoding="utf-8")


def make_bpe_dir(directory, bos_in_post_processor=False, **json_files):
    """A byte-level BPE tokenizer.json (GPT-2 style) plus the given JSON files (`tokenizer_config={...}`, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(LINES, trainer)
    if bos_in_post_processor:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )
    tokenizer.save(str(directory / "tokenizer.json"))
    for name, content in json_files.items():
        write_json(directory / f"{name}.json", content)
    return directory


def make_sentencepiece_dir(directory, model_file, **json_files):
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, directory / "tokenizer.model")
    for name, content in json_files.items():
        write_json(directory / f"{name}.json", content)
    return directory


def test_missing_tokenizer_files_name_them_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        Tokenizer(tmp_path)
    message = str(error.value)
    for expected in ("tokenizer.json", "tokenizer.model", "scripts/download.py", "scripts/convert_gguf_checkpoint.py"):
        assert expected in message


def test_bpe_special_tokens_from_tokenizer_config(tmp_path):
    # tokens may be written as a plain string or as an AddedToken dict
    config = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "add_bos_token": True}
    tokenizer = Tokenizer(make_bpe_dir(tmp_path, tokenizer_config=config))
    assert tokenizer.backend == "huggingface"
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
    assert tokenizer.stop_ids == {2}
    assert tokenizer.use_bos
    assert tokenizer.vocab_size == 320

    hello = tokenizer.encode("Hello world", bos=False)
    assert hello.dtype == torch.long and hello.ndim == 1 and 1 not in hello.tolist()
    assert tokenizer.encode("Hello world").tolist() == [1] + hello.tolist()
    # a BOS written in the text is not doubled; special tokens in the text are single ids
    assert tokenizer.encode("<|im_start|>Hello world").tolist() == [1] + hello.tolist()
    assert tokenizer.encode("Hello world", eos=True).tolist() == [1] + hello.tolist() + [2]
    assert tokenizer.encode("Hello world<|im_end|>", eos=True).tolist() == [1] + hello.tolist() + [2]
    assert tokenizer.encode("Hello world", max_length=2).tolist() == [1, hello[0].item()]

    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>", bos=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHi"
    assert tokenizer.token_to_id("<|im_end|>") == 2
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.token_to_id("<|not a token|>")


def test_bpe_ids_from_generation_config_and_no_bos_by_default(tmp_path):
    # Llama 3 instruct style: several ids end generation
    generation_config = {"bos_token_id": 0, "eos_token_id": [2, 1]}
    tokenizer = Tokenizer(make_bpe_dir(tmp_path, generation_config=generation_config))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 2, None)
    assert tokenizer.stop_ids == {1, 2}
    assert not tokenizer.use_bos  # the post-processor does not add it and nothing says to
    assert tokenizer.encode("Hello")[0] != 0
    assert tokenizer.encode("Hello", bos=True)[0] == 0


def test_bpe_bos_from_post_processor_is_added_once(tmp_path):
    config = {"bos_token_id": 0, "eos_token_id": 2}
    tokenizer = Tokenizer(make_bpe_dir(tmp_path, bos_in_post_processor=True, config=config))
    assert tokenizer.use_bos
    ids = tokenizer.encode("Hello world").tolist()
    assert ids[0] == 0 and ids[1] != 0
    assert tokenizer.encode("Hello world", bos=False).tolist() == ids[1:]


def test_round_trip_and_streaming_of_multibyte_text(tmp_path):
    tokenizer = Tokenizer(make_bpe_dir(tmp_path))
    for text in LINES[:3] + ["   spaces   and\n\nnewlines  ", "🤗🤗 new emoji 🦜 unseen"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        pieces = list(tokenizer.decode_stream(iter(ids.tolist())))
        assert "".join(pieces) == text
        assert not any("\ufffd" in piece for piece in pieces)  # half characters wait for the rest of their bytes


def test_sentencepiece_backend(tmp_path, tiny_sentencepiece_model):
    tokenizer = Tokenizer(make_sentencepiece_dir(tmp_path, tiny_sentencepiece_model))
    reference = sentencepiece.SentencePieceProcessor(model_file=str(tiny_sentencepiece_model))
    assert tokenizer.backend == "sentencepiece"
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, None)
    assert tokenizer.use_bos and tokenizer.stop_ids == {2}
    assert tokenizer.vocab_size == reference.vocab_size()

    for text in ["The quick brown fox", "  two leading spaces", "tabs\tand\nnewlines", "unseen: ñ 日本 🦜", "123"]:
        ids = tokenizer.encode(text)
        assert ids.tolist() == [1] + reference.encode(text)
        assert tokenizer.decode(ids) == "<s>" + text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert "".join(tokenizer.decode_stream(ids[1:])) == text

    # control tokens written in the text are matched whole (sentencepiece alone would spell them out)
    ids = tokenizer.encode("<s>Paris</s>", bos=False).tolist()
    assert ids == [1] + reference.encode("Paris") + [2]
    assert tokenizer.decode(ids) == "<s>Paris</s>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Paris"
    assert tokenizer.token_to_id("</s>") == 2
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.token_to_id("<|im_start|>")


def test_sentencepiece_streaming_keeps_leading_spaces(tmp_path, tiny_sentencepiece_model):
    tokenizer = Tokenizer(make_sentencepiece_dir(tmp_path, tiny_sentencepiece_model))
    text = "Paris is the capital of France."
    ids = tokenizer.encode(text, bos=False).tolist()
    one_by_one = "".join(tokenizer.decode([token_id]) for token_id in ids)
    assert one_by_one != text  # why decode_stream exists: a lone "▁is" decodes to "is"
    assert "".join(tokenizer.decode_stream(ids)) == text


def test_sentencepiece_special_tokens_from_config_files(tmp_path, tiny_sentencepiece_model):
    config = {"add_bos_token": False, "eos_token": {"content": "</s>"}, "pad_token": "<unk>"}
    tokenizer = Tokenizer(make_sentencepiece_dir(tmp_path, tiny_sentencepiece_model, tokenizer_config=config,
                                                 generation_config={"eos_token_id": [2, 3]}))
    assert not tokenizer.use_bos and tokenizer.encode("Paris")[0] != 1
    assert (tokenizer.eos_id, tokenizer.pad_id) == (2, 0)
    assert tokenizer.stop_ids == {2, 3}


def test_tokenizer_json_is_preferred_over_tokenizer_model(tmp_path, tiny_sentencepiece_model):
    make_bpe_dir(tmp_path)
    shutil.copy(tiny_sentencepiece_model, tmp_path / "tokenizer.model")
    assert Tokenizer(tmp_path).backend == "huggingface"
