"""One Tokenizer over Hugging Face `tokenizers` (tokenizer.json) and sentencepiece (tokenizer.model).

The checkpoint directory describes its own tokenizer: the vocabulary file, plus the special tokens in
tokenizer_config.json, generation_config.json and config.json (first one that names a token wins).

We always encode without the backend's own special tokens and add BOS/EOS ourselves. Some
checkpoints add BOS in the tokenizer.json post-processor *and* say `add_bos_token: true`, and
chat templates often write the BOS token into the text; letting two places add it gives a doubled BOS,
which silently hurts quality.

Streaming: sentencepiece (and byte-level BPE with multi-byte characters) cannot decode one token
at a time: a lone "▁Paris" decodes to "Paris" without its space, and half of an emoji decodes to
"\ufffd". `decode_stream` decodes a growing window and yields only the new text, so generation
scripts can print tokens as they arrive and still get exactly `decode(all_ids)`.
"""

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch


class Tokenizer:
    def __init__(self, checkpoint_dir: Path | str) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        tokenizer_json = checkpoint_dir / "tokenizer.json"
        tokenizer_model = checkpoint_dir / "tokenizer.model"
        if not tokenizer_json.is_file() and not tokenizer_model.is_file():
            raise FileNotFoundError(
                f"No tokenizer in {str(checkpoint_dir)!r}: neither {tokenizer_json.name} nor {tokenizer_model.name}"
                " exists there. Run `python scripts/download.py --repo_id ORG/NAME` to download the checkpoint,"
                " or `python scripts/convert_gguf_checkpoint.py --gguf_path FILE.gguf"
                f" --checkpoint_dir {checkpoint_dir}` to make one from a GGUF file."
            )
        self.checkpoint_dir = checkpoint_dir
        tokenizer_config = _read_json(checkpoint_dir / "tokenizer_config.json")
        generation_config = _read_json(checkpoint_dir / "generation_config.json")
        model_config = _read_json(checkpoint_dir / "config.json")

        if tokenizer_json.is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self.backend = "huggingface"
            try:
                self.processor = HFTokenizer.from_file(str(tokenizer_json))
            except Exception as error:
                raise ValueError(f"Could not read {tokenizer_json}: {error}") from error
            self.vocab_size = self.processor.get_vocab_size(with_added_tokens=True)
            backend_ids = {"bos": None, "eos": None, "pad": None}
        else:
            from sentencepiece import SentencePieceProcessor

            self.backend = "sentencepiece"
            self.processor = SentencePieceProcessor(model_file=str(tokenizer_model))
            self.vocab_size = self.processor.vocab_size()
            backend_ids = {
                "bos": _non_negative(self.processor.bos_id()),
                "eos": _non_negative(self.processor.eos_id()),
                "pad": _non_negative(self.processor.pad_id()),
            }
            # sentencepiece never matches control pieces ("<s>", "</s>") written in the text, while
            # HF tokenizers and llama.cpp do; we split them out ourselves to behave the same.
            self._special_ids = {
                self.processor.id_to_piece(index): index
                for index in range(self.vocab_size)
                if self.processor.is_control(index) or self.processor.is_unknown(index)
            }
            self._special_ids.pop("", None)
            alternatives = "|".join(re.escape(token) for token in sorted(self._special_ids, key=len, reverse=True))
            self._special_pattern = re.compile(f"({alternatives})") if alternatives else None

        def special_id(name: str) -> int | None:
            token = tokenizer_config.get(f"{name}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if token:
                return self.token_to_id(token)
            for config in (generation_config, model_config):
                token_id = config.get(f"{name}_token_id")
                if isinstance(token_id, list):
                    token_id = token_id[0] if token_id else None
                if token_id is not None:
                    return token_id
            return backend_ids[name]

        self.bos_id = special_id("bos")
        self.eos_id = special_id("eos")
        self.pad_id = special_id("pad")

        self.stop_ids = {self.eos_id} if self.eos_id is not None else set()
        for config in (generation_config, model_config):
            eos_token_ids = config.get("eos_token_id")
            if eos_token_ids is not None:
                self.stop_ids.update(eos_token_ids if isinstance(eos_token_ids, list) else [eos_token_ids])

        if self.bos_id is None:
            self.use_bos = False
        elif "add_bos_token" in tokenizer_config:
            self.use_bos = bool(tokenizer_config["add_bos_token"])
        elif self.backend == "sentencepiece":
            self.use_bos = True
        else:
            # No explicit flag: BOS is wanted exactly when the tokenizer.json post-processor adds it (Llama 3 style).
            with_special = self.processor.encode("a", add_special_tokens=True).ids
            without_special = self.processor.encode("a", add_special_tokens=False).ids
            self.use_bos = with_special[:1] == [self.bos_id] and without_special[:1] != [self.bos_id]

    def token_to_id(self, token: str) -> int:
        if self.backend == "huggingface":
            token_id = self.processor.token_to_id(token)
        else:
            token_id = self.processor.piece_to_id(token)
            if token_id == self.processor.unk_id() and token != self.processor.id_to_piece(token_id):
                token_id = None
        if token_id is None:
            raise ValueError(f"Token {token!r} is not in the vocabulary of the tokenizer in {self.checkpoint_dir}.")
        return token_id

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, max_length: int = -1) -> torch.Tensor:
        """Token ids of `text` as a 1-D LongTensor. Special tokens written in the text ("<|im_start|>")
        become their single ids. `bos=None` adds BOS when the checkpoint asks for it (`use_bos`); BOS/EOS
        are not added a second time when the text already starts/ends with them. `max_length > 0` truncates."""
        if self.backend == "huggingface":
            ids = self.processor.encode(text, add_special_tokens=False).ids
        else:
            ids = []
            pieces = self._special_pattern.split(text) if self._special_pattern else [text]
            for piece in pieces:
                if piece in self._special_ids:
                    ids.append(self._special_ids[piece])
                elif piece:
                    ids.extend(self.processor.encode(piece))
        if bos if bos is not None else self.use_bos:
            if self.bos_id is None:
                raise ValueError(f"The tokenizer in {self.checkpoint_dir} has no BOS token; use bos=False.")
            if ids[:1] != [self.bos_id]:
                ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise ValueError(f"The tokenizer in {self.checkpoint_dir} has no EOS token; use eos=False.")
            if ids[-1:] != [self.eos_id]:
                ids.append(self.eos_id)
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int], skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if isinstance(ids, int):
            ids = [ids]
        if self.backend == "huggingface":
            return self.processor.decode(ids, skip_special_tokens=skip_special_tokens)
        # sentencepiece renders control tokens as "": write them out like HF does, between decoded runs.
        special_tokens = {index: token for token, index in self._special_ids.items()}
        text, run = [], []
        for token_id in ids:
            if token_id in special_tokens:
                text.append(self.processor.decode(run))
                run = []
                if not skip_special_tokens:
                    text.append(special_tokens[token_id])
            else:
                run.append(token_id)
        text.append(self.processor.decode(run))
        return "".join(text)

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = False) -> Iterator[str]:
        """Yield the text of `ids` piece by piece as they arrive, e.g. from a generation loop.

        Decoding each token alone loses sentencepiece's leading spaces and splits multi-byte characters,
        so we decode the window since the last printed text and yield what it adds; the pieces joined
        equal `decode(ids)`. Text ending in an incomplete character ("\ufffd") waits for the next token.
        """
        seen: list[int] = []
        prefix_start = 0  # the window starts here: decoding from a token boundary keeps spaces right
        printed_end = 0  # tokens before this index are already printed
        for token_id in ids:
            seen.append(int(token_id))
            prefix_text = self.decode(seen[prefix_start:printed_end], skip_special_tokens)
            window_text = self.decode(seen[prefix_start:], skip_special_tokens)
            if len(window_text) > len(prefix_text) and not window_text.endswith("\ufffd"):
                yield window_text[len(prefix_text):]
                prefix_start, printed_end = printed_end, len(seen)
        if printed_end < len(seen):
            prefix_text = self.decode(seen[prefix_start:printed_end], skip_special_tokens)
            window_text = self.decode(seen[prefix_start:], skip_special_tokens)
            if len(window_text) > len(prefix_text):
                yield window_text[len(prefix_text):]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _non_negative(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None
