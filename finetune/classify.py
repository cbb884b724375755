"""Turn an LLM into a text classifier: frozen features + logistic regression, the head alone, the last layers, all
layers, or LoRA.

    python scripts/prepare_classification.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python finetune/classify.py --mode lora --data_dir data/movie_reviews --out_dir out/classify/lora

Every mode puts a linear head on the final hidden state of the last real token (`--pooling mean`: the mean over the
tokens) and trains what the mode says (model/classify.py): `features` extracts the pooled states once (cached in
out_dir/features/) and fits scikit-learn's logistic regression; `head`, `last_layers --n_layers K`, `full` and `lora`
train with AdamW and cross-entropy in the loop below. The run directory gets `hparams.yaml`, `metrics.csv`,
resumable `step-NNNNNN/` checkpoints, the classifier in `final/` (read by generate/classify.py and
scripts/convert_to_hf.py --classifier_dir), and the test-split evaluation: `results.json` (accuracy, macro-F1,
confusion matrix, train time, peak memory, trainable parameters) and `confusion_matrix.png`.
Copy this file and edit it: the loop is all here.
"""

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import lightning_fabric as L
import torch
import torch.nn.functional as F

from model.cli import NonNegativeInt, PositiveInt, run_cli
from model.config import Config
from model.data.classification import collate, load_classification_data
from model.data.prepare import check_prepared_data
from model.data.sft import save_dataset
from model.device import peak_memory_gb
from model.files import atomic_write_text
from model.gpt import GPT
from model.lora import LoRAConfig, count_parameters, inject_lora
from model.training.optim import build_optimizer
from model.training.run import (
    MetricsLogger,
    Throughput,
    check_weights,
    epoch_batches,
    gradient_accumulation_iters,
    print_rank0,
    rng_state,
    save_training_state,
    warmup_cosine,
)
from model.training.rundir import Run, StopOnSignal, check_writable, checkpoint_bytes, disk_errors, open_run
from model.training.fsdp import is_fsdp
from model.training.strategy import default_precision, fabric_strategy, weights_dtype
from model.weights.checkpoint import lit_weight_files, load_state_dict, require_checkpoint
from model.workflows.classify import (
    Classifier,
    classification_metrics,
    mark_trainable,
    plot_confusion_matrix,
    predict,
    save_classifier,
)

# AdamW learning rate of the GPT's trainable weights per mode: the more of a pretrained model trains, the gentler
DEFAULT_LEARNING_RATES = {"last_layers": 1e-4, "full": 2e-5, "lora": 5e-4}


@dataclass
class ClassifyArgs:
    """The run's flags, typed (`setup`'s docstring documents them)."""

    checkpoint_dir: Path
    data_dir: Path
    out_dir: Path
    mode: str
    n_layers: int
    pooling: str
    precision: str
    micro_batch_size: int
    global_batch_size: int
    learning_rate: Optional[float]
    head_learning_rate: float
    weight_decay: float
    warmup_steps: int
    max_steps: Optional[int]
    epochs: int
    max_seq_length: Optional[int]
    eval_interval: int
    eval_iters: int
    save_interval: int
    logistic_c: float
    feature_batch_size: int
    seed: int
    resume: bool | str | Path
    overwrite: bool
    gradient_checkpointing: str
    checkpoint_layers: Optional[int]
    checkpoint_rest: str
    optimizer: str
    group_by_length: bool
    compile: bool


