"""Export a Forge checkpoint as a Hugging Face transformers folder.

    python scripts/convert_to_hf.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --out_dir out/hf

The output has config.json, model.safetensors and the tokenizer files, and loads with
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` (and so with vLLM, TGI, llama.cpp's converter).

With `--classifier_dir out/classify/lora/final` (a finetune/classify.py run on this checkpoint) it exports the
classifier instead, as the matching *ForSequenceClassification (LlamaForSequenceClassification, ...) with
`score.weight` and the labels in config.json's id2label/label2id: `AutoModelForSequenceClassification.from_pretrained`.
"""

import json
import shutil
from pathlib import Path
from typing import Literal, Optional

from model.cli import run_cli
from model.config import Config
from model.device import DTYPES
from model.files import atomic_save_safetensors, atomic_write_text, staged_dir
from model.weights.checkpoint import load_state_dict
from model.weights.convert import hf_config_dict, lit_to_hf
from model.weights.load import detect

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def convert_to_hf(
    checkpoint_dir: Path,
    out_dir: Path,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    classifier_dir: Optional[Path] = None,
) -> None:
    """Write `checkpoint_dir`'s model as an HF folder in `out_dir`.

    Args:
        checkpoint_dir: A Forge checkpoint (model_config.yaml + lit_model.safetensors), or a full fine-tune's out_dir.
        out_dir: Where to write config.json, model.safetensors and the tokenizer files.
        dtype: Save the weights in this dtype; by default the checkpoint's own.
        classifier_dir: Export this classifier (a finetune/classify.py run's final/ or step-*/ directory, built on
            checkpoint_dir) as a transformers *ForSequenceClassification model instead of the causal LM.
    """
    kind, checkpoint_dir = detect(checkpoint_dir)
    if kind is not None:
        raise ValueError(f"{checkpoint_dir} is a {kind.name}, not a checkpoint: merge it into one first"
                         " (`python scripts/merge_lora.py --checkpoint_dir RUN --out_dir DIR` for LoRA, which"
                         " `python scripts/export_peft.py` also exports as a PEFT adapter)")
    config = Config.from_checkpoint(checkpoint_dir)
    if classifier_dir is not None:
        from model.tokenizer import Tokenizer
        from model.workflows.classify import classifier_to_hf, load_classifier

        classifier, hparams = load_classifier(classifier_dir, checkpoint_dir=checkpoint_dir)
        tokenizer = Tokenizer(checkpoint_dir)
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        hf_state_dict, hf_config = classifier_to_hf(classifier, hparams, pad_id)
        if dtype:
            hf_state_dict = {k: v.to(DTYPES[dtype]) for k, v in hf_state_dict.items()}
    else:
        state_dict = load_state_dict(checkpoint_dir, dtype=DTYPES[dtype] if dtype else None)
        hf_state_dict = {k: v.contiguous() for k, v in lit_to_hf(config, state_dict).items()}
        hf_config = hf_config_dict(config)
    hf_config["torch_dtype"] = str(next(iter(hf_state_dict.values())).dtype).removeprefix("torch.")
    generation_config = Path(checkpoint_dir) / "generation_config.json"
    if generation_config.is_file():
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in (ids := json.loads(generation_config.read_text())):
                hf_config[key] = ids[key]

    with staged_dir(out_dir) as tmp_dir:  # never a half-written export
        atomic_save_safetensors(hf_state_dict, tmp_dir / "model.safetensors", metadata={"format": "pt"})
        atomic_write_text(tmp_dir / "config.json", json.dumps(hf_config, indent=2))
        for name in TOKENIZER_FILES:
            if (Path(checkpoint_dir) / name).is_file():
                shutil.copy2(Path(checkpoint_dir) / name, tmp_dir / name)
    print(f"Saved {hf_config['architectures'][0]} to {out_dir}")


if __name__ == "__main__":
    run_cli(convert_to_hf)
