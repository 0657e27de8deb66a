"""``gptoss bench``: prefill and decode speed, time to first token, memory and roofline share.

What is measured, per configuration (prompt length P, batch B, context depth d; G tokens generated):
the cache is first holding d tokens (filled once, untimed, restored before every run), then

- prefill: the P prompt tokens of B aligned streams, in chunks of ``PREFILL_CHUNK`` per forward;
  ``prefill_tok_s = B*P / prefill_s``;
- time to first token (``ttft_ms``): prefill plus the unembedding and the greedy pick of the first
  token, until it is on the host;
- decode: the G-1 tokens after the first, one decode step of all B streams a step, each step
  timed alone; ``decode_tok_s = B*(G-1) / decode_s`` counts the tokens of all B streams
  (steady state: the first token is not in it) and ``stream_tok_s`` is that over B;
  ``itl_p50/p90/p99_ms`` are percentiles of the step times within a run;
- ``peak_mem_gb``: on GPU the allocator's peak reserved bytes in the run (``memory`` also holds
  the peak allocated and the driver's view of the device); on CPU the process's peak RSS in the run
  (VmHWM, reset before each run via /proc/self/clear_refs where Linux allows it, else the
  process's lifetime peak, and ``memory.rss_scope`` says which);
- ``decode_gbps = decode_tok_s * bytes_per_token`` and ``roofline_share = decode_gbps /
  bandwidth_gbps``: the share of the memory-bandwidth roofline the decode reached.

Honesty: every timed interval starts and ends with a device synchronisation (a step's time is
what it takes until its token exists, as in a generator that streams tokens); ``--warmup`` runs
per configuration (compilation, autotuning, allocator growth) are run identically and not
counted; ``--repeat`` counted runs give mean, standard deviation (Bessel-corrected, as
llama-bench) and median of each figure. All configurations prefill through ``Transformer.forward``
with B aligned streams of random token ids, the same way. The path that
ran (``system``: ops/kernels, cuda_graph) is what this loop used: at batch 1, when the engine has
its static decode step (CUDA with the kernels), the decode runs through it, CUDA graph included,
exactly as ``gptoss chat`` decodes. At B > 1 the streams go through the batched engine that
``gptoss serve --parallel`` and ``gptoss eval --parallel`` run (``batch.py``: a slot each, one
decode step of all of them, per-bucket CUDA graphs where the kernels run): its rounds are driven
and timed here, prefill first (all B prompts join at once), then one decode step a round. Each
B > 1 configuration also has one ``staggered`` run: stream i joins i*(G-1)/B rounds after the first,
so prefill (chunked under the engine's budget) and decode share rounds as in a server; it gives
total and per-stream tok/s, TTFT and inter-token latency over all streams.
``decode_path`` in each configuration says which path ran; ``engine_cuda_graph`` what the engine has.

Bandwidth (``bandwidth_gbps``) is measured in the same run on the same device: the best of a few
copies of a large buffer (1 GiB device-to-device on GPU, 256 MiB memcpy on CPU), counting the bytes
read plus the bytes written, as STREAM's copy does. It is what the device achieves, below the
datasheet figure.

Bytes per decoded token (``bytes_per_token``), counted from the config; w is the bytes of the
activation dtype (weights and the KV cache are held in it), L layers, E experts, k active:

    attention   L * (qkv_dim*D + q_dim*D + qkv_dim + D) * w         q/k/v/o weights and biases
    norms       (L * (2*D + n_heads) + D) * 4                      RMSNorm scales, sinks (fp32)
    router      L * (E*D + E) * w
    experts     L * u(B) * (3*F*D * 4.25/8 + (2*F + D) * w)        MXFP4 (4 bits + an 8-bit scale
                                                                  per 32 values) and biases
    unembedding V * D * w
    embedding   B * D * w                                          the B rows looked up
    kv cache    B * sum over layers of 2 * K*dh * w * n_pos        n_pos = context on full layers,
                                                                  min(context, window) on windowed

per decode step of B streams, divided by B. ``context`` is the positions the new token attends
over (those before it and itself). u(B) = E * (1 - (1 - k/E)^B) is the expected number of distinct
experts B tokens touch when the router spreads them evenly (u(1) = k). Reads of activations and
the KV write of the new token are left out (a few KB). For gpt-oss-20b in bf16 at a 2048-token
context this gives 3.761 GB (attention 1.274, experts 1.271, unembedding 1.158, KV 0.053, router
0.004), which is DESIGN.md's 3.76; gpt-oss-120b gives 5.083 GB, DESIGN's 5.08. It is a lower
bound of the traffic: the PyTorch reference path also reads the dequantized experts it writes, so
its share is far below what kernels that dequantize in registers reach.

The JSON result (``--format json``; what ``--baseline`` reads; the values are examples):

    {
      "schema": "gptoss-bench/1",
      "created": "2026-11-21T17:00:00+00:00",            UTC
      "system": {                                        what ran (Engine.runtime_info, plus):
        "device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "driver": "...",
        "cuda": "...", "torch": "...", "triton": "...", "python": "...",
        "dtype": "bfloat16", "ops": "...", (any other key runtime_info gives, e.g. "kernels"),
        "cuda_graph": false, "engine_cuda_graph": (only when the engine has one),
        "bench_path": "Transformer.forward, B aligned streams, eager",
        "cpu_threads": 16, "cpu_name": "..."
      },
      "model": {"name": "gpt-oss-20b", "preset": "gpt-oss-20b", "path": null,
                "random_weights": true, "context": 2176, "weights_bytes": ...,
                "params": {"total": ..., "active_per_token": ..., "embedding": ..., ...},
                "config": {ModelConfig fields}},
      "settings": {"prompt_lens": [128, 2048], "gen_tokens": 128, "batch": [1],
                   "context_depth": [0], "repeat": 3, "warmup": 1, "seed": 0},
      "bandwidth_gbps": ...,                             GB/s, the best of the copies
      "bandwidth": {"method": "device-to-device copy", "bytes": 1073741824,
                    "counted": "read + write", "gbps_values": [...]},
      "timing": {"wall_s", "load_s", "info_s", "bandwidth_s", "fill_s", "warmup_s", "runs_s",
                 "measured_s"},                          where the wall clock went (seconds)
      "warnings": ["..."],
      "results": [
        {"prompt_len": 128, "batch": 1, "context_depth": 0, "gen_tokens": 128,
         "decode_context": [129, 255], "bytes_per_token": ...,  mean over the decode steps
         "prefill_tok_s": {"mean": ..., "std": ..., "median": ..., "values": [...]},
         "ttft_ms", "decode_tok_s", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "peak_mem_gb",
         "decode_gbps", "roofline_share": {same four keys},
         "memory": {last run: "peak_allocated", "peak_reserved", "device_used",
                    "device_total" on GPU; "peak_rss", "rss_scope" on CPU},
         "runs": [{"prefill_s", "ttft_s", "decode_s", "decode_steps", "wall_s"}, ...]}
      ]
    }

``timing.measured_s`` is the sum of the counted runs' timed phases (ttft_s + decode_s); it never
exceeds ``runs_s`` (the counted runs, restore of the cache included) nor ``wall_s``.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import benchstats, selfcheck
from .config import PRESETS, ModelConfig, preset
from .cpu_ops import cpu_name
from .batch import BatchEngine
from .engine import PREFILL_CHUNK, DecodeStep, Engine, memory_stats, pick_device, pick_dtype
from .errors import GptossError
from .sampling import SamplingParams

SCHEMA = "gptoss-bench/1"
BENCH_PATH = "Transformer.forward, B aligned streams, eager"     # batch 1 without a DecodeStep
BATCH_PATH = "BatchEngine: a slot per stream, one decode step for all"  # batch > 1
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}   # bandwidth probe: well beyond any cache
MXFP4_BYTES_PER_VALUE = 4.25 / 8
GREEDY = SamplingParams(temperature=0)            # the bench takes the argmax, as at batch 1


# ---- the performance model ------------------------------------------------------------------
def decode_bytes(cfg: ModelConfig, context: int, dtype: torch.dtype | str = torch.bfloat16,
                 batch: int = 1) -> dict[str, float]:
    """Bytes read by one decode step of ``batch`` streams at ``context``, by kind (see the
    module docstring for the formula)."""
    w = _dtype_bytes(dtype)
    D, F, E, k, L = cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.n_experts_per_token, cfg.n_layers
    used = E * (1 - (1 - k / E) ** batch)           # expected distinct experts of B tokens
    per_pos = 2 * cfg.kv_dim * w                     # one position's k and v, one layer
    kv = sum(per_pos * (min(context, cfg.sliding_window) if windowed else context)
             for windowed in cfg.windowed_layers)
    return {
        "attention": L * (cfg.qkv_dim * D + cfg.q_dim * D + cfg.qkv_dim + D) * w,
        "norms": (L * (2 * D + cfg.n_heads) + D) * 4,
        "router": L * (E * D + E) * w,
        "experts": L * used * (3 * F * D * MXFP4_BYTES_PER_VALUE + (2 * F + D) * w),
        "unembedding": cfg.vocab_size * D * w,
        "embedding": batch * D * w,
        "kv_cache": batch * kv,
    }


def bytes_per_token(cfg: ModelConfig, context: int, dtype: torch.dtype | str = torch.bfloat16,
                    batch: int = 1) -> float:
    """Bytes read per decoded token: one step of ``batch`` streams, shared by its ``batch`` tokens."""
    return sum(decode_bytes(cfg, context, dtype, batch).values()) / batch


def _dtype_bytes(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        dtype = pick_dtype(dtype, torch.device("cpu"))
    return torch.empty((), dtype=dtype).element_size()


# ---- options --------------------------------------------------------------------------------
@dataclass
class Options:
    """The sweep and what to run it on, checked."""

    model: str | None
    random_weights: str | None
    prompt_lens: list[int]
    gen_tokens: int
    batch: list[int]
    context_depth: list[int]
    repeat: int
    warmup: int
    device: str = "auto"
    dtype: str = "auto"
    graph: bool = True
    seed: int = 0

    @property
    def needed_context(self) -> int:
        return max(self.prompt_lens) + max(self.context_depth) + self.gen_tokens


def int_list(text: str, option: str, minimum: int) -> list[int]:
    """'128,2048' -> [128, 2048]; duplicates dropped, order kept; one-line errors."""
    values: list[int] = []
    for part in str(text).split(","):
        part = part.strip().replace("_", "")
        if not re.fullmatch(r"\d+", part):
            raise GptossError(f"{option} {text!r}: {part!r} is not a whole number",
                              f"give comma-separated integers, e.g. {option} 128,2048")
        v = int(part)
        if v < minimum:
            raise GptossError(f"{option} {text!r}: {v} is below {minimum}")
        if v not in values:
            values.append(v)
    return values


def parse_percentage(text: str) -> float:
    """'5%' or '5' -> 0.05."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%?\s*", str(text))
    if not m or float(m.group(1)) >= 100:
        raise GptossError(f"--max-regression {text!r} is not a percentage",
                          "give a number from 0 to 100, e.g. 5%")
    return float(m.group(1)) / 100


def make_options(model, random_weights, prompt_lens, gen_tokens, batch, context_depth, repeat,
                 warmup, device="auto", dtype="auto", graph=True) -> Options:
    if model and random_weights:
        raise GptossError("--model and --random-weights exclude each other", "give one of them")
    if not model and not random_weights:
        raise GptossError("nothing to benchmark",
                          "give --model FOLDER|HUB_ID or --random-weights gpt-oss-20b|gpt-oss-120b|small|tiny")
    if random_weights and random_weights not in PRESETS:
        preset(random_weights)                      # raises: unknown preset, with the choices
    pick_dtype(dtype, pick_device(device))           # unknown device or dtype: one line, now
    if gen_tokens < 2:
        raise GptossError(f"--gen-tokens {gen_tokens}: decode needs at least 2 tokens",
                          "the first token comes from prefill; decode is timed from the second")
    if repeat < 1:
        raise GptossError(f"--repeat {repeat}: at least one measured run is needed")
    if warmup < 0:
        raise GptossError(f"--warmup {warmup} is negative")
    return Options(model, random_weights, int_list(prompt_lens, "--prompt-lens", 1), gen_tokens,
                   int_list(batch, "--batch", 1), int_list(context_depth, "--context-depth", 0),
                   repeat, warmup, device, dtype, graph)


# ---- the command ----------------------------------------------------------------------------
def run(model=None, random_weights=None, prompt_lens="128,2048", gen_tokens=128, batch="1",
        context_depth="0", repeat=3, warmup=1, fmt="table", output=None, baseline=None,
        max_regression="5%", device="auto", dtype="auto", graph=True, verbose=False) -> dict:
    """``gptoss bench``: check everything that can be checked before the (long) run, run the
    sweep, print the result on stdout, write ``--output``, compare with ``--baseline``."""
    if fmt not in benchstats.FORMATS:
        raise GptossError(f"unknown --format {fmt!r}", f"use one of {', '.join(benchstats.FORMATS)}")
    opts = make_options(model, random_weights, prompt_lens, gen_tokens, batch, context_depth,
                        repeat, warmup, device, dtype, graph)
    limit = parse_percentage(max_regression)
    base = benchstats.load_baseline(baseline) if baseline is not None else None
    if output is not None and not Path(output).parent.is_dir():
        raise GptossError(f"--output {output}: the folder {Path(output).parent} does not exist")
    result = execute(opts, progress=True)
    benchstats.emit(result, fmt, sys.stdout, verbose=verbose)
    benchstats.print_notes(result)
    if output is not None:
        out_fmt = fmt if fmt in ("json", "csv", "md") else "json"
        with open(output, "w", encoding="utf-8", newline="") as f:
            benchstats.emit(result, out_fmt, f)
    if base is not None:
        benchstats.check_baseline(result, base, limit, str(baseline))
    return result


