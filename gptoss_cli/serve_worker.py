"""The engine side of ``gptoss serve``: worker threads take queued jobs in arrival order.

With ``parallel`` 1 one thread owns the engine and requests are served one at a time. With
``parallel`` N (``--parallel``) N job threads each run one request at a time through a
``BatchView`` of one ``BatchEngine`` (``batch.py``), whose own thread decodes all of their
sequences together: up to N requests share each decode step. What exceeds N waits in a bounded
queue: a request that finds the queue full is answered 429 with Retry-After at once rather than
waiting unboundedly. A job is one request: each of its
prompts (completions may send several) times ``n`` choices, run one after the other, so the
engine's prefix reuse makes every choice after the first cost no prefill.

The worker writes a job's events to its asyncio queue, in order: ``Started`` with the job's first
sampled token (so a stream's first event means "the model is answering", not "the request was
accepted"), then each choice's ``Delta``s and ``Done``, then ``End``. It checks the job's
``cancelled`` flag after every token: when the client goes away decoding stops at the next token.
``close`` (the server is shutting down) refuses what waits in the queue with a 503, stops the
running job at its next token and ends it with a 503 too, and refuses what comes after.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from .harmony import STOP_TOKEN_IDS
from .serve_api import Done, GenRequest, ReplyBuilder
from .serve_metrics import Metrics
from .serve_params import ApiError

HISTORY = 64            # finished requests kept for /health and the tests
SHUTTING_DOWN = "the server is shutting down"


@dataclass(frozen=True)
class Started:
    """The job's first token was sampled: a stream may begin."""


@dataclass(frozen=True)
class End:
    """The job is over; ``error`` (with its HTTP ``status``) if it failed or was refused."""

    error: str = ""
    status: int = 500
    code: str = "internal_error"

    def api_error(self) -> ApiError:
        return ApiError(self.status, self.error, code=self.code)


