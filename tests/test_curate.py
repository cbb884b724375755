"""scripts/curate.py: planted duplicates are found and distinct rows kept, each rule catches its row and spares
good ones, chat formats round-trip, the judge's messy replies parse, a killed judge run resumes from its cache,
the model stages batch correctly, and bad input is one `error:` line with no output left behind.

The model stages run a tiny random SmolLM2 with the real tokenizer; their tests check the mechanics (batching,
caching, thresholds), which do not need a model that knows anything.
"""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script
from hf_models import save_tiny_model

from model.cli import run_cli
from model.data.curate import model_embeddings, response_perplexities, tfidf_embeddings, to_sample, topic_map
from model.data.records import Record, read_records
from model.weights.convert import convert_hf_checkpoint
from model.weights.load import load_model
from model.workflows.judge import Judge, ScoreCache, pair_key, parse_score

curate_script = load_script("scripts/curate.py")
SENTENCES = (ROOT / "scripts" / "data" / "sentences.txt").read_text(encoding="utf-8").split("\n")
TEMPLATES = ("Reverse the order of the words: {}", "Translate into formal English: {}", "Write a headline for: {}",
             "Give one follow-up question about: {}", "Summarize in a few words: {}")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    checkpoint_dir = tmp_path_factory.mktemp("tiny") / "org" / "tiny-smollm2"
    save_tiny_model("smollm2", checkpoint_dir, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "prompt_style.yaml"):
        shutil.copy(smollm2_dir / name, checkpoint_dir / name)
    convert_hf_checkpoint(checkpoint_dir)
    return checkpoint_dir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def distinct_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows about different sentences, answered with other different sentences: similar in form, distinct in content."""
    rng = random.Random(seed)
    sentences = SENTENCES[:]
    rng.shuffle(sentences)
    rows = []
    for i in range(count):
        topic, answer = sentences[i % len(sentences)], sentences[(i * 7 + 3) % len(sentences)]
        rows.append({"instruction": TEMPLATES[i % len(TEMPLATES)].format(topic),
                     "output": f"{answer}. {sentences[(i * 13 + 5) % len(sentences)]}."})
    return rows


def curate(tmp_path: Path, data_file: Path, **flags) -> tuple[list[dict], list[dict], dict]:
    """Run the script in-process; (kept rows, removed.jsonl entries, stats)."""
    out_file = tmp_path / ("out" + data_file.suffix)
    report_dir = tmp_path / "report"
    flags.setdefault("map_embeddings", "none")
    curate_script.curate(data_file=data_file, out_file=out_file, report_dir=report_dir, **flags)
    kept = [r.row for r in read_records(out_file)] if out_file.stat().st_size else []
    removed = [json.loads(line) for line in (report_dir / "removed.jsonl").read_text(encoding="utf-8").splitlines()]
    return kept, removed, json.loads((report_dir / "stats.json").read_text())


# ----------------------------------------------------------------------------------------------- judge replies


@pytest.mark.parametrize("reply, score", [
    ("Score: 8/10", 8.0), ("8", 8.0), ("**Rating:** 7.5", 7.5), ("I'd give it 9 out of 10", 9.0),
    ("Score:9", 9.0), ("score = 10", 10.0), ("7.\nThe answer is fine", 7.0), ("Rating: 4/5", 8.0),
    ("On a scale of 1 to 10, I would rate this a 6.", 6.0), ("I give it nine out of ten.", 9.0),
    ("Accuracy: 8/10\nHelpfulness: 6/10\nOverall score: 7/10", 7.0), ("## Score\n\n**6**", 6.0),
    ("Score: 3.5 out of 10.", 3.5), ("Score: 85/100", 8.5),
    ("junk", None), ("", None), (None, None), ("Score: N/A", None), ("Score: 11", None), ("The answer is 42", None),
    ("1. The response is correct", None), ("The response has 3 errors.", None), ("Score: 12/10", None),
    ("(1-10)", None), ("\x00\ufffd🙂", None),
])
def test_parse_score_reads_messy_judge_replies(reply, score):
    assert parse_score(reply) == score


def test_score_cache_survives_a_torn_last_line(tmp_path):
    cache = ScoreCache(tmp_path / "scores.jsonl")
    cache.add("a", 8.0, "Score: 8")
    cache.add("b", None, "junk")
    cache.close()
    with open(tmp_path / "scores.jsonl", "a", encoding="utf-8") as fp:
        fp.write('{"key": "c", "sco')  # killed mid-write
    reloaded = ScoreCache(tmp_path / "scores.jsonl")
    assert len(reloaded) == 2 and reloaded["a"]["score"] == 8.0 and reloaded["b"]["score"] is None


# ----------------------------------------------------------------------------------------------- dedup


def test_dedup_finds_planted_duplicates_and_keeps_every_distinct_row(tmp_path):
    rng = random.Random(1)
    distinct = distinct_rows(150)
    rows = [dict(row, id=f"d{i}") for i, row in enumerate(distinct)]
    planted = {}
    for k, i in enumerate(rng.sample(range(150), 40)):
        source = distinct[i]
        if k < 20:  # the same text but for case, punctuation and spacing
            row = {"instruction": "  " + source["instruction"].upper().replace(":", " -"),
                   "output": source["output"].replace(". ", "  ").rstrip(".") + "!"}
            planted[f"e{k}"] = ("exact_dedup", i)
        else:  # a typo and a word added: Jaccard 0.88-0.92 to the original on character 5-grams
            words = source["output"].split(" ")
            words[len(words) // 2] = words[len(words) // 2][:-1] + "x"
            row = {"instruction": source["instruction"], "output": " ".join(words).rstrip(".") + " indeed"}
            planted[f"n{k}"] = ("fuzzy_dedup", i)
        after_source = [r["id"] for r in rows].index(f"d{i}") + 1
        rows.insert(rng.randrange(after_source, len(rows) + 1), dict(row, id=list(planted)[-1]))
    data = write_jsonl(tmp_path / "data.jsonl", rows)

    kept, removed, stats = curate(tmp_path, data, stages="exact_dedup,fuzzy_dedup")

    removed_by_id = {entry["row"]["id"]: entry for entry in removed}
    assert set(removed_by_id) == set(planted), "recall: every planted duplicate; precision: nothing else"
    for row_id, (stage, source) in planted.items():
        entry = removed_by_id[row_id]
        assert entry["stage"] == stage
        # the reason names the kept original's row number
        assert f"of row {[r.get('id') for r in rows].index(f'd{source}') + 1} " in entry["reason"] + " "
    assert [row["id"] for row in kept] == [f"d{i}" for i in range(150)]  # unchanged, in order
    assert stats["stages"]["exact_dedup"]["removed"] == 20 and stats["stages"]["fuzzy_dedup"]["removed"] == 20


def test_fuzzy_threshold_and_ngram_size_decide_what_is_near(tmp_path):
    base = {"instruction": "Describe the lighthouse", "output": "The old lighthouse keeper counted ships every winter."}
    variant = {"instruction": "Describe the lighthouse", "output": "The old lighthouse keeper counted boats every winter."}
    data = write_jsonl(tmp_path / "data.jsonl", [base, variant])
    _, removed, _ = curate(tmp_path / "loose", data, stages="fuzzy_dedup", fuzzy_threshold=0.6)
    assert len(removed) == 1
    _, removed, _ = curate(tmp_path / "strict", data, stages="fuzzy_dedup", fuzzy_threshold=0.95)
    assert removed == []
    _, removed, _ = curate(tmp_path / "words", data, stages="fuzzy_dedup", fuzzy_threshold=0.6, shingle="word",
                           ngram=3)
    assert removed == []  # one word in 12 changes 3 of the 3-grams: Jaccard ~0.5


# ----------------------------------------------------------------------------------------------- rules


def test_each_rule_removes_its_row_with_its_reason_and_spares_good_rows(tmp_path):
    good = [
        {"instruction": "Write a Python function that doubles a list", "output": "def double(xs):\n    return [2 * x for x in xs]"},
        {"instruction": "How many legs does a spider have?", "output": "8"},
        {"instruction": "Which option is right, (A) or (B)?", "output": "(B)"},
        {"instruction": "Traduis en russe : bonjour", "output": "Здравствуйте"},
        {"instruction": "Tell me about AI safety research", "output": "AI safety research studies how to make AI systems reliable and aligned."},
    ]
    bad = {
        "empty response": {"instruction": "Say something", "output": "   "},
        "instruction shorter than 3 characters": {"instruction": "?", "output": "What do you want to know?"},
        "refusal/boilerplate": {"instruction": "What do you think of jazz?",
                                "output": "As an AI language model, I don't have personal opinions."},
        "refusal/boilerplate ": {"instruction": "Write a story about pirates", "output": "I'm sorry, but I can't help with that."},
        "repeated 3-grams": {"instruction": "Write a poem", "output": "the cat sat on the mat " * 12},
        "non-text junk": {"instruction": "Give me the data", "output": "@@##$$%%^^&&**(()){{}}||~~``!!@@##$$%%"},
        "longer than 400 characters": {"instruction": "Write an essay", "output": "word " * 100},
        "matches --drop_regex": {"instruction": "Where can I buy it?", "output": "Visit https://spam.example.com now"},
    }
    rows = good + [dict(row, expect=reason.strip()) for reason, row in bad.items()]
    data = write_jsonl(tmp_path / "data.jsonl", rows)

    kept, removed, _ = curate(tmp_path, data, stages="rules", max_chars=400, drop_regex=r"https?://\S*spam")

    assert kept == good
    assert len(removed) == len(bad)
    for entry in removed:
        assert entry["stage"] == "rules" and entry["reason"].startswith(entry["row"]["expect"]), entry


def test_rules_read_every_assistant_turn_of_chat_rows_and_keep_the_format(tmp_path):
    refusal_early = {"messages": [{"role": "user", "content": "Hi there"},
                                  {"role": "assistant", "content": "As an AI, I cannot greet you."},
                                  {"role": "user", "content": "Fine, what is 2+2?"},
                                  {"role": "assistant", "content": "4"}]}
    good = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
                         {"role": "assistant", "content": "Lima."}]}
    unanswered = {"messages": [{"role": "user", "content": "Anyone there?"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [refusal_early, good, unanswered])
    kept, removed, stats = curate(tmp_path / "m", data, stages="rules,exact_dedup")
    assert stats["format"] == "messages" and kept == [good]
    assert [e["reason"].split(":")[0] for e in removed] == ["refusal/boilerplate", "empty response"]

    sharegpt = [{"conversations": [{"from": "human", "value": "Name a prime number"}, {"from": "gpt", "value": "7"}]},
                {"conversations": [{"from": "human", "value": "Name a prime number"}, {"from": "gpt", "value": "7"}]},
                {"conversations": [{"from": "human", "value": "Name an even number"}, {"from": "gpt", "value": "12"}]}]
    import pandas as pd

    parquet = tmp_path / "chat.parquet"
    pd.DataFrame(sharegpt).to_parquet(parquet)
    kept, removed, stats = curate(tmp_path / "s", parquet, stages="rules,exact_dedup")
    assert stats["format"] == "sharegpt" and len(kept) == 2 and kept[1] == sharegpt[2]
    assert removed[0]["reason"] == "exact duplicate of row 1" and removed[0]["where"].endswith("row 1")


def test_chat_roles_are_read_like_data_preparation_reads_them():
    """curate and prepare_json read chat rows with one parser: a role in any case ("User") passes both."""
    from model.data.prepare import chat_example

    row = {"messages": [{"role": "System", "content": "Be brief."}, {"role": "User", "content": "Capital of Peru?"},
                        {"role": "ASSISTANT", "content": "Lima."}]}
    sample = to_sample(Record(row, "x line 1"), "messages", None)
    example = chat_example(Record(row, "x line 1"))
    assert sample.messages == [{"role": "system", "content": "Be brief."}, *example.messages]
    assert example.system == "Be brief." and sample.response == "Lima."


def test_instruction_field_mapping_joins_the_input(tmp_path):
    record = Record({"q": "Translate", "ctx": "bonjour", "a": "hello"}, "x line 1")
    from model.data.curate import FieldMap

    sample = to_sample(record, "instruction", FieldMap("q", "ctx", "a", ""))
    assert sample.instruction == "Translate\n\nbonjour" and sample.response == "hello"
    assert sample.messages[-1] == {"role": "assistant", "content": "hello"}


# ----------------------------------------------------------------------------------------------- bad input


def cli_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(curate_script.curate, args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    # the progress bar may have drawn before the bad row: the error is the last line, the only one, no traceback
    assert err[-1].startswith("error: ") and sum(line.startswith("error:") for line in err) == 1, err
    assert not any("Traceback" in line for line in err)
    return err[-1]


@pytest.mark.parametrize("content, extra, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', [], "data.jsonl line 2: not valid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', [], "data.jsonl line 2: missing field 'output'"),
    ('{"prompt": "a", "output": "b"}\n', [], "missing field 'instruction'"),
    ("", [], "no rows in the file"),
    (b'{"instruction": "caf\xe9", "output": "b"}\n', [], "line 1: not UTF-8 text"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', [], "messages turn 0 has the unknown role 'robot'"),
    ('{"instruction": "a", "output": "b"}\n', ["--stages", "rules,typo"], "unknown stage(s) ['typo']"),
    ('{"instruction": "a", "output": "b"}\n', ["--stages", "judge"], "needs --judge_checkpoint_dir"),
    ('{"instruction": "a", "output": "b"}\n', ["--drop_regex", "[(", "--stages", "rules"], "not a valid regular"),
    ('{"instruction": "a", "output": "b"}\n', ["--out_file", "OUT.txt"], "unknown data format '.txt'"),
])
def test_bad_input_is_one_error_line_and_leaves_no_output(content, extra, message, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    (data.write_bytes if isinstance(content, bytes) else data.write_text)(content)
    out_file, report_dir = tmp_path / "out" / "kept.jsonl", tmp_path / "report"
    args = ["--data_file", str(data), "--out_file", str(out_file), "--report_dir", str(report_dir), *extra]
    args = [str(tmp_path / a) if a == "OUT.txt" else a for a in args]
    assert message in cli_error(capsys, args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


# ----------------------------------------------------------------------------------------------- model stages


def test_batched_perplexity_and_embeddings_equal_one_row_at_a_time(tiny_dir):
    model = load_model(tiny_dir, device="cpu")
    from model.prompts import load_prompt_style
    from model.tokenizer import Tokenizer

    tokenizer, style = Tokenizer(tiny_dir), load_prompt_style(tiny_dir)
    rows = [{"instruction": r["instruction"], "output": r["output"] * (i + 1)} for i, r in enumerate(distinct_rows(3))]
    samples = [to_sample(Record(row, "t"), "instruction", curate_script.FieldMap()) for row in rows]
    together = response_perplexities(model, tokenizer, style, samples)
    alone = [response_perplexities(model, tokenizer, style, [s])[0] for s in samples]
    assert together == pytest.approx(alone, rel=1e-4)
    # against the plain definition: exp(mean NLL of the answer tokens)
    from model.data.curate import encode_for_model

    ids, labels = encode_for_model(tokenizer, style, samples[0], 1024)
    logits = model(ids.unsqueeze(0))[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100)
    assert alone[0] == pytest.approx(float(nll.exp()), rel=1e-4)

    texts = [s.text for s in samples]
    batched = model_embeddings(model, tokenizer, texts, batch_size=3)
    single = np.concatenate([model_embeddings(model, tokenizer, [t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)  # the padding is left out of the mean


def test_perplexity_stage_drops_the_most_surprising_answers(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", distinct_rows(8))
    kept, removed, stats = curate(tmp_path, data, stages="perplexity", perplexity_checkpoint_dir=tiny_dir,
                                  perplexity_percentile=50, batch_size=3)
    assert len(kept) == 4 and len(removed) == 4
    threshold = stats["perplexity_threshold"]
    assert all(float(e["reason"].split()[1]) > threshold for e in removed)
    assert (tmp_path / "report" / "perplexity.png").is_file()


class FakeReplies:
    """Judge.score with canned replies (the generation itself is tested on the tiny model below)."""

    def __init__(self, replies: dict[str, str]):
        self.replies, self.calls = replies, []

    def __call__(self, judge, pairs):
        self.calls.append(len(pairs))
        replies = [self.replies[instruction] for instruction, _ in pairs]
        return [(parse_score(reply), reply) for reply in replies]


def test_judge_stage_keeps_rows_at_or_above_the_threshold(tiny_dir, tmp_path, monkeypatch):
    rows = distinct_rows(6)
    replies = ["Score: 9/10", "I'd give it 3 out of 10", "**Rating:** 7", "the answer is fine", "Score: 6.5", "7"]
    fake = FakeReplies({r["instruction"]: reply for r, reply in zip(rows, replies)})
    monkeypatch.setattr(Judge, "score", lambda judge, pairs: fake(judge, pairs))
    data = write_jsonl(tmp_path / "data.jsonl", rows)

    kept, removed, stats = curate(tmp_path / "keep", data, stages="judge", judge_checkpoint_dir=tiny_dir,
                                  judge_min_score=7, map_embeddings="tfidf", map_method="pca", clusters=2)
    assert kept == [rows[0], rows[2], rows[3], rows[5]]  # row 3 has no score: kept by default
    assert [e["reason"] for e in removed] == ["judge score 3 < 7", "judge score 6.5 < 7"]
    assert stats["judge"]["unscored"] == 1 and stats["judge"]["scored"] == 5
    report = (tmp_path / "keep" / "report" / "report.md").read_text()
    assert "judge_scores.png" in report and "the answer is fine" in report

    kept, removed, _ = curate(tmp_path / "drop", data, stages="judge", judge_checkpoint_dir=tiny_dir,
                              judge_min_score=7, judge_unscored="drop")
    assert kept == [rows[0], rows[2], rows[5]]
    assert [e["row"] for e in removed if e["reason"] == "the judge's reply held no score"] == [rows[3]]


def test_killed_judge_run_resumes_from_its_score_cache(tiny_dir, tmp_path, monkeypatch):
    rows = distinct_rows(7)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    real_score = Judge.score
    calls = []

    def killed_after_first_batch(judge, pairs):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(pairs))
        return real_score(judge, pairs)

    monkeypatch.setattr(Judge, "score", killed_after_first_batch)
    flags = dict(stages="judge", judge_checkpoint_dir=tiny_dir, judge_min_score=1, batch_size=3,
                 judge_max_new_tokens=3)
    with pytest.raises(KeyboardInterrupt):
        curate(tmp_path, data, **flags)
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "report" / "report.md").exists()
    cache_file = tmp_path / "report" / "judge_scores.jsonl"
    first_replies = [json.loads(line) for line in cache_file.read_text().splitlines()]
    assert len(first_replies) == 3 and all(e["raw"].startswith("Score:") for e in first_replies)

    resumed = []

    def counting(judge, pairs):
        resumed.append(len(pairs))
        return real_score(judge, pairs)

    monkeypatch.setattr(Judge, "score", counting)
    kept, removed, stats = curate(tmp_path, data, **flags)
    assert sum(resumed) == 4, "only the rows the killed run had not judged"
    assert stats["judge"]["cached_before_run"] == 3
    cache = ScoreCache(cache_file)
    assert len(cache) == 7
    assert len(kept) + len(removed) == 7
    # the cached replies are what the judge says now: greedy decoding of the same prompt
    judge_id = Judge(tiny_dir, device="cpu", max_new_tokens=3, max_prompt_tokens=1024).id
    first = rows[0]
    assert cache[pair_key(first["instruction"], first["output"], judge_id)]["raw"] == \
        real_score(Judge(tiny_dir, device="cpu", max_new_tokens=3, max_prompt_tokens=1024),
                   [(first["instruction"], first["output"])])[0][1]


def test_topic_map_from_model_hidden_states_and_tfidf_clusters_recover_topics(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", distinct_rows(24))
    curate(tmp_path, data, stages="rules", map_embeddings="model", embed_checkpoint_dir=tiny_dir, clusters=3,
           map_method="tsne")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "embedded with the model" in report and (tmp_path / "report" / "topics.png").stat().st_size > 10_000

    # each row draws its words from its topic's vocabulary: rows of a topic share words, topics share none
    topics = ["bread flour yeast butter oven soup garlic onion basil simmer bake recipe",
              "rocket telescope orbit planet astronaut station solar launch moon comet galaxy satellite",
              "bank interest loans mortgage investors shares stock market fund bonds inflation dividend"]
    rng = random.Random(0)
    texts, truth = [], []
    for label, vocabulary in enumerate(topics):
        for _ in range(10):
            texts.append(" ".join(rng.sample(vocabulary.split(), 5)))
            truth.append(label)
    result = topic_map(texts, tfidf_embeddings(texts), clusters=3, method="pca")
    for c in range(3):
        members = np.asarray(truth)[result.labels == c]
        assert len(set(members)) == 1 and len(members) == 10  # every cluster is one topic
    for c in range(3):  # a cluster's top words come from its topic's vocabulary
        topic = truth[int(np.flatnonzero(result.labels == c)[0])]
        assert set(result.top_words[c][:3]) <= set(topics[topic].split())


@pytest.mark.real_model
def test_real_judge_scores_parse(smollm2_dir):
    judge = Judge(smollm2_dir, device="cpu", max_new_tokens=4)
    results = judge.score([("What is the capital of France?", "The capital of France is Paris."),
                           ("Count the words in: the cat sat", "3")])
    assert all(score is not None and 1 <= score <= 10 for score, _ in results), results
    assert all(raw.startswith("Score:") for _, raw in results)
