"""From rows of instruction or chat data to the prepared train.pt / test.pt / meta.json of model/data.py.

Every `scripts/prepare_<dataset>.py` does the same four steps, with the pieces here:

    rows (model/records.py)  ──►  Example: a conversation ending with an assistant turn, and where it came from
                                  (`instruction_example`, `conversation_example`, `chat_example`)
    examples  ──►  train / validation split           (`split_train_val`, seeded)
    each split ──►  tokenized samples, loss on every assistant turn  (`encode_conversation`)
    samples   ──►  train.pt, test.pt, meta.json, all or nothing      (`write_prepared`)

`prepare_sft_dataset` runs the three last steps and prints what it did; the scripts only turn their dataset's rows
into examples.

Two decisions every script shares:
- `--max_seq_length` cuts a sample's tokens at the end. A sample cut so short that no token of any answer is left
  would train on the prompt alone (or, with masked inputs, on nothing: a batch of such samples has no loss), so it
  is dropped; the counts of cut and dropped samples are printed and written to meta.json.
- `--reverse_instructions` swaps the roles: the response becomes the prompt and the instruction the answer to learn
  (the backward model p(instruction | response) of "Self-Alignment with Instruction Backtranslation", Li et al.
  2023, which then writes instructions for unlabeled text). A row's system prompt describes the forward task, so
  reversed examples leave it out (a prompt style's default system prompt, like SmolLM2's, still applies).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from model.data.chat import chat_field, chat_messages
from model.data.records import Record, RecordError, field
from model.data.sft import IGNORE_INDEX
from model.files import publish_file
from model.prompts import Alpaca, Message, PromptStyle
from model.tokenizer import Tokenizer

@dataclass
class Example:
    """One training example before tokenization: user/assistant turns ending with an assistant turn (every assistant
    turn is learned), an optional system prompt, where it came from (for error messages) and an optional task name."""

    messages: list[Message]
    system: str | None = None
    where: str = ""
    task: str | None = None


# ---------------------------------------------------------------------------------------------- rows -> examples
def instruction_example(
    prompt_style: PromptStyle,
    instruction: str,
    response: str,
    input: str = "",
    system: str | None = None,
    *,
    reverse: bool = False,
    where: str = "",
    task: str | None = None,
) -> Example:
    """A single-turn example from instruction fields. A non-empty `input` (Alpaca's input, Dolly's context) follows
    the instruction after a blank line; under the alpaca prompt style it gets the template's own "### Input:" section
    and preamble, so the text is exactly the Alpaca paper's. `reverse`: see the module docstring."""
    if not instruction.strip():
        raise RecordError(f"{where}: the instruction is empty")
    if not response.strip():
        raise RecordError(f"{where}: the response is empty")
    if reverse:
        prompt = response
        answer = f"{instruction}\n\n{input}" if input.strip() else instruction
        return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], None, where,
                       task)
    if input.strip():
        if isinstance(prompt_style, Alpaca):
            instruction = f"{instruction}\n\n### Input:\n{input}"
            if system is None:
                system = prompt_style.preamble_with_input
        else:
            instruction = f"{instruction}\n\n{input}"
    return Example([{"role": "user", "content": instruction}, {"role": "assistant", "content": response}], system,
                   where, task)


def conversation_example(
    messages: list[Message], system: str | None = None, *, reverse: bool = False, where: str = "",
    task: str | None = None,
) -> Example:
    """An example from a conversation of {"role", "content"} messages (a leading system message is taken as the
    system prompt, over `system`). Trailing user turns are dropped: nothing answers them, so there is nothing to
    learn from them. Every assistant turn must have text."""
    messages = list(messages)
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
    for index, message in enumerate(messages):
        if message["role"] == "system":
            raise RecordError(f"{where}: turn {index} is a system turn; a system message may only come first")
        if message["role"] == "assistant" and not message["content"].strip():
            raise RecordError(f"{where}: assistant turn {index} is empty")
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not messages:
        raise RecordError(f"{where}: the conversation has no assistant turn to learn from")
    if reverse:
        messages = _reversed_turns(messages, where)
        system = None
    return Example(messages, system, where, task)


