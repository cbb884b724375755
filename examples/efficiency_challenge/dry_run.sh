#!/usr/bin/env bash
# A CPU dry run of the efficiency-challenge pipeline with the same configs and commands as README.md, on
# SmolLM2-135M-Instruct and 63 rows: curate -> prepare -> LR finder -> LoRA and QLoRA -> merge -> evaluate.
# The flags after each --config only swap the model, shrink the data and the steps; nothing else changes.
# Run from the repository root after scripts/quickstart.sh (or any run that converted the SmolLM2 checkpoint).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ] && . .venv/bin/activate  # the environment scripts/install.sh made
# stage 6 runs lm-eval, the optional `eval` extra: installed first if missing, so no stage fails on it at the end
python -c "import lm_eval" 2>/dev/null || python -m pip install -q -e ".[eval]"
CONFIGS=examples/efficiency_challenge
MODEL=${MODEL:-checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct}
OUT=${OUT:-out/challenge_dry_run}
rm -rf "$OUT" && mkdir -p "$OUT"
stage() { echo; echo "=== $1 ($(date -u +%T))"; }

stage "0. a small instruction mix: task-set rows, 6 exact and 6 near duplicates, 3 empty answers"
python - "$OUT/mix.jsonl" <<'PY'
import json, random, sys
from model.data.tasks import generate_pairs, read_sentences
rows = [{"instruction": p["instruction"], "output": p["response"]}
        for p in generate_pairs(read_sentences(), 48, ["uppercase", "count_words", "reverse_words"], "dry", 0.0)]
rng = random.Random(0)
rows += [dict(r) for r in rng.sample(rows, 6)]                                              # exact duplicates
rows += [{**r, "instruction": r["instruction"].replace(" ", "  ", 1) + "!"} for r in rng.sample(rows, 6)]  # near
rows += [{"instruction": "Say something.", "output": ""}] * 3                               # nothing to learn
with open(sys.argv[1], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
print(f"{len(rows)} rows")
PY

stage "1. curate: rules, exact and fuzzy dedup, judge"
python scripts/curate.py --config $CONFIGS/curate.yaml --data_file "$OUT/mix.jsonl" --out_file "$OUT/curated.jsonl" \
  --report_dir "$OUT/curate" --judge_checkpoint_dir "$MODEL" --judge_min_score 1 --precision 32-true \
  --batch_size 8 --map_embeddings none

stage "2. prepare"
python scripts/prepare_json.py --config $CONFIGS/prepare.yaml --data_file "$OUT/curated.jsonl" \
  --checkpoint_dir "$MODEL" --out_dir "$OUT/data" --val_split_fraction 0.1

stage "3. LR range test with the training config's model flags"
python scripts/lr_find.py --checkpoint_dir "$MODEL" --data_dir "$OUT/data" --out_dir "$OUT/lr_find" --method lora \
  --lora_r 16 --lora_alpha 32 --lora_key true --lora_projection true --lora_mlp true \
  --micro_batch_size 2 --global_batch_size 4 --num_steps 8 --min_lr 1e-5 --max_lr 1e-1

stage "4a. LoRA (the A100 config)"
python finetune/lora.py --config $CONFIGS/lora_a100_40gb.yaml --checkpoint_dir "$MODEL" --data_dir "$OUT/data" \
  --out_dir "$OUT/lora" --precision 32-true --micro_batch_size 2 --global_batch_size 4 --max_steps 2 \
  --warmup_steps 1 --max_seq_length 256 --eval_interval 2 --eval_iters 1 --save_interval 2

stage "4b. QLoRA (the 4090 config; bitsandbytes' 4-bit layers also run on the CPU)"
python finetune/lora.py --config $CONFIGS/qlora_4090_24gb.yaml --checkpoint_dir "$MODEL" --data_dir "$OUT/data" \
  --out_dir "$OUT/qlora" --precision 32-true --micro_batch_size 2 --global_batch_size 4 --max_steps 1 \
  --warmup_steps 1 --max_seq_length 256 --eval_interval 1 --eval_iters 1 --save_interval 1

stage "5. merge"
python scripts/merge_lora.py --checkpoint_dir "$OUT/lora" --out_dir "$OUT/merged"

stage "6. evaluate (the bundled offline lm-eval task instead of the leaderboard tasks, which need a download)"
python eval/lm_eval_harness.py --config $CONFIGS/eval.yaml --checkpoint_dir "$OUT/merged" --tasks forge_local \
  --limit 8 --precision 32-true --out_dir "$OUT/eval"
stage "done"
