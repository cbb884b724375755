"""Token generation with a KV cache: sampling, stopping, and streaming text out of token ids."""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch

from model.gpt import GPT


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
        logits = model(prompt.unsqueeze(0), input_pos)[:, -1]
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


class TextStream:
    """Turns a growing list of token ids into text pieces for printing as they come.

    Decoding token by token breaks multi-byte characters and sentencepiece's leading spaces, so the whole
    generated sequence is decoded each time and only the new suffix is emitted; an incomplete UTF-8 character
    ("\ufffd" at the end) waits for the next token.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece
