"""generate/serve.py and model/workflows/serve.py: the real SmolLM2 behind the server, spoken to with the official
`openai` client (chat, streaming chat, completions, stop sequences, bad and over-long requests), concurrent
clients answered with continuous batching with the same greedy answers as one by one, a client leaving mid-stream,
and a port in use."""

import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from model.generate import generate  # noqa: E402
from model.prompts import load_prompt_style  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from model.weights.load import load_any  # noqa: E402
from model.workflows.serve import BatchingEngine, create_app  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_thread")]
QUESTIONS = ["What is the capital of France?", "What is 2 + 2?", "Name a color.", "Say hello.",
             "What is the capital of Germany?", "Name a fruit.", "What is the opposite of hot?", "Count to three."]


@pytest.fixture(scope="module")
def server(smollm2_dir):
    loaded = load_any(smollm2_dir, device="cpu")
    engine = BatchingEngine(loaded.model, Tokenizer(smollm2_dir), max_batch_size=8)
    app = create_app(engine, load_prompt_style(smollm2_dir), "smollm2")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=http.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    yield client, engine, loaded.model
    http.should_exit = True
    thread.join()
    engine.close()
    listener.close()


def forge_answer(model, smollm2_dir, question: str, max_tokens: int) -> str:
    tokenizer = Tokenizer(smollm2_dir)
    prompt = load_prompt_style(smollm2_dir).apply([{"role": "user", "content": question}])
    ids = generate(model, tokenizer.encode(prompt), max_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids)
    return tokenizer.decode([i for i in ids if i not in tokenizer.stop_ids])


def chat(client, question: str, max_tokens: int = 16, **kwargs):
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                          max_tokens=max_tokens, temperature=0.0, **kwargs)


def test_chat_stream_and_models(server, smollm2_dir):
    client, _, model = server
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    response = chat(client, QUESTIONS[0], max_tokens=24)
    answer = response.choices[0].message.content
    assert answer == forge_answer(model, smollm2_dir, QUESTIONS[0], 24)
    assert "Paris" in answer and response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == len(Tokenizer(smollm2_dir).encode(answer))

    chunks = list(chat(client, QUESTIONS[0], max_tokens=24, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
    assert chunks[-1].choices[0].finish_reason == "stop"

    short = chat(client, QUESTIONS[0], max_tokens=3).choices[0]
    assert short.finish_reason == "length" and answer.startswith(short.message.content)


def test_completions_and_stop_sequences(server):
    client, _, _ = server
    full = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12,
                                     temperature=0.0).choices[0]
    assert full.finish_reason == "length"
    stopped = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12,
                                        temperature=0.0, stop=["Paris"]).choices[0]
    assert "Paris" in full.text and stopped.text == full.text[: full.text.index("Paris")]
    assert stopped.finish_reason == "stop"
    streamed = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12,
                                         temperature=0.0, stop="Paris", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == stopped.text


def test_bad_requests_get_openai_errors(server):
    client, _, _ = server
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], temperature=5.0)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="smollm2", messages=[])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 8192 tokens") as error:
        chat(client, "word " * 9000)
    assert error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        chat(client, "Hi", max_tokens=9000)
    assert chat(client, "Still alive?", max_tokens=2).choices[0].message.content  # the server survived


def test_concurrent_clients_join_a_running_batch_and_match_sequential(server):
    """Continuous batching: 8 clients with different prompts and max_tokens, the last arriving mid-decode, get the
    sequential greedy answers; the batch holds several requests at once and the latecomer joins it running."""
    client, engine, _ = server
    lengths = [40, 8, 24, 16, 48, 12, 32, 20]
    start = time.perf_counter()
    sequential = [chat(client, q, max_tokens=n).choices[0].message.content for q, n in zip(QUESTIONS, lengths)]
    sequential_s = time.perf_counter() - start
    engine.batch_sizes.clear()
    start = time.perf_counter()
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        first = [pool.submit(chat, client, q, n) for q, n in zip(QUESTIONS[:-1], lengths[:-1])]
        while len(engine.batch_sizes) < 4:  # the first seven are decoding
            time.sleep(0.01)
        running_when_it_arrived = len(engine.batch)
        last = pool.submit(chat, client, QUESTIONS[-1], lengths[-1])
        concurrent = [future.result().choices[0].message.content for future in first + [last]]
    concurrent_s = time.perf_counter() - start
    assert concurrent == sequential
    assert running_when_it_arrived > 0 and max(engine.batch_sizes) > 1
    assert idle_soon(engine)
    print(f"\n8 requests: sequential {sequential_s:.1f}s, concurrent {concurrent_s:.1f}s"
          f" ({sequential_s / concurrent_s:.2f}x; {len(engine.batch_sizes)} steps, mean batch"
          f" {sum(engine.batch_sizes) / len(engine.batch_sizes):.1f}; shared machine)")


def idle_soon(engine, seconds: float = 30) -> bool:
    """Whether the engine holds no request and has freed the KV cache within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(engine.batch) == 0 and all(cache is None for cache in engine.model.kv_caches()):
            return True
        time.sleep(0.01)
    return False


def test_a_client_leaving_mid_stream_frees_its_row(server, smollm2_dir):
    """A streaming client that disconnects leaves the batch at once; the request beside it, whose row moves into the
    freed one, still gets its sequential answer."""
    client, engine, model = server
    expected = forge_answer(model, smollm2_dir, QUESTIONS[4], 40)  # before the engine runs: they share the model
    stream = client.completions.create(model="smollm2", prompt="1, 2, 3, 4, 5, 6, 7,", max_tokens=2000,
                                       temperature=0.0, stream=True)
    pieces = [next(stream).choices[0].text for _ in range(3)]
    with ThreadPoolExecutor(1) as pool:
        beside = pool.submit(chat, client, QUESTIONS[4], 40)
        while len(engine.batch) < 2:
            time.sleep(0.01)
        assert "".join(pieces).strip()
        steps_at_close = len(engine.batch_sizes)
        stream.close()  # the first row: the other request moves into it
        assert beside.result().choices[0].message.content == expected
    assert idle_soon(engine)
    assert len(engine.batch_sizes) - steps_at_close < 60  # of the 2000 tokens asked for
    assert chat(client, "Still alive?", max_tokens=2).choices[0].message.content


def test_a_failing_step_answers_500_and_the_engine_goes_on(server, monkeypatch):
    from model.generate import ContinuousBatch

    client, engine, _ = server
    step, failures = ContinuousBatch.step, []

    def fails_once(batch):
        if not failures:
            failures.append(len(batch))
            raise RuntimeError("out of memory")
        return step(batch)

    monkeypatch.setattr(ContinuousBatch, "step", fails_once)
    with pytest.raises(openai.InternalServerError, match="RuntimeError: out of memory"):
        chat(client, QUESTIONS[0])
    assert failures == [1] and idle_soon(engine)
    assert chat(client, "Still alive?", max_tokens=2).choices[0].message.content


def test_port_in_use_is_one_error_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(ROOT / "generate/serve.py"), "--checkpoint_dir", str(tmp_path), "--port", str(port)],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: Cannot listen on 127.0.0.1:{port} (Address already in use); is another server running? Pass --port"]
