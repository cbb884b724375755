"""Server throughput: 1, 4 and 8 concurrent OpenAI clients against generate/serve.py's engine, batched vs one by one.

    python benchmarks/serve_speed.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

The server runs in this process (uvicorn on a free localhost port, the engine of model/workflows/serve.py) and
the clients are threads using the official `openai` client. Every level sends the same greedy chat requests; the
baseline is the same server with `max_batch_size=1`, which answers the requests one after another. Both run in
this one process on the same machine, alternating, so their ratio holds even on a busy machine (absolute numbers
do not). With `--gguf_file` (and llama-cpp-python installed) it also times llama.cpp generating from that GGUF
against Forge's `generate` on the same prompt, the same number of tokens and threads.
"""

import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

QUESTIONS = ["What is the capital of France?", "What is 2 + 2?", "Name a color.", "Say hello.",
             "What is the capital of Germany?", "Name a fruit.", "What is the opposite of hot?", "Count to three."]


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
                    timeout=600)
    return client, engine


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
    tokens = sum(n for _, n in results)
    return {"tokens_per_s": tokens / wall, "latency_s": statistics.mean(t for t, _ in results), "tokens": tokens}


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


def main(checkpoint_dir: Path, max_tokens: int = 32, requests_per_client: int = 2, threads: int = 1,
         gguf_file: Optional[Path] = None) -> None:
    """Print the throughput table (and llama.cpp vs Forge with `gguf_file`).

    Args:
        checkpoint_dir: A checkpoint or fine-tuning run.
        max_tokens: The most tokens per answer (greedy; answers that end earlier count what they produced).
        requests_per_client: Requests each client sends one after another at every level.
        threads: torch (and llama.cpp) threads.
        gguf_file: A GGUF export of the same checkpoint to time in llama.cpp.
    """
    torch.set_num_threads(threads)
    client, engine = start_server(Path(checkpoint_dir), max_batch_size=8)
    rows = []
    for clients in (1, 4, 8):
        engine.max_batch_size = 1
        one_by_one = load_level(client, clients, requests_per_client, max_tokens)
        engine.max_batch_size = 8
        engine.batch_sizes.clear()
        batched = load_level(client, clients, requests_per_client, max_tokens)
        rows.append((clients, one_by_one, batched, max(engine.batch_sizes)))
    print("| concurrent clients | one by one: tokens/s | latency s | batched: tokens/s | latency s | largest batch |"
          " batched / one by one |\n|---|---|---|---|---|---|---|")
    for clients, one_by_one, batched, largest in rows:
        print(f"| {clients} | {one_by_one['tokens_per_s']:.1f} | {one_by_one['latency_s']:.2f} |"
              f" {batched['tokens_per_s']:.1f} | {batched['latency_s']:.2f} | {largest} |"
              f" {batched['tokens_per_s'] / one_by_one['tokens_per_s']:.2f}x |")
    engine.close()
    if gguf_file is not None:
        llama_cpp_vs_forge(Path(checkpoint_dir), Path(gguf_file), max_tokens, threads)


if __name__ == "__main__":
    from model.cli import run_cli

    run_cli(main)
