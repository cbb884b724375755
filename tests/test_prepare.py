"""model/prepare.py: rows -> examples (instruction, OpenAI and ShareGPT chat, reversed), multi-turn encoding with the
loss on assistant turns only, the seeded split, the all-or-nothing write-out and the downloads' offline errors."""

from pathlib import Path

import pytest
import torch
from test_data import chatml_dir, sentencepiece_dir  # noqa: F401 (fixtures)

from model.data.prepare import (
    _tokenize_at_once,
    _tokenize_segment_by_segment,
    chat_example,
    check_prepared_data,
    conversation_example,
    encode_conversation,
    hub_dataset_file,
    instruction_example,
    marked_loss_text,
    prepare_sft_dataset,
    split_train_val,
    tokenizer_fingerprint,
    url_file,
    write_prepared,
)
from model.data.records import Record, RecordError
from model.data.sft import IGNORE_INDEX, encode_example
from model.prompts import PromptStyle, prompt_styles
from model.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "Berlin is the capital"},
]


def loss_runs(sample):
    """The token runs that carry the loss, as (start, end) index pairs."""
    has_loss = (sample["labels"] != IGNORE_INDEX).tolist() + [False]
    runs, start = [], None
    for index, flag in enumerate(has_loss):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((start, index))
            start = None
    return runs


@pytest.mark.parametrize("style_name", list(prompt_styles))
def test_multi_turn_loss_is_on_every_assistant_turn_and_nothing_else(chatml_dir, style_name):
    """For every prompt style: the tokens are the whole rendered conversation, and the runs of tokens with loss
    decode to exactly the assistant segments the style marks (answer + end-of-turn marker), EOS after the last one
    where the style has no marker of its own."""
    tokenizer, style = Tokenizer(chatml_dir), PromptStyle.from_name(style_name)
    sample = encode_conversation(tokenizer, style, CONVERSATION, system="Be brief.")
    segments = style.apply_turns(CONVERSATION, "Be brief.")
    last = max(i for i, (_, is_answer) in enumerate(segments) if is_answer)
    answers = [text for text, is_answer in segments if is_answer]
    appended_eos = not answers[-1].endswith(style.stop_tokens())
    if appended_eos:
        answers[-1] += "<|im_end|>"  # this tokenizer's EOS token
    full_text = "".join(text for text, _ in segments[: last + 1]) + ("<|im_end|>" if appended_eos else "")
    assert tokenizer.decode(sample["input_ids"]) == "<|endoftext|>" + full_text  # BOS, then the text
    assert [tokenizer.decode(sample["input_ids"][a:b]) for a, b in loss_runs(sample)] == answers
    assert torch.equal(sample["labels"][sample["labels"] != IGNORE_INDEX],
                       sample["input_ids"][sample["labels"] != IGNORE_INDEX])
    assert sample["prompt"] == "".join(text for text, _ in segments[:last])
    assert sample["response"] == "Berlin is the capital" and sample["truncated"] == 0

    unmasked = encode_conversation(tokenizer, style, CONVERSATION, system="Be brief.", mask_inputs=False)
    assert torch.equal(unmasked["labels"], sample["input_ids"])


@pytest.mark.parametrize("style_name", ["llama2", "mistral", "alpaca", "default", "zephyr"])
def test_multi_turn_masking_with_sentencepiece(sentencepiece_dir, style_name):
    """sentencepiece puts a "▁" before every text it encodes alone: the tokens must still be those of the whole
    text, and exactly the two answers carry the loss."""
    tokenizer, style = Tokenizer(sentencepiece_dir), PromptStyle.from_name(style_name)
    sample = encode_conversation(tokenizer, style, CONVERSATION)
    segments = style.apply_turns(CONVERSATION)
    last = max(i for i, (_, is_answer) in enumerate(segments) if is_answer)
    appended_eos = not segments[last][0].endswith(style.stop_tokens())
    whole = tokenizer.encode("".join(text for text, _ in segments[: last + 1]), eos=appended_eos)
    assert torch.equal(sample["input_ids"], whole)
    texts = [tokenizer.decode(sample["input_ids"][a:b]).strip() for a, b in loss_runs(sample)]
    assert len(texts) == 2 and texts[0].startswith("Paris") and texts[1].startswith("Berlin is the capital")
    assert texts[1].endswith("</s>")


