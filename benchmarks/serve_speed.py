"""Server throughput: 1, 4 and 8 concurrent OpenAI clients against generate/serve.py's engine, continuous batching vs
one by one, and where a decode step's time goes.

    python benchmarks/serve_speed.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

The server runs in this process (uvicorn on a free localhost port, the engine of model/workflows/serve.py) and
the clients are threads using the official `openai` client. Every level sends the same greedy chat requests (8
questions that take long answers of different lengths); the baseline is the same server with `max_batch_size=1`,
which answers the requests one after another. Both run in this one process on the same machine, alternating, so
their ratio holds even on a busy machine (absolute numbers do not).

The second table times the model alone (`ContinuousBatch`, no HTTP): a prompt's prefill, and one decode step at
1, 2, 4 and 8 rows, split into the forward pass and the rest (sampling, bookkeeping). 8 x step(1) / step(8) is the
most 8 clients can gain from batching. With `--gguf_file` (and llama-cpp-python installed) it also times llama.cpp
generating from that GGUF against Forge's `generate` on the same prompt, the same number of tokens and threads.
"""

import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

QUESTIONS = ["Write a short story about a robot who learns to paint.", "Explain how photosynthesis works.",
             "Describe the water cycle step by step.", "Give me three tips for learning a new language.",
             "Summarize the plot of Romeo and Juliet.", "Why is the sky blue?",
             "What are the benefits of regular exercise?", "How does a computer store information?"]


def start_server(checkpoint_dir: Path, max_batch_size: int):
    import uvicorn
    from openai import OpenAI

    from model.prompts import load_prompt_style
    from model.tokenizer import Tokenizer
    from model.weights.load import load_any
    from model.workflows.serve import BatchingEngine, create_app

    loaded = load_any(checkpoint_dir, device="cpu")
    engine = BatchingEngine(loaded.model, Tokenizer(loaded.checkpoint_dir), max_batch_size=max_batch_size)
    app = create_app(engine, load_prompt_style(loaded.checkpoint_dir), "bench")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1", api_key="none", max_retries=0,
                    timeout=1800)
    return client, engine, loaded


def load_level(client, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    """`clients` threads each sending `requests_per_client` chat requests one after another."""

    def one_client(index: int) -> list[tuple[float, int]]:
        results = []
        for r in range(requests_per_client):
            question = QUESTIONS[(index * requests_per_client + r) % len(QUESTIONS)]
            start = time.perf_counter()
            response = client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                temperature=0.0)
            results.append((time.perf_counter() - start, response.usage.completion_tokens))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [item for items in pool.map(one_client, range(clients)) for item in items]
    wall = time.perf_counter() - start
    lengths = [n for _, n in results]
    return {"tokens_per_s": sum(lengths) / wall, "latency_s": statistics.mean(t for t, _ in results),
            "lengths": lengths}


def step_profile(model, tokenizer, style, max_tokens: int) -> None:
    """The model alone: prefill of one prompt, and decode steps at 1, 2, 4, 8 rows (forward pass vs the rest)."""
    from model.generate import ContinuousBatch

    prompts = [tokenizer.encode(style.apply([{"role": "user", "content": q}])) for q in QUESTIONS]
    print(f"\n| rows | prefill ms (one prompt, {prompts[0].numel()} tokens) | decode step ms | of which forward ms |"
          " tokens/s | vs 1 row |\n|---|---|---|---|---|---|")
    forward = model.forward
    base = None
    for rows in (1, 2, 4, 8):
        batch = ContinuousBatch(model)
        start = time.perf_counter()
        for key in range(rows):
            batch.add(key, prompts[key], max_tokens, temperature=0.0)
        prefill_ms = (time.perf_counter() - start) * 1000 / rows
        forward_s = []

        def timed_forward(*args, **kwargs):
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            forward_s.append(time.perf_counter() - start)
            return out

        model.forward = timed_forward
        steps = 0
        start = time.perf_counter()
        while len(batch) == rows and steps < 32:  # full rows only (an answer that ends would shrink the batch)
            batch.step()
            steps += 1
        step_s = (time.perf_counter() - start) / steps
        del model.forward
        for key in batch.keys():
            batch.remove(key)
        base = base or step_s
        print(f"| {rows} | {prefill_ms:.0f} | {step_s * 1000:.1f} | {statistics.mean(forward_s) * 1000:.1f} |"
              f" {rows / step_s:.1f} | {rows * base / step_s:.2f}x |")


