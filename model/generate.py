"""Token generation with a KV cache: sampling, stopping, and streaming text out of token ids."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence

import torch

from model.gpt import GPT

if TYPE_CHECKING:
    from model.prompts import PromptStyle
    from model.tokenizer import Tokenizer


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids `(B,)` from the last position's logits `(B, vocab)`. `temperature=0` is greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(dim=-1)
        remove = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    generator: Optional[torch.Generator] = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids that follow the 1-D `prompt`, one at a time (so callers can stream).

    The prompt is processed in one forward pass that fills the KV cache; each new token then costs one
    single-position forward pass. Stops after yielding a token in `stop_ids`.
    """
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise ValueError("The prompt must be a non-empty 1-D tensor of token ids")
    total = prompt.numel() + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(
            f"The prompt ({prompt.numel()} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's context of"
            f" {model.config.block_size} tokens; lower --max_new_tokens or shorten the prompt"
        )
    stop_ids = set(stop_ids)
    device = prompt.device
    model.set_kv_cache(batch_size=1, max_seq_length=total, device=device)
    try:
        input_pos = torch.arange(prompt.numel(), device=device)
        last_only = (input_pos == input_pos[-1]).unsqueeze(0)
        logits = model(prompt.unsqueeze(0), input_pos, logits_mask=last_only)
        for _ in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            token_id = int(token)
            yield token_id
            if token_id in stop_ids:
                return
            input_pos = input_pos[-1:] + 1
            logits = model(token.view(1, 1), input_pos)[:, -1]
    finally:
        model.clear_kv_cache()


def until_stop(pieces: Iterable[str], stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Pass text pieces through until one of `stop_strings` appears (it is not passed on).

    A tail that could be the start of a stop string is held back until the next piece decides, so a stop
    marker spread over several tokens (e.g. "\nUser:") never reaches the screen. Stopping early also stops the
    generator that feeds `pieces`.
    """
    pending = ""
    for piece in pieces:
        pending += piece
        hits = [pending.find(stop) for stop in stop_strings if stop in pending]
        if hits:
            yield pending[: min(hits)]
            return
        hold = max((k for stop in stop_strings for k in range(1, len(stop)) if pending.endswith(stop[:k])), default=0)
        if len(pending) > hold:
            yield pending[: len(pending) - hold]
            pending = pending[len(pending) - hold:]
    if pending:
        yield pending


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


def stream_reply(model: GPT, tokenizer: Tokenizer, prompt_ids: torch.Tensor, stop_ids: set[int],
                 stop_strings: list[str], generated: list[int], **sampling) -> Iterator[str]:
    """The reply's text, piece by piece, without its stop marker; the token ids are appended to `generated`."""

    def tokens():
        for token_id in generate(model, prompt_ids, stop_ids=stop_ids, **sampling):
            if token_id in stop_ids:
                return
            generated.append(token_id)
            yield token_id

    return until_stop(tokenizer.decode_stream(tokens()), stop_strings)


@torch.inference_mode()
def generate_batch(
    model: GPT,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    generator: Optional[torch.Generator] = None,
) -> list[list[int]]:
    """The generated token ids (stop token excluded) for each of several prompts, decoded together.

    Decoding one token reads every weight once whatever the batch size, so answering many prompts together is
    nearly as fast as answering one. The prompts are left-padded to a common length; the cache masks the padding
    out and starts each sample's positions after it, so each answer equals what `generate` gives alone.
    """
    stop_ids = set(stop_ids)
    device = prompts[0].device
    length = max(p.numel() for p in prompts)
    if length + max_new_tokens > model.config.block_size:
        raise ValueError(f"The longest prompt ({length} tokens) plus max_new_tokens={max_new_tokens} exceeds the"
                         f" model's context of {model.config.block_size} tokens")
    pad_lengths = torch.tensor([length - p.numel() for p in prompts], device=device)
    idx = torch.zeros(len(prompts), length, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, length - p.numel():] = p
    model.set_kv_cache(batch_size=len(prompts), max_seq_length=length + max_new_tokens, device=device,
                       pad_lengths=pad_lengths)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    try:
        input_pos = torch.arange(length, device=device)
        last_only = torch.zeros_like(idx, dtype=torch.bool)
        last_only[:, -1] = True
        logits = model(idx, input_pos, logits_mask=last_only)
        for _ in range(max_new_tokens):
            tokens = sample(logits, temperature, top_k, top_p, generator)
            for i, token in enumerate(tokens.tolist()):
                if not done[i]:
                    done[i] = token in stop_ids
                    if not done[i]:
                        outputs[i].append(token)
            if all(done):
                break
            input_pos = input_pos[-1:] + 1
            logits = model(tokens.view(-1, 1), input_pos)[:, -1]
    finally:
        model.clear_kv_cache()
    return outputs