@pytest.mark.parametrize("style_name", list(prompt_styles))
def test_one_tokenization_of_a_long_chat_equals_one_per_segment(chatml_dir, style_name):
    """The fast path (the whole text tokenized once, tokens given to segments by their character offsets) gives the
    same ids and mask as tokenizing the growing text once per segment."""
    tokenizer, style = Tokenizer(chatml_dir), PromptStyle.from_name(style_name)
    segments = style.apply_turns(CONVERSATION + CONVERSATION[2:], "Be brief.")
    last = max(i for i, (_, is_answer) in enumerate(segments) if is_answer)
    segments = segments[: last + 1]
    append_eos = not segments[-1][0].endswith(style.stop_tokens())
    prompt = "".join(text for text, _ in segments[:-1])
    fast = _tokenize_at_once(tokenizer, segments, append_eos, prompt)
    slow = _tokenize_segment_by_segment(tokenizer, segments, append_eos)
    assert fast is not None
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_a_token_across_a_turn_boundary_takes_the_slow_path(chatml_dir, sentencepiece_dir):
    tokenizer, style = Tokenizer(chatml_dir), PromptStyle.from_name("default")
    # the default style writes turns back to back: "say the qui" + "ck" has the token "ick" across the boundary
    messages = [{"role": "user", "content": "say the qui"}, {"role": "assistant", "content": "ck"},
                {"role": "user", "content": " and"}, {"role": "assistant", "content": " more"}]
    segments = style.apply_turns(messages)
    assert _tokenize_at_once(tokenizer, segments, True, "".join(t for t, _ in segments[:-1])) is None
    sample = encode_conversation(tokenizer, style, messages)
    ids, mask = _tokenize_segment_by_segment(tokenizer, segments, True)
    assert torch.equal(sample["input_ids"], ids) and torch.equal(sample["labels"] != IGNORE_INDEX, mask)
    assert _tokenize_at_once(Tokenizer(sentencepiece_dir), segments, True, "") is None  # no offsets


@pytest.mark.parametrize("style_name", ["chatml", "llama3", "alpaca", "phi3", "falcon", "mistral-v0.3"])
def test_a_single_exchange_is_encoded_as_encode_example_does(chatml_dir, style_name):
    tokenizer, style = Tokenizer(chatml_dir), PromptStyle.from_name(style_name)
    messages = [{"role": "user", "content": "Reverse: a b c"}, {"role": "assistant", "content": "c b a"}]
    for mask_inputs in (True, False):
        ours = encode_conversation(tokenizer, style, messages, system="Sys.", mask_inputs=mask_inputs)
        reference = encode_example(tokenizer, style, "Reverse: a b c", "c b a", system="Sys.", mask_inputs=mask_inputs)
        assert ours.keys() == reference.keys()
        for key in ours:
            assert (torch.equal(ours[key], reference[key]) if isinstance(ours[key], torch.Tensor)
                    else ours[key] == reference[key])


def test_truncation_keeps_partial_answers_and_drops_answerless_samples(chatml_dir):
    tokenizer, style = Tokenizer(chatml_dir), PromptStyle.from_name("chatml")
    full = encode_conversation(tokenizer, style, CONVERSATION)
    first_answer = loss_runs(full)[0][0]
    cut = encode_conversation(tokenizer, style, CONVERSATION, max_seq_length=first_answer + 1)
    assert cut["truncated"] == len(full["input_ids"]) - first_answer - 1
    assert torch.equal(cut["input_ids"], full["input_ids"][: first_answer + 1])
    assert (cut["labels"] != IGNORE_INDEX).sum() == 1
    # cut before the first answer token: nothing to learn, with or without masked inputs
    assert encode_conversation(tokenizer, style, CONVERSATION, max_seq_length=first_answer) is None
    assert encode_conversation(tokenizer, style, CONVERSATION, max_seq_length=first_answer, mask_inputs=False) is None


def test_alpaca_input_renders_the_papers_template(chatml_dir):
    style = PromptStyle.from_name("alpaca")
    example = instruction_example(style, "Translate to French.", "Le chat dort.", input="The cat sleeps.")
    sample = encode_conversation(Tokenizer(chatml_dir), style, example.messages, example.system)
    assert sample["prompt"] == style.apply({"instruction": "Translate to French.", "input": "The cat sleeps."})
    other = instruction_example(PromptStyle.from_name("chatml"), "Translate to French.", "x", input="The cat sleeps.")
    assert other.messages[0]["content"] == "Translate to French.\n\nThe cat sleeps." and other.system is None


