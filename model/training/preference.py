"""Preference alignment: the losses (DPO and its IPO / hinge / robust variants, ORPO), sequence log-probabilities and reference log-probs computed once and cached.

Notation, for a prompt x with a chosen answer y_w and a rejected answer y_l:

    log pi(y|x)    the policy's log-probability of an answer: the sum over the answer's tokens (the prompt's tokens,
                   and the padding, are not counted; see `sequence_logps`)
    log ref(y|x)   the same under the frozen reference model (the model before alignment)
    h              (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)), the "DPO logits"
    r(y)           beta * (log pi(y|x) - log ref(y|x)), the implicit reward; its margin r(y_w) - r(y_l) = beta * h
    sigma          the logistic function; log sigma(z) = -softplus(-z)

Reference log-probs are a pure function of (the data file, the reference checkpoint, max_seq_length, the dtype and
quantization the reference runs in), so `reference_cache_path` names the cache after a hash of all of them and a
later run with the same inputs reuses it without loading a reference at all.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from model.data.preference import collate_pairs
from model.data.sft import IGNORE_INDEX
from model.files import atomic_torch_save
from model.training.loss import head_cross_entropy, labelled_positions

LOSSES = ("sigmoid", "ipo", "hinge", "robust", "orpo")


REFERENCE_DIR = "reference"


def dpo_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)): how much more the policy prefers y_w over y_l
    than the reference does."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): L = -log sigma(beta * h).

    With label_smoothing eps > 0 it is conservative DPO (cDPO, Mitchell 2023), which assumes each label is flipped
    with probability eps: L = -(1 - eps) log sigma(beta * h) - eps log sigma(-beta * h). Its minimum is at a finite
    margin, so the rewards stop growing once the pairs are separated."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def ipo_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): L = (h - 1 / (2 beta))^2, a squared loss that pulls the log-ratio margin to a
    fixed target instead of pushing it to infinity, so it does not overfit deterministic preferences.

    Pass h computed from per-token *average* log-probs (`preference_losses` does): TRL does the same, noting the
    IPO authors confirmed that the paper's results use that normalization; with summed log-probs the target
    1 / (2 beta) would mean a different thing for every answer length."""
    return (logits - 1 / (2 * beta)) ** 2


