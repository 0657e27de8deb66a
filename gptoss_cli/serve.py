"""``gptoss serve``: one engine behind an OpenAI-compatible HTTP server (Starlette on uvicorn).

The engine holds one KV cache and generates one sequence at a time, so requests are served one
at a time, in arrival order, by a single worker thread reading a bounded queue: a request that
finds the queue full is answered 429 with Retry-After at once rather than waiting unboundedly.
The engine's prefix reuse works across requests: a follow-up turn resends the conversation, which
shares its prefix with the previous prompt, so only the new tokens are prefilled
(``usage.prompt_tokens_details.cached_tokens`` says how many were reused).

The worker checks the request's ``cancelled`` flag after every token: when the client goes away
(the HTTP server reports the disconnect; Starlette cancels the streaming task) decoding stops at
the next token and the engine takes the next request. The wire formats live in ``serve_api.py``
(Chat Completions) and ``serve_responses.py`` (Responses); this module owns the engine, the queue
and the routes, and never formats an OpenAI object itself.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

from .errors import GptossError
from .harmony import STOP_TOKEN_IDS, render_completion
from .serve_api import ApiError, ChatChunks, Delta, GenRequest, ReplyBuilder, chat_completion, chat_request, new_id, sse

DEFAULT_MAX_QUEUE = 16
HISTORY = 64            # finished requests kept for /health and the tests


@dataclass(eq=False)
class Job:
    """One request on its way through the queue: the worker writes its events, the handler reads."""

    id: str
    req: GenRequest
    prompt: list[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0                   # tokens decoded so far (written by the worker)
    generated_at_cancel: int | None = None
    outcome: str = ""                    # stop | length | context | cancelled | error

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.generated_at_cancel = self.generated
            self.cancelled.set()

    def put(self, item) -> None:
        """From the worker thread: hand an item to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:             # the loop is gone (server shutting down)
            self.cancel()


@dataclass(frozen=True)
class Done:
    """The end of a job's events: the builder holds the reply; ``error`` is set if it failed."""

    builder: ReplyBuilder | None
    stop_reason: str
    prompt_tokens: int
    cached_tokens: int
    error: str = ""


class Worker:
    """The thread that owns the engine and runs queued jobs one at a time, in order."""

    def __init__(self, engine, max_queue: int = DEFAULT_MAX_QUEUE):
        self.engine = engine
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.busy: Job | None = None
        self.history: list[Job] = []       # finished jobs, oldest first (the last HISTORY)
        self.served = 0
        self._mean_s = 1.0                 # running mean request time, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="gptoss-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            wait = max(1, round(self._mean_s * (self.queue.qsize() + 1)))
            raise ApiError(429, f"the server is busy: {self.queue.maxsize} requests are already waiting; retry later",
                           code="queue_full", type_="rate_limit_error", headers={"Retry-After": str(wait)}) from None

    def stop(self) -> None:
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass

    def _loop(self) -> None:
        if self.engine.device.type == "cuda":     # a new thread starts on cuda:0
            import torch

            torch.cuda.set_device(self.engine.device)
        while (job := self.queue.get()) is not None:
            if job.cancelled.is_set():     # its client left while it waited: tell its handler
                job.outcome = "cancelled"
                done = Done(None, "cancelled", len(job.prompt), 0, "the client went away")
            else:
                t0, self.busy = time.perf_counter(), job
                try:
                    done = self._run(job)
                finally:
                    self.busy = None
                    self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - t0)
            self.served += 1               # recorded before the client hears of the end
            self.history = (self.history + [job])[-HISTORY:]
            job.put(done)

    def _run(self, job: Job) -> Done:
        eng, req = self.engine, job.req
        builder = ReplyBuilder(eng.tokenizer, req.stop)
        room = eng.max_context - len(job.prompt)
        gen = eng.generate(job.prompt, max_new_tokens=min(req.max_tokens or room, room),
                           temperature=req.temperature, top_p=req.top_p,
                           stop_tokens=() if req.ignore_eos else STOP_TOKEN_IDS, seed=req.seed)
        outcome = ""
        try:
            for tok in gen:
                job.generated += 1
                for d in builder.feed(tok):
                    job.put(d)
                if builder.stop_hit:
                    outcome = "stop"
                    break
                if job.cancelled.is_set():
                    outcome = "cancelled"
                    break
            outcome = outcome or eng.last_stats.stop_reason
        except Exception as e:             # a bug below us: the request fails, the server goes on
            job.outcome = "error"
            return Done(None, "error", len(job.prompt), 0, f"{type(e).__name__}: {e}")
        finally:
            gen.close()
        for d in builder.finish():
            job.put(d)
        job.outcome = outcome
        return Done(builder, outcome, len(job.prompt), eng.last_stats.reused_tokens)