def execute(opts: Options, progress: bool = False) -> dict:
    """Load the model, measure the bandwidth, run the sweep; the JSON result as a dict."""
    t_start = time.perf_counter()
    timing = dict.fromkeys(("load_s", "info_s", "bandwidth_s", "fill_s", "warmup_s", "runs_s",
                            "measured_s"), 0.0)
    bar = benchstats.Progress(enabled=progress, total=len(_configs(opts)) * (opts.warmup + opts.repeat))
    with bar:
        bar.say("loading the model")
        with selfcheck.quiet():              # an op that failed its check: in "warnings" below
            engine, name, path = _engine(opts)
        timing["load_s"] = time.perf_counter() - t_start
        t = time.perf_counter()
        bar.say("measuring memory bandwidth")
        bandwidth = measure_bandwidth(engine.device)
        timing["bandwidth_s"] = time.perf_counter() - t
        t = time.perf_counter()
        system, warnings = _system(engine, opts)    # imports triton: seconds, not nothing
        timing["info_s"] = time.perf_counter() - t
        with engine.kernel_scope():         # its forward passes count with the engine's counters
            results = [_measure_config(engine, opts, P, B, d, bandwidth["gbps"], timing, bar)
                       for P, B, d in _configs(opts)]
    timing["wall_s"] = time.perf_counter() - t_start
    cfg = engine.config
    counts = cfg.param_counts()
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "system": system,
        "model": {
            "name": name, "preset": _preset_of(cfg), "path": path,
            "random_weights": bool(cfg.random_weights), "context": engine.max_context,
            "weights_bytes": engine.model.nbytes(),
            "params": {"total": sum(v for k, v in counts.items() if k != "active_experts"),
                       "active_per_token": sum(v for k, v in counts.items()
                                               if k not in ("experts", "embedding")),
                       **counts},
            "config": cfg.to_json(),
        },
        "settings": {"prompt_lens": opts.prompt_lens, "gen_tokens": opts.gen_tokens,
                     "batch": opts.batch, "context_depth": opts.context_depth,
                     "repeat": opts.repeat, "warmup": opts.warmup, "seed": opts.seed},
        "bandwidth_gbps": bandwidth["gbps"],
        "bandwidth": {k: v for k, v in bandwidth.items() if k != "gbps"},
        "timing": timing,
        "warnings": warnings,
        "results": results,
    }