def setup(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    data_dir: Path = Path("data/movie_reviews"),
    out_dir: Optional[Path] = None,
    mode: Literal["features", "head", "last_layers", "full", "lora"] = "lora",
    n_layers: PositiveInt = 2,
    pooling: Literal["last", "mean"] = "last",
    precision: Optional[Literal["32-true", "bf16-true", "bf16-mixed", "16-mixed"]] = None,
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
    micro_batch_size: PositiveInt = 8,
    global_batch_size: PositiveInt = 16,
    learning_rate: Optional[float] = None,
    head_learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: NonNegativeInt = 10,
    max_steps: Optional[PositiveInt] = None,
    epochs: PositiveInt = 1,
    max_seq_length: Optional[PositiveInt] = None,
    group_by_length: bool = True,
    eval_interval: PositiveInt = 50,
    eval_iters: PositiveInt = 8,
    save_interval: PositiveInt = 100,
    logistic_c: float = 1.0,
    feature_batch_size: PositiveInt = 16,
    gradient_checkpointing: Literal["none", "selective", "block", "offload"] = "none",
    checkpoint_layers: Optional[PositiveInt] = None,
    checkpoint_rest: Literal["none", "selective"] = "none",
    compile: bool = False,
    optimizer: Literal["adamw", "adamw_fused", "adamw8bit", "paged_adamw8bit"] = "adamw",
    seed: int = 1337,
    resume: Union[bool, Literal["auto"], Path] = False,
    overwrite: bool = False,
) -> None:
    """Train a classifier on `checkpoint_dir` with the prepared labelled data in `data_dir`, and score it on the test
    split.

    Args:
        checkpoint_dir: A converted checkpoint directory (the base model).
        data_dir: Prepared data: `train.pt`, `test.pt` and `meta.json` from scripts/prepare_classification.py run
            with this checkpoint.
        out_dir: Where the run writes its files; default out/classify/<mode>.
        mode: What trains: features (frozen pooled states + scikit-learn logistic regression), head (a linear head on
            the frozen model), last_layers (the head, the last --n_layers blocks and the final norm), full
            (everything) or lora (the head and LoRA adapters).
        n_layers: How many of the last transformer blocks train in --mode last_layers.
        pooling: The text's vector: the final hidden state of its last token (last) or the mean over its tokens.
            Only `last` exports to transformers' *ForSequenceClassification.
        precision: 32-true, bf16-true, bf16-mixed or 16-mixed. Default on GPU: bf16-mixed for the modes that train
            GPT weights (last_layers, full), bf16-true for the others; 32-true on CPU.
        devices: Devices per node (GPUs, or CPU processes with --strategy ddp or fsdp); --mode features runs on one.
        num_nodes: Number of nodes.
        strategy: auto, ddp (a full copy of the model per device) or fsdp (FSDP2: the model, its gradients and
            optimizer state sharded across the devices; see tutorials/multi_gpu.md).
        lora_r: LoRA rank (--mode lora).
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        lora_dropout: Dropout on the LoRA input.
        lora_query: LoRA on the query projection.
        lora_key: LoRA on the key projection.
        lora_value: LoRA on the value projection.
        lora_projection: LoRA on the attention output projection.
        lora_mlp: LoRA on every MLP linear.
        micro_batch_size: Texts per forward pass.
        global_batch_size: Texts per optimizer step (gradient accumulation makes up the difference).
        learning_rate: Peak AdamW learning rate of the GPT's trainable weights; default 1e-4 (last_layers), 2e-5
            (full), 5e-4 (lora). Not used by --mode head or features.
        head_learning_rate: Peak learning rate of the new classification head (it starts from zero, so it needs more).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps before the cosine decay.
        max_steps: Optimizer steps to run; default: `epochs` over the training set.
        epochs: Passes over the training set (when max_steps is not given).
        max_seq_length: Cut texts to this many tokens; default: as prepared (up to the model's context).
        group_by_length: Cut micro-batches from texts of similar length (sorted within windows of 50 micro-batches
            of the shuffled texts, the batch order shuffled again), so little padding is computed; false: a plain
            shuffle.
        eval_interval: Validate (loss and accuracy on part of the test split) every this many optimizer steps.
        eval_iters: Validation batches per evaluation.
        save_interval: Save a resumable checkpoint every this many optimizer steps.
        logistic_c: Inverse L2 regularization strength of the logistic regression (--mode features), on
            standardized features.
        feature_batch_size: Texts per forward pass when extracting features and evaluating.
        gradient_checkpointing: what the backward pass computes again instead of keeping: none; selective (the norms'
            and activations' outputs, and LoRA dropout's copies of them: a third to half less, elementwise work);
            block (each Block, keeping only its input: one more forward pass); offload (block, with that input in
            pinned CPU memory). What each saves and costs: tutorials/performance.md.
        checkpoint_layers: Checkpoint only the first this many Blocks as --gradient_checkpointing says (default:
            every Block); memory and recomputation fall in between, in proportion.
        checkpoint_rest: none or selective: the Blocks after the first --checkpoint_layers (with block or offload).
        compile: torch.compile each Block of the training forward and backward pass (dynamic shapes: one graph for
            every sequence length; validation and prediction stay eager). Costs a compilation at step 1.
        optimizer: adamw; adamw_fused (one fused kernel per step); adamw8bit (bitsandbytes: 8-bit moments, 2 instead
            of 8 bytes of state per trained parameter); paged_adamw8bit (adamw8bit paged to host memory on CUDA).
        seed: Random seed (data order, dropout, initialization).
        resume: Continue a run: true/auto (the latest checkpoint in out_dir; auto starts fresh if none) or the path
            of a step-* directory. --mode features has no steps: its cached features make a rerun cheap instead.
            Only --max_steps, --epochs and the eval/save flags may differ from the run's.
        overwrite: Replace the run already in out_dir (its hparams.yaml, metrics.csv, step-*/, final/; the cached
            features stay) instead of refusing to start.
    """
    if out_dir is None:
        out_dir = Path("out/classify") / mode
    hparams = dict(locals())
    if mode == "head" and learning_rate is not None:
        raise ValueError("--learning_rate is the GPT's, and --mode head trains only the head: use --head_learning_rate")
    if mode == "features" and learning_rate is not None:
        raise ValueError("--mode features fits a logistic regression: tune --logistic_c, not --learning_rate")
    if mode == "features" and resume not in (False, "false", "False"):
        raise ValueError("--mode features has no training steps to resume; rerun it with --overwrite true (the features"
                         " are cached)")
    if mode == "features" and (devices * num_nodes > 1 or strategy == "fsdp"):
        raise ValueError("--mode features extracts the features and fits the regression in one process: drop --devices,"
                         " --num_nodes and --strategy")
    require_checkpoint(checkpoint_dir)
    lora_config = LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, query=lora_query, key=lora_key,
                             value=lora_value, projection=lora_projection, mlp=lora_mlp) if mode == "lora" else None
    precision = hparams["precision"] = precision or default_precision(trains_base_weights=mode in ("last_layers", "full"))
    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, precision=precision,
                      strategy=fabric_strategy(strategy, devices, num_nodes, precision, checkpoint_dir))
    args = ClassifyArgs(**{name: hparams[name] for name in ClassifyArgs.__dataclass_fields__})
    fabric.launch(main, args, lora_config, hparams)