def test_reverse_instructions_learn_the_instruction_from_the_response(chatml_dir):
    style = PromptStyle.from_name("chatml")
    example = instruction_example(style, "Summarize:", "A short summary.", input="A long text.", system="S",
                                  reverse=True)
    assert example.messages == [{"role": "user", "content": "A short summary."},
                                {"role": "assistant", "content": "Summarize:\n\nA long text."}]
    assert example.system is None  # the system prompt describes the forward task
    sample = encode_conversation(Tokenizer(chatml_dir), style, example.messages)
    assert marked_loss_text(Tokenizer(chatml_dir), sample).endswith("⟦Summarize:\n\nA long text.<|im_end|>⟧")

    reversed_chat = conversation_example(CONVERSATION, reverse=True)
    assert [m["content"] for m in reversed_chat.messages] == [
        "Paris", "Capital of France?", "Berlin is the capital", "And of Germany?"]
    assert [m["role"] for m in reversed_chat.messages] == ["user", "assistant"] * 2
    with pytest.raises(RecordError, match="row 2: user turn 2 is empty, and --reverse_instructions would learn it"):
        conversation_example(CONVERSATION[:2] + [{"role": "user", "content": " "}] + CONVERSATION[3:], reverse=True,
                             where="row 2")
    with pytest.raises(RecordError, match="row 3: --reverse_instructions needs turns that alternate.*turn 1"):
        conversation_example([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                              {"role": "assistant", "content": "c"}], reverse=True, where="row 3")


def test_openai_and_sharegpt_chats_give_the_same_example():
    openai = Record({"messages": [{"role": "system", "content": "Be kind."}, *CONVERSATION,
                                  {"role": "user", "content": "thanks"}]}, "a.jsonl line 1")
    sharegpt = Record({"conversations": [
        {"from": "system", "value": "Be kind."},
        *[{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CONVERSATION],
        {"from": "human", "value": "thanks"},
    ]}, "b.json item 0")
    for record in (openai, sharegpt):
        example = chat_example(record)
        # the trailing user turn has no answer to learn and is dropped; the system turn becomes the system prompt
        assert example.messages == CONVERSATION and example.system == "Be kind."
    # a row's system field only applies to a chat without a system turn of its own
    assert chat_example(Record({"messages": CONVERSATION}, "x"), "From the row.").system == "From the row."
    assert chat_example(openai, "From the row.").system == "Be kind."


@pytest.mark.parametrize(
    "row, match",
    [
        ({"text": "hi"}, r"data.jsonl line 4: missing field 'messages' or 'conversations' \(it has \['text'\]\)"),
        ({"messages": []}, "line 4: field 'messages' should be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "line 4: messages turn 0 should be an object with 'role' and 'content'"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "line 4: conversations turn 0 has the unknown from 'robot'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
         "line 4: assistant turn 1 is empty"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "line 4: the conversation has no assistant turn"),
        ({"messages": [{"role": "user", "content": 5}]}, "line 4: messages turn 0: 'content' should be text, got int"),
    ],
)
def test_bad_chat_rows_name_the_row_and_the_problem(row, match):
    with pytest.raises(RecordError, match=match):
        chat_example(Record(row, "data.jsonl line 4"))


def test_split_is_seeded_disjoint_and_complete():
    items = list(range(100))
    train, val = split_train_val(items, 0.1, seed=1)
    assert len(val) == 10 and sorted(train + val) == items
    assert split_train_val(items, 0.1, seed=1) == (train, val)
    assert split_train_val(items, 0.1, seed=2)[1] != val
    assert len(split_train_val(items[:3], 0.01, seed=1)[1]) == 1  # at least one validation row
    with pytest.raises(ValueError, match="1 row.* too few to split"):
        split_train_val(items[:1], 0.5, seed=1)


def test_write_prepared_is_all_or_nothing(tmp_path, monkeypatch):
    from model.data import prepare

    sample = {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, 2]), "prompt": "p", "response": "r"}
    out_dir = tmp_path / "out"
    write_prepared(out_dir, {"train": [sample], "test": [sample]}, {"a": 1})
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    assert sorted(before) == ["meta.json", "test.pt", "train.pt"]

    published = []

    def fail_on_second(tmp, path):
        if published:
            raise OSError("disk full")
        published.append(path)
        # nothing is renamed: the files already there stay as they were until every new one is complete

    monkeypatch.setattr(prepare, "publish_file", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        write_prepared(out_dir, {"train": [sample] * 2, "test": [sample]}, {"a": 2})
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before  # no temp files left either
    with pytest.raises(OSError, match="disk full"):
        published.clear()
        write_prepared(tmp_path / "new", {"train": [sample], "test": [sample]}, {})
    assert not (tmp_path / "new").exists()


def other_tokenizer_same_vocab(chatml_dir, directory):
    """The chatml tokenizer with two tokens' ids swapped: the same vocabulary size, other meanings."""
    import json
    import shutil

    shutil.copytree(chatml_dir, directory)
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    return directory


def test_data_of_another_tokenizer_with_ids_inside_the_vocabulary_is_refused(chatml_dir, tmp_path):
    other = other_tokenizer_same_vocab(chatml_dir, tmp_path / "other")
    assert Tokenizer(other).vocab_size == Tokenizer(chatml_dir).vocab_size
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(chatml_dir)
    style = PromptStyle.from_name("chatml")
    examples = [instruction_example(style, f"say {i}", f"ok {i}", where=f"row {i}") for i in range(6)]
    prepare_sft_dataset(examples, Tokenizer(chatml_dir), style, tmp_path / "data",
                        checkpoint_dir=chatml_dir, max_seq_length=-1, mask_inputs=True, val_split_fraction=0.3, seed=1,
                        reverse_instructions=False, source="rows")
    assert check_prepared_data(tmp_path / "data", chatml_dir)["tokenizer_sha256"] == tokenizer_fingerprint(chatml_dir)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'data'} was prepared with the tokenizer of {chatml_dir}, which"
                                         rf" differs from {other}'s: its token ids mean other words here"):
        check_prepared_data(tmp_path / "data", other)