# ---- the HTTP side ----------------------------------------------------------------------------


class Server:
    """The routes over one worker; ``app`` is the ASGI application."""

    def __init__(self, engine, model_name: str, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE):
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.worker = Worker(engine, max_queue)
        self.created = int(time.time())
        self.info = engine.runtime_info()   # once: it imports triton, seconds the first time
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/responses", self.responses, methods=["POST"]),
        ]
        handlers = {404: self._not_found, 405: self._not_allowed, Exception: self._internal}
        self.app = Starlette(routes=routes, exception_handlers=handlers)

    # -- plumbing --------------------------------------------------------------------------------
    @staticmethod
    def _error(e: ApiError):
        from starlette.responses import JSONResponse

        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def _not_found(self, request, exc):
        return self._error(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    async def _internal(self, request, exc):   # a bug of ours: an error object, not a bare 500 page
        return self._error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))

    async def _not_allowed(self, request, exc):
        return self._error(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    def _check_key(self, request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request) -> dict:
        self._check_key(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is None:
            raise ApiError(400, f"'model' is required; this server serves {self.model_name!r}", param="model")
        if model != self.model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return body

    def _submit(self, req: GenRequest, prefix: str) -> Job:
        prompt = render_completion(req.conversation, self.engine.tokenizer)
        limit = self.engine.max_context
        if len(prompt) >= limit:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the context holds {limit} "
                                "(shorten the conversation, or restart the server with a larger --context)",
                           param="messages", code="context_length_exceeded")
        job = Job(new_id(prefix), req, prompt, asyncio.get_running_loop())
        self.worker.submit(job)
        return job

    @staticmethod
    async def _events(job: Job):
        """The job's deltas, then its ``Done``; cancels the job if the reader stops early."""
        finished = False
        try:
            while not finished:
                item = await job.events.get()
                finished = isinstance(item, Done)
                yield item
        finally:
            if not finished:               # the client went away (Starlette cancelled the stream)
                job.cancel()

    @staticmethod
    async def _watch_disconnect(request, job: Job) -> None:
        """For a non-streaming request: cancel its job when the client goes away."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    async def _collect(self, request, job: Job) -> tuple[list[Delta], Done]:
        """A non-streaming request's deltas and ``Done`` (an ``ApiError`` 500 if it failed)."""
        watcher = asyncio.create_task(self._watch_disconnect(request, job))
        deltas = []
        try:
            async for item in self._events(job):
                if isinstance(item, Done):
                    if item.error:
                        raise self._failed(item)
                    return deltas, item
                deltas.append(item)
        finally:
            watcher.cancel()

    @staticmethod
    def _failed(done: Done) -> ApiError:
        return ApiError(500, f"generation failed: {done.error}", code="internal_error")

    def _stream(self, lines):
        from starlette.responses import StreamingResponse

        return StreamingResponse(lines, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _guarded(self, request, handler):
        try:
            return await handler(request)
        except ApiError as e:
            return self._error(e)

    # -- routes ----------------------------------------------------------------------------------
    async def health(self, request):
        from starlette.responses import JSONResponse

        w = self.worker
        return JSONResponse({"status": "ok", "model": self.model_name, "busy": w.busy is not None,
                             "queued": w.queue.qsize(), "served": w.served})

    def _model_object(self) -> dict:
        info = self.info
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gptoss",
                "max_model_len": self.engine.max_context, "random_weights": bool(info["random_weights"]),
                "device": info["device"], "dtype": info["dtype"], "ops": info["ops"],
                "fallbacks": sorted(info["fallbacks"])}      # ops running their reference on this machine

    async def models(self, request):
        from starlette.responses import JSONResponse

        async def handler(request):
            self._check_key(request)
            return JSONResponse({"object": "list", "data": [self._model_object()]})
        return await self._guarded(request, handler)

    async def model(self, request):
        from starlette.responses import JSONResponse

        async def handler(request):
            self._check_key(request)
            name = request.path_params["model"]
            if name != self.model_name:
                raise ApiError(404, f"model {name!r} is not served here", param="model", code="model_not_found")
            return JSONResponse(self._model_object())
        return await self._guarded(request, handler)

    async def chat(self, request):
        return await self._guarded(request, self._chat)

    async def _chat(self, request):
        from starlette.responses import JSONResponse

        req = chat_request(await self._body(request))
        job = self._submit(req, "chatcmpl-")
        if not req.stream:
            _, done = await self._collect(request, job)
            return JSONResponse(chat_completion(job.id, self.model_name, done.builder, done.stop_reason,
                                                done.prompt_tokens, done.cached_tokens))
        chunks = ChatChunks(job.id, self.model_name)

        async def lines():
            yield sse(chunks.first())
            async for item in self._events(job):
                if isinstance(item, Delta):
                    yield sse(chunks.of(item))
                elif item.error:
                    yield sse(self._failed(item).body())
                else:
                    yield sse(chunks.last(item.builder, item.stop_reason))
                    if req.include_usage:
                        yield sse(chunks.usage(item.builder, item.stop_reason, item.prompt_tokens, item.cached_tokens))
            yield sse("[DONE]")
        return self._stream(lines())

    async def responses(self, request):
        return await self._guarded(request, self._responses)

    async def _responses(self, request):
        from starlette.responses import JSONResponse

        from .serve_responses import ResponseEvents, responses_request

        body = await self._body(request)
        req = responses_request(body)
        job = self._submit(req, "resp_")
        events = ResponseEvents(job.id, self.model_name, body, len(job.prompt))
        if not req.stream:
            deltas, done = await self._collect(request, job)
            for d in deltas:
                events.add(d)
            events.finish(done)
            return JSONResponse(events.response)

        async def lines():
            for e in events.start():
                yield sse(e)
            async for item in self._events(job):
                if isinstance(item, Delta):
                    for e in events.add(item):
                        yield sse(e)
                elif item.error:
                    yield sse(self._failed(item).body())
                else:
                    for e in events.finish(item):
                        yield sse(e)
        return self._stream(lines())


# ---- the command ------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts so that a busy port is one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GptossError(f"cannot listen on {host}:{port}: {e.strerror or e}", "pick another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(*, model: str, host: str, port: int, context: int, api_key: str | None, max_queue: int,
        device: str, dtype: str, yes: bool = False) -> None:
    import uvicorn
    from rich.console import Console
    from rich.text import Text

    from .loading import load_engine

    if max_queue < 1:
        raise GptossError("--max-queue must be at least 1")
    if not 0 <= port <= 65535:
        raise GptossError(f"--port {port} is not a port number (0-65535; 0 picks a free one)")
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    sock = bind(host, port)                        # before the (slow) load: fail fast on a busy port
    engine = load_engine(model, device, dtype, context, yes, err)
    server = Server(engine, model, api_key, max_queue)
    shown_host = f"[{host}]" if ":" in host else host
    address = f"http://{shown_host}:{sock.getsockname()[1]}/v1"
    info = server.info
    weights = "RANDOM weights (output is noise)" if info["random_weights"] else "real weights"
    auth = "API key required" if api_key else "no API key"
    line = (f"gptoss serve: {address} · model {model} · {info['device']} {info['dtype']} · "
            f"context {engine.max_context:,} · {weights} · {auth}")
    err.print(Text(line, style="bold"), soft_wrap=True)
    config = uvicorn.Config(server.app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        server.worker.stop()
