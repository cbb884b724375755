"""Chat with a checkpoint or a fine-tuning run in the terminal, multi-turn, with the reply streamed as it is generated.

    python generate/chat.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python generate/chat.py --checkpoint_dir out/lora

Type a message and press Enter. `!reset` starts a new conversation, `!exit` (or Ctrl-D) quits. The whole
conversation is formatted with the checkpoint's prompt style every turn, so the model sees the history.
"""

import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

from model.cli import run_cli
from model.generate import stop_markers, stream_reply
from model.prompts import PromptStyle, load_prompt_style
from model.tokenizer import Tokenizer
from model.weights.load import load_any


def chat(
    checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"),
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: Optional[int] = 50,
    top_p: float = 0.9,
    seed: int = 1234,
    system: Optional[str] = None,
    prompt_style: Optional[str] = None,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    quantize: Optional[str] = None,
    device: str = "auto",
) -> None:
    """Interactive multi-turn chat.

    Args:
        checkpoint_dir: A checkpoint or a fine-tuning run (its out_dir, final/ or a step-* directory).
        max_new_tokens: The most tokens per reply.
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample among the k most likely tokens only.
        top_p: Nucleus sampling threshold.
        seed: Random seed for sampling.
        system: A system message (overrides the prompt style's default).
        prompt_style: Override the checkpoint's prompt style.
        precision: Weights' precision: 32-true, bf16-true or 16-true. Default: bf16 on GPU, fp32 on CPU.
        quantize: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq or bnb.int8; default: a run's base as it trained.
        device: "auto", "cpu", "cuda", ...
    """
    loaded = load_any(checkpoint_dir, device=device, precision=precision, quantize=quantize)
    model = loaded.model
    style = PromptStyle.from_name(prompt_style) if prompt_style else load_prompt_style(loaded.checkpoint_dir)
    tokenizer = Tokenizer(loaded.checkpoint_dir)
    device_ = model.transformer.wte.weight.device
    stop_ids, stop_strings = stop_markers(tokenizer, style)
    generator = torch.Generator(device_).manual_seed(seed)
    context = model.config.block_size
    print(f"Chatting with {model.config.name} ({style.name} prompt style). !reset starts over, !exit quits.",
          file=sys.stderr)

    messages: list[dict] = []
    while True:
        try:
            user = input(">> User: ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if user.strip() == "!exit":
            return
        if user.strip() == "!reset":
            messages = []
            continue
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        prompt_ids = tokenizer.encode(style.apply(messages, system=system)).to(device_)
        # drop the oldest turns when the conversation outgrows the context
        while prompt_ids.numel() + max_new_tokens > context and len(messages) > 1:
            messages = messages[2:]
            prompt_ids = tokenizer.encode(style.apply(messages, system=system)).to(device_)
        print(">> Reply: ", end="", flush=True)
        t0 = time.perf_counter()
        generated: list[int] = []
        reply = ""
        for piece in stream_reply(model, tokenizer, prompt_ids, stop_ids, stop_strings, generated,
                                  max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=generator):
            reply += piece
            print(piece, end="", flush=True)
        elapsed = time.perf_counter() - t0
        print(flush=True)
        print(f"({len(generated)} tokens, {len(generated) / elapsed:.1f} tokens/s)", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply.strip()})


if __name__ == "__main__":
    run_cli(chat)
