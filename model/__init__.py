"""Forge's library: everything the scripts share, in layers whose imports point only down.

    workflows/   merge, classify, judge, evaluate (benchmark scoring), harness (lm-evaluation-harness over our GPT),
                 serve (the batching engine and OpenAI API): whole tasks built from the layers below (never from a
                 script)
    data/        records (JSON/JSONL/CSV/Parquet rows with file:line errors), chat (chat rows -> messages),
                 prepare (rows -> prepared splits), sft (SFT samples, collate, packing), preference (pairs),
                 classification (labelled texts), tasks (the embedded task set), on_policy (pairs from a model's own
                 answers), curate
    training/    run (typed TrainArgs, batch order, schedule, resumable state, hparams, metrics), rundir (one run per
                 directory, resume checks, the lock, Ctrl-C), strategy (Fabric strategy, precision, dtype), preference
                 (DPO-family losses, sequence log-probs, the reference cache), lr_find (the LR range test),
                 loss (head + cross-entropy in chunks), optim (--optimizer)
    weights/     checkpoint (our safetensors files), convert (HF <-> Forge weight maps), gguf (llama.cpp's GGUF in and
                 out), load (one loader for a checkpoint or any fine-tuning run, detected from its files)
    the model    config, gpt, tokenizer, prompts, generate, lora, adapter, quantize
    base         files (atomic writers), device (devices, precisions, dtypes), cli (the CLI and its error line)

`GPT`, `Config` and `Tokenizer` are importable from `model` directly.
"""

from model.config import Config
from model.gpt import GPT
from model.tokenizer import Tokenizer

__all__ = ["Config", "GPT", "Tokenizer"]
