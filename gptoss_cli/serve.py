"""``gptoss serve``: one engine behind an OpenAI-compatible HTTP server (Starlette on uvicorn).

This module owns the routes and the process; ``serve_worker.py`` runs the engine (one request at a
time, in order, from a bounded queue), and the wire formats live in ``serve_api.py`` (Chat
Completions), ``serve_responses.py`` (Responses), ``serve_completions.py`` (Completions and vLLM's
tokenizer endpoints); this module never formats an OpenAI object itself.

The event loop only moves bytes. A request body is read up to ``--max-body`` bytes (more is a 413
before the rest is read); parsing it, rendering the conversation to tokens and writing a large
reply happen on a small thread pool, so one big request never stalls ``/health`` or the other
streams. The listening socket is made with ``IPPROTO_TCP`` so that asyncio sets ``TCP_NODELAY`` on
every connection (otherwise Nagle's algorithm and delayed ACKs add ~40 ms to each reply on a
kept-alive connection). A stream's first event is sent with its first generated token.

Shutdown (Ctrl-C, SIGTERM): the server stops accepting, ends each open stream with an error event
(``[DONE]`` after it on chat and completions; ``response.failed`` on responses), answers queued
requests with a JSON 503, and exits with one line saying so.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from .errors import GptossError
from .harmony import render_completion
from .harmony_constrain import ToolCallConstraint
from .serve_api import ChatChunks, Delta, Done, chat_completion, chat_request, sse
from .serve_completions import (CompletionChunks, TextBuilder, completion, completion_request, detokenize_request,
                                tokenize_request, tokenizer_info)
from .serve_metrics import Metrics
from .serve_params import ApiError, new_id
from .serve_responses import ResponseEvents, responses_request
from .serve_worker import End, Job, Started, Worker

DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_BODY = 4 * 2**20     # a full 131k-token context is under 1.5 MB of JSON, even escaped
PREPARE_THREADS = 2
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses",
          "/tokenize", "/detokenize", "/tokenizer_info")


class Server:
    """The routes over one worker; the server itself is the ASGI application (``app``)."""

    def __init__(self, engine, model_name: str, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 *, max_body: int = DEFAULT_MAX_BODY, cors_origins: tuple[str, ...] = (), parallel: int = 1):
        self.engine, self.model_name, self.api_key, self.max_body = engine, model_name, api_key, max_body
        self.metrics = Metrics(model_name)
        self.worker = Worker(engine, max_queue, self.metrics, parallel)
        self.created = int(time.time())
        self.info = engine.runtime_info()   # once: it imports triton, seconds the first time
        self.info["parallel"] = parallel
        self.tokenizer = engine.tokenizer
        self.vocab = engine.config.vocab_size
        self.closing = False
        self.stopped = (0, 0)               # at shutdown: (requests ended, queued requests refused)
        self._pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="gptoss-prepare")
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/responses", self.responses, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/tokenizer_info", self.tokenizer_info, methods=["GET"]),
        ]
        handlers = {404: self._not_found, 405: self._not_allowed, Exception: self._internal}
        middleware = [Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                 allow_headers=["*"], max_age=600)] if cors_origins else []
        self.starlette = Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)

    @property
    def app(self):
        return self

    async def __call__(self, scope, receive, send):
        """The ASGI application: Starlette's, counting each answer by route and status, and quiet
        about the tasks uvicorn cancels once shutdown has waited long enough."""
        if scope["type"] != "http":
            return await self.starlette(scope, receive, send)
        path = scope["path"]
        route = "/v1/models" if path.startswith("/v1/models/") else path if path in ROUTES else "other"
        status = 0

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.starlette(scope, receive, counted)
        except asyncio.CancelledError:
            if not self.closing:
                raise
        finally:
            if status:
                self.metrics.request(route, status)

    def begin_shutdown(self) -> None:
        """Refuse new requests, end the running one and the queued ones (on the event loop)."""
        if not self.closing:
            self.closing = True
            self.stopped = self.worker.close()

    # -- plumbing --------------------------------------------------------------------------------
    @staticmethod
    def _error(e: ApiError):
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

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this server takes ({self.max_body:,} bytes; "
                             "restart it with a larger --max-body)", code="request_too_large",
                        headers={"Connection": "close"})

    async def _read(self, request) -> bytes:
        """The request's body, at most ``max_body`` bytes (413 as soon as it is known to be more)."""
        self._check_key(request)
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down", headers={"Connection": "close"})
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large()
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large()
            parts.append(chunk)
        return b"".join(parts)

    async def _offload(self, fn, *args):
        """``fn(*args)`` on the prepare threads: CPU work never runs on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _json(self, obj, status: int = 200):
        return await self._offload(lambda: JSONResponse(obj, status_code=status))

    def _parse(self, raw: bytes, model_required: bool = True) -> dict:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is None and model_required:
            raise ApiError(400, f"'model' is required; this server serves {self.model_name!r}", param="model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return body

    def _fits(self, prompt: list[int], param: str) -> list[int]:
        limit = self.engine.max_context
        if len(prompt) >= limit:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the context holds {limit} "
                                "(shorten the conversation, or restart the server with a larger --context)",
                           param=param, code="context_length_exceeded")
        return prompt

    # These run on the prepare threads: parse, check, render.
    def _prepare_chat(self, raw: bytes):
        body = self._parse(raw)
        req = chat_request(body, self.vocab)
        return body, req, [self._fits(render_completion(req.conversation, self.tokenizer), "messages")]

    def _prepare_responses(self, raw: bytes):
        body = self._parse(raw)
        req = responses_request(body, self.vocab)
        return body, req, [self._fits(render_completion(req.conversation, self.tokenizer), "input")]

    def _prepare_completions(self, raw: bytes):
        body = self._parse(raw)
        req, prompts = completion_request(body, self.tokenizer, self.vocab)
        return body, req, [self._fits(p, "prompt") for p in prompts]

    def _submit(self, prefix: str, req, prompts: list[list[int]], builder=None) -> Job:
        constraint = None
        if req.tool_choice.mode == "required":
            names = [req.tool_choice.name] if req.tool_choice.name else [t.name for t in req.conversation.tools]
            constraint = lambda: ToolCallConstraint(self.tokenizer, names)   # noqa: E731 (one per choice)
        job = Job(new_id(prefix), req, prompts, asyncio.get_running_loop(), builder=builder, constraint=constraint)
        self.worker.submit(job)
        return job

    @staticmethod
    async def _events(job: Job, first=None):
        """The job's events up to its ``End`` (after ``first`` if given); cancels the job if the
        reader stops early (the client went away: Starlette cancelled the stream)."""
        finished = False
        try:
            if first is not None:
                finished = isinstance(first, End)
                yield first
            while not finished:
                item = await job.events.get()
                finished = isinstance(item, End)
                yield item
        finally:
            if not finished:
                job.cancel()

    @staticmethod
    async def _watch_disconnect(request, job: Job) -> None:
        """Cancel the job when the client goes away (before a stream has begun)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    async def _first(self, request, job: Job):
        """A stream's first event, which comes with the first generated token (or, with ``echo``,
        the scored prompt): until then nothing is sent, so a queued request that is refused (the
        server shutting down) still gets a plain JSON error."""
        watcher = asyncio.create_task(self._watch_disconnect(request, job))
        try:
            item = await job.events.get()
        except asyncio.CancelledError:
            job.cancel()
            raise
        finally:
            watcher.cancel()
        if isinstance(item, End) and item.error:
            raise item.api_error()
        return item

    async def _collect(self, request, job: Job) -> tuple[list[Delta], list[Done]]:
        """A non-streaming request's deltas and finished choices (its error as an ``ApiError``)."""
        watcher = asyncio.create_task(self._watch_disconnect(request, job))
        deltas, dones = [], []
        try:
            async for item in self._events(job):
                if isinstance(item, End) and item.error:
                    raise item.api_error()
                if isinstance(item, Done):
                    dones.append(item)
                elif isinstance(item, Delta):
                    deltas.append(item)
        finally:
            watcher.cancel()
        if not dones:
            raise ApiError(499, "the request was cancelled", code="cancelled")
        return deltas, dones

    @staticmethod
    def _stream(lines):
        return StreamingResponse(lines, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _guarded(self, request, handler):
        try:
            return await handler(request)
        except ApiError as e:
            return self._error(e)

    # -- routes ----------------------------------------------------------------------------------
    async def health(self, request):
        w = self.worker
        return JSONResponse({"status": "shutting_down" if self.closing else "ok", "model": self.model_name,
                             "busy": w.busy is not None, "running": len(w.running), "parallel": w.parallel,
                             "queued": w.queue.qsize(), "served": w.served},
                            status_code=503 if self.closing else 200)

    async def prometheus(self, request):
        w = self.worker
        return PlainTextResponse(self.metrics.render(w.queue.qsize(), len(w.running)),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def _model_object(self) -> dict:
        info = self.info
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gptoss",
                "max_model_len": self.engine.max_context, "random_weights": bool(info["random_weights"]),
                "device": info["device"], "dtype": info["dtype"], "ops": info["ops"],
                "fallbacks": sorted(info["fallbacks"])}      # ops running their reference on this machine

    async def models(self, request):
        async def handler(request):
            self._check_key(request)
            return JSONResponse({"object": "list", "data": [self._model_object()]})
        return await self._guarded(request, handler)

    async def model(self, request):
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
        body, req, prompts = await self._offload(self._prepare_chat, await self._read(request))
        job = self._submit("chatcmpl-", req, prompts)
        logprobs = req.sampling.logprobs is not None
        if not req.stream:
            _, dones = await self._collect(request, job)
            return await self._json(chat_completion(job.id, self.model_name, dones, logprobs))
        first = await self._first(request, job)
        chunks = ChatChunks(job.id, self.model_name)
        return self._stream(self._chunk_events(job, first, chunks, req.include_usage, roles=True))

    async def _chunk_events(self, job: Job, first, chunks, include_usage: bool, roles: bool):
        """A chat or completions stream (``chunks``: ``ChatChunks`` or ``CompletionChunks``): each
        delta, each choice's finish, usage if asked for, ``[DONE]``; chat opens each choice with
        its role. A job that fails or is stopped ends with its error object, then ``[DONE]``."""
        begun, dones = set(), []
        async for item in self._events(job, first):
            choice = 0 if isinstance(item, Started) else getattr(item, "choice", None)
            if roles and choice is not None and choice not in begun:
                begun.add(choice)
                yield sse(chunks.first(choice))
            if isinstance(item, Delta):
                yield sse(chunks.of(item))
            elif isinstance(item, Done):
                dones.append(item)
                yield sse(chunks.last(item))
            elif isinstance(item, End) and item.error:
                yield sse(item.api_error().body())
            elif isinstance(item, End) and include_usage and dones:
                yield sse(chunks.usage(dones))
        yield sse("[DONE]")

    async def completions(self, request):
        return await self._guarded(request, self._completions)

    async def _completions(self, request):
        body, req, prompts = await self._offload(self._prepare_completions, await self._read(request))
        logprobs = req.sampling.logprobs

        def builder(choice: int) -> TextBuilder:
            return TextBuilder(self.tokenizer, req.stop, choice, req.skip_special_tokens, logprobs, req.tokens_as_ids)
        job = self._submit("cmpl-", req, prompts, builder)
        if not req.stream:
            _, dones = await self._collect(request, job)
            return await self._json(completion(job.id, self.model_name, sorted(dones, key=lambda d: d.choice)))
        first = await self._first(request, job)
        chunks = CompletionChunks(job.id, self.model_name, logprobs is not None)
        return self._stream(self._chunk_events(job, first, chunks, req.include_usage, roles=False))

    async def responses(self, request):
        return await self._guarded(request, self._responses)

    async def _responses(self, request):
        body, req, prompts = await self._offload(self._prepare_responses, await self._read(request))
        job = self._submit("resp_", req, prompts)
        events = ResponseEvents(job.id, self.model_name, body, len(prompts[0]))
        if not req.stream:
            deltas, dones = await self._collect(request, job)
            for d in deltas:
                events.add(d)
            events.finish(dones[0])
            return await self._json(events.response)
        first = await self._first(request, job)

        async def lines():
            for e in events.start():
                yield sse(e)
            async for item in self._events(job, first):
                if isinstance(item, Delta):
                    for e in events.add(item):
                        yield sse(e)
                elif isinstance(item, Done):
                    for e in events.finish(item):
                        yield sse(e)
                elif isinstance(item, End) and item.error:
                    for e in events.fail(item.api_error()):
                        yield sse(e)
        return self._stream(lines())

    # -- vLLM's tokenizer endpoints ----------------------------------------------------------------
    def _render_messages(self, body: dict) -> list[int]:
        return render_completion(chat_request(body, self.vocab).conversation, self.tokenizer)

    def _tokenize(self, raw: bytes) -> dict:
        body = self._parse(raw, model_required=False)
        tokens = tokenize_request(body, self.tokenizer, self._render_messages)
        out = {"count": len(tokens), "max_model_len": self.engine.max_context, "tokens": tokens, "token_strs": None}
        if body.get("return_token_strs"):
            out["token_strs"] = [self.tokenizer.decode_single_token_bytes(t).decode("utf-8", "replace") for t in tokens]
        return out

    def _detokenize(self, raw: bytes) -> dict:
        return {"prompt": detokenize_request(self._parse(raw, model_required=False), self.tokenizer, self.vocab)}

    async def tokenize(self, request):
        async def handler(request):
            return await self._json(await self._offload(self._tokenize, await self._read(request)))
        return await self._guarded(request, handler)

    async def detokenize(self, request):
        async def handler(request):
            return await self._json(await self._offload(self._detokenize, await self._read(request)))
        return await self._guarded(request, handler)

    async def tokenizer_info(self, request):
        async def handler(request):
            self._check_key(request)
            return JSONResponse(tokenizer_info(self.tokenizer, self.engine.max_context))
        return await self._guarded(request, handler)


# ---- the process ------------------------------------------------------------------------------


class GracefulServer(uvicorn.Server):
    """uvicorn, ending our requests before it waits for their connections to finish."""

    def __init__(self, config: uvicorn.Config, server: Server, announce=None):
        super().__init__(config)
        self.app_server, self.announce = server, announce

    async def shutdown(self, sockets=None) -> None:
        self.app_server.begin_shutdown()
        await super().shutdown(sockets)
        if self.announce is not None:
            ended, refused = self.app_server.stopped
            self.announce(f"gptoss serve: stopped · {ended} running request{'s' * (ended != 1)} ended · "
                          f"{refused} queued request{'s' * (refused != 1)} refused")


def uvicorn_server(server: Server, announce=None, **config) -> GracefulServer:
    """The uvicorn server ``gptoss serve`` runs (``config``: ``uvicorn.Config``'s keywords)."""
    config = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 5, **config}
    return GracefulServer(uvicorn.Config(server, **config), server, announce)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts so that a busy port is one clear line.
    Made with ``IPPROTO_TCP``: asyncio sets ``TCP_NODELAY`` only on sockets whose protocol says
    TCP, and accepted connections inherit the listening socket's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GptossError(f"cannot listen on {host}:{port}: {e.strerror or e}", "pick another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def parse_size(text: str, option: str = "--max-body") -> int:
    """``4MiB``, ``512KiB``, ``1MB``, ``100000``: a size in bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?)?[bB]?\s*", str(text))
    if not m:
        raise GptossError(f"{option} {text!r} is not a size", f"e.g. {option} 4MiB or {option} 1000000")
    unit = (m.group(2) or "").lower()
    scale = {"": 1, "k": 10**3, "ki": 2**10, "m": 10**6, "mi": 2**20, "g": 10**9, "gi": 2**30}[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1024:
        raise GptossError(f"{option} {text!r} is too small to hold a request", "at least 1KiB")
    return size


def run(*, model: str, host: str, port: int, context: int, api_key: str | None, max_queue: int,
        device: str, dtype: str, yes: bool = False, served_model_name: str | None = None,
        max_body: str = "4MiB", cors_origins: str | None = None, parallel: int | None = None) -> None:
    from rich.console import Console
    from rich.text import Text

    from .loading import load_engine

    if max_queue < 1:
        raise GptossError("--max-queue must be at least 1")
    if parallel is not None and not 1 <= parallel <= 64:
        raise GptossError(f"--parallel {parallel}: use 1 to 64 sequences decoded together")
    if not 0 <= port <= 65535:
        raise GptossError(f"--port {port} is not a port number (0-65535; 0 picks a free one)")
    if served_model_name is not None and not served_model_name.strip():
        raise GptossError("--served-model-name must not be empty")
    body_limit = parse_size(max_body)
    origins = tuple(o.strip() for o in (cors_origins or "").split(",") if o.strip())
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    sock = bind(host, port)                        # before the (slow) load: fail fast on a busy port
    engine = load_engine(model, device, dtype, context, yes, err)
    name = served_model_name.strip() if served_model_name else model
    if parallel is None:
        from .batch import default_parallel

        parallel = default_parallel(engine.device)
    server = Server(engine, name, api_key, max_queue, max_body=body_limit, cors_origins=origins, parallel=parallel)
    shown_host = f"[{host}]" if ":" in host else host
    address = f"http://{shown_host}:{sock.getsockname()[1]}/v1"
    info = server.info
    weights = "RANDOM weights (output is noise)" if info["random_weights"] else "real weights"
    auth = "API key required" if api_key else "no API key"
    line = (f"gptoss serve: {address} · model {name} · {info['device']} {info['dtype']} · "
            f"context {engine.max_context:,} · {parallel} parallel · {weights} · {auth}")
    err.print(Text(line, style="bold"), soft_wrap=True)
    uv = uvicorn_server(server, announce=lambda text: err.print(Text(text), soft_wrap=True))
    try:
        uv.run(sockets=[sock])
    except KeyboardInterrupt:          # uvicorn re-raises the Ctrl-C it handled: we are done
        pass
    finally:
        server.worker.stop()
