"""``Engine``: load a gpt-oss checkpoint and turn token ids into logits and new token ids.

The library API of DESIGN.md 2. The engine knows nothing about text or Harmony (that lives in
``harmony.py`` above it); it owns one model, one KV cache and the tokens that cache holds.

Prefix reuse: a call whose tokens share a prefix with what is cached continues from there. Full
layers keep every position, so they can always go back; the windowed layers' rings cannot, once
a position is overwritten. So the engine keeps small copies of the rings at the end of each
prompt (``RingSnapshot``, with the last logits), and resumes from the latest one that the new
tokens still share when the rings themselves cannot go back far enough. A chat turn, whose
rendering drops the previous reply's analysis, resumes from the previous prompt's snapshot.
Whatever path is taken, the result is exactly what a fresh engine computes.

On CUDA with the Triton kernels (``ops.use_kernels``), decoding runs ``DecodeStep``: the token and
its position sit in static device buffers, so each step is the same launches whatever the
position, captured once in a CUDA graph and replayed per token (``cuda_graph=False`` runs the
same step eagerly, which gives bit-identical tokens). Prefill and the CPU path run eagerly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from . import ops, selfcheck
from .cache import RingSnapshot
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import ContextFullError, GptossError
from .model import Transformer
from .sampling import Constraint, Sampler, SamplingParams, Step, sample  # noqa: F401 (sample: re-exported)

PREFILL_CHUNK = 2048      # tokens per forward during prefill (bounds activation memory)
MAX_SNAPSHOTS = 8
SNAPSHOT_TAIL = 8       # a second snapshot this many tokens before the end of each prompt


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GptossError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GptossError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise GptossError(f"device {device!r} is not supported", "use auto, cpu, cuda or cuda:N")
    return dev


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or _cpu_bf16_native(device) else torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if dtype not in table:
        raise GptossError(f"unknown dtype {dtype!r}", "use auto, bfloat16 or float32")
    return table[dtype]


def _cpu_bf16_native(device: torch.device) -> bool:
    """Whether bf16 on this CPU runs at memory speed: the native library is built and multiplies
    in AVX512-BF16 (without it PyTorch's bf16 matrix-vector products are slower than float32's)."""
    if device.type != "cpu" or not ops.use_cpu_native(device):
        return False
    from .cpu_ops import bf16_native

    return bf16_native()


@dataclass
class GenerationStats:
    """What the last ``generate`` call did, for stats lines and benchmarks (seconds)."""

    prompt_tokens: int = 0
    reused_tokens: int = 0        # prompt tokens whose KV came from the cache
    prefill_tokens: int = 0       # prompt tokens actually computed
    prefill_s: float = 0.0
    first_token_s: float = 0.0    # from the call to the first token
    decode_tokens: int = 0        # tokens produced after the first
    decode_s: float = 0.0
    stop_reason: str = ""         # "stop" (a stop token), "length" (max_new_tokens), "context"
    token_times: list[float] = field(default_factory=list)  # seconds since the call, per token


class DecodeStep:
    """One decode step over static buffers, optionally replayed from a CUDA graph.

    The token and its position live in device tensors (``tok`` [1, 1], ``pos`` 0-d), and the
    forward pass takes ``pos`` as its start: full layers attend over their whole preallocated
    buffer (causality hides the slots past ``pos``; the attention kernel skips them) and the
    rings write through device-side slot indices. Nothing depends on the position on the host,
    so the launches are identical at every step: one CUDA-graph replay per token (DESIGN.md 5:
    at batch 1, launch overhead is the whole budget). The cache's buffers are updated in place
    (reset, rewind, restore all copy), so the captured addresses stay valid.
    """

    def __init__(self, model: Transformer, cache, graph: bool, counters: torch.Tensor | None = None):
        self.model = model
        self.cache = cache
        self.use_graph = graph
        # the kernels' arrival counters this step counts with (its engine's; else its own), fixed
        # before any capture, as the graph keeps their address
        self.counters = counters if counters is not None else ops.new_kernel_counters(model.device)
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        self.pos = torch.zeros((), dtype=torch.long, device=model.device)
        self.graph = None
        self.logits: torch.Tensor | None = None   # the graph's output buffer

    def _run(self) -> torch.Tensor:
        with ops.kernel_counters(self.counters):
            h = self.model.forward(self.tok, self.cache, self.pos)
            return self.model.logits(h[0, -1])

    def _capture(self) -> None:
        # Warm up on a side stream first (kernels compile, the allocator settles). The warm-up
        # does the real step at the current position; capturing records without running, and
        # the first replay redoes the same writes, so the cache ends up the same.
        side = torch.cuda.Stream(device=self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._run()
        self.graph = graph

    def __call__(self, tok: int, pos: int) -> torch.Tensor:
        """float32 logits [vocab] after ``tok`` at ``pos`` (the graph's buffer: use before the
        next call). A position outside the cache is refused: the kernels would write past it."""
        if not 0 <= pos < self.cache.max_context:
            raise ContextFullError(f"position {pos} is past the cache's {self.cache.max_context} positions",
                                   "start a new conversation or raise --context")
        self.tok.fill_(tok)
        self.pos.fill_(pos)
        self.cache.dirty = True
        if not self.use_graph:
            out = self._run()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            out = self.logits
        self.cache.length = pos + 1
        self.cache.dirty = False
        return out


class Engine:
    """One gpt-oss model, its KV cache, and the tokens that cache holds."""

    def __init__(self, model: Transformer, folder: Path | None = None, cuda_graph: bool = True,
                 check: bool = True):
        self.model = model
        self.config: ModelConfig = model.cfg
        self.folder = folder
        self.device = model.device
        self.dtype = model.dtype
        self.max_context = model.max_context
        self.seq = Sequence(model, model.new_cache(1))   # the cache and what it holds
        self.last_stats = GenerationStats()
        self._tokenizer = None
        # this engine's own arrival counters for the kernels' last-program epilogues (arrive.py):
        # two engines, or an engine beside another stream, never count into each other's
        self.counters = ops.new_kernel_counters(self.device)
        if self.device.type == "cpu":
            from .cpu_ops import apply_thread_count

            apply_thread_count()
        # the fast ops checked against their references on this machine (cached on disk); one
        # that fails runs its reference from now on (selfcheck.py)
        if check:
            with ops.kernel_counters(self.counters):
                selfcheck.check_engine(model)
        # static decode step: CUDA with the kernels (the reference MoE syncs with the host, so an
        # op fallen back to its reference is not captured in a graph)
        static = self.device.type == "cuda" and ops.use_kernels(self.device)
        graph = cuda_graph and not ops.fallbacks(self.device)
        self._decoder = DecodeStep(model, self.cache, graph=graph, counters=self.counters) if static else None

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | Path, device: str = "auto", dtype: str | torch.dtype = "auto",
             max_context: int = 8192, cuda_graph: bool = True, check: bool = True) -> "Engine":
        """Load a checkpoint folder, a hub id in the local HF cache, or a named local model.

        ``cuda_graph``: on CUDA with the Triton kernels, replay the decode step from a CUDA graph
        (False: run the same step eagerly); ignored elsewhere. ``check``: check the fast ops
        against their references first (``selfcheck.check_engine``; ``GPTOSS_CHECK=0`` also
        skips it)."""
        from .resolve import resolve_model

        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        ckpt = Checkpoint.open(resolve_model(model))
        ctx = _check_context(max_context, ckpt.config)
        tensors = ckpt.load(dev, dt)
        return cls(Transformer(ckpt.config, tensors, ctx), folder=ckpt.folder, cuda_graph=cuda_graph, check=check)

    @classmethod
    def random(cls, cfg: ModelConfig, device: str = "auto", dtype: str | torch.dtype = "auto",
               max_context: int = 8192, seed: int = 0, cuda_graph: bool = True, check: bool = True) -> "Engine":
        """Random MXFP4 weights in ``cfg``'s shapes, drawn straight on the device (benchmarks)."""
        from .synthetic import random_tensors

        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        cfg = cfg.replace(random_weights=True)
        tensors = random_tensors(cfg, device=dev, dtype=dt, seed=seed)
        return cls(Transformer(cfg, tensors, _check_context(max_context, cfg)), cuda_graph=cuda_graph, check=check)

    def warmup(self) -> None:
        """Compile the kernels and capture the decode step's CUDA graph now, so that the first
        reply's timings are the model's and not Triton's compiler (``load_engine`` calls this
        behind its spinner). It runs one short prompt (13 tokens and the 8-token snapshot tail:
        token counts that are not multiples of 16, the specialisation most prompts get) and two
        decode steps (the capture, a replay), then forgets them. Without the static decode step
        (CPU, or the reference ops) nothing is compiled and it returns at once."""
        if self._decoder is None:
            return
        for _ in self.generate(list(range(1, 14 + SNAPSHOT_TAIL)), max_new_tokens=3, temperature=0):
            pass
        self._reset()
        self.last_stats = GenerationStats()

    @property
    def cache(self):
        return self.seq.cache

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens whose KV is in the cache."""
        return self.seq.cached_tokens

    @cached_tokens.setter
    def cached_tokens(self, tokens: list[int]) -> None:
        self.seq.cached_tokens = tokens

    @property
    def snapshots(self) -> list[RingSnapshot]:
        return self.seq.snapshots

    def kernel_scope(self):
        """A block whose kernels count with this engine's counters (wrap synchronous forward
        passes that run outside the engine's own methods in it, as ``gptoss bench`` does)."""
        return ops.kernel_counters(self.counters)

    @property
    def fallbacks(self) -> dict[str, str]:
        """The ops that run their reference on this engine's device (they failed their check on
        this machine, in this process): name -> why."""
        return ops.fallbacks(self.device)

    @property
    def tokenizer(self):
        """The ``o200k_harmony`` tiktoken encoding, built from the model folder on first use."""
        if self._tokenizer is None:
            from .tokenizer import load_encoding

            self._tokenizer = load_encoding(self.folder)
        return self._tokenizer

    def runtime_info(self) -> dict:
        """What runs: device, dtype, the op implementations (``ops``: triton, pytorch-reference, or
        on CPU ``cpu_ops.status()``, e.g. cpu-native (avx512); ``kernels``: the Triton kernels'
        names; ``fallbacks``: the ops that failed their check and run their reference, with why),
        CUDA graph on/off, versions."""
        from .cpu_ops import cpu_name

        kernels = ops.kernel_names(self.device)
        info = {
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else cpu_name(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "ops": "triton" if kernels else _cpu_ops_status(self.device),
            "kernels": kernels,
            "fallbacks": ops.fallbacks(self.device),
            "cuda_graph": self._decoder is not None and self._decoder.use_graph,
            "torch": torch.__version__,
            "random_weights": self.config.random_weights,
        }
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
        if self.device.type == "cuda":
            info["cuda"] = torch.version.cuda
            info["driver"] = selfcheck.driver_version()
        else:
            from .cpu_ops import cpu_threads

            info["threads"] = cpu_threads()   # GPTOSS_THREADS or --threads, else PyTorch's count
        return info

    # ---- the API -----------------------------------------------------------------------------
    def logits(self, tokens: Iterable[int]) -> torch.Tensor:
        """float32 logits [len(tokens), vocab] of a fresh sequence (the cache is reset)."""
        return torch.cat([chunk for _, chunk in self._fresh_logits(self._check_tokens(tokens))]).cpu()

    def prompt_logprobs(self, tokens: Iterable[int], top: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities of a fresh sequence's tokens, each given those before it:
        (logprobs [n-1] float32 of tokens[1:], top ids [n-1, top], their logprobs [n-1, top]).

        The same forward as ``logits`` (the cache is reset), reduced chunk by chunk on the device,
        so that the [n, vocab] matrix never reaches the host: ``gptoss eval``'s perplexity and
        the server's ``echo``/``logprobs`` both read this, and so agree to the bit."""
        tokens = self._check_tokens(tokens)
        target = torch.tensor(tokens[1:] + [0], dtype=torch.long, device=self.device)       # [n]
        lps, ids, vals = [], [], []
        for s, chunk in self._fresh_logits(tokens):                                        # [t, V]
            lse = chunk.logsumexp(dim=-1)                                                  # [t]
            lps.append(chunk.gather(1, target[s:s + len(chunk)].unsqueeze(1)).squeeze(1) - lse)
            if top:
                v, i = torch.topk(chunk, top, dim=-1)                                      # [t, top]
                ids.append(i)
                vals.append(v - lse.unsqueeze(1))
        n = len(tokens) - 1
        if not top:
            return torch.cat(lps)[:n].cpu(), torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, 0)
        return torch.cat(lps)[:n].cpu(), torch.cat(ids)[:n].cpu(), torch.cat(vals)[:n].cpu()

    def generate(
        self, tokens: Iterable[int], max_new_tokens: int = 256, temperature: float = 1.0,
        top_p: float = 1.0, stop_tokens: Iterable[int] = (), seed: int | None = None, **sampling,
    ) -> Iterator[int]:
        """Yield new token ids; stops after a stop token, ``max_new_tokens``, or a full context.
        ``sampling``: the other fields of ``SamplingParams`` (top_k, min_p, the penalties,
        logit_bias).

        The cache always holds exactly ``cached_tokens``, so breaking out of the loop (or Ctrl-C)
        leaves a state the next call reuses.
        """
        params = SamplingParams(temperature=temperature, top_p=top_p, **sampling)
        steps = self.stream(tokens, params, max_new_tokens, stop_tokens, seed)
        try:
            for step in steps:
                yield step.token
        finally:
            steps.close()

    def stream(self, tokens: Iterable[int], params: SamplingParams = SamplingParams(), max_new_tokens: int = 256,
               stop_tokens: Iterable[int] = (), seed: int | None = None,
               constraint: Constraint | None = None) -> Iterator[Step]:
        """``generate``, yielding a ``Step`` per token (its log-probabilities when
        ``params.logprobs`` asks for them); ``constraint`` masks what may come next."""
        tokens = self._check_tokens(tokens)
        stop = set(int(t) for t in stop_tokens)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed) if seed is not None else gen.seed()
        sampler = Sampler(params, tokens, self.config.vocab_size, self.device, gen, constraint)
        st = self.last_stats = GenerationStats(prompt_tokens=len(tokens))
        t0 = time.perf_counter()
        logits = self._prefill(tokens, st)
        st.prefill_s = time.perf_counter() - t0
        pos = len(tokens)
        for i in range(max_new_tokens):
            step = sampler(logits)
            tok = step.token
            now = time.perf_counter() - t0
            st.token_times.append(now)
            if i == 0:
                st.first_token_s = now
            else:
                st.decode_tokens, st.decode_s = i, now - st.first_token_s
            yield step
            if tok in stop:
                st.stop_reason = "stop"
                return
            if pos >= self.max_context:
                st.stop_reason = "context"
                return
            if i + 1 == max_new_tokens:
                break
            logits = self._step(tok, pos)
            pos += 1
        st.stop_reason = "length"

    # ---- internals ---------------------------------------------------------------------------
    def _check_tokens(self, tokens: Iterable[int]) -> list[int]:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise GptossError("the prompt is empty: give at least one token")
        V = self.config.vocab_size
        bad = next((t for t in tokens if not 0 <= t < V), None)
        if bad is not None:
            raise GptossError(f"token id {bad} is outside the vocabulary (0..{V - 1})")
        if len(tokens) >= self.max_context:
            raise ContextFullError(
                f"the prompt has {len(tokens)} tokens; the context holds {self.max_context}",
                "start a new conversation or raise --context",
            )
        return tokens

    def _fresh_logits(self, tokens: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, float32 logits [t, vocab] on the device) per prefill chunk of a fresh sequence."""
        self._reset()
        for s in range(0, len(tokens), PREFILL_CHUNK):
            chunk = tokens[s:s + PREFILL_CHUNK]
            with self.kernel_scope():                  # never held across the yield
                h = self.model.forward(self._tensor(chunk), self.cache, s)
                logits = self.model.logits(h[0])
            self.cached_tokens = tokens[:s + len(chunk)]
            yield s, logits

    def _tensor(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], dtype=torch.long, device=self.device)     # [1, T]

    def _reset(self) -> None:
        self.seq.reset()

    def _prefill(self, tokens: list[int], st: GenerationStats) -> torch.Tensor:
        fill = Prefill(self.seq, tokens, st)
        with self.kernel_scope():
            while fill.logits is None:
                fill.advance(PREFILL_CHUNK)
        return fill.logits

    def _step(self, tok: int, pos: int) -> torch.Tensor:
        if self._decoder is not None:
            logits = self._decoder(tok, pos)
        else:
            with self.kernel_scope():
                logits = self.model.logits(self.model.forward(self._tensor([tok]), self.cache, pos)[0, -1])
        self.seq.cached_tokens.append(tok)
        return logits


class Sequence:
    """One sequence's KV cache and what it holds: the tokens whose KV is there, and copies of its
    rings at prompt ends (prefix reuse, see the module docstring). The engine has one; the batched
    engine (``batch.py``) one per slot of its pool."""

    def __init__(self, model: Transformer, cache):
        self.model = model
        self.cache = cache
        self.cached_tokens: list[int] = []       # tokens whose KV is in the cache
        self.snapshots: list[RingSnapshot] = []  # ring copies at prompt ends, oldest first

    def reset(self) -> None:
        self.cache.reset()
        self.cached_tokens = []
        self.snapshots = []

    def forget_after(self, n: int) -> None:
        """Hold at most the first ``n`` tokens from now on (what the rings cannot give back is
        recomputed, or restored from a snapshot, by the next prefill)."""
        self.cached_tokens = self.cached_tokens[:n]
        self.snapshots = [s for s in self.snapshots if s.length <= n]
        if n == 0:
            self.reset()

    def common_prefix(self, tokens: list[int]) -> int:
        common = 0
        for a, b in zip(self.cached_tokens, tokens):
            if a != b:
                break
            common += 1
        return common

    def resume_point(self, tokens: list[int]) -> tuple[int, RingSnapshot | None]:
        """The longest usable cached prefix: (position to compute from, snapshot to restore)."""
        common = self.common_prefix(tokens)
        self.snapshots = [s for s in self.snapshots if s.length <= common]
        for snap in self.snapshots:               # the whole prompt, its logits included
            if snap.length == len(tokens) and snap.logits is not None:
                return snap.length, snap
        best = min(common, len(tokens) - 1)       # at least one token to get logits from
        if self.cache.can_rewind(best):
            return best, None
        usable = [s for s in self.snapshots if s.length <= best]
        if usable:
            snap = max(usable, key=lambda s: s.length)
            return snap.length, snap
        return 0, None

    def forward(self, tokens: list[int], start: int, end: int, logits: bool = True) -> torch.Tensor | None:
        """Compute tokens[start:end] (one forward; the caller bounds its length): the last
        token's logits if asked for. The caller holds the kernels' counters."""
        h = self.model.forward(torch.tensor([tokens[start:end]], dtype=torch.long, device=self.model.device),
                               self.cache, start)
        self.cached_tokens = tokens[:end]
        return self.model.logits(h[0, -1]) if logits else None

    def keep_snapshot(self, snap: RingSnapshot) -> None:
        """Keep ``snap`` (replacing one of the same length); the newest MAX_SNAPSHOTS stay."""
        kept = [s for s in self.snapshots if s.length != snap.length] + [snap]
        self.snapshots = kept[-MAX_SNAPSHOTS:]


class Prefill:
    """A prompt's prefill into a ``Sequence``, in pieces: ``advance(n)`` computes up to n more
    tokens; ``logits`` (of the last prompt token) is set once all are in. It resumes from the
    longest cached prefix, and keeps ring snapshots at the prompt's end and ``SNAPSHOT_TAIL``
    tokens before it (the next prompt often diverges right at the end of this one: a chat
    template's "assistant" header re-rendered differently). The pieces never cross that cut, so
    however the work is split, the same forwards run over the same tokens: the engine's
    ``PREFILL_CHUNK`` pieces and the batched engine's per-step budget give the same cache."""

    def __init__(self, seq: Sequence, tokens: list[int], st: GenerationStats):
        self.seq, self.tokens = seq, tokens
        self.logits: torch.Tensor | None = None
        start, snap = seq.resume_point(tokens)
        cache = seq.cache
        if snap is not None:
            cache.restore(snap)
        elif start == 0:
            cache.reset()
        else:
            cache.rewind(start)
        seq.cached_tokens = tokens[:start]
        st.reused_tokens, st.prefill_tokens = start, len(tokens) - start
        self.pos = start
        self.cut = len(tokens) - SNAPSHOT_TAIL if len(tokens) - SNAPSHOT_TAIL > start else None
        if start == len(tokens):
            self.logits = snap.logits

    @property
    def left(self) -> int:
        return len(self.tokens) - self.pos

    def advance(self, n: int) -> int:
        """Compute up to ``n`` more tokens (at least one); how many were computed."""
        end = min(len(self.tokens), self.pos + max(1, n))
        if self.cut is not None and self.pos < self.cut:
            end = min(end, self.cut)
        logits = self.seq.forward(self.tokens, self.pos, end, logits=end == len(self.tokens))
        done, self.pos = end - self.pos, end
        if self.pos == self.cut:
            self.seq.keep_snapshot(self.seq.cache.snapshot())
        if self.pos == len(self.tokens):
            self.seq.keep_snapshot(self.seq.cache.snapshot(logits))
            self.logits = logits
        return done


def _cpu_ops_status(device: torch.device) -> str:
    if not ops.use_cpu_native(device):
        return "pytorch-reference"
    from .cpu_ops import status

    return status()


def _check_context(max_context: int, cfg: ModelConfig) -> int:
    if max_context < 16:
        raise GptossError(f"a context of {max_context} tokens is too small", "use at least 16")
    if max_context > cfg.max_context:
        raise GptossError(
            f"a context of {max_context} tokens exceeds the model's {cfg.max_context}",
            f"use --context {cfg.max_context} or less",
        )
    return max_context


def memory_stats(device: torch.device) -> dict:
    """Peak memory so far: CUDA allocator figures on GPU, the process's peak RSS on CPU (bytes)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {
            "peak_allocated": torch.cuda.max_memory_allocated(device),
            "peak_reserved": torch.cuda.max_memory_reserved(device),
            "device_used": total - free,
            "device_total": total,
        }
    import resource

    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
