"""Serve a checkpoint or any fine-tuning run over an OpenAI-compatible HTTP API.

    python generate/serve.py --checkpoint_dir out/lora/alpaca --port 8000

Then use any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")`, model name = the
`--name` printed at start. Endpoints: /v1/chat/completions (the checkpoint's prompt style; "stream": true sends
server-sent events), /v1/completions, /v1/models, /health. Concurrent requests are decoded together with continuous
batching: a new request joins the running batch at the next token, a finished one leaves at once (see
model/workflows/serve.py).
"""

import socket
from pathlib import Path
from typing import Literal, Optional

from model.cli import run_cli
from model.prompts import has_prompt_style, load_prompt_style
from model.tokenizer import Tokenizer
from model.weights.load import load_any


def serve(
    checkpoint_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: Optional[str] = None,
    max_batch_size: int = 8,
    max_new_tokens: int = 256,
    device: str = "auto",
    precision: Optional[str] = None,
    quantize: Optional[Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8"]] = None,
) -> None:
    """Answer OpenAI-style requests with the model in `checkpoint_dir` until interrupted (Ctrl-C).

    Args:
        checkpoint_dir: A checkpoint directory or any fine-tuning run (a LoRA or adapter run is attached to its base).
        host: The interface to listen on; 127.0.0.1 serves this machine only, 0.0.0.0 every network.
        port: The TCP port.
        name: The model id clients pass as `model` (default: the checkpoint directory's name).
        max_batch_size: The most requests decoded together (each holds a KV cache row); more wait for a free row.
        max_new_tokens: The answer length when a request does not set max_tokens (capped by the context).
        device: "auto" (GPU if there is one), "cpu", "cuda", "cuda:1", ...
        precision: The weights' precision: "32-true", "bf16-true" or "16-true" (default: bf16 on a GPU, fp32 on CPU).
        quantize: Quantize the linear layers with bitsandbytes to save GPU memory (a QLoRA run is by default served
            with the quantization it was trained with).
    """
    import uvicorn

    from model.workflows.serve import BatchingEngine, create_app

    # take the port before the slow model load, so a port in use fails at once
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ValueError(f"Cannot listen on {host}:{port} ({error.strerror}); is another server running? Pass --port")
    try:
        loaded = load_any(checkpoint_dir, device=device, precision=precision, quantize=quantize)
        style_dir = loaded.run_dir if loaded.run_dir and has_prompt_style(loaded.run_dir) else loaded.checkpoint_dir
        style = load_prompt_style(style_dir)
        tokenizer = Tokenizer(loaded.checkpoint_dir)
        model_name = name or Path(checkpoint_dir).resolve().name
        engine = BatchingEngine(loaded.model, tokenizer, max_batch_size=max_batch_size)
        app = create_app(engine, style, model_name, default_max_tokens=max_new_tokens)
        print(f"Serving {model_name!r} ({loaded.kind}, prompt style {style.name}) on http://{host}:{port}/v1")
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        server.run(sockets=[listener])
        engine.close()
    finally:
        listener.close()


if __name__ == "__main__":
    run_cli(serve)
