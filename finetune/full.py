"""Full fine-tuning: every weight of the model trains.

    python finetune/full.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data_dir data/tasks

The most capable and the most memory-hungry method: training holds four numbers per weight (the weight, its
gradient and AdamW's two moments), 16 bytes per weight in fp32 and with bf16-mixed, before activations; use
finetune/lora.py or finetune/adapter.py where that does not fit. The run directory gets `hparams.yaml` (every flag),
`metrics.csv`, resumable checkpoints `step-NNNNNN/` and, in `final/`, a complete checkpoint directory
(`lit_model.safetensors`, `model_config.yaml`, the tokenizer files, `prompt_style.yaml`, `hparams.yaml`) that
every script reads like any other: `python generate/base.py --checkpoint_dir out/full`. To save disk, a step
directory holds only the training state (`training_state.pt`, model and optimizer, for `--resume`), not a
checkpoint directory. Copy this file and edit it: the loop is all here.
"""

import math
import time
from functools import partial
from pathlib import Path
from typing import Literal, Optional, Union

import lightning_fabric as L
import torch

from model.cli import NonNegativeInt, PositiveInt, run_cli
from model.config import Config
from model.data.prepare import check_prepared_data
from model.data.sft import get_collate_fn, get_packed_collate_fn, load_dataset, pack_samples
from model.device import peak_memory_gb, to_device
from model.generate import generate
from model.gpt import GPT
from model.lora import count_parameters
from model.tokenizer import Tokenizer
from model.training.loss import head_cross_entropy, labelled_positions
from model.training.optim import build_optimizer
from model.training.run import (
    MetricsLogger,
    Throughput,
    TrainArgs,
    check_weights,
    epoch_batches,
    gradient_accumulation_iters,
    print_rank0,
    rng_state,
    save_final_checkpoint,
    save_hparams,
    save_training_state,
    step_dir,
    warmup_cosine,
    with_answers,
)
from model.training.fsdp import is_fsdp
from model.training.rundir import StopOnSignal, check_writable, checkpoint_bytes, disk_errors, open_run
from model.training.strategy import default_precision, fabric_strategy, weights_dtype
from model.weights.checkpoint import load_state_dict, require_checkpoint


