"""Export a checkpoint or a fine-tuning run to one GGUF file, for llama.cpp, Ollama and LM Studio.

    python scripts/convert_to_gguf.py --checkpoint_dir out/lora/alpaca --output_file smollm2-alpaca.gguf \\
        --outtype q8_0 --ollama true

A LoRA/DoRA run is merged into its base on the fly; a checkpoint is streamed tensor by tensor from its
safetensors files. The file holds the weights in llama.cpp's layout, the architecture metadata, the tokenizer and
the chat template of the checkpoint's prompt style. Families: Llama 2/3.x (incl. Llama 3.1 RoPE scaling),
SmolLM2, TinyLlama, Mistral (llama.cpp's "llama" architecture has no sliding window, so Mistral v0.1 attends to
everything: identical up to 4096 tokens), Mixtral, Phi-2, Phi-3, Falcon.
"""

from pathlib import Path
from typing import Literal, Optional

from model.cli import run_cli
from model.config import Config
from model.files import atomic_write_text
from model.lora import merge_lora
from model.prompts import has_prompt_style, load_prompt_style
from model.weights.gguf import checkpoint_tensors, export_gguf, ollama_modelfile
from model.weights.load import detect, load_any


def convert_to_gguf(
    checkpoint_dir: Path,
    output_file: Optional[Path] = None,
    outtype: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] = "f16",
    ollama: bool = False,
    name: Optional[str] = None,
) -> None:
    """Write `checkpoint_dir`'s model as a GGUF file.

    Args:
        checkpoint_dir: A checkpoint directory, or a LoRA/DoRA fine-tuning run (its out_dir, final/ or a step-*
            directory), which is merged into the base checkpoint named in its hparams.yaml.
        output_file: The .gguf file to write (replaced if it exists; written to a temporary file and renamed).
            Default: `<checkpoint_dir>/model-<outtype>.gguf`.
        outtype: The type of the weight matrices: f32, f16 or bf16 (exact up to that precision), q8_0 (8-bit, what
            llama.cpp's own converter writes), or the 4/5-bit q5_1, q5_0, q4_1, q4_0 (quantized by the gguf package;
            llama.cpp's llama-quantize makes the K-quants from an f16 file). Norms and biases stay f32.
        ollama: Also write an Ollama Modelfile beside the GGUF file, `<output_file stem>.Modelfile`
            (then `ollama create NAME -f that.Modelfile`).
        name: The model name stored in the file (general.name); default: the checkpoint's config name.
    """
    checkpoint_dir = Path(checkpoint_dir)
    kind, directory = detect(checkpoint_dir)
    if kind is None:
        config = Config.from_checkpoint(directory)
        shapes, get = checkpoint_tensors(directory)
        tokenizer_dir = style_dir = directory
    else:
        if kind.name != "LoRA/DoRA run":
            raise ValueError(
                f"{checkpoint_dir} is an {kind.name}: llama.cpp has no layers for it; only checkpoints and LoRA/DoRA"
                " runs can be exported to GGUF"
            )
        loaded = load_any(checkpoint_dir, device="cpu", precision="32-true")
        model = merge_lora(loaded.model)
        config = model.config
        state_dict = model.state_dict()
        shapes, get = {key: tuple(value.shape) for key, value in state_dict.items()}, state_dict.__getitem__
        tokenizer_dir = loaded.checkpoint_dir
        # the run's prompt style is the format it was fine-tuned on
        style_dir = directory if has_prompt_style(directory) else loaded.checkpoint_dir
    output_file = Path(output_file) if output_file else checkpoint_dir / f"model-{outtype}.gguf"
    style = load_prompt_style(style_dir)
    export_gguf(config, shapes, get, tokenizer_dir, style, output_file, outtype, name or config.name)
    print(f"Wrote {output_file} ({output_file.stat().st_size / 1e6:.1f} MB, {outtype}, prompt style {style.name})")
    if ollama:
        modelfile = output_file.with_suffix(".Modelfile")
        atomic_write_text(modelfile, ollama_modelfile(output_file.name, style))
        print(f"Wrote {modelfile}: `ollama create NAME -f {modelfile}`")


if __name__ == "__main__":
    run_cli(convert_to_gguf)
