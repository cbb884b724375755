"""Align a model with preference pairs: DPO (sigmoid), IPO, hinge, robust DPO, or ORPO; with LoRA, QLoRA or full weights.

    python scripts/prepare_preferences.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python finetune/dpo.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --data_dir data/preferences

Every pair is a prompt x, a chosen answer y_w and a rejected answer y_l. `--loss` picks the objective (formulas in
model/preference.py), with h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) on answer tokens only:

    sigmoid   DPO: -log sigma(beta h); with --label_smoothing eps, conservative DPO
    ipo       (h - 1/(2 beta))^2 on per-token average log-probs
    hinge     max(0, 1 - beta h)
    robust    rDPO: ((1-eps)(-log sigma(beta h)) - eps(-log sigma(-beta h))) / (1 - 2 eps), eps = --label_smoothing
    orpo      ORPO, one stage and no reference model: NLL(y_w) + beta * -log sigma(log odds(y_w) - log odds(y_l))

ORPO is a `--loss` here rather than a script of its own: it needs the same data, batches and loop, and differs
only in the loss line and in loading no reference.

The reference ref(.) is the model before this run. With `--method lora`/`qlora` it is the same model with its
adapters switched off (`model.lora.lora_disabled`), so no second copy is held; with `--method full` a frozen copy.
`--precompute_ref true` computes the reference log-probs of train.pt and test.pt once, saves them in
`<data_dir>/reference/` under a hash of the data file, the checkpoint's weights, max_seq_length, dtype and
quantization, and every later run with the same inputs reuses them without loading a reference.

To align an SFT model, merge the SFT adapter first (`scripts/merge_lora.py --checkpoint_dir out/lora --out_dir
checkpoints/my/sft`) and pass that directory as `--checkpoint_dir`: it is both the starting point and the reference.

The run directory is laid out as finetune/lora.py's (or, with --method full, finetune/full.py's): hparams.yaml,
metrics.csv (loss, rewards, reward margin and preference accuracy on train and validation), resumable step-NNNNNN/
checkpoints and final/, which generate/base.py, eval/tasks.py and scripts/merge_lora.py read as they read an SFT run.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import lightning_fabric as L
import torch

from model.cli import NonNegativeInt, PositiveInt, run_cli
from model.config import Config
from model.data.preference import collate_pairs, load_pairs, pair_lengths, pair_tokens, with_answers
from model.data.prepare import check_prepared_data
from model.device import peak_memory_gb, to_device
from model.gpt import GPT
from model.lora import (
    LORA_WEIGHTS,
    LoRAConfig,
    count_parameters,
    inject_lora,
    lora_disabled,
    lora_state_dict,
    mark_only_lora_as_trainable,
)
from model.quantize import quantize_model, validate_quantize
from model.training.optim import build_optimizer
from model.training.preference import (
    compute_reference,
    load_reference,
    preference_losses,
    reference_cache_path,
    reference_key,
    save_reference,
    sequence_logps,
)
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
    save_run_weights,
    save_training_state,
    step_dir,
    warmup_cosine,
)
from model.training.fsdp import full_tensors, is_fsdp
from model.training.rundir import StopOnSignal, check_writable, checkpoint_bytes, disk_errors, open_run
from model.training.strategy import default_precision, fabric_strategy, weights_dtype
from model.weights.checkpoint import load_state_dict, require_checkpoint

# what a full run's final/ takes from the base checkpoint besides the weights and config (as finetune/full.py)
METRICS = ["step", "epoch", "loss", "lr", "tokens_per_s", "reward_chosen", "reward_rejected", "reward_margin",
           "accuracy", "val_loss", "val_reward_chosen", "val_reward_rejected", "val_reward_margin", "val_accuracy",
           "val_logp_margin", "val_logp_accuracy", "memory_gb"]



@dataclass
class DPOArgs:
    """The preference-specific flags (the shared ones are in TrainArgs)."""

    method: str
    loss: str
    beta: float
    label_smoothing: float
    sft_weight: float
    precompute_ref: bool


def setup(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data_dir: Path = Path("data/preferences"),
    out_dir: Path = Path("out/dpo"),
    method: Literal["lora", "qlora", "full"] = "lora",
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "orpo"] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    precompute_ref: bool = False,
    precision: Optional[Literal["32-true", "bf16-true", "bf16-mixed", "16-mixed"]] = None,
    quantize: Optional[str] = None,
    devices: PositiveInt = 1,
    num_nodes: PositiveInt = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    lora_r: PositiveInt = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    dora: bool = False,
    micro_batch_size: PositiveInt = 2,
    global_batch_size: PositiveInt = 8,
    learning_rate: float = 5e-5,
    weight_decay: float = 0.0,
    warmup_steps: NonNegativeInt = 5,
    max_steps: Optional[PositiveInt] = None,
    epochs: PositiveInt = 1,
    max_seq_length: Optional[PositiveInt] = None,
    group_by_length: bool = True,
    eval_interval: PositiveInt = 25,
    eval_iters: PositiveInt = 25,
    save_interval: PositiveInt = 100,
    gradient_checkpointing: Literal["none", "selective", "block", "offload"] = "none",
    checkpoint_layers: Optional[PositiveInt] = None,
    checkpoint_rest: Literal["none", "selective"] = "none",
    compile: bool = False,
    optimizer: Literal["adamw", "adamw_fused", "adamw8bit", "paged_adamw8bit"] = "adamw",
    seed: int = 1337,
    resume: Union[bool, Literal["auto"], Path] = False,
    overwrite: bool = False,
) -> None:
    """Align `checkpoint_dir` with the preference pairs in `data_dir`.

    Args:
        checkpoint_dir: A converted checkpoint directory: the starting policy and, frozen, the reference model.
        data_dir: Prepared pairs: `train.pt` and `test.pt` from scripts/prepare_preferences.py run with this checkpoint.
        out_dir: Where the run writes hparams.yaml, metrics.csv, step-*/ checkpoints and final/.
        method: lora (adapters on a frozen base), qlora (the same on a 4-bit base; --quantize defaults to bnb.nf4)
            or full (every weight trains; the reference is a frozen copy unless --precompute_ref).
        loss: sigmoid (DPO), ipo, hinge, robust (rDPO) or orpo (reference-free, includes the NLL of y_w).
        beta: DPO's KL strength (0.1 is the paper's default; lower lets the policy move further from the reference);
            for ipo the target margin is 1 / (2 beta); for orpo the weight lambda of the odds-ratio term.
        label_smoothing: The assumed label-flip rate eps: conservative DPO with --loss sigmoid, rDPO with --loss robust.
        sft_weight: Adds this times the NLL of the chosen answers to a DPO-family loss (0: off; orpo has its own).
        precompute_ref: Compute the reference log-probs once, cache them under data_dir/reference/, and train
            without a reference model in memory.
        precision: 32-true, bf16-true, bf16-mixed or 16-mixed. Default: 32-true on CPU; on GPU bf16-true, and
            bf16-mixed with --method full (a bf16 weight cannot hold most full fine-tuning updates).
        quantize: With --method lora/qlora, store the frozen base in 4 or 8 bits (bnb.nf4, bnb.nf4-dq, bnb.fp4,
            bnb.fp4-dq, bnb.int8, bnb.int8-training).
        devices: Devices per node (GPUs, or CPU processes with --strategy ddp or fsdp).
        num_nodes: Number of nodes.
        strategy: auto, ddp (a full copy of the model per device) or fsdp (FSDP2: weights, gradients and
            optimizer state sharded across the devices; LoRA methods, or --method full with --loss orpo).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        lora_dropout: Dropout on the LoRA input (0 by default: dropout makes the policy's log-probs noisy at the
            start, where DPO expects them to equal the reference's).
        lora_query: LoRA on the query projection.
        lora_key: LoRA on the key projection.
        lora_value: LoRA on the value projection.
        lora_projection: LoRA on the attention output projection.
        lora_mlp: LoRA on every MLP linear.
        lora_head: LoRA on the output head.
        dora: Weight-decomposed LoRA (DoRA).
        micro_batch_size: Pairs per forward pass per device (each pair is two sequences).
        global_batch_size: Pairs per optimizer step (gradient accumulation makes up the difference).
        learning_rate: Peak learning rate (LoRA: 5e-5 to 5e-4; full: 5e-7 to 5e-6 as in the DPO paper).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps before the cosine decay.
        max_steps: Optimizer steps to run; default: `epochs` over the training pairs.
        epochs: Passes over the training pairs (when max_steps is not given).
        max_seq_length: Cut sequences to this many tokens; default: the longest (up to the model's context).
        group_by_length: Cut micro-batches from pairs of similar length (sorted within windows of 50 micro-batches
            of the shuffled pairs, the batch order shuffled again), so little padding is computed; false: a plain
            shuffle.
        eval_interval: Validate every this many optimizer steps (and at the first and the last).
        eval_iters: Validation batches per evaluation (the first eval_iters * micro_batch_size pairs of test.pt).
        save_interval: Save a resumable checkpoint every this many optimizer steps.
        gradient_checkpointing: what the backward pass computes again instead of keeping: none; selective (the norms'
            and activations' outputs, and LoRA dropout's copies of them: a third to half less, elementwise work);
            block (each Block, keeping only its input: one more forward pass); offload (block, with that input in
            pinned CPU memory). What each saves and costs: tutorials/performance.md.
        checkpoint_layers: Checkpoint only the first this many Blocks as --gradient_checkpointing says (default:
            every Block); memory and recomputation fall in between, in proportion.
        checkpoint_rest: none or selective: the Blocks after the first --checkpoint_layers (with block or offload).
        compile: torch.compile each Block of the training forward and backward pass (dynamic shapes: one graph for
            every sequence length; validation and generation stay eager). Costs a compilation at step 1.
        optimizer: adamw; adamw_fused (one fused kernel per step); adamw8bit (bitsandbytes: 8-bit moments, 2 instead
            of 8 bytes of state per trained parameter); paged_adamw8bit (adamw8bit paged to host memory on CUDA).
        seed: Random seed (data order, dropout, initialization).
        resume: Continue a run: true/auto (the latest checkpoint in out_dir; auto starts fresh if none) or the path
            of a step-* directory. Only --max_steps, --epochs and the eval/save flags may differ from the run's.
        overwrite: Replace the run already in out_dir (its hparams.yaml, metrics.csv, step-*/, final/) instead of
            refusing to start.
    """
    hparams = dict(locals())
    args = TrainArgs.from_flags(hparams)
    dpo = DPOArgs(method=method, loss=loss, beta=beta, label_smoothing=label_smoothing, sft_weight=sft_weight,
                  precompute_ref=precompute_ref)
    if method == "qlora":
        quantize = hparams["quantize"] = quantize or "bnb.nf4"
    validate_quantize(quantize)
    if quantize and method == "full":
        raise ValueError("--quantize trains adapters on a frozen quantized base: use --method qlora, not full")
    if beta <= 0:
        raise ValueError(f"--beta must be positive, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"--label_smoothing is a label-flip rate in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss not in ("sigmoid", "robust"):
        raise ValueError(f"--label_smoothing applies to --loss sigmoid and robust, not {loss}")
    if sft_weight < 0:
        raise ValueError(f"--sft_weight must be >= 0, got {sft_weight}")
    if sft_weight and loss == "orpo":
        raise ValueError("--loss orpo includes the NLL of the chosen answers already; leave --sft_weight at 0")
    if precompute_ref and loss == "orpo":
        raise ValueError("--loss orpo uses no reference model; --precompute_ref does not apply")
    lora_config = None if method == "full" else LoRAConfig.from_hparams(hparams, source="the command line")
    if strategy == "fsdp" and (quantize or precompute_ref or (method == "full" and loss != "orpo")):
        raise ValueError("--strategy fsdp takes --method lora or dora (the reference is the sharded policy with its"
                         " adapters off) or --method full with --loss orpo (no reference); not --quantize,"
                         " --precompute_ref or a full-model reference copy. Use --strategy ddp for those")
    require_checkpoint(checkpoint_dir)
    args.precision = hparams["precision"] = precision or default_precision(trains_base_weights=method == "full")
    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, precision=args.precision,
                      strategy=fabric_strategy(strategy, devices, num_nodes, args.precision, checkpoint_dir))
    fabric.launch(main, args, dpo, lora_config, quantize, hparams)

def main(fabric: L.Fabric, args: TrainArgs, dpo: DPOArgs, lora_config: Optional[LoRAConfig], quantize: Optional[str],
         hparams: dict) -> None:
    fabric.seed_everything(args.seed)
    config = Config.from_checkpoint(args.checkpoint_dir)
    log = lambda message: print_rank0(fabric, message)  # noqa: E731
    check_prepared_data(args.data_dir, args.checkpoint_dir)
    train_data = load_pairs(args.data_dir / "train.pt", vocab_size=config.vocab_size)
    val_data = load_pairs(args.data_dir / "test.pt", vocab_size=config.vocab_size)
    max_seq_length = min(args.max_seq_length or config.block_size, config.block_size)
    train_data = with_answers(train_data, max_seq_length, args.data_dir / "train.pt", log)
    val_data = with_answers(val_data, max_seq_length, args.data_dir / "test.pt", log)

    dtype = weights_dtype(fabric)
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    if not is_fsdp(fabric):  # FSDP loads each rank's shards in fabric.setup_module
        base = load_state_dict(args.checkpoint_dir, dtype=dtype)
        check_weights(model, base, args.checkpoint_dir)
        model.load_state_dict(base, assign=True)
        model.reset_rope(fabric.device)
    model.set_gradient_checkpointing(args.gradient_checkpointing, args.checkpoint_layers, args.checkpoint_rest)
    if quantize:
        quantize_model(model.to(fabric.device), quantize, compute_dtype=dtype)
    if lora_config is not None:
        inject_lora(model, lora_config)
        mark_only_lora_as_trainable(model)
    log(f"Trainable parameters: {count_parameters(model):,} of {count_parameters(model, None):,}")
    model = fabric.setup_module(model)
    if args.compile:  # after setup: under FSDP the compiled Blocks are the sharded ones
        model.module.compile_blocks()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(args.optimizer, trainable, lr=args.learning_rate, weight_decay=args.weight_decay,
                                betas=(0.9, 0.95))
    optimizer = fabric.setup_optimizers(optimizer)

    accumulate = gradient_accumulation_iters(args.global_batch_size, args.micro_batch_size, fabric.world_size)
    lengths = pair_lengths(train_data, max_seq_length)
    batches_per_epoch = len(epoch_batches(lengths, args.micro_batch_size, 0, args.seed)) // fabric.world_size
    if batches_per_epoch < accumulate:  # an epoch would end before the first optimizer step, forever
        raise ValueError(
            f"{args.data_dir / 'train.pt'} has {len(train_data)} pairs: too few for one optimizer step of"
            f" --global_batch_size {args.global_batch_size} on {fabric.world_size} device(s). Lower"
            " --global_batch_size or prepare more pairs."
        )
    max_steps = args.max_steps or max(1, args.epochs * batches_per_epoch // accumulate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_steps, max_steps))

    check_writable(args.out_dir, checkpoint_bytes(model, trainable_only=lora_config is not None))
    run = open_run(fabric, args.out_dir, hparams, args.resume, args.overwrite)

    # The reference, decided before a resumed state is loaded: until then the policy still is the reference.
    module = getattr(model, "module", model)
    reference = Reference(fabric, dpo.loss, module, max_seq_length)
    if dpo.precompute_ref:
        for split, data in (("train", train_data), ("test", val_data)):
            reference.cached[split] = cached_reference(fabric, module, data, args, split=split,
                                                       max_seq_length=max_seq_length, dtype=dtype, quantize=quantize)
    elif dpo.loss != "orpo" and lora_config is None:
        log("Loading a frozen copy of the model as the reference")
        reference.model = GPT(config).to(dtype)
        reference.model.load_state_dict(load_state_dict(args.checkpoint_dir, dtype=dtype))
        reference.model = reference.model.to(fabric.device).eval().requires_grad_(False)
        reference.model.reset_rope(fabric.device)

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0, "epoch": 0, "batch_in_epoch": 0,
             "rng": None}
    run.load(fabric, state, trainable_only=lora_config is not None, max_steps=max_steps, warmup_steps=args.warmup_steps)

    with StopOnSignal() as stop:
        train(fabric, state, args, dpo, reference=reference, train_data=train_data, val_data=val_data, lengths=lengths,
              max_steps=max_steps, accumulate=accumulate, max_seq_length=max_seq_length, hparams=hparams, stop=stop)
    if lora_config is not None:
        save_adapter(fabric, model, args.out_dir / "final", hparams)
    else:
        save_final_checkpoint(step_dir(args.out_dir, state["step"]), config, args.checkpoint_dir, args.out_dir / "final",
                              hparams, fabric=fabric, model=model)
    log(f"Saved the {'adapter' if lora_config is not None else 'aligned checkpoint'} to {args.out_dir / 'final'}")
    run.close()


class Reference:
    """Reference log-probs of a batch: from the precomputed cache, a frozen copy (`model`), or the policy itself with
    its LoRA adapters switched off."""

    def __init__(self, fabric, loss: str, policy, max_seq_length: int):
        self.fabric, self.loss, self.policy, self.max_seq_length = fabric, loss, policy, max_seq_length
        self.model = None
        self.cached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def logps(self, split: str, indices: list[int], input_ids: torch.Tensor, labels: torch.Tensor):
        if self.loss == "orpo":
            return None, None
        if split in self.cached:
            chosen, rejected = self.cached[split]
            return chosen[indices].to(self.fabric.device), rejected[indices].to(self.fabric.device)
        model = self.model if self.model is not None else self.policy
        switch = lora_disabled(model) if self.model is None else nullcontext()
        with switch, self.fabric.autocast():
            logps, _ = sequence_logps(model, input_ids, labels)
        half = len(logps) // 2
        return logps[:half], logps[half:]


def cached_reference(fabric, module, data: list[dict], args: TrainArgs, *, split: str, max_seq_length: int,
                     dtype: torch.dtype, quantize: Optional[str]):
    """The reference log-probs of `data` from the cache next to `data_file`, computed and saved first if missing."""
    data_file = args.data_dir / f"{split}.pt"
    key = reference_key(data_file, args.checkpoint_dir, max_seq_length, dtype, quantize)
    path = reference_cache_path(data_file, key)
    if path.is_file():
        print_rank0(fabric, f"Using the reference log-probs cached in {path}")
        return load_reference(path, len(data))
    if fabric.global_rank == 0:
        print_rank0(fabric, f"Computing the reference log-probs of {len(data)} pairs of {data_file} once")
        was_training = module.training
        module.eval()

        def forward(input_ids, labels):
            with lora_disabled(module), fabric.autocast():
                return sequence_logps(module, input_ids, labels)

        chosen, rejected = compute_reference(forward, data, args.micro_batch_size, max_seq_length, fabric.device,
                                             lambda message: print_rank0(fabric, message))
        module.train(was_training)
        save_reference(path, chosen, rejected, key)
        print_rank0(fabric, f"Saved them to {path}; later runs with the same data and checkpoint reuse them")
    fabric.barrier()
    return load_reference(path, len(data))


def train(fabric: L.Fabric, state: dict, args: TrainArgs, dpo: DPOArgs, *, reference: "Reference", train_data: list[dict],
          val_data: list[dict], lengths: list[int], max_steps: int, accumulate: int, max_seq_length: int,
          hparams: dict, stop: StopOnSignal) -> None:
    model, optimizer, scheduler = state["model"], state["optimizer"], state["scheduler"]
    metrics = MetricsLogger(args.out_dir, METRICS, resume_step=state["step"] if args.resume else None,
                            enabled=fabric.global_rank == 0)
    throughput = Throughput(start_step=state["step"], max_steps=max_steps)
    model.train()

    if state["step"] == 0:
        with throughput.paused():  # tokens/s counts training time only
            validate(fabric, model, reference, val_data, max_seq_length, args, dpo, metrics, step=0)
    while state["step"] < max_steps:
        batches = epoch_batches(lengths, args.micro_batch_size, state["epoch"], args.seed, args.group_by_length)
        batches = batches[fabric.global_rank::fabric.world_size][: len(batches) // fabric.world_size]
        while state["batch_in_epoch"] + accumulate <= len(batches) and state["step"] < max_steps:
            # loss, reward_chosen, reward_rejected, accuracy, pairs: summed on the device, read once per step
            totals = torch.zeros(5, device=fabric.device)
            for i in range(accumulate):
                indices = batches[state["batch_in_epoch"] + i]
                batch = collate_pairs([train_data[j] for j in indices], max_seq_length)
                # the labels stay on the CPU, where the labelled positions are found without a host-device sync
                input_ids, labels = to_device(batch["input_ids"], fabric.device), batch["labels"]
                # no gradient all-reduce until the last micro-batch of the step
                with fabric.no_backward_sync(model, enabled=i < accumulate - 1):
                    loss, chosen_rewards, rejected_rewards = pair_loss(model, reference, "train", indices, input_ids,
                                                                       labels, dpo)
                    fabric.backward(loss / accumulate)
                totals[:4] += torch.stack([loss.detach().float() * len(indices), chosen_rewards.sum(),
                                           rejected_rewards.sum(), (chosen_rewards > rejected_rewards).sum()]).float()
                totals[4] += len(indices)
                throughput.update(pair_tokens([train_data[j] for j in indices], max_seq_length) * fabric.world_size)
            totals = fabric.all_reduce(totals, reduce_op="sum").cpu()
            loss, reward_chosen, reward_rejected, accuracy = (totals[:4] / totals[4]).tolist()
            # checked before the optimizer step, so a non-finite value never reaches the weights or a checkpoint
            grad_norm = fabric.clip_gradients(model, optimizer, max_norm=1.0, error_if_nonfinite=False).item()
            skips_overflow = getattr(fabric.strategy.precision, "scaler", None) is not None
            if not math.isfinite(loss) or not (math.isfinite(grad_norm) or skips_overflow):
                what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm}"
                raise ValueError(
                    f"The {what} at step {state['step'] + 1}; nothing was saved after the last good checkpoint in"
                    f" {args.out_dir}. Lower --learning_rate or --beta, or use --precision 32-true or bf16-true."
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            state["batch_in_epoch"] += accumulate
            step = state["step"]

            lr = scheduler.get_last_lr()[0]
            memory = peak_memory_gb(fabric.device)
            print_rank0(fabric, f"{throughput.line(step, loss, lr, memory)} | margin {reward_chosen - reward_rejected:.3f}"
                                f" | acc {accuracy:.2f}")
            metrics.log({"step": step, "epoch": state["epoch"], "loss": loss, "lr": lr,
                         "tokens_per_s": throughput.tokens_per_s(), "reward_chosen": reward_chosen,
                         "reward_rejected": reward_rejected, "reward_margin": reward_chosen - reward_rejected,
                         "accuracy": accuracy, "memory_gb": memory})
            if step % args.eval_interval == 0 or step == max_steps:
                with throughput.paused():
                    validate(fabric, model, reference, val_data, max_seq_length, args, dpo, metrics, step)
            stopping = stop.requested(fabric)
            if step % args.save_interval == 0 or step == max_steps or stopping:
                state["rng"] = rng_state()
                with throughput.paused(), disk_errors(args.out_dir):
                    path = save_training_state(
                        fabric, args.out_dir, step, state, trainable_only=dpo.method != "full",
                        extra=lambda directory: (save_adapter(fabric, model, directory, hparams) if dpo.method != "full"
                                                 else save_hparams(directory, hparams)),
                    )
                print_rank0(fabric, f"Saved a checkpoint to {path}")
                if stopping:
                    raise stop.interrupted(step, path)
        if state["step"] < max_steps:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0


def pair_loss(model, reference, split, indices, input_ids, labels, dpo: DPOArgs, policy_logps=None):
    """The batch's loss and its pairs' chosen and rejected rewards: the preference loss of `--loss`, plus the NLL of
    the chosen answers (ORPO's L_SFT, or `--sft_weight` times it)."""
    logps, tokens = policy_logps if policy_logps is not None else sequence_logps(model, input_ids, labels)
    half = len(indices)
    ref_chosen, ref_rejected = reference.logps(split, indices, input_ids, labels)
    losses, chosen_rewards, rejected_rewards = preference_losses(
        dpo.loss, dpo.beta, dpo.label_smoothing, logps[:half], logps[half:], ref_chosen, ref_rejected,
        tokens[:half], tokens[half:])
    chosen_nll = -logps[:half].sum() / tokens[:half].sum()  # token-mean, as an SFT loss
    if dpo.loss == "orpo":
        loss = chosen_nll + dpo.beta * losses.mean()
    else:
        loss = losses.mean() + dpo.sft_weight * chosen_nll
    return loss, chosen_rewards, rejected_rewards


@torch.no_grad()
def validate(fabric, model, reference, val_data, max_seq_length, args, dpo, metrics, step) -> dict:
    """Loss, rewards and preference accuracy on the held-out pairs; also the policy's own preference, log pi(y_w)
    > log pi(y_l), which (unlike the implicit reward, zero for every pair at step 0) says something before training."""
    model.eval()
    val_data = val_data[: args.eval_iters * args.micro_batch_size]  # the first pairs: their indices match the cache
    totals = torch.zeros(7)  # loss, reward_chosen, reward_rejected, accuracy, logp_margin, logp_accuracy, pairs
    for start in range(0, len(val_data), args.micro_batch_size):
        indices = list(range(start, min(start + args.micro_batch_size, len(val_data))))
        batch = collate_pairs([val_data[j] for j in indices], max_seq_length)
        input_ids, labels = batch["input_ids"].to(fabric.device), batch["labels"]
        logps, tokens = sequence_logps(model, input_ids, labels)
        loss, chosen_rewards, rejected_rewards = pair_loss(model, reference, "test", indices, input_ids, labels, dpo,
                                                           policy_logps=(logps, tokens))
        logp_margin = logps[:len(indices)] - logps[len(indices):]
        totals += torch.tensor([loss.item() * len(indices), chosen_rewards.sum().item(), rejected_rewards.sum().item(),
                                (chosen_rewards > rejected_rewards).sum().item(), logp_margin.sum().item(),
                                (logp_margin > 0).sum().item(), len(indices)])
    totals = fabric.all_reduce(totals.to(fabric.device), reduce_op="mean").cpu()
    loss, chosen, rejected, accuracy, logp_margin, logp_accuracy = (totals[:6] / totals[6]).tolist()
    row = {"step": step, "val_loss": loss, "val_reward_chosen": chosen, "val_reward_rejected": rejected,
           "val_reward_margin": chosen - rejected, "val_accuracy": accuracy, "val_logp_margin": logp_margin,
           "val_logp_accuracy": logp_accuracy}
    print_rank0(fabric, f"step {step} | val loss {loss:.4f} | reward margin {chosen - rejected:.4f} | reward accuracy"
                        f" {accuracy:.3f} | log-prob margin {logp_margin:.3f} | log pi(y_w) > log pi(y_l):"
                        f" {logp_accuracy:.3f} ({int(totals[6])} pairs)")
    metrics.log(row)
    model.train()
    return row


def save_adapter(fabric, model, run_dir: Path, hparams: dict) -> None:
    # under FSDP every rank takes part in gathering the adapter to its true shapes; rank 0 writes it
    adapter = dict(full_tensors(lora_state_dict(getattr(model, "module", model)).items()))
    if fabric.global_rank == 0:
        save_run_weights(run_dir, adapter, LORA_WEIGHTS, hparams)




if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(setup)