def main(fabric: L.Fabric, args: ClassifyArgs, lora_config: Optional[LoRAConfig], hparams: dict) -> None:
    fabric.seed_everything(args.seed)
    config = Config.from_checkpoint(args.checkpoint_dir)
    check_prepared_data(args.data_dir, args.checkpoint_dir)
    train_data, label_names = load_classification_data(args.data_dir, "train", vocab_size=config.vocab_size)
    test_data, _ = load_classification_data(args.data_dir, "test", vocab_size=config.vocab_size)
    if len({s["label"] for s in train_data}) < 2:
        raise ValueError(f"{args.data_dir / 'train.pt'} has only one class: a classifier needs examples of at least two")
    max_seq_length = min(args.max_seq_length or config.block_size, config.block_size)
    hparams = {**hparams, "labels": label_names, **(lora_config.to_hparams() if lora_config else {})}
    if args.mode != "lora":
        hparams = {k: v for k, v in hparams.items() if not k.startswith("lora_")}
    run = open_run(fabric, args.out_dir, hparams, args.resume, args.overwrite)

    dtype = weights_dtype(fabric)
    with fabric.init_module(empty_init=True):
        gpt = GPT(config)
    if not is_fsdp(fabric):  # FSDP loads each rank's shards in fabric.setup_module
        base = load_state_dict(args.checkpoint_dir, dtype=dtype)
        check_weights(gpt, base, args.checkpoint_dir)
        gpt.load_state_dict(base, assign=True)
        gpt.reset_rope(fabric.device)
    gpt.set_gradient_checkpointing(args.gradient_checkpointing, args.checkpoint_layers, args.checkpoint_rest)
    if lora_config is not None:
        inject_lora(gpt, lora_config)
    classifier = Classifier(gpt, len(label_names), args.pooling, bias=args.mode == "features")
    if not is_fsdp(fabric):
        classifier = classifier.to(fabric.device)
    mark_trainable(classifier, args.mode, args.n_layers)
    trainable_params = count_parameters(classifier)
    print_rank0(fabric, f"Mode {args.mode}: {trainable_params:,} trainable parameters of"
                        f" {count_parameters(classifier, None):,}; labels {label_names}")

    if args.mode == "features":
        classifier.eval()
        run.load(fabric, {}, trainable_only=True)  # nothing to resume: writes hparams.yaml
        timing = fit_logistic_regression(fabric, classifier, train_data, args, max_seq_length)
        test_logits = classifier.score(features_of(fabric, classifier, test_data, "test", args,
                                                   max_seq_length)[0].to(fabric.device)).float().cpu()
    else:
        with StopOnSignal() as stop:
            timing = train_classifier(fabric, classifier, train_data, test_data, max_seq_length, args, hparams, run,
                                      stop)
        classifier = timing.pop("model").eval()
        test_logits = predict(classifier, test_data, args.feature_batch_size, max_seq_length, fabric.device)
    save_classifier(classifier, args.out_dir / "final", hparams, write=fabric.global_rank == 0)
    print_rank0(fabric, f"Saved the classifier to {args.out_dir / 'final'}")
    run.close()
    if fabric.global_rank != 0:
        return

    test_labels = [s["label"] for s in test_data]
    result = classification_metrics(test_labels, test_logits.argmax(dim=-1), len(label_names))
    result = {"mode": args.mode, "n_layers": args.n_layers if args.mode == "last_layers" else None,
              "pooling": args.pooling, "labels": label_names, "train_samples": len(train_data),
              "test_samples": len(test_data), "trainable_parameters": trainable_params, **timing,
              "peak_memory_gb": round(peak_memory_gb(fabric.device), 3), **result}
    atomic_write_text(args.out_dir / "results.json", json.dumps(result, indent=1) + "\n")
    title = (f"{args.mode}{' ' + str(args.n_layers) if args.mode == 'last_layers' else ''} on {args.checkpoint_dir.name}\n"
             f"accuracy {result['accuracy']:.1%}, macro-F1 {result['macro_f1']:.3f}")
    plot_confusion_matrix(result["confusion_matrix"], label_names, args.out_dir / "confusion_matrix.png", title)
    print_rank0(fabric, f"Test ({len(test_data)} texts): accuracy {result['accuracy']:.4f} | macro-F1"
                        f" {result['macro_f1']:.4f} | train time {result['train_time_s']:.1f}s | peak memory"
                        f" {result['peak_memory_gb']:.2f} GB\nConfusion matrix (rows: true {label_names}):"
                        f" {result['confusion_matrix']}\nWrote {args.out_dir / 'results.json'} and"
                        f" {args.out_dir / 'confusion_matrix.png'}")


# ----------------------------------------------------------------------------------------------- features + logistic regression


def features_of(fabric, classifier, samples, split: str, args: ClassifyArgs, max_seq_length: int):
    """The pooled hidden states of `samples` and the seconds it took, cached under args.out_dir/features/ by everything
    that determines them: the weights file, the prepared data, the pooling, the length limit and the precision."""
    key = hashlib.sha256()
    for path in [*lit_weight_files(args.checkpoint_dir), args.data_dir / f"{split}.pt"]:
        stat = path.stat()
        key.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    key.update(f"{args.pooling}:{max_seq_length}:{args.precision}".encode())
    cache = args.out_dir / "features" / f"{split}-{key.hexdigest()[:16]}.pt"
    if cache.is_file():
        print_rank0(fabric, f"Using the cached {split} features {cache}")
        return torch.load(cache, weights_only=True), 0.0
    t0 = time.perf_counter()
    features = predict(classifier, samples, args.feature_batch_size, max_seq_length, fabric.device, features=True,
                       progress=True)
    seconds = time.perf_counter() - t0
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_dataset(features, cache)  # the same atomic torch.save
    return features, seconds


def fit_logistic_regression(fabric, classifier, train_data, args: ClassifyArgs, max_seq_length: int) -> dict:
    """Fit scikit-learn's logistic regression on the standardized training features, then fold the standardization
    into the classifier's linear head, so the saved classifier is one GPT + one linear layer like every mode's."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    features, extract_s = features_of(fabric, classifier, train_data, "train", args, max_seq_length)
    labels = [s["label"] for s in train_data]
    t0 = time.perf_counter()
    scaler = StandardScaler().fit(features.numpy())
    regression = LogisticRegression(C=args.logistic_c, max_iter=5000).fit(scaler.transform(features.numpy()), labels)
    fit_s = time.perf_counter() - t0
    coef = torch.tensor(regression.coef_, dtype=torch.float32)
    intercept = torch.tensor(regression.intercept_, dtype=torch.float32)
    if coef.size(0) == 1:  # binary: sklearn's one logit z for class 1 is the softmax over the logits (0, z)
        coef, intercept = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros_like(intercept), intercept])
    # w.(x - mean) / scale + b == (w / scale).x + (b - w.(mean / scale))
    mean, scale = (torch.tensor(a, dtype=torch.float32) for a in (scaler.mean_, scaler.scale_))
    with torch.no_grad():
        classifier.score.weight.copy_(coef / scale)
        classifier.score.bias.copy_(intercept - (coef * (mean / scale)).sum(dim=1))
    train_accuracy = float((torch.tensor(regression.predict(scaler.transform(features.numpy()))) ==
                            torch.tensor(labels)).float().mean())
    print_rank0(fabric, f"Logistic regression (C={args.logistic_c}) fitted in {fit_s:.1f}s, {regression.n_iter_.max()}"
                        f" iterations | train accuracy {train_accuracy:.4f}")
    return {"train_time_s": round(extract_s + fit_s, 2), "feature_extraction_s": round(extract_s, 2),
            "fit_s": round(fit_s, 2), "steps": None}


# ----------------------------------------------------------------------------------------------- training


def train_classifier(fabric, classifier, train_data, test_data, max_seq_length: int, args: ClassifyArgs,
                     hparams: dict, run: Run, stop: StopOnSignal) -> dict:
    model = fabric.setup_module(classifier)
    classifier = getattr(model, "module", model)  # FSDP replaces the parameters with their shards: take them after
    head = list(classifier.score.parameters())
    body = [p for p in classifier.gpt.parameters() if p.requires_grad]
    learning_rate = args.learning_rate or DEFAULT_LEARNING_RATES.get(args.mode, 0.0)
    groups = [{"params": head, "lr": args.head_learning_rate}] + ([{"params": body, "lr": learning_rate}] if body else [])
    if args.compile:
        classifier.gpt.compile_blocks()
    check_writable(args.out_dir, checkpoint_bytes(model, trainable_only=True))
    optimizer = build_optimizer(args.optimizer, groups, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    optimizer = fabric.setup_optimizers(optimizer)

    accumulate = gradient_accumulation_iters(args.global_batch_size, args.micro_batch_size, fabric.world_size)
    lengths = [min(len(s["input_ids"]), max_seq_length) for s in train_data]
    batches_per_epoch = len(epoch_batches(lengths, args.micro_batch_size, 0, args.seed)) // fabric.world_size
    if batches_per_epoch < accumulate:
        raise ValueError(f"{len(train_data)} training texts are too few for one optimizer step of --global_batch_size"
                         f" {args.global_batch_size}; lower it or prepare more texts")
    max_steps = args.max_steps or max(1, args.epochs * batches_per_epoch // accumulate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_steps, max_steps))

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0, "epoch": 0, "batch_in_epoch": 0,
             "rng": None}
    resume_from = run.load(fabric, state, trainable_only=True, max_steps=max_steps, warmup_steps=args.warmup_steps)

    metrics = MetricsLogger(args.out_dir, ["step", "epoch", "loss", "lr", "tokens_per_s", "val_loss", "val_accuracy",
                                      "memory_gb"], resume_step=state["step"] if resume_from else None,
                            enabled=fabric.global_rank == 0)
    throughput = Throughput(start_step=state["step"], max_steps=max_steps)
    started = time.perf_counter()
    model.train()
    if state["step"] == 0:
        with throughput.paused():  # tokens/s counts training time only
            validate(fabric, model, test_data, max_seq_length, args, metrics, step=0)
    while state["step"] < max_steps:
        batches = epoch_batches(lengths, args.micro_batch_size, state["epoch"], args.seed, args.group_by_length)
        batches = batches[fabric.global_rank::fabric.world_size][: len(batches) // fabric.world_size]
        while state["batch_in_epoch"] + accumulate <= len(batches) and state["step"] < max_steps:
            loss_sum = 0.0
            for i in range(accumulate):
                batch = collate([train_data[j] for j in batches[state["batch_in_epoch"] + i]],
                                max_seq_length=max_seq_length)
                logits = model(batch["input_ids"].to(fabric.device), batch["attention_mask"].to(fabric.device))
                loss = F.cross_entropy(logits.float(), batch["labels"].to(fabric.device))
                fabric.backward(loss / accumulate)
                loss_sum += loss.detach()  # read once per step: no host sync per micro-batch
                throughput.update(int(batch["attention_mask"].sum()) * fabric.world_size)  # real tokens, no sync
            # the global batch's loss: every rank's micro-batches, as one process would report it
            loss = fabric.all_reduce(loss_sum / accumulate, reduce_op="mean").item()
            # checked before the optimizer step, so a non-finite value never reaches the weights or a checkpoint
            grad_norm = fabric.clip_gradients(model, optimizer, max_norm=1.0, error_if_nonfinite=False).item()
            skips_overflow = getattr(fabric.strategy.precision, "scaler", None) is not None
            if not math.isfinite(loss) or not (math.isfinite(grad_norm) or skips_overflow):
                raise ValueError(f"The loss or gradient norm became non-finite at step {state['step'] + 1}; nothing was"
                                 f" saved after the last good checkpoint in {args.out_dir}. Lower --learning_rate /"
                                 " --head_learning_rate, or use --precision 32-true or bf16-true.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            state["batch_in_epoch"] += accumulate
            step = state["step"]

            lr = scheduler.get_last_lr()[-1]
            memory = peak_memory_gb(fabric.device)
            print_rank0(fabric, throughput.line(step, loss, lr, memory))
            metrics.log({"step": step, "epoch": state["epoch"], "loss": loss, "lr": lr,
                         "tokens_per_s": throughput.tokens_per_s(), "memory_gb": memory})
            if step % args.eval_interval == 0 or step == max_steps:
                with throughput.paused():
                    validate(fabric, model, test_data, max_seq_length, args, metrics, step)
            stopping = stop.requested(fabric)
            if step % args.save_interval == 0 or step == max_steps or stopping:
                state["rng"] = rng_state()
                with throughput.paused(), disk_errors(args.out_dir):
                    path = save_training_state(fabric, args.out_dir, step, state, trainable_only=True,
                                               extra=lambda directory: save_classifier(
                                                   model, directory, hparams, write=fabric.global_rank == 0))
                print_rank0(fabric, f"Saved a checkpoint to {path}")
                if stopping:
                    raise stop.interrupted(step, path)
        if state["step"] < max_steps:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    # this process's training time (a resumed run counts only its own part), validation included
    return {"train_time_s": round(time.perf_counter() - started, 2), "steps": max_steps,
            "model": getattr(model, "module", model)}


@torch.no_grad()
def validate(fabric, model, test_data, max_seq_length: int, args: ClassifyArgs, metrics, step: int) -> None:
    """Loss and accuracy on the first eval_iters x micro_batch_size test texts: a trend to watch, cheaper than the
    full evaluation at the end."""
    model.eval()
    samples = test_data[: args.eval_iters * args.micro_batch_size]
    batch = collate(samples, max_seq_length=max_seq_length)
    logits = torch.cat([
        model(batch["input_ids"][i:i + args.micro_batch_size].to(fabric.device),
              batch["attention_mask"][i:i + args.micro_batch_size].to(fabric.device)).float()
        for i in range(0, len(samples), args.micro_batch_size)
    ])
    labels = batch["labels"].to(fabric.device)
    val_loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    print_rank0(fabric, f"step {step} | val loss {val_loss:.4f} | val accuracy {accuracy:.4f} ({len(samples)} test texts)")
    metrics.log({"step": step, "val_loss": val_loss, "val_accuracy": accuracy})
    model.train()


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_cli(setup)
