"""48 rows of the movie set for the model stages: 32 as they are, 16 sentiment rows with the label flipped
(source "planted wrong label"), so we can see whether the judge notices wrong answers."""
import json, random, sys

rng = random.Random(0)
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
sentiment = [r for r in rows if r["source"] == "sentiment"]
others = [r for r in rows if r["source"] != "sentiment"]
flipped = [dict(r, output={"Positive": "Negative", "Negative": "Positive"}[r["output"]], source="planted wrong label")
           for r in rng.sample(sentiment, 16)]
sample = rng.sample(others, 16) + rng.sample([r for r in sentiment if r not in flipped], 16) + flipped
rng.shuffle(sample)
with open(sys.argv[2], "w", encoding="utf-8") as out:
    out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in sample)
print(f"{len(sample)} rows -> {sys.argv[2]}")
