"""Token generation with a KV cache: sampling, stopping, streaming text out of token ids, batches of prompts
decoded together, and continuous batching (requests joining and leaving a running decode)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Iterable, Iterator, Optional, Sequence

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
                done[i] = done[i] or token in stop_ids
                if not done[i]:
                    outputs[i].append(token)
            if all(done):
                break
            input_pos = input_pos[-1:] + 1
            logits = model(tokens.view(-1, 1), input_pos)[:, -1]
    finally:
        model.clear_kv_cache()
    return outputs


@dataclass(eq=False)
class Row:
    """One request in a `ContinuousBatch`: its sampling settings and where it stands."""

    key: Hashable
    max_new_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: float
    generator: Optional[torch.Generator]
    position: int  # where the next token's key and value go (= the tokens cached so far)
    logits: torch.Tensor  # `(vocab,)` for the next token
    generated: int = 0


class ContinuousBatch:
    """Requests that join and leave one running decode at step boundaries (continuous batching).

    Each request owns one row of the model's KV cache and sits at its own position in it. `add` prefills a prompt
    alone, into the next free row; `step` samples every row's next token and feeds them all to the model in one
    forward pass (each row attending to its own cached positions only); a request that ends leaves at once: the last
    row moves into its place, so the rows in use are always the first `len(batch)` and a step computes nothing for
    a finished request. The cache is allocated on the first `add`, grows as requests need, and is freed when the
    batch empties. A row's greedy answer equals what `generate` gives for its prompt alone.

    The batch owns the model's KV cache while it holds requests: do not generate with the model elsewhere then.
    """

    def __init__(self, model: GPT, stop_ids: Iterable[int] = ()) -> None:
        self.model, self.stop_ids = model, set(stop_ids)
        self.rows: list[Row] = []

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list[Hashable]:
        return [row.key for row in self.rows]

    @torch.inference_mode()
    def add(self, key: Hashable, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
            top_k: Optional[int] = None, top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> None:
        """Prefill the 1-D `prompt` into a row of its own; its tokens come out of the next `step`s under `key`."""
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError("The prompt must be a non-empty 1-D tensor of token ids")
        length = prompt.numel() + max_new_tokens
        if length > self.model.config.block_size:
            raise ValueError(
                f"The prompt ({prompt.numel()} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's"
                f" context of {self.model.config.block_size} tokens"
            )
        row = len(self.rows)
        if not self.rows:
            self.model.set_kv_cache(batch_size=1, max_seq_length=length, device=prompt.device)
        caches = self.model.kv_caches()
        # rows double when they run out, so a burst of n requests copies the cache about log2(n) times
        rows = row + 1 if row < caches[0].k.size(0) else 2 * row
        for cache in caches:
            cache.grow(rows, length)
            cache.first_row = row
        try:
            input_pos = torch.arange(prompt.numel(), device=prompt.device)
            last_only = (input_pos == input_pos[-1]).unsqueeze(0)
            logits = self.model(prompt.unsqueeze(0), input_pos, logits_mask=last_only)
        finally:
            for cache in caches:
                cache.first_row = 0
        self.rows.append(Row(key, max_new_tokens, temperature, top_k, top_p, generator, prompt.numel(), logits[0]))

    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, int, bool]]:
        """One token for every request: `(key, token, ended)`. A request ends with a stop token (included) or its
        `max_new_tokens`th token, and has then left the batch; the others' tokens go through one forward pass."""
        tokens, next_input = [], {}
        for row in list(self.rows):
            if row.temperature == 0.0:
                token = int(row.logits.argmax())
            else:
                token = int(sample(row.logits.unsqueeze(0), row.temperature, row.top_k, row.top_p, row.generator))
            row.generated += 1
            ended = token in self.stop_ids or row.generated == row.max_new_tokens
            tokens.append((row.key, token, ended))
            if ended:
                self.remove(row.key)
            else:
                next_input[row] = token
        if self.rows:
            device = self.model.lm_head.weight.device
            idx = torch.tensor([[next_input[row]] for row in self.rows], device=device)
            input_pos = torch.tensor([[row.position] for row in self.rows], device=device)
            logits = self.model(idx, input_pos)[:, -1]
            for row, row_logits in zip(self.rows, logits):
                row.logits = row_logits
                row.position += 1
        return tokens

    @torch.inference_mode()
    def remove(self, key: Hashable) -> None:
        """Take a request out at once (it ended, or its client left): the last row moves into its row."""
        index = next(i for i, row in enumerate(self.rows) if row.key is key)
        last = self.rows.pop()
        if index < len(self.rows):
            for cache in self.model.kv_caches():
                cache.move_row(len(self.rows), index, last.position)
            self.rows[index] = last
        if not self.rows:
            self.model.clear_kv_cache()
