"""Sequence classification with the GPT: a linear head on one pooled hidden state per text.

The head reads the final normalized hidden state of the last real (non-padding) token, which in a causal model is
the only position that has seen the whole text, or (`pooling="mean"`) the mean over the real tokens. The training
modes of `finetune/classify.py` differ only in what else trains (`mark_trainable`):

    features      nothing: the pooled states are extracted once and a logistic regression is fitted on them
    head          the head only (the GPT is a frozen feature extractor, trained end to end by SGD)
    last_layers   the head, the last `n_layers` blocks and the final norm
    full          the head and every weight of the GPT
    lora          the head and LoRA adapters (model/lora.py) on the frozen GPT

Prepared data lives in `data/<dataset>/` (written by `scripts/prepare_classification.py`):

    train.pt, test.pt  `torch.save` of a list of samples, loadable with `torch.load(path, weights_only=True)`:
                         "input_ids"  LongTensor (T,)  the text's tokens
                         "label"      int              the class id, an index into meta.json's "labels"
                         "text"       str              the text
                         "truncated"  int              tokens cut off the end to fit max_seq_length (0: none)
    meta.json          "labels" (the class names, in id order), the checkpoint_dir and vocab size of the tokenizer,
                       max_seq_length, per-split class counts and truncation.

A saved classifier (a run's `final/` or `step-*/`) is `hparams.yaml` (the checkpoint it was built on, the mode, the
labels, the pooling, LoRA settings) and `classifier.safetensors`, which holds the head (`score.weight`, plus
`score.bias` for a logistic regression) and every GPT tensor the mode trained (names as in `Classifier`, e.g.
`gpt.transformer.h.29.attn.qkv.weight` or `gpt.transformer.h.0.attn.qkv.lora.q.A`). The frozen rest comes from the
checkpoint, so a LoRA or head-only classifier is a few MB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from model.data.classification import collate
from model.files import atomic_save_figure, atomic_save_safetensors
from model.gpt import GPT

CLASSIFIER_WEIGHTS = "classifier.safetensors"
POOLINGS = ("last", "mean")


def to_right_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front. The GPT has no padding mask: its causal attention keeps padding
    *after* a token from reaching it, but padding before it (left padding) would be attended to and would shift its
    positions. So a left-padded batch is rolled into a right-padded one, which gives every real token exactly the
    hidden state it has in the unpadded text."""
    lengths = attention_mask.sum(dim=1)
    first = attention_mask.int().argmax(dim=1)  # index of each row's first real token
    if not bool(first.any()):
        return input_ids, attention_mask
    T = input_ids.size(1)
    index = (torch.arange(T, device=input_ids.device).unsqueeze(0) + first.unsqueeze(1)) % T
    rolled_mask = torch.arange(T, device=input_ids.device).unsqueeze(0) < lengths.unsqueeze(1)
    return input_ids.gather(1, index), rolled_mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last real token, whatever side the padding is on (transformers'
    *ForSequenceClassification takes the same position: the highest index whose mask is set)."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """`(B, T, C)` hidden states -> `(B, C)`: the last real token's (`last`) or the mean over real tokens (`mean`)."""
    if pooling == "last":
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last_token_index(attention_mask)]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    raise ValueError(f"Unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


class Classifier(nn.Module):
    """A GPT without its LM head, and a linear `score` head over the pooled final hidden state.

    `score` has no bias by default, like transformers' *ForSequenceClassification, so a trained classifier exports
    to them (scripts/convert_to_hf.py --classifier_dir); a logistic regression's head has one (`bias=True`).
    """

    def __init__(self, gpt: GPT, num_labels: int, pooling: str = "last", bias: bool = False) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"A classifier needs at least 2 labels, got {num_labels}")
        if pooling not in POOLINGS:
            raise ValueError(f"Unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        # the LM head is never used; dropping it frees its memory (an untied head is vocab_size x n_embd)
        gpt.lm_head = nn.Identity()
        self.gpt = gpt
        self.pooling = pooling
        # allocated without nn.Linear's random init (it is zeroed anyway), so that building a classifier draws nothing
        # from the random stream: under --strategy fsdp LoRA's A matrices are drawn after it, in one process before it
        self.score = nn.utils.skip_init(nn.Linear, gpt.config.n_embd, num_labels, bias=bias)
        nn.init.zeros_(self.score.weight)  # start at uniform probabilities; the body's gradients flow once it moves
        if bias:
            nn.init.zeros_(self.score.bias)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled hidden states `(B, n_embd)` for token ids `(B, T)`, right- or left-padded."""
        input_ids, attention_mask = to_right_padding(input_ids, attention_mask)
        hidden = self.gpt(input_ids, return_hidden=True)
        return pool(hidden, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits `(B, num_labels)`."""
        return self.score(self.features(input_ids, attention_mask))


def mark_trainable(classifier: Classifier, mode: str, n_layers: int = 1) -> None:
    """Freeze everything the `mode` does not train (see the module docstring). LoRA must be injected before."""
    from model.lora import mark_only_lora_as_trainable

    gpt = classifier.gpt
    if mode == "lora":
        mark_only_lora_as_trainable(gpt)
    else:
        for param in gpt.parameters():
            param.requires_grad_(mode == "full")
    if mode == "last_layers":
        if not 1 <= n_layers <= gpt.config.n_layer:
            raise ValueError(f"--n_layers must be between 1 and the model's {gpt.config.n_layer} layers, got {n_layers}")
        for module in [*gpt.transformer.h[-n_layers:], gpt.transformer.ln_f]:
            for param in module.parameters():
                param.requires_grad_(True)
    for param in classifier.score.parameters():
        param.requires_grad_(mode != "features")


def classifier_state_dict(classifier: nn.Module) -> dict[str, torch.Tensor]:
    """What a saved classifier holds: the head and every trainable tensor (the frozen rest is the checkpoint's).
    A tied embedding is saved once, under `gpt.transformer.wte.weight`. Sharded (FSDP) tensors are gathered to their
    true shapes: a collective that every rank must call."""
    from model.training.fsdp import full_tensors

    classifier = getattr(classifier, "module", classifier)  # inside Fabric's wrapper
    state = {}
    seen = set()
    for name, param in classifier.named_parameters():
        if (param.requires_grad or name.startswith("score.")) and id(param) not in seen:
            seen.add(id(param))
            state[name] = param.detach()
    return dict(full_tensors(state.items()))


def save_classifier(classifier: nn.Module, run_dir: Path, hparams: dict, write: bool = True) -> None:
    """Write the classifier's tensors and hparams.yaml into `run_dir`. Under FSDP call it on every rank (the tensors
    are gathered) with `write` true on rank 0 only."""
    from model.training.run import save_hparams

    state = classifier_state_dict(classifier)
    if not write:
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(state, run_dir / CLASSIFIER_WEIGHTS)
    save_hparams(run_dir, hparams)


def load_classifier(
    run_dir: Path | str, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
    checkpoint_dir: Optional[Path | str] = None,
) -> tuple[Classifier, dict]:
    """The classifier saved in `run_dir` (a run's out_dir, its `final/` or a `step-*/`), in eval mode, and its
    hparams. The base GPT comes from the checkpoint the run was trained on, or `checkpoint_dir` if given."""
    from model.lora import LoRAConfig, inject_lora
    from model.weights.load import load_run, run_output_dir

    run_dir = run_output_dir(Path(run_dir), CLASSIFIER_WEIGHTS)
    hparams, state_dict = load_run(run_dir, CLASSIFIER_WEIGHTS, "finetune/classify.py")
    for key in ("checkpoint_dir", "mode", "labels", "pooling"):
        if key not in hparams:
            raise ValueError(f"{run_dir / 'hparams.yaml'} lacks {key!r}: was it written by finetune/classify.py?")
    checkpoint_dir = Path(checkpoint_dir or hparams["checkpoint_dir"])
    gpt = GPT.from_checkpoint(checkpoint_dir, device=device, dtype=dtype)
    if hparams["mode"] == "lora":
        inject_lora(gpt, LoRAConfig.from_hparams(hparams, source=str(run_dir / "hparams.yaml")))
    classifier = Classifier(gpt, len(hparams["labels"]), hparams["pooling"], bias="score.bias" in state_dict)
    expected = dict(classifier.named_parameters())
    unknown = sorted(state_dict.keys() - expected.keys())
    if unknown or "score.weight" not in state_dict:
        problem = f"unknown tensors {unknown[:3]}" if unknown else "no score.weight"
        raise ValueError(f"{run_dir / CLASSIFIER_WEIGHTS} does not fit a {hparams['mode']} classifier on"
                         f" {checkpoint_dir}: {problem}")
    with torch.no_grad():
        for key, tensor in state_dict.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(f"{run_dir / CLASSIFIER_WEIGHTS}: {key} has shape {tuple(tensor.shape)}, the model's"
                                 f" is {tuple(expected[key].shape)}; was it trained on another checkpoint than"
                                 f" {checkpoint_dir}?")
            expected[key].copy_(tensor)
    return classifier.to(device).eval(), hparams


@torch.no_grad()
def predict(classifier: Classifier, samples: list[dict], batch_size: int = 16, max_seq_length: int = -1,
            device: torch.device | str = "cpu", features: bool = False, progress: bool = False) -> torch.Tensor:
    """Logits `(N, num_labels)` (or pooled features, `features=True`) for the samples, in their order. Samples of
    similar length are batched together, so little compute goes to padding."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="Features" if features else "Predicting", unit="batch")
    out: Optional[torch.Tensor] = None
    for chunk in chunks:
        batch = collate([samples[i] for i in chunk], max_seq_length=max_seq_length)
        args = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        result = (classifier.features(*args) if features else classifier(*args)).float().cpu()
        if out is None:
            out = torch.empty(len(samples), result.size(1))
        out[torch.tensor(chunk)] = result
    return out


def classification_metrics(labels: list[int] | torch.Tensor, predictions: list[int] | torch.Tensor,
                           num_labels: int) -> dict:
    """Accuracy, macro-F1 (each class's F1 counts equally, whatever its size) and the confusion matrix
    (rows: true label, columns: predicted)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    labels, predictions = list(map(int, labels)), list(map(int, predictions))
    classes = list(range(num_labels))
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
    }


def plot_confusion_matrix(matrix: list[list[int]], label_names: list[str], path: Path | str, title: str) -> None:
    """The confusion matrix as a PNG (counts and row percentages), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.array(matrix)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.2 + 0.7 * len(label_names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(label_names)):
        for j in range(len(label_names)):
            ax.text(j, i, f"{counts[i, j]}\n{rates[i, j]:.0%}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(label_names)), label_names, rotation=45 if len(label_names) > 4 else 0)
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    atomic_save_figure(fig, path)


def classifier_to_hf(classifier: Classifier, hparams: dict, pad_token_id: Optional[int]) -> tuple[dict, dict]:
    """The weights and config.json of the transformers *ForSequenceClassification model that computes the same
    logits: the GPT's weights under their HF names (LoRA merged in), `score.weight`, and a config with id2label /
    label2id. transformers pools at the last token that is not `pad_token_id`, so that id must never end a text."""
    from model.lora import LoRALinear, merge_lora
    from model.weights.convert import hf_config_dict, lit_to_hf, weight_maps

    if classifier.pooling != "last":
        raise ValueError(f"This classifier uses {classifier.pooling} pooling; transformers' *ForSequenceClassification"
                         " reads the last token only. Train with --pooling last to export it.")
    if classifier.score.bias is not None:
        raise ValueError("This classifier's head has a bias (a --mode features logistic regression), which the score"
                         " layer of transformers' *ForSequenceClassification has not; it cannot be exported exactly")
    config = classifier.gpt.config
    if any(isinstance(m, LoRALinear) for m in classifier.gpt.modules()):
        merge_lora(classifier.gpt)
    state_dict = {k: v.detach() for k, v in classifier.gpt.state_dict().items()}
    # the sequence-classification model has no LM head: map a stand-in for it, then leave it out
    head_keys = [key for m in weight_maps(config) for key in m.lit if key.startswith("lm_head")]
    for key in head_keys:
        state_dict[key] = torch.empty(0)
    hf_state_dict = {k: v.contiguous() for k, v in lit_to_hf(config, state_dict).items() if not k.startswith("lm_head")}
    hf_state_dict["score.weight"] = classifier.score.weight.detach().contiguous()
    hf_config = hf_config_dict(config)
    hf_config["architectures"] = [config.hf_architecture.replace("ForCausalLM", "ForSequenceClassification")]
    labels = list(hparams["labels"])
    hf_config.update(id2label={str(i): name for i, name in enumerate(labels)},
                     label2id={name: i for i, name in enumerate(labels)}, pad_token_id=pad_token_id,
                     problem_type="single_label_classification")
    return hf_state_dict, hf_config
