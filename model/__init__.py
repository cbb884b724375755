"""Forge's library: everything the scripts share, in layers whose imports point only down.

    workflows/   merge, classify, judge, evaluate (benchmark scoring), harness (lm-evaluation-harness over our GPT):
                 whole tasks built from the layers below (never from a script)
    data/        records (JSON/JSONL/CSV/Parquet rows with file:line errors), chat (chat rows -> messages),
                 prepare (rows -> prepared splits), sft (SFT samples, collate, packing), preference (pairs),
                 classification (labelled texts), curate
    training/    run (batch order, schedule, resumable state, hparams, metrics), preference (DPO-family losses,
                 sequence log-probs, the reference cache)
    weights/     checkpoint (our safetensors files), convert (HF <-> Forge weight maps), load (one loader for a
                 checkpoint or any fine-tuning run, detected from its files)
    the model    config, gpt, tokenizer, prompts, generate, lora, adapter, quantize
    base         files (atomic writers), device (devices, precisions, dtypes), cli (the CLI and its error line)

`GPT`, `Config` and `Tokenizer` are importable from `model` directly.
"""

from model.config import Config
from model.gpt import GPT
from model.tokenizer import Tokenizer

__all__ = ["Config", "GPT", "Tokenizer"]