def llama_cpp_vs_forge(checkpoint_dir: Path, gguf_file: Path, max_tokens: int, threads: int) -> None:
    import llama_cpp

    from model import GPT
    from model.generate import generate
    from model.prompts import load_prompt_style
    from model.tokenizer import Tokenizer

    prompt = load_prompt_style(checkpoint_dir).apply([{"role": "user", "content": QUESTIONS[0]}])
    ids = Tokenizer(checkpoint_dir).encode(prompt)
    model = GPT.from_checkpoint(checkpoint_dir, dtype=torch.float32)
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=512, n_threads=threads, verbose=False)

    def forge_once() -> int:
        return len(list(generate(model, ids, max_tokens, temperature=0.0)))

    def llama_once() -> int:
        count = 0
        for _ in llm.generate(ids.tolist(), top_k=1, temp=0.0, reset=True):
            count += 1
            if count == max_tokens:
                break
        return count

    times = {"forge (float32)": [], f"llama.cpp ({gguf_file.name})": []}
    forge_once(), llama_once()  # warm-up
    for _ in range(3):
        for name, once in zip(times, (forge_once, llama_once)):
            start = time.perf_counter()
            n = once()
            times[name].append(n / (time.perf_counter() - start))
    print(f"\n| engine ({threads} thread(s), {max_tokens} tokens, median of 3) | tokens/s |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} |")


def main(checkpoint_dir: Path, max_tokens: int = 160, requests_per_client: int = 2, threads: int = 1,
         levels: tuple[int, ...] = (1, 4, 8), gguf_file: Optional[Path] = None) -> None:
    """Print the throughput table, the decode-step profile (and llama.cpp vs Forge with `gguf_file`).

    Args:
        checkpoint_dir: A checkpoint or fine-tuning run.
        max_tokens: The most tokens per answer (greedy; answers that end earlier count what they produced).
        requests_per_client: Requests each client sends one after another at every level (a client's next request
            joins the running batch when its previous answer ends).
        threads: torch (and llama.cpp) threads.
        levels: The numbers of concurrent clients to measure.
        gguf_file: A GGUF export of the same checkpoint to time in llama.cpp.
    """
    from model.prompts import load_prompt_style

    torch.set_num_threads(threads)
    client, engine, loaded = start_server(Path(checkpoint_dir), max_batch_size=max(levels))
    rows = []
    for clients in levels:
        engine.max_batch_size = 1
        one_by_one = load_level(client, clients, requests_per_client, max_tokens)
        engine.max_batch_size = clients
        engine.batch_sizes.clear()
        batched = load_level(client, clients, requests_per_client, max_tokens)
        rows.append((clients, one_by_one, batched, statistics.mean(engine.batch_sizes)))
    print(f"| concurrent clients | answer tokens (min-max, mean) | one by one: tokens/s | latency s |"
          " continuous batching: tokens/s | latency s | mean rows per step | batched / one by one |"
          "\n|---|---|---|---|---|---|---|---|")
    for clients, one_by_one, batched, mean_rows in rows:
        lengths = batched["lengths"]
        print(f"| {clients} | {min(lengths)}-{max(lengths)}, {statistics.mean(lengths):.0f} |"
              f" {one_by_one['tokens_per_s']:.1f} | {one_by_one['latency_s']:.2f} |"
              f" {batched['tokens_per_s']:.1f} | {batched['latency_s']:.2f} | {mean_rows:.1f} |"
              f" {batched['tokens_per_s'] / one_by_one['tokens_per_s']:.2f}x |")
    engine.close()
    step_profile(loaded.model, engine.tokenizer, load_prompt_style(loaded.checkpoint_dir), max_tokens)
    if gguf_file is not None:
        llama_cpp_vs_forge(Path(checkpoint_dir), Path(gguf_file), max_tokens, threads)


if __name__ == "__main__":
    from model.cli import run_cli

    run_cli(main)
