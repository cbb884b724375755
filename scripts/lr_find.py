"""Find a learning rate: the LR range test for any fine-tuning method, a plot of loss vs LR, and a suggestion.

    python scripts/lr_find.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data_dir data/tasks \
        --method lora --lora_r 16 --lora_key true --lora_projection true --lora_mlp true

Builds the model the way the fine-tune script of `--method` does (lora: finetune/lora.py, with --quantize for QLoRA
and --dora for DoRA; full: finetune/full.py; adapter: finetune/adapter.py, --adapter_version 2 for V2; dpo:
finetune/dpo.py with LoRA, the policy's adapters switched off giving the reference), then trains it for at most
`--num_steps` optimizer steps of `--global_batch_size` samples while the learning rate grows exponentially from
`--min_lr` to `--max_lr`, and stops when the smoothed loss has grown `--divergence_factor` times above its lowest
value. Prints the suggested `--learning_rate` (the LR of the lowest smoothed loss / `--suggestion_divisor`, 10 by
default) and writes `lr_find.png` and `lr_find.json` to `--out_dir`. Nothing is saved of the weights: they are
restored after the search, which only reads the checkpoint. Pass the same model, batch and precision flags as the
fine-tune run: the best learning rate depends on them (the batch size most of all).
"""

import json
import time
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import torch

from model.adapter import AdapterConfig, inject_adapter, mark_only_adapter_as_trainable
from model.cli import PositiveInt, run_cli
from model.config import Config
from model.data.preference import collate_pairs, load_pairs, pair_lengths
from model.data.sft import get_collate_fn, load_dataset
from model.device import PRECISIONS, fast_training_precision, resolve_device
from model.files import atomic_write_text
from model.gpt import GPT
from model.lora import LoRAConfig, count_parameters, inject_lora, lora_disabled, mark_only_lora_as_trainable
from model.quantize import quantize_model, validate_quantize
from model.training.loss import head_cross_entropy, labelled_positions
from model.training.lr_find import lr_range_test, plot_lr_find
from model.training.preference import preference_losses, sequence_logps
from model.training.run import epoch_batches, gradient_accumulation_iters
from model.weights.checkpoint import load_state_dict


