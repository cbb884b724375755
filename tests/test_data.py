"""model/data.py (encoding, masking, saving, loading, batching) and scripts/prepare_tasks.py."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_script
from test_tokenizer import make_bpe_dir, make_sentencepiece_dir
from torch.utils.data import DataLoader

from model.data.sft import IGNORE_INDEX, encode_example, get_collate_fn, load_dataset, save_dataset
from model.prompts import PromptStyle, save_prompt_style
from model.tokenizer import Tokenizer

prepare = load_script("scripts/prepare_tasks.py")


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A tiny byte-level BPE checkpoint with ChatML's special tokens, BOS wanted, <|im_end|> as EOS."""
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": True}
    directory = make_bpe_dir(tmp_path_factory.mktemp("chatml"), tokenizer_config=config)
    save_prompt_style("chatml", directory)
    return directory


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory, tiny_sentencepiece_model):
    """A Llama-style sentencepiece tokenizer: BOS <s> added to every text, EOS </s>, a "▁" before every text."""
    return make_sentencepiece_dir(tmp_path_factory.mktemp("sentencepiece"), tiny_sentencepiece_model)


def answer_text(tokenizer, sample):
    """The text of the tokens that carry the loss."""
    return tokenizer.decode(sample["input_ids"][sample["labels"] != IGNORE_INDEX])


def test_labels_mask_exactly_the_prompt(chatml_dir):
    tokenizer, style = Tokenizer(chatml_dir), PromptStyle.from_name("chatml")
    sample = encode_example(tokenizer, style, "Reverse the words: hello world", "world hello")
    assert sample["prompt"] == style.apply("Reverse the words: hello world")
    assert sample["response"] == "world hello" and sample["truncated"] == 0
    # the prompt tokens are exactly what a generation script feeds: BOS once, then the rendered prompt
    prompt_ids = tokenizer.encode(sample["prompt"])
    assert prompt_ids[0] == tokenizer.bos_id and (prompt_ids == tokenizer.bos_id).sum() == 1
    assert torch.equal(sample["input_ids"][: len(prompt_ids)], prompt_ids)
    assert (sample["labels"][: len(prompt_ids)] == IGNORE_INDEX).all()
    assert torch.equal(sample["labels"][len(prompt_ids):], sample["input_ids"][len(prompt_ids):])
    # the loss is on the answer and the end-of-turn marker, which is EOS here and not appended a second time
    assert answer_text(tokenizer, sample) == "world hello<|im_end|>"
    assert sample["input_ids"][-1] == tokenizer.eos_id and sample["input_ids"][-2] != tokenizer.eos_id

    unmasked = encode_example(tokenizer, style, "Reverse the words: hello world", "world hello", mask_inputs=False)
    assert torch.equal(unmasked["labels"], unmasked["input_ids"])
    assert torch.equal(unmasked["input_ids"], sample["input_ids"])


def test_system_message_and_conversation_history_are_prompt(chatml_dir):
    tokenizer, style = Tokenizer(chatml_dir), PromptStyle.from_name("chatml")
    with_system = encode_example(tokenizer, style, "Uppercase: hi", "HI", system="Answer briefly.")
    assert with_system["prompt"].startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    conversation = [
        {"role": "user", "content": "Uppercase: hi"},
        {"role": "assistant", "content": "HI"},
        {"role": "user", "content": "Lowercase: YO"},
    ]
    sample = encode_example(tokenizer, style, conversation, "yo")
    assert "HI<|im_end|>" in sample["prompt"]
    assert answer_text(tokenizer, sample) == "yo<|im_end|>"


@pytest.mark.parametrize("style_name", ["default", "alpaca", "phi2", "falcon"])
def test_plain_text_styles_end_the_answer_with_eos(sentencepiece_dir, style_name):
    tokenizer, style = Tokenizer(sentencepiece_dir), PromptStyle.from_name(style_name)
    sample = encode_example(tokenizer, style, "Count the words: the quick fox", "3")
    ids = sample["input_ids"].tolist()
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    assert ids[-1] == tokenizer.eos_id and ids.count(tokenizer.eos_id) == 1
    assert answer_text(tokenizer, sample).strip() == "3</s>"