def hinge_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF's hinge loss on the DPO logits (Zhao et al. 2023; Liu et al. 2023, RSO): L = max(0, 1 - beta * h).
    Pairs whose margin beta * h already exceeds 1 give no gradient."""
    return torch.relu(1 - beta * logits)


def robust_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (rDPO, Chowdhury et al. 2024, eq. 9), an unbiased estimate of the DPO loss when each preference
    label is flipped with a known probability eps (`label_smoothing`, below 0.5):

        L = ((1 - eps) * -log sigma(beta * h) - eps * -log sigma(-beta * h)) / (1 - 2 eps)"""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"The robust loss needs a label-flip rate in [0, 0.5), got --label_smoothing {label_smoothing}")
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * logits)
    flipped = -label_smoothing * F.logsigmoid(-beta * logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def orpo_odds_ratio_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4-7), without a reference model:

        odds(y) = p(y) / (1 - p(y)),   p(y) = exp(mean over y's tokens of log pi(token))
        L_OR = -log sigma(log odds(y_w) - log odds(y_l))
        log odds(y) = log p(y) - log(1 - p(y))

    ORPO's full loss is L_SFT (the NLL of y_w) + lambda * L_OR, lambda being `--beta`; the script adds the NLL."""
    chosen_avg_logps, rejected_avg_logps = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        _log1mexp(chosen_avg_logps) - _log1mexp(rejected_avg_logps)
    )
    return -F.logsigmoid(log_odds)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): near 0 through expm1, far below through log1p."""
    x = x.clamp(max=-1e-7)  # an average log-prob of exactly 0 (a certain answer) would be log(0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_losses(
    loss_type: str, beta: float, label_smoothing: float,
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    ref_chosen: Optional[torch.Tensor], ref_rejected: Optional[torch.Tensor],
    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-pair preference loss and the chosen and rejected rewards (detached), from summed sequence log-probs
    and the answers' token counts. DPO variants: r(y) = beta * (log pi(y) - log ref(y)). ORPO has no reference; its
    rewards are beta * the average token log-prob, as TRL logs them, and the ref_* arguments are ignored."""
    if loss_type == "orpo":
        chosen_avg, rejected_avg = policy_chosen / chosen_tokens, policy_rejected / rejected_tokens
        losses = orpo_odds_ratio_loss(chosen_avg, rejected_avg)
        return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"The {loss_type} loss needs reference log-probs")
    if loss_type == "sigmoid":
        losses = sigmoid_loss(dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected), beta, label_smoothing)
    elif loss_type == "ipo":
        losses = ipo_loss(dpo_logits(policy_chosen / chosen_tokens, policy_rejected / rejected_tokens,
                                     ref_chosen / chosen_tokens, ref_rejected / rejected_tokens), beta)
    elif loss_type == "hinge":
        losses = hinge_loss(dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected), beta)
    elif loss_type == "robust":
        losses = robust_loss(dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected), beta, label_smoothing)
    else:
        raise ValueError(f"Unknown loss {loss_type!r}; choose one of {', '.join(LOSSES)}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log pi(token) over each row's labelled tokens, their count), both `(B,)`.

    The output at position t scores label t + 1, and only positions whose next label is not -100 are computed
    (the prompt and the padding are skipped, which also skips most of the output head's work). Right padding is
    never attended to by earlier positions, so a row gives the same value alone or in a padded batch. `labels` may
    stay on the CPU (the training loop keeps them there): the positions are found there, without a host-device
    sync."""
    positions, targets, rows = labelled_positions(labels, input_ids.device)
    # the head and its cross-entropy in chunks: the (N, vocab) float32 logits never exist at once
    token_logps = -model(input_ids, logits_mask=positions, head_fn=partial(head_cross_entropy, targets=targets))
    sums = torch.zeros(len(input_ids), device=token_logps.device, dtype=token_logps.dtype).index_add_(0, rows, token_logps)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    return sums, counts.to(input_ids.device, non_blocking=True)


def file_sha256(paths: Iterable[Path]) -> str:
    """One digest of the files' names and contents (each as `rundir.file_fingerprint` reads it: a weight shard over
    1 GiB by sampled pieces, so an 8B checkpoint is not read whole for a cache key)."""
    from model.training.rundir import file_fingerprint

    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{Path(path).name}:{file_fingerprint(path)};".encode())
    return digest.hexdigest()


def reference_key(data_file: Path, checkpoint_dir: Path, max_seq_length: int, dtype: torch.dtype,
                  quantize: Optional[str]) -> dict:
    """What reference log-probs depend on, each part hashed or spelled out; `reference_cache_path` hashes it all.
    The weights are hashed by content (byte for byte up to 1 GiB a file, sampled pieces above): a checkpoint
    fine-tuned in place keeps its path and size but must not reuse the old log-probs."""
    checkpoint_dir = Path(checkpoint_dir)
    weights = sorted(checkpoint_dir.glob("lit_model*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"No lit_model*.safetensors in {checkpoint_dir}")
    return {
        "data_sha256": file_sha256([data_file]),
        "checkpoint_sha256": file_sha256([checkpoint_dir / "model_config.yaml", *weights]),
        "checkpoint_dir": str(checkpoint_dir),
        "max_seq_length": max_seq_length,
        "dtype": str(dtype).removeprefix("torch."),
        "quantize": quantize,
    }


def reference_cache_path(data_file: Path, key: dict) -> Path:
    hashed = {k: v for k, v in key.items() if k != "checkpoint_dir"}  # a moved checkpoint is still the same model
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]
    return Path(data_file).parent / REFERENCE_DIR / f"{Path(data_file).stem}-{digest}.pt"


def save_reference(path: Path, chosen: torch.Tensor, rejected: torch.Tensor, key: dict) -> None:
    atomic_torch_save({"chosen": chosen.float().cpu(), "rejected": rejected.float().cpu(), "key": key}, Path(path))
    _atomic_json(Path(path).with_suffix(".json"), key)


def _atomic_json(path: Path, obj) -> None:
    from model.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def load_reference(path: Path, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    cached = torch.load(path, weights_only=True)
    if len(cached["chosen"]) != num_pairs:
        raise ValueError(f"{path} holds reference log-probs of {len(cached['chosen'])} pairs, the data has {num_pairs};"
                         " delete it to compute them again")
    return cached["chosen"], cached["rejected"]


@torch.no_grad()
def compute_reference(forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                      samples: list[dict], micro_batch_size: int, max_seq_length: int, device,
                      log: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reference log-probs of every pair's chosen and rejected answer, `(N,)` each, in data order.
    `forward(input_ids, labels)` is `sequence_logps` with the reference model (or the policy, adapters off)."""
    chosen, rejected = [], []
    every = max(1, len(samples) // micro_batch_size // 10)
    for n, start in enumerate(range(0, len(samples), micro_batch_size)):
        batch = collate_pairs(samples[start:start + micro_batch_size], max_seq_length)
        logps, _ = forward(batch["input_ids"].to(device), batch["labels"])
        half = len(logps) // 2
        chosen.append(logps[:half].cpu())
        rejected.append(logps[half:].cpu())
        if (n + 1) % every == 0:
            log(f"  reference log-probs: {min(start + micro_batch_size, len(samples))}/{len(samples)} pairs")
    return torch.cat(chosen), torch.cat(rejected)
