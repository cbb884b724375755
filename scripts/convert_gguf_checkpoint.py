"""Convert a llama.cpp GGUF file into a Forge checkpoint directory.

    python scripts/convert_gguf_checkpoint.py --gguf_path SmolLM2-135M-Instruct.Q4_1.gguf \\
        --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Every tensor is dequantized, so the result is a plain floating-point checkpoint you can fine-tune. The directory
gets what a Hugging Face download holds (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json), so transformers loads it too, and then our own model_config.yaml, lit_model.safetensors
and prompt_style.yaml. Only the "llama" architecture is supported (Llama 1/2/3.x, TinyLlama, Mistral 7B,
SmolLM/SmolLM2); the work is done by `model.weights.gguf`, which also writes GGUF (scripts/convert_to_gguf.py).
"""

from model.cli import run_cli
from model.weights.gguf import convert_gguf_checkpoint

if __name__ == "__main__":
    run_cli(convert_gguf_checkpoint)