def test_styles_with_an_end_of_turn_marker_get_no_extra_eos(sentencepiece_dir):
    tokenizer = Tokenizer(sentencepiece_dir)
    sample = encode_example(tokenizer, PromptStyle.from_name("llama2"), "Count the words: the quick fox", "3")
    assert sample["input_ids"].tolist().count(tokenizer.eos_id) == 1
    assert answer_text(tokenizer, sample).strip() == "3 </s>"


def test_no_bos_when_the_tokenizer_wants_none(tmp_path):
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    tokenizer = Tokenizer(make_bpe_dir(tmp_path, tokenizer_config=config))
    assert not tokenizer.use_bos
    sample = encode_example(tokenizer, PromptStyle.from_name("chatml"), "hi", "yo")
    assert tokenizer.bos_id not in sample["input_ids"].tolist()


def test_answer_tokens_are_those_of_the_whole_text(sentencepiece_dir):
    """sentencepiece puts "▁" before every text it encodes: the answer tokenized alone would start with a stray
    "▁" token the model never writes after "[/INST]"."""
    tokenizer, style = Tokenizer(sentencepiece_dir), PromptStyle.from_name("llama2")
    sample = encode_example(tokenizer, style, "Name a capital", "Paris is the capital")
    assert torch.equal(sample["input_ids"], tokenizer.encode(sample["prompt"] + " Paris is the capital </s>"))
    alone = torch.cat([tokenizer.encode(sample["prompt"]), tokenizer.encode(" Paris is the capital </s>", bos=False)])
    assert len(alone) == len(sample["input_ids"]) + 1


def test_truncation_is_reported(chatml_dir):
    tokenizer, style = Tokenizer(chatml_dir), PromptStyle.from_name("chatml")
    full = encode_example(tokenizer, style, "Repeat: ok", "ok ok ok")
    prompt_length = len(tokenizer.encode(full["prompt"]))
    fits = encode_example(tokenizer, style, "Repeat: ok", "ok ok ok", max_seq_length=len(full["input_ids"]))
    assert fits["truncated"] == 0 and torch.equal(fits["input_ids"], full["input_ids"])

    cut = encode_example(tokenizer, style, "Repeat: ok", "ok ok ok", max_seq_length=prompt_length + 1)
    assert cut["truncated"] == len(full["input_ids"]) - prompt_length - 1
    assert torch.equal(cut["input_ids"], full["input_ids"][: prompt_length + 1])
    assert torch.equal(cut["labels"], full["labels"][: prompt_length + 1])
    # a copy, not a view that would drag the whole original tensor into the saved file
    assert cut["input_ids"].untyped_storage().nbytes() == 8 * (prompt_length + 1)

    inside_prompt = encode_example(tokenizer, style, "Repeat: ok", "ok ok ok", max_seq_length=3)
    assert len(inside_prompt["input_ids"]) == 3 and (inside_prompt["labels"] == IGNORE_INDEX).all()


def test_empty_response_is_rejected(chatml_dir):
    with pytest.raises(ValueError, match="response must be a non-empty string"):
        encode_example(Tokenizer(chatml_dir), PromptStyle.from_name("chatml"), "hi", "")


def fake_sample(length, masked):
    ids = torch.arange(1, length + 1)
    labels = ids.clone()
    labels[:masked] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "prompt": "p", "response": "r", "truncated": 0}


