"""Continuous batching: many sequences through one model, one decode step for all of them.

``BatchEngine`` owns a pool of sequence slots (``cache.KVPool``: each slot its own full-layer KV,
its own rings, its own position) over an ``Engine``'s model. Requests (``submit``) wait in arrival
order for a free slot; each scheduling round (``step``):

1. drops the requests whose caller went away (``Request.cancel``): their slot is free at once;
2. admits waiting requests into free slots, the slot whose cached tokens share the longest prefix
   with the prompt first (llama-server's slot choice), so a conversation that comes back to its
   slot reuses its prefix exactly as the one-sequence engine does (``engine.Prefill``);
3. runs prefill under a token budget per round while other sequences are decoding (vLLM's chunked
   prefill): a long prompt joining costs the streams already decoding a few short stalls, not one
   long one. With nothing decoding, prefill runs unbudgeted;
4. advances every decoding sequence by one token in one forward (``Transformer.forward_rows``):
   each weight is read once for all of them, each token attends over its own slot at its own
   position; then samples each with its own sampler, settings and generator, so a seeded request
   draws the same tokens alone or beside others.

A finished, stopped or cancelled sequence leaves at once. On CUDA with the Triton kernels the
decode step runs over static buffers padded to a bucket size (1, 2, 4, 8, 16, 32: the padding rows
write to the pool's scratch slot) and is replayed from a CUDA graph captured per bucket.

Threads: ``start()`` runs the rounds on a thread of their own (``gptoss serve``); without it, the
caller's own iteration over a request drives the rounds (``gptoss eval``, ``gptoss bench``), so
one thread can submit N prompts and read them one after the other while all N advance together.
Either way one thread at a time runs the model.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Iterable, Iterator

import torch

from . import cpu_ops, ops
from .engine import Engine, GenerationStats, Prefill, Sequence
from .errors import ContextFullError, GptossError
from .sampling import Constraint, Sampler, SamplingParams, Step

BUCKETS = (1, 2, 4, 8, 16, 32)        # batch sizes a CUDA graph is captured for (padded up)
PREFILL_BUDGET = {"cuda": 2048, "cpu": 256}   # prompt tokens per round while others decode
_END = object()


def default_parallel(device: torch.device) -> int:
    """Sequences decoded together by default: 8 on a GPU (the decode step stays memory-bound,
    so 8 streams cost little more than one), 4 on a CPU (its step grows sooner with the rows)."""
    return 8 if torch.device(device).type == "cuda" else 4


class Request:
    """One generation submitted to a ``BatchEngine``: iterate over it for its ``Step``s.

    ``stats`` is filled in as it runs (``GenerationStats``: times count from ``submit``);
    ``cancel()`` (or leaving the iteration early) frees its slot at the next round."""

    def __init__(self, engine: "BatchEngine", tokens: list[int], params: SamplingParams, max_new_tokens: int,
                 stop_tokens: set[int], seed: int | None, constraint: Constraint | None,
                 cancelled: threading.Event | None = None):
        self.engine = engine
        self.tokens, self.params, self.max_new_tokens = tokens, params, max_new_tokens
        self.stop_tokens, self.seed, self.constraint = stop_tokens, seed, constraint
        self.stats = GenerationStats(prompt_tokens=len(tokens))
        self.submitted = time.perf_counter()
        self.cancelled = cancelled if cancelled is not None else threading.Event()
        self.done = False
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        # the engine's side, written by the thread running the rounds
        self.slot: int | None = None
        self.fill: Prefill | None = None
        self.sampler: Sampler | None = None
        self.generated = 0
        self.last = 0                     # the last sampled token (next decode step's input)
        self.pos = 0                      # its position

    def cancel(self) -> None:
        self.cancelled.set()
        self.engine._wake()

    def __iter__(self) -> Iterator[Step]:
        try:
            while True:
                try:
                    item = self._out.get_nowait()
                except queue.Empty:
                    if self.engine.threaded:
                        item = self._out.get()
                    elif self.engine.step() or not self._out.empty():   # drive the rounds from here
                        continue
                    else:
                        raise GptossError("the batched engine has nothing to run for this request")
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not self.done:
                self.cancel()

    def tokens_out(self) -> list[int]:
        """Run to the end; the generated token ids."""
        return [step.token for step in self]


class BatchEngine:
    """Up to ``parallel`` sequences of ``engine``'s model decoded together (module docstring).

    ``max_context``: positions per slot (default the engine's); ``prefill_budget``: prompt tokens
    per round while others decode; ``cuda_graph``: replay the padded decode step from CUDA graphs
    (CUDA with the kernels only); ``static``: run the padded static step even elsewhere (tests)."""

    def __init__(self, engine: Engine, parallel: int, max_context: int | None = None,
                 prefill_budget: int | None = None, cuda_graph: bool = True, static: bool | None = None):
        if parallel < 1:
            raise GptossError(f"--parallel {parallel}: at least 1 sequence")
        self.engine, self.model = engine, engine.model
        self.device = engine.device
        self.parallel = parallel
        self.max_context = min(max_context or engine.max_context, engine.max_context)
        self.pool = self.model.new_pool(parallel, self.max_context)
        self.slots = [Sequence(self.model, self.pool.sequence(b)) for b in range(parallel)]
        self.busy: list[Request | None] = [None] * parallel
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefill_budget = prefill_budget or PREFILL_BUDGET.get(self.device.type, 256)
        kernels = self.device.type == "cuda" and ops.use_kernels(self.device)
        self.static = kernels if static is None else static
        self.use_graph = kernels and cuda_graph and not ops.fallbacks(self.device)
        self._steps: dict[int, RowsStep] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._calls: collections.deque = collections.deque()   # (fn, done event, result box)
        self.rounds = 0                   # decode steps run (for benchmarks and tests)
        self.rows_decoded = 0             # tokens those steps produced

    # ---- the API -----------------------------------------------------------------------------
    def submit(self, tokens: Iterable[int], params: SamplingParams = SamplingParams(), max_new_tokens: int = 256,
               stop_tokens: Iterable[int] = (), seed: int | None = None,
               constraint: Constraint | None = None, cancelled: threading.Event | None = None) -> Request:
        """Queue a generation; its ``Request`` yields the new tokens as ``Step``s. ``cancelled``:
        an event of the caller's that cancels it when set (a server's client going away), seen
        at the start of the next round."""
        if self._closed:
            raise GptossError("the batched engine is closed")
        tokens = self.engine._check_tokens(tokens)
        if len(tokens) >= self.max_context:
            raise ContextFullError(f"the prompt has {len(tokens)} tokens; a slot holds {self.max_context}",
                                   "shorten the prompt or raise --context")
        req = Request(self, tokens, params, max_new_tokens, {int(t) for t in stop_tokens}, seed, constraint, cancelled)
        with self._cond:
            self.waiting.append(req)
            self._cond.notify()
        return req

    def generate(self, tokens: Iterable[int], max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, stop_tokens: Iterable[int] = (), seed: int | None = None,
                 **sampling) -> Request:
        """``Engine.generate``'s arguments; the ``Request`` (iterate over its steps)."""
        params = SamplingParams(temperature=temperature, top_p=top_p, **sampling)
        return self.submit(tokens, params, max_new_tokens, stop_tokens, seed)

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.busy)

    def start(self) -> "BatchEngine":
        """Run the rounds on a thread of their own from now on (a server)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gptoss-batch", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Cancel everything, stop the thread (if any); the engine takes nothing more."""
        with self._cond:
            self._closed = True
            pending = list(self.waiting) + [r for r in self.busy if r is not None]
            self._cond.notify_all()
        for req in pending:
            req.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self._thread is None:
            self._drop_cancelled()

    def exclusive(self, fn):
        """``fn()`` run between rounds by the thread that runs the model (its result, or its
        exception raised here): the engine's other work (``prompt_logprobs``) beside the batch."""
        if self._thread is None or self._thread is threading.current_thread():
            with self.engine.kernel_scope():
                return fn()
        box: list = []
        done = threading.Event()
        with self._cond:
            self._calls.append((fn, done, box))
            self._cond.notify()
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, done, box = self._calls.popleft()
            try:
                with self.engine.kernel_scope():
                    box.append(fn())
            except Exception as e:
                box.append(e)
            done.set()

    def step(self) -> bool:
        """One round (module docstring); False when there was nothing to do."""
        self._run_calls()
        self._drop_cancelled()
        self._admit()
        worked = self._prefill()
        decoding = [r for r in self.busy if r is not None and r.fill is None]
        if decoding:
            self._decode(decoding)
        return worked or bool(decoding)

    # ---- the rounds --------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        if self.device.type == "cuda":       # a new thread starts on cuda:0
            torch.cuda.set_device(self.device)
        while True:
            with self._cond:
                while not self._closed and not self.waiting and not any(self.busy) and not self._calls:
                    self._cond.wait()
                if self._closed:
                    break
            try:
                self.step()
            except Exception as e:           # a bug below us: its requests fail, the engine goes on
                self._fail_all(e)
        self._drop_cancelled()
        self._run_calls()

    def _fail_all(self, error: BaseException) -> None:
        for b, req in enumerate(self.busy):
            if req is not None:
                self.slots[b].reset()        # whatever it holds may be half written
                self._finish(req, "error", error)

    def _finish(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        req.stats.stop_reason = req.stats.stop_reason or reason
        if req.slot is not None and self.busy[req.slot] is req:
            self.busy[req.slot] = None
        req.fill = None
        req.done = True
        req._out.put(error if error is not None else _END)

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [r for r in self.waiting if r.cancelled.is_set()]
            for r in gone:
                self.waiting.remove(r)
        for r in gone:
            self._finish(r, "cancelled")
        for r in self.busy:
            if r is not None and r.cancelled.is_set():
                self._finish(r, "cancelled")

    def _admit(self) -> None:
        while True:
            free = [b for b, r in enumerate(self.busy) if r is None]
            with self._cond:
                if not free or not self.waiting:
                    return
                req = self.waiting.popleft()
            # the free slot holding the longest prefix of this prompt (ties: the lowest)
            b = max(free, key=lambda i: (self.slots[i].common_prefix(req.tokens), -i))
            req.slot = b
            self.busy[b] = req
            gen = torch.Generator(device=self.device)
            gen.manual_seed(req.seed) if req.seed is not None else gen.seed()
            req.sampler = Sampler(req.params, req.tokens, self.model.cfg.vocab_size, self.device, gen, req.constraint)
            req.admitted = time.perf_counter()
            req.fill = Prefill(self.slots[b], req.tokens, req.stats)

    def _prefill(self) -> bool:
        """Prefill the joining sequences in arrival order, within the round's budget when others
        are decoding; each whose prompt is in samples its first token."""
        filling = sorted((r for r in self.busy if r is not None and r.fill is not None), key=lambda r: r.submitted)
        if not filling:
            return False
        others = any(r is not None and r.fill is None for r in self.busy)
        budget = self.prefill_budget if others else None
        from .engine import PREFILL_CHUNK

        with self.engine.kernel_scope():
            for req in filling:
                while req.fill.logits is None and (budget is None or budget > 0):
                    n = PREFILL_CHUNK if budget is None else min(budget, PREFILL_CHUNK)
                    done = req.fill.advance(n)
                    if budget is not None:
                        budget -= done
                if req.fill.logits is None:
                    break
                logits = req.fill.logits
                req.stats.prefill_s = time.perf_counter() - req.admitted
                req.fill = None
                req.pos = len(req.tokens)
                self._emit(req, req.sampler(logits))
        return True

    def _emit(self, req: Request, step: Step) -> None:
        """Hand ``step`` to its request; finish the request when it stops, else it decodes on."""
        st = req.stats
        now = time.perf_counter() - req.submitted
        st.token_times.append(now)
        if req.generated == 0:
            st.first_token_s = now
        else:
            st.decode_tokens, st.decode_s = req.generated, now - st.first_token_s
        req.generated += 1
        req.last = step.token
        req._out.put(step)
        if step.token in req.stop_tokens:
            self._finish(req, "stop")
        elif req.pos >= self.max_context:
            self._finish(req, "context")
        elif req.generated >= req.max_new_tokens:
            self._finish(req, "length")

    def _decode(self, reqs: list[Request]) -> None:
        toks = [r.last for r in reqs]
        rows = [r.slot for r in reqs]
        pos = [r.pos for r in reqs]
        seqs = [self.slots[b] for b in rows]
        for s in seqs:
            s.cache.dirty = True
        if self.static:
            logits = self._static_step(len(reqs))(toks, rows, pos)
        else:
            t = torch.tensor([toks, rows, pos], dtype=torch.long, device=self.device)
            with self.engine.kernel_scope():
                logits = self.model.logits(self.model.forward_rows(t[0], t[1], t[2], self.pool))
        for r, s in zip(reqs, seqs):
            s.cached_tokens.append(r.last)
            s.cache.length = r.pos + 1
            s.cache.dirty = False
            r.pos += 1
        self.rounds += 1
        self.rows_decoded += len(reqs)
        # the greedy rows' tokens in one argmax over the batch: one pass, one transfer
        greedy = [i for i, r in enumerate(reqs) if r.sampler.greedy]
        picked: dict[int, int] = {}
        if len(greedy) > 1:
            rows_logits = logits if len(greedy) == len(reqs) else logits[greedy]
            picked = dict(zip(greedy, cpu_ops.argmax_rows(rows_logits) if rows_logits.device.type == "cpu"
                              else rows_logits.argmax(-1).tolist()))
        for i, r in enumerate(reqs):
            self._emit(r, r.sampler.take(picked[i]) if i in picked else r.sampler(logits[i]))

    def _static_step(self, n: int) -> "RowsStep":
        size = next((b for b in BUCKETS if b >= n), n)
        if size not in self._steps:
            self._steps[size] = RowsStep(self.model, self.pool, size, self.use_graph, self.engine.counters)
        return self._steps[size]


class RowsStep:
    """The batched decode step over static buffers of ``size`` rows, optionally replayed from a
    CUDA graph (``engine.DecodeStep``'s idea for several sequences). Rows past the live ones pad
    the batch: token 0 at position 0 of the pool's scratch slot."""

    def __init__(self, model, pool, size: int, graph: bool, counters: torch.Tensor | None):
        self.model, self.pool, self.size = model, pool, size
        self.use_graph, self.counters = graph, counters
        self.buf = torch.zeros(3, size, dtype=torch.long, device=model.device)    # tokens, rows, positions
        self.host = torch.zeros(3, size, dtype=torch.long, pin_memory=model.device.type == "cuda")
        self.graph = None
        self.logits: torch.Tensor | None = None

    def _run(self) -> torch.Tensor:
        with ops.kernel_counters(self.counters):
            return self.model.logits(self.model.forward_rows(self.buf[0], self.buf[1], self.buf[2], self.pool))

    def _capture(self) -> None:
        side = torch.cuda.Stream(device=self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._run()
        self.graph = graph

    def __call__(self, toks: list[int], rows: list[int], pos: list[int]) -> torch.Tensor:
        n = len(toks)
        pad = self.size - n
        self.host.copy_(torch.tensor([toks + [0] * pad, rows + [self.pool.scratch] * pad, pos + [0] * pad]))
        self.buf.copy_(self.host, non_blocking=True)
        if not self.use_graph:
            return self._run()[:n]
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits[:n]


class BatchView:
    """An ``Engine``-shaped handle on a ``BatchEngine`` running on its own thread, for one caller
    thread: what ``ChatSession``, ``gptoss eval`` and the server's worker call on an engine
    (``generate``, ``stream``, ``last_stats``, ``prompt_logprobs``, ``tokenizer``, ...), each
    generation a request of the batch. ``last_stats`` is this view's last request's."""

    def __init__(self, batch: BatchEngine):
        self.batch = batch
        engine = batch.engine
        self.tokenizer, self.config, self.device = engine.tokenizer, engine.config, engine.device
        self.dtype, self.max_context = engine.dtype, batch.max_context
        self.last_stats = GenerationStats()

    def stream(self, tokens: Iterable[int], params: SamplingParams = SamplingParams(), max_new_tokens: int = 256,
               stop_tokens: Iterable[int] = (), seed: int | None = None, constraint: Constraint | None = None,
               cancelled: threading.Event | None = None) -> Iterator[Step]:
        req = self.batch.submit(tokens, params, max_new_tokens, stop_tokens, seed, constraint, cancelled)
        self.last_stats = req.stats
        yield from req

    def generate(self, tokens: Iterable[int], max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, stop_tokens: Iterable[int] = (), seed: int | None = None,
                 **sampling) -> Iterator[int]:
        params = SamplingParams(temperature=temperature, top_p=top_p, **sampling)
        for step in self.stream(tokens, params, max_new_tokens, stop_tokens, seed):
            yield step.token

    def prompt_logprobs(self, tokens: Iterable[int], top: int = 0):
        engine = self.batch.engine
        return self.batch.exclusive(lambda: engine.prompt_logprobs(tokens, top))

    def logits(self, tokens: Iterable[int]) -> torch.Tensor:
        engine = self.batch.engine
        return self.batch.exclusive(lambda: engine.logits(tokens))

    def runtime_info(self) -> dict:
        return {**self.batch.engine.runtime_info(), "parallel": self.batch.parallel,
                "decode_path": "batched" + (" (cuda graphs)" if self.batch.use_graph else "")}