def _reversed_turns(messages: list[Message], where: str) -> list[Message]:
    """Each exchange (user asks, assistant answers) becomes (user gives the answer, assistant writes the question)."""
    reversed_messages = []
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RecordError(f"{where}: --reverse_instructions needs turns that alternate user/assistant; turn"
                              f" {index} is {message['role']!r}, expected {expected!r}")
        if expected == "user":
            if not message["content"].strip():
                raise RecordError(f"{where}: user turn {index} is empty, and --reverse_instructions would learn it")
            reversed_messages += [{"role": "user", "content": messages[index + 1]["content"]},
                                  {"role": "assistant", "content": message["content"]}]
    return reversed_messages


def chat_example(
    record: Record, system: str | None = None, *, reverse: bool = False, task: str | None = None
) -> Example:
    """An example from a chat row: OpenAI-style `messages` ([{"role", "content"}]) or ShareGPT `conversations`
    ([{"from", "value"}]), read by model.data.chat (roles system/user/assistant and ShareGPT's names, any case)."""
    messages = chat_messages(record)
    if not messages:
        raise RecordError(f"{record.where}: field {chat_field(record.row)!r} should be a non-empty list of turns")
    return conversation_example(messages, system, reverse=reverse, where=record.where, task=task)


def optional_field(record: Record, name: str | None) -> str | None:
    """A text field that rows may lack or leave empty (an input, a system prompt): None then."""
    if not name:
        return None
    value = field(record, name, required=False)
    return value if value.strip() else None


# ---------------------------------------------------------------------------------------------- tokenization
def encode_conversation(
    tokenizer: Tokenizer,
    prompt_style: PromptStyle,
    messages: list[Message],
    system: str | None = None,
    mask_inputs: bool = True,
    max_seq_length: int = -1,
) -> dict | None:
    """A sample in the format of model/data.py from a conversation that ends with an assistant turn; with
    `mask_inputs`, every assistant turn (with its end-of-turn marker) carries the loss and nothing else does.

    A single exchange gives `encode_example`'s sample. "prompt" is the text before the last answer and
    "response" the last answer, as a generation script would see them. `max_seq_length > 0` cuts the tokens at the
    end ("truncated" says how many went); None when that leaves no answer token (see the module docstring).
    """
    segments = prompt_style.apply_turns(messages, system)
    last = max(index for index, (_, is_answer) in enumerate(segments) if is_answer)
    # What follows the last answer (ChatML's "\n" after <|im_end|>) has no loss and nothing after it to predict.
    segments = segments[: last + 1]
    append_eos = not segments[last][0].endswith(prompt_style.stop_tokens())
    if append_eos and tokenizer.eos_id is None:
        raise ValueError(
            f"The {prompt_style.name!r} prompt style ends an answer with the tokenizer's EOS token, but the tokenizer"
            f" in {tokenizer.checkpoint_dir} has none."
        )
    prompt = "".join(segment for segment, _ in segments[:last])
    tokens = _tokenize_at_once(tokenizer, segments, append_eos, prompt) if len(segments) > 2 else None
    input_ids, answer_mask = tokens if tokens is not None else _tokenize_segment_by_segment(tokenizer, segments,
                                                                                            append_eos)
    labels = input_ids.masked_fill(~answer_mask, IGNORE_INDEX) if mask_inputs else input_ids.clone()

    truncated = 0
    if 0 < max_seq_length < len(input_ids):
        truncated = len(input_ids) - max_seq_length
        if not answer_mask[1:max_seq_length].any():  # position 0 is never a target
            return None
        # clone: a slice would keep (and torch.save would write) the whole original storage
        input_ids, labels = input_ids[:max_seq_length].clone(), labels[:max_seq_length].clone()
    return {"input_ids": input_ids, "labels": labels, "prompt": prompt, "response": messages[-1]["content"],
            "truncated": truncated}