def test_collate_pads_right_and_masks_the_padding():
    samples = [fake_sample(3, masked=1), fake_sample(5, masked=2)]
    loader = DataLoader(samples, batch_size=2, collate_fn=get_collate_fn(pad_id=7))
    batch = next(iter(loader))
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 7], [1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, -100, 3, 4, 5]]

    batch = get_collate_fn(max_seq_length=4, ignore_index=-1)(samples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[-1, 2, 3, -1], [-1, -1, 3, 4]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_save_and_load_round_trip(chatml_dir, tmp_path):
    tokenizer, style = Tokenizer(chatml_dir), PromptStyle.from_name("chatml")
    samples = [encode_example(tokenizer, style, f"Count: {'a ' * n}", str(n)) | {"task": "count"} for n in (1, 2, 3)]
    save_dataset(samples, tmp_path / "train.pt")
    save_dataset(samples, tmp_path / "copy.pt")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["copy.pt", "train.pt"]  # no temporary file left
    assert (tmp_path / "train.pt").read_bytes() == (tmp_path / "copy.pt").read_bytes()
    for loaded in (torch.load(tmp_path / "train.pt", weights_only=True), load_dataset(tmp_path / "train.pt", 320)):
        assert len(loaded) == 3
        for original, sample in zip(samples, loaded):
            assert sample.keys() == original.keys()
            assert torch.equal(sample["input_ids"], original["input_ids"])
            assert torch.equal(sample["labels"], original["labels"])
            assert (sample["prompt"], sample["response"]) == (original["prompt"], original["response"])
            assert sample["task"] == "count"


@pytest.mark.parametrize(
    "content, match",
    [
        ({"input_ids": torch.ones(3, dtype=torch.long)}, "must hold a list of samples"),
        (["text"], "sample 0 must be a dict"),
        ([fake_sample(3, 1), {"input_ids": torch.ones(2, dtype=torch.long)}], "sample 1 lacks the key.*labels"),
        ([fake_sample(3, 1) | {"input_ids": torch.ones(3)}], "'input_ids' must be a non-empty 1-D LongTensor"),
        ([fake_sample(3, 1) | {"labels": torch.ones(2, dtype=torch.long)}], "'input_ids' has 3 tokens but 'labels' 2"),
        ([fake_sample(3, 1) | {"prompt": 5}], "'prompt' must be a str"),
        ([fake_sample(3, 1), fake_sample(50, 1)], "sample 1 has the token id 50.*prepared with another tokenizer"),
    ],
)
def test_load_rejects_bad_files_clearly(tmp_path, content, match):
    path = tmp_path / "train.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=match):
        load_dataset(path, vocab_size=40)


def test_load_names_a_missing_file_and_the_command_that_makes_it(tmp_path):
    expected = r"train\.pt does not exist.*`python scripts/prepare_tasks\.py --checkpoint_dir"
    with pytest.raises(FileNotFoundError, match=expected):
        load_dataset(tmp_path / "train.pt")
    (tmp_path / "test.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match=r"test\.pt is not a prepared dataset"):
        load_dataset(tmp_path / "test.pt")


# ----------------------------------------------------------------------------------------------- prepare_tasks


def test_each_task_does_what_its_name_says():
    sentence = "The cat saw 2 dogs and the 11 birds"
    expected = {
        "remove_spaces": ({}, "Thecatsaw2dogsandthe11birds"),
        "reverse_words": ({}, "birds 11 the and dogs 2 saw cat The"),
        "uppercase": ({}, "THE CAT SAW 2 DOGS AND THE 11 BIRDS"),
        "lowercase": ({}, "the cat saw 2 dogs and the 11 birds"),
        "count_words": ({}, "9"),
        "sort_words": ({}, "11 2 and birds cat dogs saw The the"),
        "extract_numbers": ({}, "2, 11"),
        "first_letters": ({}, "Tcs2dat1b"),
        "replace_word": ({"old": "the", "new": "zebra"}, "The cat saw 2 dogs and zebra 11 birds"),
        "repeat_last_word": ({"times": "3"}, "birds birds birds"),
    }
    assert expected.keys() == prepare.TASKS.keys()
    for name, (fields, answer) in expected.items():
        task = prepare.TASKS[name]
        assert task.answer(sentence, **fields) == answer, name
        for template in task.templates:
            instruction = template.format(sentence=sentence, **fields)
            assert prepare.check_answer(name, instruction, f" {answer}\n"), (name, template)
            assert not prepare.check_answer(name, instruction, answer + "x")


def test_every_generated_answer_passes_its_task_checker():
    sentences = prepare.read_sentences()
    for name in prepare.TASKS:
        pairs = prepare.generate_pairs(sentences, 60, [name], "checker", system_prompt_fraction=0.0)
        assert {pair["task"] for pair in pairs} == {name}
        assert all(prepare.check_answer(name, pair["instruction"], pair["response"]) for pair in pairs)
        assert all(pair["response"] not in pair["instruction"] for pair in pairs if name == "replace_word")
        used = {template for template in prepare.TASKS[name].templates
                for pair in pairs if prepare.template_pattern(template).fullmatch(pair["instruction"])}
        assert used == set(prepare.TASKS[name].templates), f"{name}: not every phrasing is used"


def test_shipped_sentences_suit_the_tasks():
    sentences = prepare.read_sentences()
    assert len(sentences) >= 150
    assert all(5 <= len(sentence.split(" ")) <= 12 for sentence in sentences)
    assert sum(bool(prepare.NUMBER.search(sentence)) for sentence in sentences) >= 30


def test_bad_sentence_lines_are_named(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_text('One fine sentence here\nA "quoted" word here\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"sentences\.txt, line 2: .*no double quotes"):
        prepare.read_sentences(path)


def test_train_and_test_sentences_are_disjoint():
    sentences = prepare.read_sentences()
    train, test = prepare.split_sentences(sentences, seed=3)
    assert set(train).isdisjoint(test) and sorted(train + test) == sorted(sentences)
    assert any(prepare.NUMBER.search(sentence) for sentence in test)

    def sentences_of(pairs):
        return {prepare.instruction_fields(pair["task"], pair["instruction"])["sentence"] for pair in pairs}

    names = list(prepare.TASKS)
    assert sentences_of(prepare.generate_pairs(test, 100, names, "3:test", 0.0)) <= set(test)
    assert sentences_of(prepare.generate_pairs(train, 100, names, "3:train", 0.0)) <= set(train)


def test_recombined_sentences_are_new_orders_of_the_training_words():
    train, test = prepare.split_sentences(prepare.read_sentences(), seed=3)
    made = prepare.recombine_sentences(train, 300, "3:recombined", avoid=tuple(test))
    assert len(made) == len(set(made)) == 300
    assert set(made).isdisjoint(train) and set(made).isdisjoint(test)
    train_words = {word.lower() for sentence in train for word in sentence.split(" ")}
    assert all({word.lower() for word in sentence.split(" ")} <= train_words for sentence in made)
    lengths = {len(sentence.split(" ")) for sentence in train}
    assert all(len(sentence.split(" ")) in lengths and sentence[0].isupper() or not sentence[0].isalpha()
               for sentence in made)
    assert any(prepare.NUMBER.search(sentence) for sentence in made)  # extract_numbers has sentences to use
    assert prepare.recombine_sentences(train, 300, "3:recombined", avoid=tuple(test)) == made


def test_recombined_sentences_change_the_training_set_only(chatml_dir, tmp_path):
    plain = run_prepare(chatml_dir, tmp_path / "plain")
    more = run_prepare(chatml_dir, tmp_path / "more", recombined_sentences=200)
    assert more["test.pt"] == plain["test.pt"] and more["train.pt"] != plain["train.pt"]
    train, _ = prepare.split_sentences(prepare.read_sentences(), seed=42)
    samples = load_dataset(tmp_path / "more" / "train.pt")
    used = {prepare.instruction_fields(s["task"], s["prompt"].split("user\n", 1)[1].split("<|im_end|>")[0])["sentence"]
            for s in samples}
    assert used - set(train)  # most training samples now use a recombined sentence


def test_shipped_more_sentences_are_new_and_not_near_a_test_sentence():
    more = prepare.read_sentences(prepare.MORE_SENTENCES_FILE)
    assert len(more) >= 300 and all(5 <= len(sentence.split(" ")) <= 12 for sentence in more)
    assert sum(bool(prepare.NUMBER.search(sentence)) for sentence in more) >= 30
    base = prepare.read_sentences()
    assert set(more).isdisjoint(base)
    _, test = prepare.split_sentences(base, seed=42)

    def overlap(a, b):
        a, b = set(a.lower().split(" ")), set(b.lower().split(" "))
        return len(a & b) / len(a | b)

    # no paraphrase of a held-out sentence: at most 40% of the words of the two (as sets) shared
    assert max(overlap(m, t) for m in more for t in test) < 0.4


def test_more_sentences_change_the_training_set_only(chatml_dir, tmp_path):
    plain = run_prepare(chatml_dir, tmp_path / "plain")
    more = run_prepare(chatml_dir, tmp_path / "more", more_sentences=prepare.MORE_SENTENCES_FILE, num_train=400)
    assert more["test.pt"] == plain["test.pt"]
    meta = json.loads(more["meta.json"])
    train, test = prepare.split_sentences(prepare.read_sentences(), seed=42)
    assert meta["train_sentences"] == len(train) + len(prepare.read_sentences(prepare.MORE_SENTENCES_FILE))
    samples = load_dataset(tmp_path / "more" / "train.pt")
    used = {prepare.instruction_fields(s["task"], s["prompt"].split("user\n", 1)[1].split("<|im_end|>")[0])["sentence"]
            for s in samples}
    assert used - set(train) and used.isdisjoint(test)
    leaky = tmp_path / "leaky.txt"
    leaky.write_text(test[0] + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="are test sentences of the task set"):
        run_prepare(chatml_dir, tmp_path / "leaky", more_sentences=leaky)


def run_prepare(checkpoint_dir, out_dir, **flags):
    flags = {"num_train": 40, "num_test": 20, "max_seq_length": 512, **flags}
    prepare.prepare_tasks(checkpoint_dir, out_dir=out_dir, **flags)
    return {name: (out_dir / name).read_bytes() for name in ("train.pt", "test.pt", "meta.json")}


def test_prepare_tasks_is_deterministic(chatml_dir, tmp_path, capsys):
    first = run_prepare(chatml_dir, tmp_path / "a")
    assert run_prepare(chatml_dir, tmp_path / "b") == first
    other_seed = run_prepare(chatml_dir, tmp_path / "c", seed=7)
    assert other_seed["train.pt"] != first["train.pt"] and other_seed["test.pt"] != first["test.pt"]
    # the test set does not depend on the size of the training set
    assert run_prepare(chatml_dir, tmp_path / "d", num_train=50)["test.pt"] == first["test.pt"]

    output = capsys.readouterr().out
    assert "repeat_last_word" in output and "0 truncated" in output and "<|im_start|>assistant\n" in output


def test_prepared_files_load_and_describe_themselves(chatml_dir, tmp_path, capsys):
    import json

    run_prepare(chatml_dir, tmp_path, tasks="uppercase,count_words", system_prompt_fraction=1.0, max_seq_length=40)
    tokenizer = Tokenizer(chatml_dir)
    train = load_dataset(tmp_path / "train.pt", vocab_size=tokenizer.vocab_size)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["checkpoint_dir"] == str(chatml_dir) and meta["vocab_size"] == tokenizer.vocab_size == 320
    assert meta["prompt_style"] == "chatml" and meta["max_seq_length"] == 40
    assert meta["train"]["per_task"] == {"uppercase": 20, "count_words": 20} and meta["test"]["samples"] == 20
    assert meta["train"]["truncated"] == sum(sample["truncated"] > 0 for sample in train) > 0
    assert meta["train"]["longest"] == 40
    assert meta["train"]["answer_cut_off"] == sum(bool((sample["labels"] == IGNORE_INDEX).all()) for sample in train)
    assert all(any(system in sample["prompt"] for system in prepare.SYSTEM_PROMPTS) for sample in train)
    for sample in train:
        if not sample["truncated"]:
            assert answer_text(tokenizer, sample) == sample["response"] + "<|im_end|>"


@pytest.mark.parametrize(
    "flags, match",
    [
        ({"tasks": "uppercase,shout"}, "Unknown task.*shout.*remove_spaces"),
        ({"num_train": 0}, "--num_train and --num_test must be at least 1"),
        ({"max_seq_length": 0}, "--max_seq_length must be positive"),
        ({"system_prompt_fraction": 1.5}, "--system_prompt_fraction must be between 0 and 1"),
        ({"recombined_sentences": -1}, "--recombined_sentences must be 0 or more"),
    ],
)
def test_prepare_tasks_rejects_bad_flags(chatml_dir, tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        prepare.prepare_tasks(chatml_dir, out_dir=tmp_path, **flags)
    assert not list(tmp_path.iterdir())


def test_cli_missing_checkpoint_is_an_error_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/prepare_tasks.py"), "--checkpoint_dir", str(tmp_path / "nothing"),
         "--out_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: No tokenizer in") and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.real_model
def test_real_smollm2_chatml_labels_are_the_answer_and_im_end(smollm2_dir, tmp_path, capsys):
    run_prepare(smollm2_dir, tmp_path, num_train=30, num_test=10)
    tokenizer = Tokenizer(smollm2_dir)
    for sample in load_dataset(tmp_path / "train.pt", vocab_size=tokenizer.vocab_size):
        assert answer_text(tokenizer, sample) == sample["response"] + "<|im_end|>"
        assert sample["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert torch.equal(sample["input_ids"], tokenizer.encode(sample["prompt"] + sample["response"] + "<|im_end|>"))