def setup(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data_dir: Path = Path("data/tasks"),
    out_dir: Path = Path("out/full"),
    precision: Optional[Literal["32-true", "bf16-true", "bf16-mixed", "16-mixed"]] = None,
    quantize: Optional[str] = None,
    devices: PositiveInt = 1,
    num_nodes: PositiveInt = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    micro_batch_size: PositiveInt = 4,
    global_batch_size: PositiveInt = 16,
    learning_rate: float = 3e-5,
    weight_decay: float = 0.0,
    warmup_steps: NonNegativeInt = 10,
    max_steps: Optional[PositiveInt] = None,
    epochs: PositiveInt = 1,
    max_seq_length: Optional[PositiveInt] = None,
    packing: bool = False,
    group_by_length: bool = True,
    gradient_checkpointing: Literal["none", "selective", "block", "offload"] = "none",
    checkpoint_layers: Optional[PositiveInt] = None,
    checkpoint_rest: Literal["none", "selective"] = "none",
    compile: bool = False,
    optimizer: Literal["adamw", "adamw_fused", "adamw8bit", "paged_adamw8bit"] = "adamw",
    eval_interval: PositiveInt = 50,
    eval_iters: PositiveInt = 20,
    save_interval: PositiveInt = 100,
    seed: int = 1337,
    resume: Union[bool, Literal["auto"], Path] = False,
    overwrite: bool = False,
) -> None:
    """Fine-tune every weight of `checkpoint_dir` on the prepared data in `data_dir`.

    Args:
        checkpoint_dir: A converted checkpoint directory (the base model).
        data_dir: Prepared data: `train.pt` and `test.pt` from a `scripts/prepare_*.py` script run with this checkpoint.
        out_dir: Where the run writes hparams.yaml, metrics.csv, step-*/ checkpoints and final/.
        precision: 32-true, bf16-true, bf16-mixed or 16-mixed. Default: bf16-mixed on GPU, 32-true on CPU.
            bf16-true halves the memory of weights, gradients and optimizer state, but a bf16 weight cannot hold
            an update much smaller than 1/256 of itself, and at full fine-tuning learning rates most updates are.
        quantize: Not supported: quantization freezes the base; use finetune/lora.py --quantize for QLoRA.
        devices: Devices per node (GPUs, or CPU processes with --strategy ddp or fsdp).
        num_nodes: Number of nodes.
        strategy: auto, ddp (a full copy of the model per device) or fsdp (FSDP2: weights, gradients and
            optimizer state sharded across the devices; see tutorials/multi_gpu.md).
        micro_batch_size: Samples per forward pass per device.
        global_batch_size: Samples per optimizer step (gradient accumulation makes up the difference).
        learning_rate: Peak learning rate (lower than for adapters: every pretrained weight moves).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps before the cosine decay.
        max_steps: Optimizer steps to run; default: `epochs` over the training set.
        epochs: Passes over the training set (when max_steps is not given).
        max_seq_length: Truncate samples to this many tokens; default: the longest sample (up to the model's context).
        packing: Pack several samples into each row of up to max_seq_length tokens, each sample attending only to
            itself with its positions restarting (no padding wasted; the loss is unchanged). micro_batch_size and
            global_batch_size then count rows.
        group_by_length: Cut micro-batches from samples of similar length (sorted within windows of 50
            micro-batches of the shuffled data, the batch order shuffled again), so little padding is computed;
            false: a plain shuffle. With --packing it groups the packed rows.
        gradient_checkpointing: what the backward pass computes again instead of keeping: none; selective (the norms'
            and activations' outputs, and LoRA dropout's copies of them: a third to half less, elementwise work);
            block (each Block, keeping only its input: one more forward pass); offload (block, with that input in
            pinned CPU memory). What each saves and costs: tutorials/performance.md.
        checkpoint_layers: Checkpoint only the first this many Blocks as --gradient_checkpointing says (default:
            every Block); memory and recomputation fall in between, in proportion.
        checkpoint_rest: none or selective: the Blocks after the first --checkpoint_layers (with block or offload).
        compile: torch.compile each Block of the training forward and backward pass (dynamic shapes: one graph for
            every sequence length; validation, generation and --packing's rows stay eager). Costs a compilation at
            step 1.
        optimizer: adamw; adamw_fused (one fused kernel per step); adamw8bit (bitsandbytes: 8-bit moments, 2 instead
            of 8 bytes of state per trained parameter); paged_adamw8bit (adamw8bit paged to host memory on CUDA).
        eval_interval: Validate (loss + a sample generation) every this many optimizer steps.
        eval_iters: Validation batches per evaluation.
        save_interval: Save a resumable checkpoint (the training state only) every this many optimizer steps.
        seed: Random seed (data order, dropout, initialization).
        resume: Continue a run: true/auto (the latest checkpoint in out_dir; auto starts fresh if none) or the path
            of a step-* directory. Only --max_steps, --epochs and the eval/save flags may differ from the run's.
        overwrite: Replace the run already in out_dir (its hparams.yaml, metrics.csv, step-*/, final/) instead of
            refusing to start.
    """
    hparams = dict(locals())
    args = TrainArgs.from_flags(hparams)
    if quantize:
        raise ValueError("quantization freezes the base; use finetune/lora.py --quantize for QLoRA")
    require_checkpoint(checkpoint_dir)
    args.precision = hparams["precision"] = precision or default_precision(trains_base_weights=True)
    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, precision=args.precision,
                      strategy=fabric_strategy(strategy, devices, num_nodes, args.precision, checkpoint_dir))
    fabric.launch(main, args, hparams)