def _tokenize_segment_by_segment(
    tokenizer: Tokenizer, segments: list[tuple[str, bool]], append_eos: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each segment's tokens are what it adds to the tokenization of the text so far, so the whole sample is the
    tokenization of the whole text (the tokens a generation script feeds), as in `encode_example`; only where a
    token spans a segment boundary is the segment tokenized alone. Returns the ids and which of them are answer."""
    pieces, trained, text, previous = [], [], "", None
    for index, (segment, is_answer) in enumerate(segments):
        text += segment
        eos = append_eos and index == len(segments) - 1
        ids = tokenizer.encode(text, eos=eos)
        if previous is None:
            piece = ids
        elif torch.equal(ids[: len(previous)], previous):
            piece = ids[len(previous):]
        else:
            piece = tokenizer.encode(segment, bos=False, eos=eos)
        previous = ids
        pieces.append(piece)
        trained.append(torch.full((len(piece),), is_answer))
    return torch.cat(pieces), torch.cat(trained)


def _tokenize_at_once(
    tokenizer: Tokenizer, segments: list[tuple[str, bool]], append_eos: bool, prompt: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The same as `_tokenize_segment_by_segment` in two tokenizations instead of one per segment (a long chat has
    dozens): the whole text once, each token given to the segment its characters lie in, and the prompt alone, which
    must be the start of it. None where that cannot be done: a sentencepiece tokenizer (no character offsets here), a
    token across a segment boundary, or a prompt that tokenizes differently alone."""
    if tokenizer.backend != "huggingface":
        return None
    encoding = tokenizer.processor.encode("".join(segment for segment, _ in segments), add_special_tokens=False)
    ids, owners, segment_index, segment_end = list(encoding.ids), [], 0, len(segments[0][0])
    for start, end in encoding.offsets:
        while segment_index < len(segments) - 1 and start >= segment_end:
            segment_index += 1
            segment_end += len(segments[segment_index][0])
        if end > segment_end:
            return None
        owners.append(segment_index)
    # BOS and EOS exactly as Tokenizer.encode adds them
    if tokenizer.use_bos and ids[:1] != [tokenizer.bos_id]:
        ids.insert(0, tokenizer.bos_id)
        owners.insert(0, 0)
    if append_eos and ids[-1:] != [tokenizer.eos_id]:
        ids.append(tokenizer.eos_id)
        owners.append(len(segments) - 1)
    input_ids = torch.tensor(ids, dtype=torch.long)
    prompt_ids = tokenizer.encode(prompt)
    if owners.count(len(segments) - 1) != len(ids) - len(prompt_ids) or not torch.equal(
        input_ids[: len(prompt_ids)], prompt_ids
    ):
        return None
    answer_mask = torch.tensor([segments[owner][1] for owner in owners])
    return input_ids, answer_mask


# ---------------------------------------------------------------------------------------------- split, stats, write
def check_prepare_flags(max_seq_length: int, val_split_fraction: float) -> None:
    """The flags every prepare script shares, checked before anything is read or downloaded."""
    if max_seq_length < 1 and max_seq_length != -1:
        raise ValueError(f"--max_seq_length must be positive, or -1 for no limit, got {max_seq_length}")
    if not 0.0 < val_split_fraction < 1.0:
        raise ValueError(f"--val_split_fraction must be between 0 and 1 (exclusive), got {val_split_fraction}")


def split_train_val(items: list, val_split_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle with `seed` and hold out round(fraction * n) items, at least one, for validation. The same items and
    seed always give the same split."""
    if not 0.0 < val_split_fraction < 1.0:
        raise ValueError(f"--val_split_fraction must be between 0 and 1 (exclusive), got {val_split_fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    num_val = max(1, round(len(items) * val_split_fraction))
    if len(items) - num_val < 1:
        raise ValueError(f"{len(items)} row(s) are too few to split: holding out {num_val} for validation"
                         f" (--val_split_fraction {val_split_fraction}) leaves none to train on")
    return [items[i] for i in order[num_val:]], [items[i] for i in order[:num_val]]


def split_stats(samples: list[dict], dropped: int = 0) -> dict:
    """What meta.json says about a split: counts, lengths, how many samples were cut and how many dropped."""
    lengths = [len(sample["input_ids"]) for sample in samples]
    return {
        "samples": len(samples),
        "tokens": sum(lengths),
        "longest": max(lengths, default=0),
        "truncated": sum(sample.get("truncated", 0) > 0 for sample in samples),
        "dropped_answer_cut_off": dropped,
    }


def write_prepared(out_dir: Path | str, splits: dict[str, list[dict]], meta: dict) -> None:
    """Write `<split>.pt` for each split and meta.json, all or nothing: every file goes to a temporary file first and
    they are renamed into place only once all are complete, meta.json last, so a failure leaves `out_dir` as it was
    (and does not leave a new, empty `out_dir` behind). meta.json records the SHA-256 of each split file: a kill
    between two renames (a new train.pt beside an old test.pt) is found and refused by `check_prepared_data`. The
    temporary files of a killed run are removed by the next one."""
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = {f"{name}.pt": _torch_bytes(samples) for name, samples in splits.items()}
    meta = {**meta, "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}}
    contents["meta.json"] = (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode()
    for name in contents:
        for leftover in out_dir.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)
    temporary: dict[str, str] = {}
    try:
        for name, data in contents.items():
            fd, temporary[name] = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as file:
                file.write(data)
        for name, tmp in temporary.items():  # meta.json is the last key: it is published last
            publish_file(tmp, out_dir / name)
    except BaseException:
        for tmp in temporary.values():
            Path(tmp).unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def tokenizer_fingerprint(checkpoint_dir: Path | str) -> str:
    """SHA-256 of the checkpoint's tokenizer files (tokenizer.json / tokenizer.model): two tokenizers with the same
    vocabulary size but different tokens get different fingerprints."""
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model"):
        path = Path(checkpoint_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def check_prepared_data(data_dir: Path | str, checkpoint_dir: Path | str, splits: tuple[str, ...] = ("train", "test")
                        ) -> dict:
    """The meta.json of prepared data, checked against the checkpoint it is used with and against the split files:
    data prepared with another tokenizer (same vocabulary size or not) is refused, and so is a directory whose
    preparation did not finish (a split file that is not the one meta.json describes). Data without a meta.json
    (saved by hand) has nothing to check here."""
    data_dir, checkpoint_dir = Path(data_dir), Path(checkpoint_dir)
    meta_path = data_dir / "meta.json"
    again = f"Prepare it again with a scripts/prepare_*.py script and --checkpoint_dir {checkpoint_dir}"
    if not meta_path.is_file():
        return {}  # samples saved by hand with model.data.sft.save_dataset: load_dataset checks their token ids
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}). {again}") from None
    prepared_with = meta.get("checkpoint_dir", "another checkpoint")
    fingerprint = meta.get("tokenizer_sha256")
    if fingerprint is not None and fingerprint != tokenizer_fingerprint(checkpoint_dir):
        raise ValueError(f"{data_dir} was prepared with the tokenizer of {prepared_with}, which differs from"
                         f" {checkpoint_dir}'s: its token ids mean other words here. {again}")
    if fingerprint is None and "vocab_size" in meta and meta["vocab_size"] != Tokenizer(checkpoint_dir).vocab_size:
        raise ValueError(f"{data_dir} was prepared for a vocabulary of {meta['vocab_size']} tokens ({prepared_with}),"
                         f" not {checkpoint_dir}'s. {again}")
    for split in splits:
        name, expected = f"{split}.pt", meta.get("sha256", {}).get(f"{split}.pt")
        if expected is not None and (data_dir / name).is_file() and _sha256(data_dir / name) != expected:
            raise ValueError(f"{data_dir / name} is not the file {meta_path} describes (an interrupted or mixed"
                             f" preparation). {again}")
    return meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _torch_bytes(samples: list[dict]) -> bytes:
    # Through a buffer torch.save names the archive's root folder "archive", whatever the file is called, so the same
    # samples always give the same bytes.
    buffer = io.BytesIO()
    torch.save(samples, buffer)
    return buffer.getvalue()


def prepare_sft_dataset(
    examples: list[Example],
    tokenizer: Tokenizer,
    prompt_style: PromptStyle,
    out_dir: Path,
    *,
    checkpoint_dir: Path,
    max_seq_length: int,
    mask_inputs: bool,
    val_split_fraction: float,
    seed: int,
    reverse_instructions: bool,
    source: str,
    test_examples: list[Example] | None = None,
) -> dict:
    """Split the examples (unless `test_examples` gives the test split), tokenize them, write train.pt / test.pt /
    meta.json and print a report; returns meta."""
    from tqdm import tqdm

    if not examples:
        raise RecordError(f"{source}: no rows to prepare")
    if test_examples is None:
        train, val = split_train_val(examples, val_split_fraction, seed)
    elif not test_examples:
        raise RecordError("The test file has no rows")
    else:
        train, val = examples, test_examples
    splits, stats = {}, {}
    progress = tqdm(total=len(train) + len(val), desc="tokenizing", unit=" rows", mininterval=2)
    for name, split in (("train", train), ("test", val)):
        samples, dropped = [], 0
        for example in split:
            try:
                sample = encode_conversation(tokenizer, prompt_style, example.messages, example.system,
                                             mask_inputs=mask_inputs, max_seq_length=max_seq_length)
            except ValueError as error:
                progress.close()
                raise ValueError(f"{example.where}: {error}") from None
            progress.update()
            if sample is None:
                dropped += 1
                continue
            if example.task is not None:
                sample["task"] = example.task
            samples.append(sample)
        if not samples:
            progress.close()
            raise ValueError(f"No {name} sample is left: --max_seq_length {max_seq_length} cuts off the answer of"
                             f" all {len(split)}. Raise --max_seq_length.")
        splits[name] = samples
        stats[name] = split_stats(samples, dropped)
        tasks = [sample["task"] for sample in samples if "task" in sample]
        if tasks:
            stats[name]["per_task"] = {task: tasks.count(task) for task in sorted(set(tasks))}
    progress.close()
    meta = {
        "source": source,
        "checkpoint_dir": str(checkpoint_dir),
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer_fingerprint(checkpoint_dir),
        "prompt_style": prompt_style.name,
        "max_seq_length": max_seq_length,
        "mask_inputs": mask_inputs,
        "reverse_instructions": reverse_instructions,
        "val_split_fraction": val_split_fraction,
        "seed": seed,
        **stats,
    }
    write_prepared(out_dir, splits, meta)

    print(f"Wrote {out_dir}/train.pt, test.pt and meta.json from {source}"
          f" ({prompt_style.name!r} prompt style, {checkpoint_dir})")
    for name, split_stat in stats.items():
        print(f"{name}: {split_stat['samples']} samples, {split_stat['tokens']} tokens, longest"
              f" {split_stat['longest']}; {split_stat['truncated']} cut to --max_seq_length {max_seq_length} and kept,"
              f" {split_stat['dropped_answer_cut_off']} dropped (no answer token left)")
    print(f"\nExample, the tokens decoded, the loss on the text between ⟦ and ⟧:\n"
          f"{marked_loss_text(tokenizer, splits['train'][0])}")
    return meta


def marked_loss_text(tokenizer: Tokenizer, sample: dict) -> str:
    """The sample's tokens decoded, each run of tokens that carries the loss between ⟦ and ⟧: a person checks the
    masking at a glance."""
    ids, has_loss = sample["input_ids"].tolist(), (sample["labels"] != IGNORE_INDEX).tolist()
    parts, start = [], 0
    for index in range(1, len(ids) + 1):
        if index == len(ids) or has_loss[index] != has_loss[start]:
            text = tokenizer.decode(ids[start:index])
            parts.append(f"⟦{text}⟧" if has_loss[start] else text)
            start = index
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- downloads
OFFLINE_HINT = "Without network access, copy the file from a machine that has it and pass --data_file PATH."


def hub_dataset_file(repo_id: str, filename: str, gated: bool = False) -> Path:
    """A file of a dataset repo on the Hugging Face Hub, downloaded once into the Hub cache (HF_HOME); honours
    HF_TOKEN and HF_HUB_OFFLINE=1 (which uses the cache only)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except GatedRepoError:
        raise ValueError(f"The dataset {repo_id} is gated: accept its terms at https://huggingface.co/datasets/"
                         f"{repo_id}, then set HF_TOKEN (or run `huggingface-cli login`). Or pass --data_file with a"
                         f" local copy of {filename}.") from None
    except Exception as error:  # no network, offline mode, missing file: all mean "use --data_file"
        hint = " (the dataset is gated: accept its terms and set HF_TOKEN)" if gated else ""
        raise ValueError(f"Could not download {filename} from the Hugging Face dataset {repo_id}{hint}:"
                         f" {type(error).__name__}: {str(error).splitlines()[0].rstrip('.') if str(error) else ''}. "
                         f"{OFFLINE_HINT}") from None


def url_file(url: str, download_dir: Path) -> Path:
    """The file at `url`, downloaded once into `download_dir` (through a temporary file: never half written).
    HF_HUB_OFFLINE=1 keeps these downloads offline too."""
    path = Path(download_dir) / url.rsplit("/", 1)[-1]
    if path.is_file():
        return path
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"{path} is not downloaded yet and HF_HUB_OFFLINE is set, so {url} is not fetched."
                         f" {OFFLINE_HINT}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                file.write(chunk)
        publish_file(tmp, path)
    except (urllib.error.URLError, OSError) as error:
        Path(tmp).unlink(missing_ok=True)
        raise ValueError(f"Could not download {url}: {error}. {OFFLINE_HINT}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
