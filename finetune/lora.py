"""Fine-tune with LoRA, QLoRA, DoRA or QDoRA.

    python finetune/lora.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data_dir data/tasks

The base model is frozen (and, with `--quantize`, stored in 4 or 8 bits); only the low-rank adapters (and DoRA's
magnitudes) train. The run directory gets `hparams.yaml` (every flag), `metrics.csv`, resumable checkpoints
`step-NNNNNN/` and the adapter in `final/` (`lora.safetensors` + `hparams.yaml`), which every generate and eval
script, `scripts/merge_lora.py` and `scripts/export_peft.py` read (`--checkpoint_dir out/lora`). Copy this file and
edit it: the loop is all here.
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
from model.lora import (
    LORA_WEIGHTS,
    LoRAConfig,
    count_parameters,
    inject_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    mark_routers_as_trainable,
)
from model.quantize import load_quantized, validate_quantize
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
    save_run_weights,
    save_training_state,
    warmup_cosine,
    with_answers,
)
from model.training.fsdp import full_tensors, is_fsdp
from model.training.rundir import StopOnSignal, check_writable, checkpoint_bytes, disk_errors, open_run
from model.training.strategy import default_precision, fabric_strategy, weights_dtype
from model.weights.checkpoint import load_state_dict, require_checkpoint


def setup(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data_dir: Path = Path("data/tasks"),
    out_dir: Path = Path("out/lora"),
    precision: Optional[Literal["32-true", "bf16-true", "bf16-mixed", "16-mixed"]] = None,
    quantize: Optional[str] = None,
    devices: PositiveInt = 1,
    num_nodes: PositiveInt = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    lora_r: PositiveInt = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    dora: bool = False,
    lora_router: bool = False,
    micro_batch_size: PositiveInt = 4,
    global_batch_size: PositiveInt = 16,
    learning_rate: float = 3e-4,
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
    """Fine-tune `checkpoint_dir` on the prepared data in `data_dir` with LoRA adapters.

    Args:
        checkpoint_dir: A converted checkpoint directory (the base model).
        data_dir: Prepared data: `train.pt` and `test.pt` from a `scripts/prepare_*.py` script run with this checkpoint.
        out_dir: Where the run writes hparams.yaml, metrics.csv, step-*/ checkpoints and final/.
        precision: 32-true, bf16-true, bf16-mixed or 16-mixed. Default: bf16-true on GPU, 32-true on CPU.
        quantize: Store the frozen base in 4 bits (QLoRA: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, or torchao's
            ao.nf4, the one that shards under --strategy fsdp) or 8 bits (bnb.int8, bnb.int8-training). Works on CPU
            and GPU.
        devices: Devices per node (GPUs, or CPU processes with --strategy ddp or fsdp).
        num_nodes: Number of nodes.
        strategy: auto, ddp (a full copy of the model per device) or fsdp (FSDP2: weights, gradients and
            optimizer state sharded across the devices; see tutorials/multi_gpu.md).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        lora_dropout: Dropout on the LoRA input.
        lora_query: LoRA on the query projection.
        lora_key: LoRA on the key projection.
        lora_value: LoRA on the value projection.
        lora_projection: LoRA on the attention output projection.
        lora_mlp: LoRA on every MLP linear (every expert's in an MoE).
        lora_head: LoRA on the output head.
        dora: Weight-decomposed LoRA (DoRA): also learn a magnitude per output row.
        lora_router: Train a mixture-of-experts model's routers in full (from scripts/merge_moe.py); with every
            other lora_* flag false, only the routers train.
        micro_batch_size: Samples per forward pass per device.
        global_batch_size: Samples per optimizer step (gradient accumulation makes up the difference).
        learning_rate: Peak learning rate.
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
        save_interval: Save a resumable checkpoint every this many optimizer steps.
        seed: Random seed (data order, dropout, initialization).
        resume: Continue a run: true/auto (the latest checkpoint in out_dir; auto starts fresh if none) or the path
            of a step-* directory. Only --max_steps, --epochs and the eval/save flags may differ from the run's.
        overwrite: Replace the run already in out_dir (its hparams.yaml, metrics.csv, step-*/, final/) instead of
            refusing to start.
    """
    hparams = dict(locals())
    args = TrainArgs.from_flags(hparams)
    lora_config = LoRAConfig.from_hparams(hparams, source="the command line")
    validate_quantize(quantize)
    if lora_router and quantize:
        raise ValueError("--lora_router trains the routers in full precision; it cannot be combined with --quantize")
    if quantize and quantize != "ao.nf4" and strategy == "fsdp":
        raise ValueError(f"--quantize {quantize} cannot be combined with --strategy fsdp: FSDP2 rebuilds every weight as"
                         " a sharded DTensor, which drops bitsandbytes' quantization state; use --quantize ao.nf4"
                         " (torchao's NF4 shards) or --strategy ddp")
    require_checkpoint(checkpoint_dir)
    args.precision = hparams["precision"] = precision or default_precision(trains_base_weights=False)
    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, precision=args.precision,
                      strategy=fabric_strategy(strategy, devices, num_nodes, args.precision, checkpoint_dir, quantize))
    fabric.launch(main, args, lora_config, quantize, hparams)


def main(fabric: L.Fabric, args: TrainArgs, lora_config: LoRAConfig, quantize: Optional[str], hparams: dict) -> None:
    fabric.seed_everything(args.seed)
    config = Config.from_checkpoint(args.checkpoint_dir)
    tokenizer = Tokenizer(args.checkpoint_dir)
    check_prepared_data(args.data_dir, args.checkpoint_dir)
    train_data = load_dataset(args.data_dir / "train.pt", vocab_size=config.vocab_size)
    val_data = load_dataset(args.data_dir / "test.pt", vocab_size=config.vocab_size)
    max_seq_length = min(args.max_seq_length or config.block_size, config.block_size)
    train_data = with_answers(fabric, train_data, max_seq_length, args.data_dir / "train.pt")
    val_data = with_answers(fabric, val_data, max_seq_length, args.data_dir / "test.pt")

    # The base model: loaded in the training dtype, or quantized block by block as it loads (the 4-bit layers compute
    # in bf16), then wrapped with adapters in the training dtype
    dtype = weights_dtype(fabric)
    if quantize and not is_fsdp(fabric):  # FSDP quantizes each Block as it shards it, in fabric.setup_module
        model = load_quantized(args.checkpoint_dir, quantize, fabric.device, dtype=dtype, config=config)
        model.reset_rope(fabric.device)
    else:
        with fabric.init_module(empty_init=True):
            model = GPT(config)
        if not is_fsdp(fabric):  # FSDP loads each rank's shards in fabric.setup_module
            base = load_state_dict(args.checkpoint_dir, dtype=dtype)
            check_weights(model, base, args.checkpoint_dir)
            model.load_state_dict(base, assign=True)
            model.reset_rope(fabric.device)
    model.set_gradient_checkpointing(args.gradient_checkpointing, args.checkpoint_layers, args.checkpoint_rest)
    inject_lora(model, lora_config, dtype=dtype)
    mark_only_lora_as_trainable(model)
    if lora_config.router:
        mark_routers_as_trainable(model)
    print_rank0(fabric, f"Trainable parameters: {count_parameters(model):,} of {count_parameters(model, None):,}")
    model = fabric.setup_module(model)
    if args.compile:  # after setup: under FSDP the compiled Blocks are the sharded ones
        model.module.compile_blocks()
    print_rank0(fabric, f"Setup peak memory: {peak_memory_gb(fabric.device):.2f} GB")
    if fabric.device.type == "cuda":  # from here on the peak is the training's own
        torch.cuda.reset_peak_memory_stats(fabric.device)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(args.optimizer, trainable, lr=args.learning_rate, weight_decay=args.weight_decay,
                                betas=(0.9, 0.95))
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

    check_writable(args.out_dir, checkpoint_bytes(model, trainable_only=True))
    run = open_run(fabric, args.out_dir, hparams, args.resume, args.overwrite)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0, "epoch": 0, "batch_in_epoch": 0,
             "rng": None}
    run.load(fabric, state, trainable_only=True, max_steps=max_steps, warmup_steps=args.warmup_steps)

    with StopOnSignal() as stop:
        train(fabric, state, args, train_data=train_data, val_data=val_data, lengths=lengths, tokenizer=tokenizer,
              max_steps=max_steps, accumulate=accumulate, max_seq_length=max_seq_length, hparams=hparams, stop=stop)
    save_adapter(fabric, model, args.out_dir / "final", hparams)
    print_rank0(fabric, f"Saved the adapter to {args.out_dir / 'final'}")
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
                    f" {args.out_dir}. Lower --learning_rate, or use --precision 32-true or bf16-true."
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
                # the adapter alone too, so generate/, eval/ and merge_lora.py read a step directory as a run
                with throughput.paused(), disk_errors(args.out_dir):
                    path = save_training_state(fabric, args.out_dir, step, state, trainable_only=True,
                                               extra=lambda directory: save_adapter(fabric, model, directory, hparams))
                print_rank0(fabric, f"Saved a checkpoint to {path}")
                if stopping:
                    raise stop.interrupted(step, path)
        if state["step"] < max_steps:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0


def next_token_loss(model, input_ids: torch.Tensor, labels: torch.Tensor,
                    segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 at position t, over the positions whose next label is not -100.

    The head is computed only at those positions: with the prompt masked, that skips most of its work.

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


def save_adapter(fabric, model, run_dir: Path, hparams: dict) -> None:
    # under FSDP every rank takes part in gathering the adapter to its true shapes; rank 0 writes it
    adapter = dict(full_tensors(lora_state_dict(getattr(model, "module", model)).items()))
    if fabric.global_rank == 0:
        save_run_weights(run_dir, adapter, LORA_WEIGHTS, hparams)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(setup)