def test_a_kill_between_two_renames_is_refused_and_the_rerun_cleans_up(tmp_path, monkeypatch, chatml_dir):
    import json

    from model.data import prepare

    sample = {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, 2]), "prompt": "p", "response": "r"}
    out_dir = tmp_path / "out"
    write_prepared(out_dir, {"train": [sample], "test": [sample]}, {"checkpoint_dir": str(chatml_dir)})
    check_prepared_data(out_dir, chatml_dir)
    real_publish = prepare.publish_file

    def killed_after_train(tmp, path):
        if path.name != "train.pt":
            raise KeyboardInterrupt  # SIGKILL: no cleanup runs, so the temporary files stay
        real_publish(tmp, path)

    monkeypatch.setattr(prepare, "publish_file", killed_after_train)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)  # a kill cleans nothing
    with pytest.raises(KeyboardInterrupt):
        write_prepared(out_dir, {"train": [sample] * 3, "test": [sample] * 2}, {"checkpoint_dir": str(chatml_dir)})
    monkeypatch.undo()
    assert len(torch.load(out_dir / "train.pt", weights_only=True)) == 3  # new train.pt, old test.pt and meta.json
    assert sorted(p.name for p in out_dir.iterdir() if p.name.endswith(".tmp")) != []
    with pytest.raises(ValueError, match=rf"{out_dir / 'train.pt'} is not the file {out_dir / 'meta.json'} describes"
                                         r" \(an interrupted or mixed preparation\)"):
        check_prepared_data(out_dir, chatml_dir)
    write_prepared(out_dir, {"train": [sample] * 3, "test": [sample] * 2}, {"checkpoint_dir": str(chatml_dir)})
    assert sorted(p.name for p in out_dir.iterdir()) == ["meta.json", "test.pt", "train.pt"]
    assert json.loads((out_dir / "meta.json").read_text())["checkpoint_dir"] == str(chatml_dir)
    check_prepared_data(out_dir, chatml_dir)


def test_downloads_offline_say_to_use_data_file(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="Could not download data.jsonl from the Hugging Face dataset org/d.*--data_file"):
        hub_dataset_file("org/d", "data.jsonl")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set.*--data_file PATH"):
        url_file("https://example.com/data/train.json", tmp_path / "downloads")
    assert not (tmp_path / "downloads").exists()
    # a file downloaded before is used as it is
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "train.json").write_text("[]")
    assert url_file("https://example.com/data/train.json", tmp_path / "downloads") == tmp_path / "downloads/train.json"