def _configs(opts: Options) -> list[tuple[int, int, int]]:
    """(prompt_len, batch, depth) in the order they run: one cache per (batch, depth)."""
    return [(P, B, d) for B in opts.batch for d in opts.context_depth for P in opts.prompt_lens]


def _engine(opts: Options) -> tuple[Engine, str, str | None]:
    """The engine for --model or --random-weights, with just the context the sweep needs."""
    need = max(16, opts.needed_context)
    extra = {}
    if opts.random_weights:
        cfg, name, path = preset(opts.random_weights), opts.random_weights, None
        factory = Engine.random
    else:
        from .checkpoint import Checkpoint
        from .resolve import resolve_model

        ckpt = Checkpoint.open(resolve_model(opts.model))
        cfg, name, path = ckpt.config, opts.model, str(ckpt.folder)
        factory = Engine.load
    if opts.needed_context > cfg.max_context:
        raise GptossError(
            f"prompt length {max(opts.prompt_lens)} + context depth {max(opts.context_depth)} + "
            f"{opts.gen_tokens} generated tokens = {opts.needed_context} exceeds the model's context "
            f"of {cfg.max_context}", "use shorter --prompt-lens, --context-depth or --gen-tokens")
    if "cuda_graph" in inspect.signature(factory).parameters:
        extra["cuda_graph"] = opts.graph
    if opts.random_weights:
        return Engine.random(cfg, opts.device, opts.dtype, need, seed=opts.seed, **extra), name, path
    return Engine.load(path, opts.device, opts.dtype, need, **extra), name, path


def _preset_of(cfg: ModelConfig) -> str | None:
    for name, p in PRESETS.items():
        if p.replace(random_weights=cfg.random_weights, max_context=cfg.max_context) == cfg:
            return name
    return None


def _system(engine: Engine, opts: Options) -> tuple[dict, list[str]]:
    """Engine.runtime_info as it is, corrected to what this loop ran, plus a few facts."""
    info = dict(engine.runtime_info())
    info.pop("random_weights", None)                 # a property of the model, reported there
    warnings = []
    if info.get("cuda_graph"):
        info["engine_cuda_graph"] = info["cuda_graph"]
        if engine._decoder is None:
            warnings.append("the engine has a CUDA-graph decode step, but bench drives "
                            "Transformer.forward eagerly: the figures are without the graph")
    # batch 1 replays the engine's graph; B > 1 the batched engine's per-bucket graphs
    info["cuda_graph"] = engine._decoder is not None and engine._decoder.use_graph
    if opts.graph and engine.device.type == "cuda" and "engine_cuda_graph" not in info:
        warnings.append("--graph: this build has no CUDA-graph decode step; the decode step ran eagerly")
    info.setdefault("driver", None)
    info["bench_path"] = BENCH_PATH if opts.batch == [1] else f"{BENCH_PATH}; {BATCH_PATH}"
    info["python"] = platform.python_version()
    info["cpu_threads"] = torch.get_num_threads()
    info["cpu_name"] = cpu_name()
    for op, why in info["fallbacks"].items():
        warnings.append(selfcheck.fallback_line(op, why).removeprefix(selfcheck.WARNING_PREFIX))
    if engine.config.random_weights:
        warnings.append("random weights: the speed is real, the tokens are noise")
    if opts.warmup == 0:
        warnings.append("--warmup 0: the first run of each configuration includes one-time costs "
                        "(compilation, autotuning, allocation)")
    return info, warnings