def main(fabric: L.Fabric, args: TrainArgs, hparams: dict) -> None:
    fabric.seed_everything(args.seed)
    config = Config.from_checkpoint(args.checkpoint_dir)
    tokenizer = Tokenizer(args.checkpoint_dir)
    check_prepared_data(args.data_dir, args.checkpoint_dir)
    train_data = load_dataset(args.data_dir / "train.pt", vocab_size=config.vocab_size)
    val_data = load_dataset(args.data_dir / "test.pt", vocab_size=config.vocab_size)
    max_seq_length = min(args.max_seq_length or config.block_size, config.block_size)
    train_data = with_answers(fabric, train_data, max_seq_length, args.data_dir / "train.pt")
    val_data = with_answers(fabric, val_data, max_seq_length, args.data_dir / "test.pt")

    # The model in the training dtype (fp32 under the mixed precisions: those keep fp32 master weights). With tied
    # embeddings, loading re-ties the head to the embedding, so the one shared weight trains once.
    dtype = weights_dtype(fabric)
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    if not is_fsdp(fabric):  # FSDP loads each rank's shards in fabric.setup_module
        base = load_state_dict(args.checkpoint_dir, dtype=dtype)
        check_weights(model, base, args.checkpoint_dir)
        model.load_state_dict(base, assign=True)
        model.reset_rope(fabric.device)
    model.set_gradient_checkpointing(args.gradient_checkpointing, args.checkpoint_layers, args.checkpoint_rest)
    print_rank0(fabric, f"Trainable parameters: {count_parameters(model):,}")
    model = fabric.setup_module(model)
    if args.compile:  # after setup: under FSDP the compiled Blocks are the sharded ones
        model.module.compile_blocks()

    optimizer = build_optimizer(args.optimizer, model.parameters(), lr=args.learning_rate,
                                weight_decay=args.weight_decay, betas=(0.9, 0.95))
    optimizer = fabric.setup_optimizers(optimizer)

    accumulate = gradient_accumulation_iters(args.global_batch_size, args.micro_batch_size, fabric.world_size)
    lengths = [min(len(s["input_ids"]), max_seq_length) for s in train_data]
    if args.packing:
        packs = pack_samples(lengths, max_seq_length)
        print_rank0(fabric, f"Packed {len(train_data)} samples into {len(packs)} rows of up to {max_seq_length} tokens")
        train_data = [[train_data[i] for i in pack] for pack in packs]
        lengths = [sum(lengths[i] for i in pack) for pack in packs]
    batches_per_epoch = len(epoch_batches(lengths, args.micro_batch_size, 0, args.seed)) // fabric.world_size
    if batches_per_epoch < accumulate:  # an epoch would end before the first optimizer step, forever
        raise ValueError(
            f"{args.data_dir / 'train.pt'} has {len(train_data)} samples: too few for one optimizer step of"
            f" --global_batch_size {args.global_batch_size} on {fabric.world_size} device(s). Lower"
            " --global_batch_size or prepare more samples."
        )
    max_steps = args.max_steps or max(1, args.epochs * batches_per_epoch // accumulate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_steps, max_steps))

    # written only now that the data, the model and the batch sizes have passed their checks: a bad input
    # leaves no output directory behind
    check_writable(args.out_dir, checkpoint_bytes(model, trainable_only=False))
    run = open_run(fabric, args.out_dir, hparams, args.resume, args.overwrite)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0, "epoch": 0, "batch_in_epoch": 0,
             "rng": None}
    run.load(fabric, state, trainable_only=False, max_steps=max_steps, warmup_steps=args.warmup_steps)

    with StopOnSignal() as stop:
        train(fabric, state, args, train_data=train_data, val_data=val_data, lengths=lengths, tokenizer=tokenizer,
              max_steps=max_steps, accumulate=accumulate, max_seq_length=max_seq_length, hparams=hparams, stop=stop)
    save_final_checkpoint(step_dir(args.out_dir, state["step"]), config, args.checkpoint_dir, args.out_dir / "final",
                          hparams, fabric=fabric, model=model)
    print_rank0(fabric, f"Saved the fine-tuned checkpoint to {args.out_dir / 'final'}")
    run.close()


