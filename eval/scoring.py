"""What the eval scripts share: log-likelihoods of continuations in batches, rolling windows over long texts,
batched greedy answers, and writing a result file.

Scoring a continuation is one forward pass over `context + continuation`; only the continuation's positions go
through the output head (`logits_mask`), which is most of the cost for a large vocabulary. Sequences are sorted by
length and right-padded: causal attention never lets a real position see the padding after it, so each score
equals the one computed alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from model.files import atomic_write_text
from model.generate import generate_batch
from model.gpt import GPT
from model.prompts import PromptStyle
from model.tokenizer import Tokenizer


@torch.inference_mode()
def continuation_logprobs(
    model: GPT, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16, desc: Optional[str] = None,
) -> list[tuple[float, bool]]:
    """For each `(context_ids, continuation_ids)`: the summed log-probability of the continuation given the context,
    and whether greedy decoding would produce exactly the continuation.

    A sequence longer than the model's context keeps its last `block_size` tokens (the continuation must fit).
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    block_size = model.config.block_size
    device = model.transformer.wte.weight.device
    inputs = []
    for index, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"Request {index} has an empty context or continuation; both need at least one token")
        if len(continuation) > block_size:
            raise ValueError(f"A continuation of {len(continuation)} tokens does not fit the model's context of"
                             f" {block_size} tokens")
        # the last token is only ever a target, never an input
        inputs.append((list(context) + list(continuation))[-(block_size + 1):][:-1])
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, disable=desc is None) as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            length = len(inputs[batch[0]])
            idx = torch.zeros(len(batch), length, dtype=torch.long)
            scored = torch.zeros(len(batch), length, dtype=torch.bool)
            targets = []
            for row, i in enumerate(batch):
                n, m = len(inputs[i]), len(requests[i][1])
                idx[row, :n] = torch.tensor(inputs[i])
                scored[row, n - m:n] = True
                targets.extend(requests[i][1])
            logits = model(idx.to(device), logits_mask=scored.to(device))
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            targets_t = torch.tensor(targets, device=logprobs.device)
            token_logprobs = logprobs.gather(-1, targets_t[:, None]).squeeze(-1).cpu()
            greedy = (logprobs.argmax(dim=-1) == targets_t).cpu()
            offset = 0
            for i in batch:
                m = len(requests[i][1])
                results[i] = (float(token_logprobs[offset:offset + m].sum()), bool(greedy[offset:offset + m].all()))
                offset += m
            progress.update(len(batch))
    return results


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split the way lm-evaluation-harness does: the two texts are
    encoded together (a word keeps its usual tokens across the seam) and cut after the context's own tokens; a
    space that ends the context moves to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation).tolist()
    context_ids = tokenizer.encode(context).tolist()
    return whole[:len(context_ids)], whole[len(context_ids):]


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """`(context, continuation)` pairs that score every token of `tokens` exactly once (the first one after
    `prefix_token`, a BOS or EOS), each with as much preceding context as fits in `max_length`. These are
    lm-evaluation-harness's own windows, so a perplexity here equals its `loglikelihood_rolling`."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = get_rolling_token_windows(tokens, prefix_token=prefix_token, max_seq_len=max_length, context_len=1)
    return [make_disjoint_window(window) for window in windows]


def prefix_token(tokenizer: Tokenizer) -> int:
    """The token that stands before a text scored from its very beginning: BOS, or EOS for tokenizers without one
    (what lm-evaluation-harness's HF model uses)."""
    token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if token is None:
        raise ValueError(f"The tokenizer in {tokenizer.checkpoint_dir} has neither a BOS nor an EOS token to start"
                         " a text with")
    return token


def stop_markers(tokenizer: Tokenizer, style: PromptStyle) -> tuple[set[int], list[str]]:
    """What ends a reply: the tokenizer's EOS ids and the prompt style's end-of-turn markers, as ids where a marker
    is one token and as text where it takes several."""
    ids, strings = set(tokenizer.stop_ids), []
    for text in style.stop_tokens():
        encoded = tokenizer.encode(text, bos=False)
        if encoded.numel() == 1:
            ids.add(int(encoded))
        else:
            strings.append(text)
    return ids, strings


def greedy_answers(model: GPT, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                   style: Optional[PromptStyle] = None, desc: str = "Answering") -> list[str]:
    """The greedy answer to each of `prompts` (already rendered in the model's prompt style), decoded in batches;
    with `style`, an answer also ends at the style's end-of-turn markers."""
    stop_ids, stop_strings = stop_markers(tokenizer, style) if style is not None else (tokenizer.stop_ids, [])
    device = model.transformer.wte.weight.device
    answers = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr) as progress:
        for start in range(0, len(prompts), batch_size):
            batch = [tokenizer.encode(p).to(device) for p in prompts[start:start + batch_size]]
            for ids in generate_batch(model, batch, max_new_tokens, temperature=0.0, stop_ids=stop_ids):
                text = tokenizer.decode(ids)
                for marker in stop_strings:
                    text = text.split(marker)[0]
                answers.append(text.strip())
            progress.update(len(batch))
    return answers


def write_result(out_dir: Path, name: str, result: dict) -> Path:
    """Write `result` as `out_dir/name` atomically (never a half-written file) and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / name, json.dumps(result, indent=2, ensure_ascii=False))
    return out_dir / name


def default_out_dir(checkpoint_dir: Path, run_dir: Optional[Path]) -> Path:
    """Where a result goes when --out_dir is not given: the run's weights directory, else out/eval/<checkpoint>."""
    return Path(run_dir) if run_dir is not None else Path("out/eval") / Path(checkpoint_dir).name


def model_flags(path: Path) -> dict:
    """What a path names, as load_model_run's arguments: a checkpoint (model_config.yaml), or a LoRA or adapter run
    (its out_dir, final/ or a step-* directory), told apart by the weights file in it."""
    from model.adapter import ADAPTER_WEIGHTS
    from model.lora import LORA_WEIGHTS

    path = Path(path)
    if (path / "model_config.yaml").is_file():
        return {"checkpoint_dir": path}
    for weights, flag in ((LORA_WEIGHTS, "lora_dir"), (ADAPTER_WEIGHTS, "adapter_dir")):
        if (path / weights).is_file() or (path / "final" / weights).is_file():
            return {flag: path}
    raise FileNotFoundError(
        f"{path} is neither a checkpoint (no model_config.yaml) nor a fine-tuning run (no lora.safetensors or"
        " adapter.safetensors in it or in its final/)"
    )