# ---- measuring ------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 4) -> dict:
    """Best-of-``reps`` copy of a large buffer on ``device``; GB/s counting read + write."""
    nbytes = nbytes or COPY_BYTES[device.type]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = max(1 << 26, min(nbytes, free // 4))
    inner = 10 if device.type == "cuda" else 1        # copies per timed rep (timer resolution)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)                                    # touch the pages, warm the copy path
    values = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            dst.copy_(src)
        _sync(device)
        values.append(2 * nbytes * inner / (time.perf_counter() - t0) / 1e9)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()                      # the probe's buffers must not count as peak
    method = "device-to-device copy" if device.type == "cuda" else "memcpy (torch copy_)"
    return {"gbps": max(values), "method": method, "bytes": nbytes, "counted": "read + write",
            "gbps_values": values}


def _reset_peak(device: torch.device) -> bool:
    """Start a new peak-memory window; False where only the process lifetime peak exists."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                              # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _peak(device: torch.device, windowed: bool) -> tuple[float, dict]:
    mem = memory_stats(device)
    if device.type == "cuda":
        return mem["peak_reserved"], mem
    try:
        status = Path("/proc/self/status").read_text()
        mem["peak_rss"] = int(re.search(r"VmHWM:\s+(\d+)\s*kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        windowed = False
    mem["rss_scope"] = "run" if windowed else "process"
    return mem["peak_rss"], mem


def _tokens(n_streams: int, n_tokens: int, vocab: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_streams, n_tokens), generator=g).to(device)     # [B, T]


def _prefill(model, cache, tokens: torch.Tensor, start: int) -> torch.Tensor:
    h = None
    for s in range(0, tokens.shape[1], PREFILL_CHUNK):
        h = model.forward(tokens[:, s:s + PREFILL_CHUNK], cache, start + s)       # [B, t, D]
    return h


def _one_run(engine: Engine, cache, prompt: torch.Tensor, depth: int, gen: int, snap, step=None) -> dict:
    """One timed run: restore the depth, prefill, first token, G-1 decode steps (through ``step``,
    the engine's ``DecodeStep``, when given: what ``gptoss chat`` runs at batch 1)."""
    model, dev = engine.model, engine.device
    t_run = time.perf_counter()
    cache.restore(snap) if snap is not None else cache.reset()
    P = prompt.shape[1]                                                             # [B, P]
    _sync(dev)
    t0 = time.perf_counter()
    h = _prefill(model, cache, prompt, depth)
    _sync(dev)
    t1 = time.perf_counter()
    nxt = model.logits(h[:, -1]).argmax(-1, keepdim=True)                           # [B, 1]
    nxt.tolist()                                       # the first tokens are on the host
    t2 = prev = time.perf_counter()
    steps = []
    for pos in range(depth + P, depth + P + gen - 1):
        if step is not None:                                                         # B = 1
            nxt = step(int(nxt), pos).argmax(-1).view(1, 1)
        else:
            h = model.forward(nxt, cache, pos)                                       # [B, 1, D]
            nxt = model.logits(h[:, -1]).argmax(-1, keepdim=True)                    # [B, 1]
        _sync(dev)
        now = time.perf_counter()
        steps.append(now - prev)
        prev = now
    return {"prefill_s": t1 - t0, "ttft_s": t2 - t0, "decode_s": prev - t2, "decode_steps": len(steps),
            "step_s": steps, "wall_s": time.perf_counter() - t_run}


def _batched_runner(engine: Engine, B: int, depth: int, gen: int, seed: int, timing: dict, bar):
    """The batched engine of B slots, each holding its stream's ``depth`` tokens, and a function
    running one timed run of B prompts ([B, P]) through it (``_one_run``'s fields)."""
    cfg, dev = engine.config, engine.device
    be = BatchEngine(engine, B, max_context=engine.max_context, cuda_graph=engine._decoder is not None
                     and engine._decoder.use_graph)
    prefixes = _tokens(B, depth, cfg.vocab_size, seed + 1, "cpu").tolist() if depth else [[] for _ in range(B)]
    if depth:
        t = time.perf_counter()
        bar.say(f"filling the cache to depth {depth} (batch {B})")
        for req in [be.submit(p, max_new_tokens=1) for p in prefixes]:
            req.tokens_out()
        _sync(dev)
        timing["fill_s"] += time.perf_counter() - t

    def run(prompt: torch.Tensor) -> dict:
        t_run = time.perf_counter()
        for seq in be.slots:                 # each slot back to its depth: the prompt is computed
            seq.forget_after(depth)
        prompts = [pre + p for pre, p in zip(prefixes, prompt.tolist())]
        _sync(dev)
        t0 = time.perf_counter()
        reqs = [be.submit(p, GREEDY, gen) for p in prompts]
        be._admit()
        be._prefill()                        # nothing decodes yet: all B prompts at once
        _sync(dev)
        t1 = time.perf_counter()
        steps, prev = [], t1
        while be.active:
            be.step()
            _sync(dev)
            now = time.perf_counter()
            steps.append(now - prev)
            prev = now
        for r in reqs:
            r.tokens_out()                   # drain (all done)
        return {"prefill_s": t1 - t0, "ttft_s": t1 - t0, "decode_s": prev - t1, "decode_steps": len(steps),
                "step_s": steps, "wall_s": time.perf_counter() - t_run}

    return be, prefixes, run


def _staggered_run(be: BatchEngine, prefixes: list[list[int]], prompt: torch.Tensor, depth: int, gen: int) -> dict:
    """Stream i joins (gen-1)*i/B rounds after the first; totals over every stream."""
    B = len(prefixes)
    for seq in be.slots:
        seq.forget_after(depth)
    prompts = [pre + p for pre, p in zip(prefixes, prompt.tolist())]
    dev = be.device
    t0 = time.perf_counter()
    reqs: list = []
    rounds = 0
    while len(reqs) < B or be.active or be.waiting:
        while len(reqs) < B and rounds >= (gen - 1) * len(reqs) // B:
            reqs.append(be.submit(prompts[len(reqs)], GREEDY, gen))
        be.step()
        _sync(dev)
        rounds += 1
    wall = time.perf_counter() - t0
    gaps = sorted(1e3 * (b - a) for r in reqs for a, b in zip(r.stats.token_times, r.stats.token_times[1:]))
    decode = [r.stats.decode_tokens / r.stats.decode_s for r in reqs if r.stats.decode_s > 0]
    first = min(r.submitted + r.stats.first_token_s for r in reqs)
    return {"streams": B, "rounds": rounds, "wall_s": wall,
            "total_tok_s": sum(r.generated for r in reqs) / wall,
            "decode_tok_s": sum(r.stats.decode_tokens for r in reqs) / (time.perf_counter() - first),
            "stream_tok_s": sum(decode) / len(decode) if decode else None,
            "ttft_ms": 1e3 * sum(r.stats.first_token_s for r in reqs) / B,
            "itl_p50_ms": benchstats.percentile(gaps, 50) if gaps else None,
            "itl_p90_ms": benchstats.percentile(gaps, 90) if gaps else None,
            "itl_p99_ms": benchstats.percentile(gaps, 99) if gaps else None}


def _measure_config(engine: Engine, opts: Options, P: int, B: int, depth: int, bandwidth: float,
                    timing: dict, bar) -> dict:
    if B > 1:
        return _measure_batched(engine, opts, P, B, depth, bandwidth, timing, bar)
    cfg, dev = engine.config, engine.device
    G = opts.gen_tokens
    cache = engine.model.new_cache(B)
    snap = None
    if depth:
        t = time.perf_counter()
        bar.say(f"filling the cache to depth {depth} (batch {B})")
        _prefill(engine.model, cache, _tokens(B, depth, cfg.vocab_size, opts.seed + 1, dev), 0)
        snap = cache.snapshot()
        _sync(dev)
        timing["fill_s"] += time.perf_counter() - t
    prompt = _tokens(B, P, cfg.vocab_size, opts.seed, dev)
    label = f"prompt {P}, batch {B}, depth {depth}"
    # batch 1 decodes through the engine's static step (CUDA graph) when it has one, as chat does
    step = (DecodeStep(engine.model, cache, engine._decoder.use_graph, counters=engine.counters)
            if B == 1 and engine._decoder else None)
    for i in range(opts.warmup):
        bar.step(f"{label}: warm-up {i + 1}/{opts.warmup}")
        timing["warmup_s"] += _one_run(engine, cache, prompt, depth, G, snap, step)["wall_s"]
    contexts = range(depth + P + 1, depth + P + G)     # positions attended by each decode step
    bpt = sum(bytes_per_token(cfg, c, engine.dtype, B) for c in contexts) / len(contexts)
    runs, figs, mem = _timed_runs(lambda: _one_run(engine, cache, prompt, depth, G, snap, step),
                                  dev, opts, label, B, P, bpt, bandwidth, timing, bar)
    path = f"DecodeStep, CUDA graph {'on' if step.use_graph else 'off'}" if step else BENCH_PATH
    del cache, snap, step
    if dev.type == "cuda":
        torch.cuda.empty_cache()                      # the next configuration's peak starts clean
    return {"prompt_len": P, "batch": B, "context_depth": depth, "gen_tokens": G,
            "decode_context": [contexts[0], contexts[-1]], "bytes_per_token": bpt,
            "decode_path": path,
            **{k: benchstats.summarize(v) for k, v in figs.items()},
            "memory": mem, "runs": runs}


def _measure_batched(engine: Engine, opts: Options, P: int, B: int, depth: int, bandwidth: float,
                     timing: dict, bar) -> dict:
    """A B > 1 configuration through the batched engine (see the module docstring)."""
    cfg, dev = engine.config, engine.device
    G = opts.gen_tokens
    be, prefixes, run = _batched_runner(engine, B, depth, G, opts.seed, timing, bar)
    prompt = _tokens(B, P, cfg.vocab_size, opts.seed, "cpu")
    label = f"prompt {P}, batch {B}, depth {depth}"
    for i in range(opts.warmup):
        bar.step(f"{label}: warm-up {i + 1}/{opts.warmup}")
        timing["warmup_s"] += run(prompt)["wall_s"]
    contexts = range(depth + P + 1, depth + P + G)
    bpt = sum(bytes_per_token(cfg, c, engine.dtype, B) for c in contexts) / len(contexts)
    runs, figs, mem = _timed_runs(lambda: run(prompt), dev, opts, label, B, P, bpt, bandwidth, timing, bar)
    bar.say(f"{label}: staggered starts")
    staggered = _staggered_run(be, prefixes, prompt, depth, G)
    graphs = be.use_graph
    be.close()
    del be
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"prompt_len": P, "batch": B, "context_depth": depth, "gen_tokens": G,
            "decode_context": [contexts[0], contexts[-1]], "bytes_per_token": bpt,
            "decode_path": f"BatchEngine: {B} slots, one decode step for all, CUDA graphs {'on' if graphs else 'off'}",
            **{k: benchstats.summarize(v) for k, v in figs.items()},
            "staggered": staggered, "memory": mem, "runs": runs}


def _timed_runs(one_run, dev: torch.device, opts: Options, label: str, B: int, P: int, bpt: float,
                bandwidth: float, timing: dict, bar) -> tuple[list, dict, dict]:
    """``opts.repeat`` counted runs of ``one_run``: (runs, figures by key, last run's memory)."""
    runs, figs = [], {f.key: [] for f in benchstats.FIGURES}
    mem = {}
    for i in range(opts.repeat):
        bar.step(f"{label}: run {i + 1}/{opts.repeat}")
        windowed = _reset_peak(dev)
        r = one_run()
        peak, mem = _peak(dev, windowed)
        steps = r.pop("step_s")
        decode_tok_s = B * r["decode_steps"] / r["decode_s"]
        ms = sorted(s * 1e3 for s in steps)
        for key, v in (("prefill_tok_s", B * P / r["prefill_s"]), ("ttft_ms", r["ttft_s"] * 1e3),
                       ("decode_tok_s", decode_tok_s), ("stream_tok_s", decode_tok_s / B), ("itl_p50_ms", benchstats.percentile(ms, 50)),
                       ("itl_p90_ms", benchstats.percentile(ms, 90)),
                       ("itl_p99_ms", benchstats.percentile(ms, 99)), ("peak_mem_gb", peak / 1e9),
                       ("decode_gbps", decode_tok_s * bpt / 1e9),
                       ("roofline_share", decode_tok_s * bpt / 1e9 / bandwidth)):
            figs[key].append(v)
        runs.append(r)
        timing["runs_s"] += r["wall_s"]
        timing["measured_s"] += r["ttft_s"] + r["decode_s"]
    return runs, figs, mem
