"""An OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI + uvicorn).

``POST /v1/completions`` (JSON, or server-sent events with ``"stream": true``), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus text). Text is byte-level (UTF-8 bytes are token
ids, as in ``efformer generate``); a prompt may also be a list of token ids. A bad request is a 4xx
JSON error naming the field (``{"error": {"message", "type", "param"}}``); a full queue is a 503 with
Retry-After; a client that disconnects mid-stream has its request cancelled, which frees its batch
row and KV blocks. The engine steps in one background thread; shutdown lets in-flight requests
finish for ``drain_s`` seconds, then cancels the rest.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pydantic
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from efformer.serve.engine import Engine, QueueFullError, Request, RequestError, SamplingParams

MAX_BODY_BYTES = 1 << 20  # a larger request body is refused (413) before it is parsed


class CompletionRequest(pydantic.BaseModel):
    """The body of ``POST /v1/completions`` (the OpenAI fields efformer honours; others are refused)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[pydantic.StrictInt]
    max_tokens: pydantic.StrictInt = pydantic.Field(16, ge=1)
    temperature: float = pydantic.Field(1.0, ge=0, le=10)
    top_p: float = pydantic.Field(1.0, gt=0, le=1)
    top_k: pydantic.StrictInt | None = pydantic.Field(None, ge=1)
    stop: str | list[str] | None = pydantic.Field(None, validate_default=True)
    stream: bool = False
    seed: pydantic.StrictInt | None = None
    user: str | None = None

    @pydantic.field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if len(v) == 0:
            raise ValueError("the prompt is empty; give text or a non-empty list of token ids")
        return v

    @pydantic.field_validator("stop")
    @classmethod
    def _stops(cls, v):
        v = [v] if isinstance(v, str) else v or []
        if len(v) > 4 or any(not s for s in v):
            raise ValueError("at most 4 non-empty stop strings")
        return v


def _error(status: int, message: str, param: str | None, kind: str = "invalid_request_error", headers=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


class EngineLoop:
    """Runs ``engine.step()`` in a background thread while there is work; hands tokens to asyncio."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.wake = threading.Event()
        self.stopping = False
        self.accepting = True
        self.errors = 0
        self.thread = threading.Thread(target=self._run, name="efformer-engine", daemon=True)

    def start(self) -> None:
        """Start the stepping thread."""
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            if not self.engine.has_work:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # never let one bad step kill the worker: fail what was in flight
                self.errors += 1
                self.engine.abort_all()

    def submit(self, prompt: list[int], params: SamplingParams, on_event) -> Request:
        """Queue a request (RequestError / QueueFullError as the engine raises them)."""
        req = self.engine.submit(prompt, params, on_event=on_event)
        self.wake.set()
        return req

    def shutdown(self, drain_s: float) -> None:
        """Stop accepting, let in-flight requests finish for ``drain_s`` seconds, cancel the rest, stop."""
        self.accepting = False
        end = time.monotonic() + drain_s
        while self.engine.has_work and time.monotonic() < end:
            time.sleep(0.01)
        for req in [*self.engine.waiting, *([self.engine.prefilling] if self.engine.prefilling else []),
                    *self.engine.running]:
            self.engine.cancel(req)
        end = time.monotonic() + 5
        while self.engine.has_work and time.monotonic() < end:
            time.sleep(0.01)
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=5)


def build_app(engine: Engine, model_name: str = "efformer", *, drain_s: float = 10.0) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name``."""
    loop_ = EngineLoop(engine)
    started = time.time()
    counters = {"requests": 0, "rejected": 0, "disconnected": 0}

    @asynccontextmanager
    async def lifespan(app):
        loop_.start()
        yield
        await asyncio.to_thread(loop_.shutdown, drain_s)

    app = FastAPI(title="efformer", lifespan=lifespan)
    app.state.engine_loop = loop_

    @app.middleware("http")
    async def limit_body(request: HttpRequest, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes", "body")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc and first.get("type") != "json_invalid" else "body"  # the top-level field
        counters["rejected"] += 1
        return _error(400, f"{param}: {first.get('msg', 'invalid')}", param)

    @app.get("/health")
    async def health():
        return {"status": "ok" if loop_.accepting else "shutting_down"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "efformer"}]}

    @app.get("/metrics")
    async def metrics():
        e = engine
        lines = {
            "efformer_requests_total": counters["requests"],
            "efformer_requests_rejected_total": counters["rejected"],
            "efformer_requests_disconnected_total": counters["disconnected"],
            "efformer_requests_finished_total": e.stats["finished"],
            "efformer_generated_tokens_total": e.stats["generated"],
            "efformer_prefill_tokens_total": e.stats["prefill_tokens"],
            "efformer_engine_steps_total": e.stats["steps"],
            "efformer_engine_errors_total": loop_.errors,
            "efformer_running_requests": len(e.running),
            "efformer_waiting_requests": len(e.waiting),
            "efformer_kv_blocks_free": e.pool.free,
            "efformer_kv_blocks_total": e.pool.num_blocks,
        }
        return PlainTextResponse("".join(f"{k} {v}\n" for k, v in lines.items()))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HttpRequest):
        counters["requests"] += 1
        if body.model is not None and body.model != model_name:
            counters["rejected"] += 1
            return _error(404, f"model {body.model!r} is not served here; this server has {model_name!r}", "model",
                          "not_found_error")
        if not loop_.accepting:
            return _error(503, "the server is shutting down", None, "server_error")
        prompt = list(body.prompt.encode("utf-8")) if isinstance(body.prompt, str) else list(body.prompt)
        params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                                top_p=None if body.top_p == 1 else body.top_p, seed=body.seed,
                                stop=[list(s.encode("utf-8")) for s in body.stop])
        aio = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(req, tokens, done):  # engine thread -> event loop
            aio.call_soon_threadsafe(queue.put_nowait, (list(tokens), done, req.finish_reason))

        try:
            req = loop_.submit(prompt, params, on_event)
        except RequestError as e:
            counters["rejected"] += 1
            return _error(400, str(e), e.field)
        except QueueFullError as e:
            counters["rejected"] += 1
            return _error(503, str(e), None, "server_error", headers={"Retry-After": "1"})
        created, rid = int(time.time()), f"cmpl-{req.id}"

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            async def events() -> AsyncIterator[str]:
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                try:
                    while True:
                        tokens, done, reason = await queue.get()
                        text = decoder.decode(bytes(t % 256 for t in tokens), final=done)
                        if text or done:
                            yield f"data: {json.dumps(chunk(text, _finish(reason) if done else None))}\n\n"
                        if done:
                            yield "data: [DONE]\n\n"
                            return
                finally:
                    if not req.finished:  # the client went away mid-stream: free its row and blocks
                        counters["disconnected"] += 1
                        engine.cancel(req)
                        loop_.wake.set()

            return StreamingResponse(events(), media_type="text/event-stream")

        out: list[int] = []
        try:
            while True:
                tokens, done, reason = await queue.get()
                out += tokens
                if done:
                    break
        finally:
            if not req.finished:
                engine.cancel(req)
        body_out = chunk(bytes(t % 256 for t in out).decode("utf-8", errors="replace"), _finish(reason))
        body_out["usage"] = {"prompt_tokens": len(prompt), "completion_tokens": len(out),
                             "total_tokens": len(prompt) + len(out)}
        return body_out

    return app


def _finish(reason: str | None) -> str:
    """OpenAI's finish_reason for an engine one ("stop", "length"; cancelled/error read as "stop")."""
    return "length" if reason == "length" else "stop"
