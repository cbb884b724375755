"""How the curation did on the planted rows: per source, how many rows were removed and by which stage."""
import collections, json, sys

report_dir = sys.argv[1]
data = [json.loads(line) for line in open(sys.argv[2], encoding="utf-8")]
removed = [json.loads(line) for line in open(f"{report_dir}/removed.jsonl", encoding="utf-8")]
total = collections.Counter(row["source"] for row in data)
by_stage = collections.defaultdict(collections.Counter)
for entry in removed:
    by_stage[entry["row"]["source"]][entry["stage"]] += 1
print(f"{'source':<20} {'rows':>5} {'removed':>8}  by stage")
for source, count in total.most_common():
    stages = by_stage[source]
    print(f"{source:<20} {count:>5} {sum(stages.values()):>8}  {dict(stages)}")
