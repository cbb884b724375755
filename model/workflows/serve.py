"""An OpenAI-compatible HTTP API over one model, with continuous batching.

`BatchingEngine` owns the model. A background thread runs one decode (`model.generate.ContinuousBatch`, one KV
cache row per request): each step decodes one token for every running request; new requests join at the next step
boundary (their prompt prefilled into a free row) and a request leaves as soon as it ends, so concurrent clients
of different lengths keep the batch full. Each request gets its text as it is decoded (for streaming) through an
asyncio queue. Each request samples with its own settings (a seed gives it its own generator), so any requests
can share the batch.

`create_app` is the FastAPI app: /v1/chat/completions (prompt style of the checkpoint; streaming as server-sent
events), /v1/completions, /v1/models and /health; errors come back as OpenAI-style JSON with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from model.generate import ContinuousBatch
from model.prompts import PromptStyle
from model.tokenizer import Tokenizer


class APIError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(eq=False)
class Job:
    """One request inside the engine: its prompt, sampling settings, and where its text goes."""

    prompt: torch.Tensor
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: Optional[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    tokens: list[int] = field(default_factory=list)
    sent: str = ""  # the text already handed to the client
    finished: bool = False
    cancelled: bool = False  # the client went away: the engine drops the request at the next step

    def emit(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class BatchingEngine:
    """Continuous batching on a background thread: every decode step takes one token for each running request,
    queued requests join at step boundaries (up to `max_batch_size` rows), and a request leaves as soon as it ends
    (stop token, stop string, max_tokens, or its client disconnecting)."""

    def __init__(self, model, tokenizer: Tokenizer, max_batch_size: int = 8):
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.device = next(model.parameters()).device
        self.pending: queue.Queue[Optional[Job]] = queue.Queue()
        # for tests and the benchmark: the rows of every decode step, and how many requests joined a running batch
        self.batch_sizes: list[int] = []
        self.joined_running = 0
        self.batch = ContinuousBatch(model, stop_ids=tokenizer.stop_ids)
        self.thread = threading.Thread(target=self.run, name="forge-batching-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.pending.put(job)

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join()

    def run(self) -> None:
        while self.take_queued_jobs():
            try:
                for job in self.batch.keys():
                    if job.cancelled:
                        self.batch.remove(job)
                if len(self.batch):
                    self.step()
            except Exception as error:  # answers every running request with a 500 and starts afresh
                for job in self.batch.keys():
                    job.emit(("error", f"{type(error).__name__}: {error}"))
                self.batch = ContinuousBatch(self.model, stop_ids=self.tokenizer.stop_ids)
                self.model.clear_kv_cache()
        for job in self.batch.keys():
            self.batch.remove(job)

    def take_queued_jobs(self) -> bool:
        """Prefill queued requests into free rows: wait for one when idle, take only those already waiting when
        busy (the running requests should not stall). False once `close` was called."""
        while len(self.batch) < self.max_batch_size:
            try:
                job = self.pending.get(block=not len(self.batch))
            except queue.Empty:
                return True
            if job is None:
                return False
            if job.cancelled:
                continue
            generator = None if job.seed is None else torch.Generator(self.device).manual_seed(job.seed)
            if len(self.batch):
                self.joined_running += 1
            try:
                self.batch.add(job, job.prompt.to(self.device), job.max_tokens, temperature=job.temperature,
                               top_p=job.top_p, generator=generator)
            except Exception as error:  # a failure answers the request with a 500, never kills the loop
                job.emit(("error", f"{type(error).__name__}: {error}"))
        return True

    def step(self) -> None:
        self.batch_sizes.append(len(self.batch))
        for job, token, ended in self.batch.step():
            self.advance(job, token)
            if job.finished and not ended:  # a stop string
                self.batch.remove(job)

    def advance(self, job: Job, token: int) -> None:
        if token in self.tokenizer.stop_ids:
            self.finish(job, "stop")
            return
        job.tokens.append(token)
        text = self.tokenizer.decode(job.tokens)
        hits = [text.find(stop) for stop in job.stop if stop in text]
        if hits:
            self.send(job, text[: min(hits)])
            self.finish(job, "stop")
            return
        if len(job.tokens) >= job.max_tokens:
            self.send(job, text.rstrip("\ufffd"))
            self.finish(job, "length")
            return
        # hold back an incomplete character and a tail that may become a stop string
        ready = len(text.rstrip("\ufffd"))
        hold = max((k for stop in job.stop for k in range(1, len(stop)) if text[:ready].endswith(stop[:k])), default=0)
        self.send(job, text[: ready - hold])

    def send(self, job: Job, text: str) -> None:
        if len(text) > len(job.sent):
            job.emit(("text", text[len(job.sent):]))
            job.sent = text

    def finish(self, job: Job, reason: str) -> None:
        job.finished = True
        job.emit(("done", reason, len(job.tokens)))


# ----------------------------------------------------------------------------------------------------------------
# The OpenAI API
# ----------------------------------------------------------------------------------------------------------------


class Sampling(BaseModel):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = 1
    stream: bool = False


class ChatMessage(BaseModel):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]


def message_text(message: ChatMessage, index: int) -> str:
    if message.role not in ("system", "user", "assistant"):
        raise APIError(400, f"messages[{index}].role must be system, user or assistant, got {message.role!r}",
                       f"messages[{index}].role")
    if isinstance(message.content, str):
        return message.content
    if isinstance(message.content, list) and all(part.get("type") == "text" for part in message.content):
        return "".join(str(part.get("text", "")) for part in message.content)
    raise APIError(400, f"messages[{index}].content must be text", f"messages[{index}].content")


def create_app(engine: BatchingEngine, style: PromptStyle, model_name: str, default_max_tokens: int = 256) -> FastAPI:
    app = FastAPI(title=f"Forge: {model_name}")
    tokenizer = engine.tokenizer
    block_size = engine.model.config.block_size
    # the prompt style's end-of-turn strings stop a chat answer too (most are also stop tokens)
    style_stops = list(style.stop_tokens())

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        return JSONResponse(error_body(error.message, kind, error.param, error.code), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if part != "body")
        return JSONResponse(error_body(f"{param}: {first['msg']}", param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse(error_body(str(error.detail)), status_code=error.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "forge"}]}

    def make_job(request: Sampling, prompt: str, max_tokens: Optional[int], extra_stop: list[str]) -> Job:
        if request.model != model_name:
            raise APIError(404, f"The model {request.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")
        if request.n != 1:
            raise APIError(400, "Only n=1 is supported", "n")
        ids = tokenizer.encode(prompt)
        room = block_size - ids.numel()
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            asked = max_tokens if max_tokens is not None else 1
            raise APIError(
                400, f"This model's maximum context length is {block_size} tokens. However, you requested"
                f" {ids.numel() + asked} tokens ({ids.numel()} in the messages, {asked} in the completion)."
                " Please reduce the length of the messages or completion.", "messages", "context_length_exceeded",
            )
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        loop = asyncio.get_running_loop()
        return Job(ids, max_tokens or min(default_max_tokens, room), request.temperature, request.top_p,
                   stop + extra_stop, request.seed, loop, asyncio.Queue())

    async def events(job: Job) -> AsyncIterator[tuple]:
        engine.submit(job)
        try:
            while True:
                event = await job.events.get()
                if event[0] == "error":
                    raise APIError(500, event[1])
                yield event
                if event[0] == "done":
                    return
        finally:
            # a client that disconnects mid-stream closes this generator: its row is freed at the next step
            job.cancelled = not job.finished

    async def answer(job: Job) -> tuple[str, str, int]:
        text, reason, n_tokens = "", "length", 0
        async for event in events(job):
            if event[0] == "text":
                text += event[1]
            else:
                reason, n_tokens = event[1], event[2]
        return text, reason, n_tokens

    def usage(job: Job, n_tokens: int) -> dict:
        prompt_tokens = job.prompt.numel()
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens, "total_tokens": prompt_tokens + n_tokens}

    def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except APIError as error:
                yield f"data: {json.dumps(error_body(error.message, 'server_error'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        messages = [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(request.messages)]
        if messages[-1]["role"] == "assistant":
            raise APIError(400, "The last message must come from the user (or the system)", "messages")
        try:
            prompt = style.apply(messages)
        except ValueError as error:
            raise APIError(400, str(error), "messages") from error
        job = make_job(request, prompt, request.max_completion_tokens or request.max_tokens, style_stops)
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": response_id, "created": created, "model": model_name}
        if not request.stream:
            text, reason, n_tokens = await answer(job)
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
            return dict(head, object="chat.completion", choices=[choice], usage=usage(job, n_tokens))

        async def chunks():
            def chunk(delta: dict, reason: Optional[str] = None) -> dict:
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
                return dict(head, object="chat.completion.chunk", choices=[choice])

            yield chunk({"role": "assistant", "content": ""})
            async for event in events(job):
                yield chunk({"content": event[1]}) if event[0] == "text" else chunk({}, event[1])

        return sse(chunks())

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1:
            raise APIError(400, "Send one prompt per request (a list of prompts is not supported)", "prompt")
        job = make_job(request, prompts[0], request.max_tokens, [])
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name,
                "object": "text_completion"}
        if not request.stream:
            text, reason, n_tokens = await answer(job)
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            return dict(head, choices=[choice], usage=usage(job, n_tokens))

        async def chunks():
            async for event in events(job):
                text, reason = (event[1], None) if event[0] == "text" else ("", event[1])
                yield dict(head, choices=[{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}])

        return sse(chunks())

    return app