def lr_find(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data_dir: Path = Path("data/tasks"),
    out_dir: Path = Path("out/lr_find"),
    method: Literal["lora", "full", "adapter", "dpo"] = "lora",
    precision: Optional[Literal["32-true", "bf16-true"]] = None,
    quantize: Optional[str] = None,
    device: str = "auto",
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    dora: bool = False,
    adapter_prompt_length: int = 10,
    adapter_start_layer: int = 2,
    adapter_version: int = 1,
    beta: float = 0.1,
    sft_weight: float = 0.0,
    micro_batch_size: int = 4,
    gradient_checkpointing: Literal["none", "selective", "block", "offload"] = "none",
    checkpoint_layers: Optional[PositiveInt] = None,
    checkpoint_rest: Literal["none", "selective"] = "none",
    global_batch_size: int = 16,
    weight_decay: float = 0.0,
    max_seq_length: Optional[int] = None,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_steps: int = 60,
    smoothing: float = 0.9,
    divergence_factor: float = 4.0,
    suggestion_divisor: float = 10.0,
    seed: int = 1337,
) -> float:
    """Run the LR range test for `--method` on `data_dir/train.pt` and print the suggested --learning_rate.

    Args:
        checkpoint_dir: The converted checkpoint the fine-tune run starts from.
        data_dir: Prepared data: train.pt from scripts/prepare_*.py (preference pairs from
            scripts/prepare_preferences.py for --method dpo).
        out_dir: Where to write lr_find.png (loss vs learning rate) and lr_find.json (every step and the suggestion).
        method: lora (also QLoRA with --quantize, DoRA with --dora), full, adapter or dpo (sigmoid loss, on LoRA).
        precision: 32-true or bf16-true. Default: bf16-true on a GPU or a CPU with fast bf16 matmuls (AMX,
            AVX512-BF16), else 32-true.
        quantize: Store the frozen base in 4 or 8 bits (bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8) for
            lora, adapter and dpo.
        device: "auto", "cpu", "cuda", ...
        lora_r: LoRA rank (lora, dpo).
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        lora_query: LoRA on the query projection.
        lora_key: LoRA on the key projection.
        lora_value: LoRA on the value projection.
        lora_projection: LoRA on the attention output projection.
        lora_mlp: LoRA on every MLP linear.
        lora_head: LoRA on the output head.
        dora: Weight-decomposed LoRA (DoRA).
        adapter_prompt_length: Learned prompt vectors per adapted block (adapter).
        adapter_start_layer: The first adapted block (adapter).
        adapter_version: 1 (LLaMA-Adapter) or 2 (LLaMA-Adapter V2) (adapter).
        beta: DPO's KL strength (dpo).
        sft_weight: Adds this times the NLL of the chosen answers to the DPO loss (dpo).
        micro_batch_size: Samples (pairs for dpo) per forward pass.
        gradient_checkpointing: none, selective, block or offload, as the fine-tune run will use it (finetune/lora.py's flag):
            the test then fits in the memory the run fits in.
        checkpoint_layers: The fine-tune run's --checkpoint_layers (checkpoint only the first this many Blocks).
        checkpoint_rest: The fine-tune run's --checkpoint_rest (none or selective: the other Blocks).
        global_batch_size: Samples per optimizer step, as in the fine-tune run (gradient accumulation makes up the
            difference).
        weight_decay: AdamW weight decay.
        max_seq_length: Truncate samples to this many tokens; default: the model's context.
        min_lr: The first learning rate tried.
        max_lr: The last learning rate tried, if the loss has not diverged before.
        num_steps: Optimizer steps from min_lr to max_lr (about 10 per decade is enough to see the curve).
        smoothing: The loss's moving-average factor (0: no smoothing).
        divergence_factor: Stop when the smoothed loss exceeds this many times its lowest value.
        suggestion_divisor: The suggestion is the LR of the lowest smoothed loss divided by this: 10 is the safe
            rule for a run of unknown length; a short run (the quickstart's 10 minutes) can go closer, e.g. 4.
        seed: Random seed (batch order, adapter initialization).
    """
    validate_quantize(quantize)
    if quantize and method == "full":
        raise ValueError("--quantize freezes a 4/8-bit base for adapters; it cannot be combined with --method full")
    if not (checkpoint_dir / "model_config.yaml").is_file():
        raise FileNotFoundError(f"{checkpoint_dir / 'model_config.yaml'} not found. Convert the checkpoint first:"
                                f" `python scripts/convert_hf_checkpoint.py --checkpoint_dir {checkpoint_dir}`")
    train_file = data_dir / "train.pt"
    if not train_file.is_file():
        command = "scripts/prepare_preferences.py" if method == "dpo" else "scripts/prepare_tasks.py"
        raise FileNotFoundError(f"{train_file} does not exist. Prepare the data first, e.g. `python {command}"
                                f" --checkpoint_dir {checkpoint_dir} --out_dir {data_dir}`")
    torch.manual_seed(seed)
    precision = precision or fast_training_precision()
    dtype = getattr(torch, PRECISIONS[precision])
    device = resolve_device(device)
    config = Config.from_checkpoint(checkpoint_dir)
    max_seq_length = min(max_seq_length or config.block_size, config.block_size)

    # The model, built as the fine-tune script of `method` builds it
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(load_state_dict(checkpoint_dir, dtype=dtype), assign=True)
    model.reset_rope(device)  # the one buffer, still on the meta device
    model = model.to(device)
    if quantize:
        quantize_model(model, quantize, compute_dtype=dtype)
    if method in ("lora", "dpo"):
        inject_lora(model, LoRAConfig(lora_r, lora_alpha, 0.0, lora_query, lora_key, lora_value, lora_projection,
                                      lora_mlp, lora_head, dora))
        mark_only_lora_as_trainable(model)
    elif method == "adapter":
        inject_adapter(model, AdapterConfig(adapter_prompt_length, adapter_start_layer, adapter_version))
        mark_only_adapter_as_trainable(model)
    model = model.to(device)  # the new adapter weights too
    model.set_gradient_checkpointing(gradient_checkpointing, checkpoint_layers, checkpoint_rest)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"{method} in {precision} on {device}: {count_parameters(model):,} trainable parameters of"
          f" {count_parameters(model, None):,}")
    optimizer = torch.optim.AdamW(trainable, lr=min_lr, weight_decay=weight_decay, betas=(0.9, 0.95))

    # The batches: a fresh shuffle of the training set, reshuffled if the search outlasts an epoch
    if method == "dpo":
        data = load_pairs(train_file, vocab_size=config.vocab_size)
        lengths = pair_lengths(data, max_seq_length)
    else:
        data = load_dataset(train_file, vocab_size=config.vocab_size)
        lengths = [min(len(sample["input_ids"]), max_seq_length) for sample in data]
    accumulate = gradient_accumulation_iters(global_batch_size, micro_batch_size, 1)
    batches = []
    epoch = 0
    while len(batches) < num_steps * accumulate:
        batches += epoch_batches(lengths, micro_batch_size, epoch, seed)
        epoch += 1
    sft_collate = get_collate_fn(pad_id=0, max_seq_length=max_seq_length)

    def loss_step(step: int) -> float:
        total = 0.0
        for i in range(accumulate):
            samples = [data[j] for j in batches[step * accumulate + i]]
            if method == "dpo":
                batch = collate_pairs(samples, max_seq_length)
                loss = dpo_loss(model, batch["input_ids"].to(device), batch["labels"], beta, sft_weight)
            else:
                batch = sft_collate(samples)
                loss = next_token_loss(model, batch["input_ids"].to(device), batch["labels"])
            (loss / accumulate).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)  # as every fine-tune script clips
        return total / accumulate

    t0 = time.perf_counter()
    result = lr_range_test(trainable, optimizer, loss_step, min_lr, max_lr, num_steps, smoothing, divergence_factor,
                           suggestion_divisor, log=print)
    seconds = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"LR range test: {method}{' + ' + quantize if quantize else ''}, {precision}, batch {global_batch_size}"
    plot_lr_find(result, out_dir / "lr_find.png", title)
    summary = {"method": method, "precision": precision, "quantize": quantize, "global_batch_size": global_batch_size,
               "suggested_learning_rate": result.suggestion, "min_loss_lr": result.min_loss_lr,
               "steepest_lr": result.steepest_lr, "diverged_at": result.diverged_at, "seconds": seconds,
               "lrs": result.lrs, "losses": result.losses, "smoothed": result.smoothed}
    atomic_write_text(out_dir / "lr_find.json", json.dumps(summary, indent=2) + "\n")
    stop = f"diverged at lr {result.diverged_at:.3g}" if result.diverged_at else f"reached --max_lr {max_lr:g}"
    print(f"{len(result.lrs)} steps in {seconds:.0f}s, {stop}; lowest smoothed loss {min(result.smoothed):.4f}"
          f" at lr {result.min_loss_lr:.3g}, steepest descent at lr {result.steepest_lr:.3g}")
    print(f"wrote {out_dir / 'lr_find.png'} and {out_dir / 'lr_find.json'}")
    print(f"suggested --learning_rate {result.suggestion:.2g}")
    return result.suggestion


def next_token_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens, as finetune/ computes it: the head only where a label follows, and
    with its cross-entropy in chunks (no full-vocabulary logits), so a search needs the memory its run needs."""
    positions, targets, _ = labelled_positions(labels, input_ids.device)
    return model(input_ids, logits_mask=positions, head_fn=partial(head_cross_entropy, targets=targets)).mean()


def dpo_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, beta: float, sft_weight: float) -> torch.Tensor:
    """finetune/dpo.py's sigmoid loss with a LoRA policy: the reference is the same model with its adapters off."""
    with torch.no_grad(), lora_disabled(model):
        ref_logps, _ = sequence_logps(model, input_ids, labels)
    logps, tokens = sequence_logps(model, input_ids, labels)
    half = len(input_ids) // 2
    losses, _, _ = preference_losses("sigmoid", beta, 0.0, logps[:half], logps[half:], ref_logps[:half],
                                     ref_logps[half:], tokens[:half], tokens[half:])
    return losses.mean() + sft_weight * (-logps[:half].sum() / tokens[:half].sum())


if __name__ == "__main__":
    run_cli(lr_find)