def train(fabric: L.Fabric, state: dict, args: TrainArgs, *, train_data: list, val_data: list[dict], lengths: list[int],
          tokenizer: Tokenizer, max_steps: int, accumulate: int, max_seq_length: int, hparams: dict,
          stop: StopOnSignal) -> None:
    model, optimizer, scheduler = state["model"], state["optimizer"], state["scheduler"]
    collate = get_collate_fn(pad_id=0, max_seq_length=max_seq_length)
    train_collate = get_packed_collate_fn(pad_id=0, max_seq_length=max_seq_length) if args.packing else collate
    metrics = MetricsLogger(args.out_dir, ["step", "epoch", "loss", "lr", "tokens_per_s", "val_loss", "memory_gb"],
                            resume_step=state["step"] if args.resume else None, enabled=fabric.global_rank == 0)
    throughput = Throughput(start_step=state["step"], max_steps=max_steps)
    model.train()

    if state["step"] == 0:
        with throughput.paused():  # tokens/s counts training time only
            validate(fabric, model, val_data, collate, tokenizer, args, metrics, step=0)
    while state["step"] < max_steps:
        batches = epoch_batches(lengths, args.micro_batch_size, state["epoch"], args.seed, args.group_by_length)
        batches = batches[fabric.global_rank::fabric.world_size][: len(batches) // fabric.world_size]
        while state["batch_in_epoch"] + accumulate <= len(batches) and state["step"] < max_steps:
            loss_sum = 0.0
            for i in range(accumulate):
                indices = batches[state["batch_in_epoch"] + i]
                batch = train_collate([train_data[j] for j in indices])
                # the labels stay on the CPU, where the labelled positions are found without a host-device sync
                input_ids, labels = to_device(batch["input_ids"], fabric.device), batch["labels"]
                # no gradient all-reduce until the last micro-batch of the step
                with fabric.no_backward_sync(model, enabled=i < accumulate - 1):
                    loss = next_token_loss(model, input_ids, labels, batch.get("segment_ids"))
                    fabric.backward(loss / accumulate)
                loss_sum += loss.detach()  # read once per step: no host sync per micro-batch
                throughput.update(sum(lengths[j] for j in indices) * fabric.world_size)  # padding excluded
            # the global batch's loss: every rank's micro-batches, as one process would report it
            loss = fabric.all_reduce(loss_sum / accumulate, reduce_op="mean").item()
            # checked before the optimizer step, so a non-finite value never reaches the weights or a checkpoint;
            # the norm is of the all-reduced gradients, so every rank stops together. With 16-mixed an overflow
            # is routine: the grad scaler skips that step and lowers its scale.
            grad_norm = fabric.clip_gradients(model, optimizer, max_norm=1.0, error_if_nonfinite=False).item()
            skips_overflow = getattr(fabric.strategy.precision, "scaler", None) is not None
            if not math.isfinite(loss) or not (math.isfinite(grad_norm) or skips_overflow):
                what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm}"
                raise ValueError(
                    f"The {what} at step {state['step'] + 1}; nothing was saved after the last good checkpoint in"
                    f" {args.out_dir}. Lower --learning_rate, or use --precision 32-true or bf16-mixed."
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            state["batch_in_epoch"] += accumulate
            step = state["step"]

            lr = scheduler.get_last_lr()[0]
            memory = peak_memory_gb(fabric.device)
            print_rank0(fabric, throughput.line(step, loss, lr, memory))
            metrics.log({"step": step, "epoch": state["epoch"], "loss": loss, "lr": lr,
                         "tokens_per_s": throughput.tokens_per_s(), "memory_gb": memory})
            if step % args.eval_interval == 0 or step == max_steps:
                with throughput.paused():
                    validate(fabric, model, val_data, collate, tokenizer, args, metrics, step)
            stopping = stop.requested(fabric)
            if step % args.save_interval == 0 or step == max_steps or stopping:
                state["rng"] = rng_state()
                with throughput.paused(), disk_errors(args.out_dir):
                    path = save_training_state(fabric, args.out_dir, step, state, trainable_only=False,
                                               extra=lambda directory: save_hparams(directory, hparams))
                print_rank0(fabric, f"Saved a checkpoint to {path}")
                if stopping:
                    raise stop.interrupted(step, path)
        if state["step"] < max_steps:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0


def next_token_loss(model, input_ids: torch.Tensor, labels: torch.Tensor,
                    segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 at position t, over the positions whose next label is not -100.

    Logits are computed only at those positions: with the prompt masked, that skips most of the output head.

    `labels` may stay on the CPU (the training loop keeps them there): the positions are found there and sent to
    the device without a host-device sync."""
    positions, targets, _ = labelled_positions(labels, input_ids.device)
    if segment_ids is not None:
        segment_ids = segment_ids.to(input_ids.device)
    # the head and its cross-entropy in chunks: the (N, vocab) float32 logits never exist at once
    losses = model(input_ids, logits_mask=positions, segment_ids=segment_ids,
                   head_fn=partial(head_cross_entropy, targets=targets))
    return losses.mean()


@torch.no_grad()
def validate(fabric, model, val_data, collate, tokenizer, args, metrics, step) -> None:
    model.eval()
    losses = []
    for i in range(0, min(len(val_data), args.eval_iters * args.micro_batch_size), args.micro_batch_size):
        batch = collate(val_data[i:i + args.micro_batch_size])
        losses.append(next_token_loss(model, batch["input_ids"].to(fabric.device), batch["labels"]))
    val_loss = fabric.all_reduce(torch.stack(losses).mean(), reduce_op="mean").item()
    line = f"step {step} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 20)):.2f}"
    if is_fsdp(fabric):  # a generation would all-gather every block for each token: the loss only
        print_rank0(fabric, line)
    else:  # a sample generation shows what the numbers mean
        sample = val_data[0]
        prompt_ids = tokenizer.encode(sample["prompt"]).to(fabric.device)
        t0 = time.perf_counter()
        answer_ids = [t for t in generate(model, prompt_ids, 48, temperature=0.0, stop_ids=tokenizer.stop_ids)
                      if t not in tokenizer.stop_ids]
        print_rank0(fabric, f"{line} | {time.perf_counter() - t0:.1f}s\n  prompt:   {sample['prompt']!r}\n"
                            f"  expected: {sample['response']!r}\n  got:      {tokenizer.decode(answer_ids)!r}")
    metrics.log({"step": step, "val_loss": val_loss})
    model.train()




if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(setup)