@dataclass(eq=False)
class Job:
    """One request on its way through the queue: the worker writes its events, the handler reads.

    ``prompts``: the token ids of each prompt; ``builder(choice)`` makes what reads a choice's
    tokens (a ``ReplyBuilder`` for Harmony, a ``TextBuilder`` for raw completions);
    ``constraint()`` a fresh token mask per choice (``tool_choice``), or None."""

    id: str
    req: GenRequest
    prompts: list[list[int]]
    loop: asyncio.AbstractEventLoop
    builder: object = None
    constraint: object = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    accepted: float = field(default_factory=time.perf_counter)
    generated: int = 0                   # tokens decoded so far (written by the worker)
    started: bool = False                # Started was sent
    generated_at_cancel: int | None = None
    outcome: str = ""                    # stop | length | context | cancelled | error | refused
    abort: End | None = None             # why the server ended it (shutdown)

    @property
    def prompt(self) -> list[int]:
        return self.prompts[0]

    def cancel(self, why: End | None = None) -> None:
        if why is not None and self.abort is None:
            self.abort = why
        if not self.cancelled.is_set():
            self.generated_at_cancel = self.generated
            self.cancelled.set()

    def put(self, item) -> None:
        """From the worker thread: hand an item to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:             # the loop is gone (server shutting down)
            self.cancel()


class Worker:
    """The threads that run queued jobs in order: one (it owns the engine), or ``parallel`` over
    a batched engine."""

    def __init__(self, engine, max_queue: int, metrics: Metrics, parallel: int = 1):
        self.engine, self.metrics = engine, metrics
        self.parallel = parallel
        self.batch = None
        if parallel > 1:
            from .batch import BatchEngine

            self.batch = BatchEngine(engine, parallel).start()
        self.max_queue = max_queue
        # jobs wait here until a job thread is free; at most max_queue of them (``submit``)
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self._admitted = 0                 # jobs submitted and not yet ended: running + waiting
        self.running: list[Job] = []       # the jobs being served, oldest first
        self.history: list[Job] = []       # finished jobs, oldest first (the last HISTORY)
        self.served = 0
        self.closing = False
        self._lock = threading.Lock()      # taking a job vs closing
        self._mean_s = 1.0                 # running mean request time, for Retry-After
        self._local = threading.local()    # each job thread's view of the batched engine
        self._threads = [threading.Thread(target=self._loop, name=f"gptoss-engine-{i}", daemon=True)
                         for i in range(parallel)]
        for t in self._threads:
            t.start()

    @property
    def busy(self) -> Job | None:
        """The oldest job being served, or None."""
        running = self.running
        return running[0] if running else None

    def _engine(self):
        """What this job thread generates with: the engine, or its own view of the batch."""
        if self.batch is None:
            return self.engine
        if not hasattr(self._local, "view"):
            from .batch import BatchView

            self._local.view = BatchView(self.batch)
        return self._local.view

    def submit(self, job: Job) -> None:
        if self.closing:
            raise ApiError(503, SHUTTING_DOWN, code="shutting_down", headers={"Connection": "close"})
        with self._lock:
            full = self._admitted >= self.parallel + self.max_queue
            if not full:
                self._admitted += 1
                self.queue.put_nowait(job)
        if full:
            wait = max(1, round(self._mean_s * (self.queue.qsize() + 1) / self.parallel))
            raise ApiError(429, f"the server is busy: {self.max_queue} requests are already waiting; retry later",
                           code="queue_full", type_="rate_limit_error", headers={"Retry-After": str(wait)})

    def close(self) -> tuple[int, int]:
        """Shutting down: refuse the queued jobs and stop the running one (each gets a 503 End);
        (running jobs stopped, queued jobs refused)."""
        end = End(SHUTTING_DOWN, 503, "shutting_down")
        with self._lock:
            self.closing = True
            refused = []
            while True:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    refused.append(job)
                    self._admitted -= 1
            running = list(self.running)
        for job in refused:
            job.outcome = "refused"
            job.cancel(end)
            job.put(end)
        for job in running:
            job.cancel(end)
        self.stop()
        return len(running), len(refused)

    def stop(self) -> None:
        for _ in self._threads:
            self.queue.put_nowait(None)
        if self.batch is not None:
            threading.Thread(target=self._close_batch, daemon=True).start()

    def _close_batch(self) -> None:
        for t in self._threads:        # the job threads end their requests first
            if t is not threading.current_thread():
                t.join(timeout=30)
        self.batch.close()

    def _loop(self) -> None:
        if self.engine.device.type == "cuda":     # a new thread starts on cuda:0
            import torch

            torch.cuda.set_device(self.engine.device)
        while (job := self.queue.get()) is not None:
            with self._lock:
                refuse = self.closing
                if not (refuse or job.cancelled.is_set()):
                    self.running.append(job)
            if refuse:                     # close() has drained the queue: not reached, but never silent
                with self._lock:
                    self._admitted -= 1
                job.outcome = "refused"
                job.put(End(SHUTTING_DOWN, 503, "shutting_down"))
                continue
            if job.cancelled.is_set():     # its client left while it waited: tell its handler
                job.outcome, end = "cancelled", End("the client went away", 499, "cancelled")
            else:
                t0 = time.perf_counter()
                try:
                    end = self._run(job)
                finally:
                    with self._lock:
                        self.running.remove(job)
                    self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - t0)
                self.metrics.finished(time.perf_counter() - job.accepted)
            with self._lock:
                self._admitted -= 1
                self.served += 1           # recorded before the client hears of the end
                self.history = (self.history + [job])[-HISTORY:]
            job.put(job.abort or end)

    def _run(self, job: Job) -> End:
        try:
            for p, prompt in enumerate(job.prompts):
                for c in range(job.req.n):
                    self._choice(job, p * job.req.n + c, prompt, c)
                    if job.cancelled.is_set():
                        job.outcome = "cancelled"
                        return End()
        except Exception as e:             # a bug below us: the request fails, the server goes on
            job.outcome = "error"
            return End(f"generation failed: {type(e).__name__}: {e}")
        return End()

    def _choice(self, job: Job, index: int, prompt: list[int], nth: int) -> None:
        """One choice: score the prompt if it comes back with logprobs, generate, report."""
        eng, req = self._engine(), job.req
        builder = job.builder(index) if job.builder is not None else ReplyBuilder(eng.tokenizer, req.stop, index)
        if req.echo:
            scored = (eng.prompt_logprobs(prompt, top=req.sampling.logprobs)
                      if req.sampling.logprobs is not None else ())
            for d in builder.echo(prompt, *scored):
                job.put(d)
        room = eng.max_context - len(prompt)
        max_new = min(room if req.max_tokens is None else req.max_tokens, room)
        outcome, cached = "length", 0
        if max_new > 0:
            seed = None if req.seed is None else (req.seed + nth) % 2**64
            extra = {"cancelled": job.cancelled} if self.batch is not None else {}
            steps = eng.stream(prompt, req.sampling, max_new, () if req.ignore_eos else STOP_TOKEN_IDS, seed,
                               job.constraint() if job.constraint is not None else None, **extra)
            try:
                last = None
                for step in steps:
                    now = time.perf_counter()
                    first = job.generated == 0
                    self._start(job)
                    self.metrics.token(now - job.accepted if first else None, None if last is None else now - last)
                    last = now
                    job.generated += 1
                    for d in builder.feed(step.token, step):
                        job.put(d)
                    if builder.stop_hit:
                        outcome = "stop"
                        break
                    if job.cancelled.is_set():
                        outcome = "cancelled"
                        break
                else:
                    outcome = eng.last_stats.stop_reason
            finally:
                steps.close()
            cached = eng.last_stats.reused_tokens
        else:
            self._start(job)               # nothing to generate (echo with max_tokens 0)
        self.metrics.prompt(len(prompt), cached)
        for d in builder.finish():
            job.put(d)
        job.outcome = outcome
        if job.abort is None:              # a stopped job ends with its error, not a finished choice
            job.put(Done(builder, outcome, len(prompt), cached, index))

    @staticmethod
    def _start(job: Job) -> None:
        if not job.started:
            job.started = True
            job.put(Started())
