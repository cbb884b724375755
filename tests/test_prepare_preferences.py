"""model/data/on_policy.py and scripts/prepare_preferences.py --from_run: on-policy pairs keep only a prompt's own
wrong answers as rejected, against that prompt's gold answer, and are the same for the same flags."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import load_script
from hf_models import save_tiny_model

from model.data.on_policy import PromptItem, sample_answers, wrong_answer_pairs
from model.data.preference import load_pairs
from model.data.tasks import check_answer
from model.tokenizer import Tokenizer
from model.weights.convert import convert_hf_checkpoint
from model.weights.load import load_any

pytestmark = pytest.mark.usefixtures("one_thread")
prepare = load_script("scripts/prepare_preferences.py")


def items_and_answers():
    items = [
        PromptItem("p0", "Convert this sentence to uppercase: The red fox ran", "THE RED FOX RAN", task="uppercase"),
        PromptItem("p1", "Sentence: Two cats slept\nNumber of words?", "3", task="count_words"),
        PromptItem("p2", "Convert this sentence to lowercase: Big Blue Sky", "big blue sky", task="lowercase"),
    ]
    answers = [
        # right (with spaces), a wrong one twice, another wrong one, an empty one
        [" THE RED FOX RAN ", "THE RED FOX ran", "THE RED FOX ran", "", "THE RED FOX"],
        # always right
        ["3", "3"],
        # wrong answers, one of which is another prompt's gold: it still pairs only with its own prompt
        ["3", "Big blue sky", "big blue sky"],
    ]
    return items, answers


def is_right(item: PromptItem, answer: str) -> bool:
    return check_answer(item.task, item.instruction, answer)


def test_only_wrong_answers_become_rejected_each_with_its_own_prompt():
    items, answers = items_and_answers()
    rows, counts = wrong_answer_pairs(items, answers, is_right, max_pairs_per_prompt=5)
    by_prompt = {}
    for where, instruction, chosen, rejected, system, task in rows:
        item = next(i for i in items if i.instruction == instruction)
        assert chosen == item.gold and task == item.task
        assert not is_right(item, rejected) and rejected.strip() != chosen.strip()
        assert rejected in [a.strip() for a in answers[items.index(item)]]  # one of this prompt's own answers
        by_prompt.setdefault(instruction, []).append(rejected)
    assert by_prompt == {items[0].instruction: ["THE RED FOX ran", "THE RED FOX"],
                         items[2].instruction: ["3", "Big blue sky"]}
    assert counts == {"answers": 10, "right": 4, "empty": 1, "duplicate": 1, "beyond_max_pairs": 0,
                      "prompts_without_a_wrong_answer": 1, "prompts_never_answered_right": 0}
    assert [row[0] for row in rows] == ["p0, own answer 1", "p0, own answer 2", "p2, own answer 1", "p2, own answer 2"]


def test_only_answerable_drops_prompts_the_model_never_gets_right():
    items, answers = items_and_answers()
    items.append(PromptItem("p3", "Sentence: Red sky at night\nNumber of words?", "4", task="count_words"))
    answers.append(["5", "3", "five"])  # wrong every time: out of the model's reach
    every, counts = wrong_answer_pairs(items, answers, is_right, max_pairs_per_prompt=5)
    answerable, counts_answerable = wrong_answer_pairs(items, answers, is_right, 5, only_answerable=True)
    assert [row[0] for row in every] == ["p0, own answer 1", "p0, own answer 2", "p2, own answer 1",
                                         "p2, own answer 2", "p3, own answer 1", "p3, own answer 2", "p3, own answer 3"]
    assert answerable == every[:4]
    assert counts["prompts_never_answered_right"] == counts_answerable["prompts_never_answered_right"] == 1
    with pytest.raises(ValueError, match="--only_answerable needs --from_run and --samples_per_prompt of 2"):
        prepare.prepare_preferences(checkpoint_dir=Path("unused"), only_answerable=True, from_run=Path("unused"),
                                    samples_per_prompt=1)


def test_max_pairs_per_prompt_keeps_the_first_wrong_answers():
    items, answers = items_and_answers()
    rows, counts = wrong_answer_pairs(items, answers, is_right, max_pairs_per_prompt=1)
    assert [(row[0], row[3]) for row in rows] == [("p0", "THE RED FOX ran"), ("p2", "3")]
    assert counts["beyond_max_pairs"] == 2 and counts["duplicate"] == 1
    with pytest.raises(ValueError, match="at least 1"):
        wrong_answer_pairs(items, answers, is_right, max_pairs_per_prompt=0)
    with pytest.raises(ValueError, match="3 prompts but 2"):
        wrong_answer_pairs(items, answers[:2], is_right)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A tiny random SmolLM2 with the real tokenizer and prompt style: its answers are (almost all) wrong."""
    checkpoint_dir = tmp_path_factory.mktemp("tiny") / "org" / "tiny-smollm2"
    save_tiny_model("smollm2", checkpoint_dir, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_style.yaml"):
        shutil.copy(smollm2_dir / name, checkpoint_dir / name)
    convert_hf_checkpoint(checkpoint_dir)
    return checkpoint_dir


def test_sampled_answers_are_batched_seeded_and_greedy_first(tiny_dir):
    model = load_any(tiny_dir, device="cpu", precision="32-true").model
    tokenizer = Tokenizer(tiny_dir)
    prompts = ["Count to three.", "Say hi."]
    answers = sample_answers(model, tokenizer, prompts, 3, 1.0, 5, batch_size=4, seed=7)
    assert [len(a) for a in answers] == [3, 3]
    assert answers == sample_answers(model, tokenizer, prompts, 3, 1.0, 5, batch_size=4, seed=7)
    greedy = sample_answers(model, tokenizer, prompts, 1, 0.0, 5, batch_size=1, seed=0)
    assert [a[0] for a in answers] == [g[0] for g in greedy]
    with pytest.raises(ValueError, match="--temperature > 0"):
        sample_answers(model, tokenizer, prompts, 2, 0.0, 5, batch_size=4, seed=7)


def test_from_run_writes_on_policy_pairs(tiny_dir, tmp_path):
    out = tmp_path / "own"
    flags = dict(checkpoint_dir=tiny_dir, from_run=tiny_dir, num_train=6, num_test=3, samples_per_prompt=2,
                 max_new_tokens=4, batch_size=8, max_pairs_per_prompt=2, precision="32-true", device="cpu")
    prepare.prepare_preferences(out_dir=out, **flags)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "tasks-on-policy"
    assert meta["on_policy"]["train"]["answers"] == 12 and meta["on_policy"]["test"]["answers"] == 6
    prompts = prepare.task_prompts(6, 3, "all", 42)
    user_turn = "<|im_start|>user\n"
    for split in ("train", "test"):
        pairs = load_pairs(out / f"{split}.pt")
        assert len(pairs) >= 1
        golds = {p["instruction"]: p["response"] for p in prompts[split]}
        for pair in pairs:
            instruction = pair["prompt"].split(user_turn, 1)[1].rsplit("<|im_end|>", 1)[0]
            assert pair["chosen"] == golds[instruction]  # the gold answer of this very prompt
            assert check_answer(pair["task"], instruction, pair["chosen"])
            assert not check_answer(pair["task"], instruction, pair["rejected"])
    # the same flags give the same files
    prepare.prepare_preferences(out_dir=tmp_path / "again", **flags)
    assert (out / "train.pt").read_bytes() == (tmp_path / "again" / "train.pt").read_bytes()


def test_from_run_rejects_a_data_file(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="cannot be combined with --data_file"):
        prepare.prepare_preferences(checkpoint_dir=tiny_dir, from_run=tiny_dir, data_file=tmp_path / "x.jsonl")


def test_train_sentences_make_the_training_prompts_only(tmp_path):
    from model.data.tasks import MORE_SENTENCES_FILE, instruction_fields, read_sentences, split_sentences

    plain = prepare.task_prompts(30, 10, "all", 42)
    more = prepare.task_prompts(30, 10, "all", 42, MORE_SENTENCES_FILE)
    assert more["test"] == plain["test"]
    shipped = set(read_sentences(MORE_SENTENCES_FILE))
    assert {instruction_fields(p["task"], p["instruction"])["sentence"] for p in more["train"]} <= shipped
    # a test sentence in the file is refused, whatever its case
    _, test = split_sentences(read_sentences(), 42)
    leaky = tmp_path / "leaky.txt"
    leaky.write_text(f"One new sentence for training\n{test[0].upper()}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"leaky\.txt: 1 sentence\(s\) are test sentences"):
        prepare.task_prompts(30, 10, "all", 42, leaky)
    with pytest.raises(ValueError, match="--train_sentences .* cannot be combined with --data_file"):
        prepare.prepare_preferences(checkpoint_dir=tmp_path, train_sentences=leaky, data_file=tmp_path / "x.jsonl")
