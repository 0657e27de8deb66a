"""Native CPU ops (the MXFP4 MoE, the few-row bf16 linear, decode attention, and a decode step's
RoPE + cache store, residual add + RMSNorm + router, for one sequence or a batch of them): a small
C++ library, built at first use.

Why: the reference ``ops.moe`` dequantizes each chosen expert whole into a float tensor before
its matmul, so one decode step writes and rereads about eight times the bytes the packed experts
hold (issue 16 measured 0.11 tok/s on 4 layers of gpt-oss-20b). ``csrc/cpu_ops.cpp`` reads the
packed experts once per call: a tile of 4 rows is decoded into a float buffer and used for every
token routed to that expert, the 4 chosen experts of every token go in one call, and plain
threads split the output rows (see its header comment).

Why C++ through ctypes and not ``torch.utils.cpp_extension``, numba or ``torch.compile``: the
library includes no PyTorch header, so it builds with one ``g++`` call in about two seconds on
2 cores (a torch extension takes close to a minute), it needs no extra Python package, and
ctypes releases the GIL while it runs. It is compiled with ``-march=native`` for the machine
it runs on (AVX-512 where the CPU has it, a scalar loop elsewhere) into a cache folder
(``$GPTOSS_CACHE`` or ``~/.cache/gptoss``) keyed by the source, the compiler and the CPU flags,
so each machine builds it once.

When there is no C++ compiler (or the build fails) the reference runs instead, with one warning
saying why and what to install; ``status()`` says which path runs (``gptoss bench`` reports it).
``GPTOSS_KERNELS=0`` forces the reference everywhere (A/B runs). ``GPTOSS_THREADS`` sets the
thread count of the library and of PyTorch's CPU ops (default: PyTorch's, i.e. the physical
cores); its worker threads are kept between calls asleep on a condition variable, so none
spins while the machine is shared (starting a thread per call cost ~45 us, ~100 times a 20b step).
A parallel phase is cut into a few parts per thread that whoever runs takes in turn, so a worker
that another process keeps off its core does not hold the phase up (issue 26).

``linear``: PyTorch's bf16 matmul on CPU reads its weight at a fraction of the memory bandwidth
when only a few rows come in (measured 1.5-3.7 GB/s against 8.7 for float32 on this machine), so
a decode step in bf16 (attention, unembedding) goes to the library instead, which widens each
weight row to float32 in registers and splits the rows over the threads (with AVX512-BF16, one
``vdpbf16ps`` per 32 products for every number of rows). Above ``LINEAR_MAX_ROWS`` rows (prefill,
and a batched decode step of more than 16 sequences) PyTorch's matmul is faster and runs:
measured for continuous batching at gpt-oss-20b widths (qkv 5120x2880, out 2880x4096, bf16, 2
threads of a shared EPYC, best of 12), the library ties PyTorch near 8 rows and loses from 16 on
(at 32 rows: 7.0 against 3.8 ms). The norms' single-threaded loops likewise lose to PyTorch from
about 12-16 rows (at 32: rmsnorm 95 against 46 us), so ``SMALL_MAX_ROWS`` stays 16 too.

``attention``: at a decode step the reference ``ops.attention`` costs about 1 ms per layer on
gpt-oss-20b shapes, nearly all of it PyTorch's per-op overhead on tiny tensors (einsums, masks,
a concatenated sink, a softmax). For at most ``ATTN_MAX_ROWS`` query tokens the library does the
same computation in one call: each query token and the H/K heads sharing a kv head are one work
item, every allowed key and value row is read once for those heads, the softmax (with the sink)
is in float32. q may be a strided view (the split of the qkv projection) and k, v
slices of a cache buffer: strides are passed, nothing is copied. Prefill runs the reference,
whose einsums amortize their overhead over many rows.

``rope_store``, ``rmsnorm``, ``add_rmsnorm``, ``add_rmsnorm_route`` (``csrc/small_ops.cpp``): at a
decode step their references are about 60 tiny PyTorch ops per layer (~0.9 ms at gpt-oss-20b
shapes, ~20 ms of a 24-layer step), all per-op overhead. For at most ``SMALL_MAX_ROWS`` tokens
the library does each in one call, one thread, with the reference's roundings (a bias added in
the activation dtype, the router logits rounded to it as ``F.linear`` does) and torch.topk's own
selection algorithm, so the same experts are chosen, ties included. Prefill runs the references.

``attention_rows``, ``rope_store_rows``: the batched decode step (continuous batching) of up to
``ROWS_MAX_TOKENS`` sequences, one token each, each in its own row of a pooled cache at its own
position. The same code as ``attention`` (a work item is one token and the heads sharing a kv
head, here reading its own row's keys; split over the worker threads) and as ``rope_store`` (one
thread, the reference's roundings: q, the cache writes and a ring's table agree to the bit).

Routing of ``moe`` alone is the reference's own (``ops.route.reference``), so the same experts
are chosen. Computed in float32 whatever the activation dtype; the result is cast back to it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from importlib.resources import files
from pathlib import Path

import torch

from .errors import GptossError

THREADS_ENV = "GPTOSS_THREADS"
CACHE_ENV = "GPTOSS_CACHE"
SOURCES = ("cpu_ops.cpp", "small_ops.cpp", "bf16.h")   # the .cpp compiled together into one library
LINEAR_MAX_ROWS = 16
ATTN_MAX_ROWS = 16        # query tokens per native attention call; prefill runs the reference
SMALL_MAX_ROWS = 16       # tokens (rows) per native rope_store / norm call; prefill runs the reference
ROWS_MAX_TOKENS = 64      # sequences per native attention_rows / rope_store_rows call (a batched decode step)
MOE_MAX_TOKENS = 256      # tokens per library call: Ctrl-C is seen between calls (~1 s at 20b)
# the most rows each op runs natively (more: its reference runs; the MoE takes any number)
MAX_ROWS = {"linear": LINEAR_MAX_ROWS, "attention": ATTN_MAX_ROWS, "rope_store": SMALL_MAX_ROWS,
            "rmsnorm": SMALL_MAX_ROWS, "add_rmsnorm": SMALL_MAX_ROWS, "add_rmsnorm_route": SMALL_MAX_ROWS,
            "attention_rows": ROWS_MAX_TOKENS, "rope_store_rows": ROWS_MAX_TOKENS}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")


def cpu_threads() -> int:
    """Threads for CPU work: ``$GPTOSS_THREADS``, else PyTorch's own count (its default is the
    physical cores, or ``OMP_NUM_THREADS``), so one setting governs both."""
    value = os.environ.get(THREADS_ENV)
    if not value:
        return torch.get_num_threads()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise GptossError(f"{THREADS_ENV}={value!r} is not a thread count", "use a positive integer, or unset it")
    return n


def apply_thread_count() -> int:
    """Give PyTorch's CPU ops the same thread count as the library (``GPTOSS_THREADS``)."""
    n = cpu_threads()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def _cache_dir() -> Path:
    from .resolve import cache_dir

    return cache_dir() / "cpu_ops"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine if hasattr(os, "uname") else sys.platform


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _build(cxx: str, sources: dict[str, bytes]) -> Path:
    """Compile the library from ``sources`` (file name -> text) into the cache (atomically:
    parallel processes may race)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([*sources.values(), " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    folder = _cache_dir()
    lib = folder / f"libgptoss_cpu-{key}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        paths = []
        for name, text in sources.items():
            paths.append(Path(tmp) / name)
            paths[-1].write_bytes(text)
        tmp_lib = Path(tmp) / lib.name
        units = [str(p) for p in paths if p.suffix == ".cpp"]
        done = subprocess.run([cxx, *FLAGS, *units, "-o", str(tmp_lib)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
        os.replace(tmp_lib, lib)
    return lib


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library or None, a line saying which path runs and why)."""
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (install g++, or set CXX)"
    try:
        sources = {name: (files("gptoss_cli") / "csrc" / name).read_bytes() for name in SOURCES}
        lib = ctypes.CDLL(str(_build(cxx, sources)))
    except (OSError, RuntimeError) as exc:
        return None, (f"building {' + '.join(n for n in SOURCES if n.endswith('.cpp'))} with {cxx} failed: {exc};"
                      " set CXX to a working C++17 compiler")
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.gptoss_moe.argtypes = [p, i64, i64, i64, i64, p, p, i64, p, p, p, p, p, p, i32, f32, p, i32, i32]
    lib.gptoss_moe.restype = i32
    lib.gptoss_linear_bf16.argtypes = [p, i64, i64, p, i64, p, p, i32, i32]
    lib.gptoss_linear_bf16.restype = i32
    lib.gptoss_attention.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i64, p, p, p, i64, f32, i32, p, i32, i32]
    lib.gptoss_attention.restype = i32
    lib.gptoss_rope_store.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i64, i64, p, p, p, p, p, p, p, p, p, i32]
    lib.gptoss_rope_store.restype = i32
    lib.gptoss_attention_rows.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i64, p, p, p, p, i64, f32, p, i32, i32]
    lib.gptoss_attention_rows.restype = i32
    lib.gptoss_rope_store_rows.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i64, i64, p, p, p, p, p, p, p, p, p,
                                           i32]
    lib.gptoss_rope_store_rows.restype = i32
    lib.gptoss_add_rmsnorm.argtypes = [p, p, p, i64, i64, p, f32, p, p, p, p, i64, i64, p, p, i32]
    lib.gptoss_add_rmsnorm.restype = i32
    lib.gptoss_linear_f32.argtypes = [p, i64, i64, p, i64, p, p, i32]
    lib.gptoss_linear_f32.restype = i32
    lib.gptoss_argmax_rows.argtypes = [p, i64, i64, p, i32]
    lib.gptoss_argmax_rows.restype = i32
    lib.gptoss_moe_simd.restype = ctypes.c_char_p
    return lib, f"cpu-native ({lib.gptoss_moe_simd().decode()})"


def bf16_native() -> bool:
    """Whether the library is built and multiplies bf16 in AVX512-BF16 (``dtype auto`` on CPU
    is then bfloat16)."""
    lib, _ = _library()
    return lib is not None and "avx512_bf16" in lib.gptoss_moe_simd().decode()


def status() -> str:
    """Which MoE runs on CPU tensors: ``cpu-native (avx512)`` or why the reference runs."""
    lib, why = _library()
    return why if lib is not None else f"pytorch-reference: {why}"


def fallback_line() -> str | None:
    """None when the library runs; else one line saying why the slow PyTorch reference runs and
    what to do. The command line prints it once, at load (``loading.load_engine``)."""
    lib, why = _library()
    if lib is not None:
        return None
    return f"the native CPU library is not available ({why}): running the PyTorch reference, 30-100x slower"


@functools.cache
def _warn_fallback(why: str) -> None:
    warnings.warn(f"CPU MoE: {why}; running the slow PyTorch reference", RuntimeWarning, stacklevel=3)


def moe(
    x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor,
    w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
    w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor,
    top_k: int, swiglu_limit: float, *, routing: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``ops.moe`` on CPU tensors (same arguments, same result up to float32 rounding); ``routing``
    (weights, experts) [N, k], when the caller has routed already, is used instead of routing here."""
    from . import ops

    lib, why = _library()
    if lib is None:
        _warn_fallback(why)
        return ops.moe.reference(x, router_w, router_b, w1_blocks, w1_scales, w1_bias,
                                 w2_blocks, w2_scales, w2_bias, top_k, swiglu_limit, routing=routing)
    N, D = x.shape
    E, F2 = w1_bias.shape
    bias_bf16 = w1_bias.dtype == torch.bfloat16
    b1, b2 = (b if b.dtype == torch.bfloat16 else b.float() for b in (w1_bias, w2_bias))
    packed = [t.contiguous() for t in (w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2)]
    pointers = [t.data_ptr() for t in packed]
    out = torch.empty(N, D, dtype=torch.float32)
    weights, experts = routing if routing is not None else ops.route.reference(x, router_w, router_b, top_k)
    for t0 in range(0, N, MOE_MAX_TOKENS):                                  # weights, experts [N, k]
        xs = x[t0:t0 + MOE_MAX_TOKENS]
        ex = experts[t0:t0 + MOE_MAX_TOKENS].contiguous()
        wt = weights[t0:t0 + MOE_MAX_TOKENS].float().contiguous()
        xf = xs.float().contiguous()
        rc = lib.gptoss_moe(xf.data_ptr(), xs.shape[0], D, F2 // 2, E, ex.data_ptr(), wt.data_ptr(), top_k,
                            *pointers, int(bias_bf16), float(swiglu_limit),
                            out[t0:].data_ptr(), cpu_threads(), int(x.dtype == torch.bfloat16))
        if rc != 0:
            raise ValueError(f"cpu_ops: bad shapes (code {rc}): D={D}, F={F2 // 2} must be multiples of 32")
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def argmax_rows(x: torch.Tensor) -> list[int]:
    """``x.argmax(-1).tolist()`` for float32 CPU rows [R, V] (the first of equal maxima, NaN the
    largest): the library's one pass at the memory's rate, else PyTorch's."""
    lib, _ = _library()
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu" or not x.numel():
        return x.argmax(-1).tolist()
    xc = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    if lib.gptoss_argmax_rows(xc.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), cpu_threads()) != 0:
        raise ValueError(f"cpu_ops.argmax_rows: bad shape {tuple(x.shape)}")
    return out.tolist()


def _linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """A few float32 rows through the library (a decode step's projections: one row too, which
    it streams 1.6-2x as fast as PyTorch's gemv); None where the library cannot (no AVX-512)."""
    lib, _ = _library()
    if lib is None:
        return None
    n_out, K = weight.shape
    xc, wc = x.reshape(rows, K).contiguous(), weight.contiguous()
    bc = None if bias is None else bias.float().contiguous()
    y = torch.empty(rows, n_out, dtype=torch.float32)
    rc = lib.gptoss_linear_f32(xc.data_ptr(), rows, K, wc.data_ptr(), n_out, None if bc is None else bc.data_ptr(),
                               y.data_ptr(), cpu_threads())
    if rc == -2:
        return None
    if rc != 0:
        raise ValueError(f"cpu_ops.linear: bad shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return y.view(*x.shape[:-1], n_out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``ops.linear`` on CPU tensors: the library for a few rows (bf16 or float32), else PyTorch."""
    import torch.nn.functional as F

    rows = x.numel() // max(1, x.shape[-1])
    if weight.dtype == x.dtype == torch.float32 and rows <= LINEAR_MAX_ROWS:
        y = _linear_f32(x, weight, bias, rows)
        return F.linear(x, weight, bias) if y is None else y
    if weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or rows > LINEAR_MAX_ROWS \
            or x.shape[-1] % 16:
        return F.linear(x, weight, bias)
    lib, _ = _library()
    if lib is None:
        return F.linear(x, weight, bias)
    n_out, K = weight.shape
    xc, wc = x.reshape(rows, K).contiguous(), weight.contiguous()
    bc = None if bias is None else bias.to(torch.bfloat16).contiguous()
    y = torch.empty(rows, n_out, dtype=torch.bfloat16)
    rc = lib.gptoss_linear_bf16(xc.data_ptr(), rows, K, wc.data_ptr(), n_out,
                                None if bc is None else bc.data_ptr(), y.data_ptr(), 1, cpu_threads())
    if rc != 0:
        raise ValueError(f"cpu_ops.linear: bad shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return y.view(*x.shape[:-1], n_out)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, scale: float, keys_by_position: bool = False,
) -> torch.Tensor:
    """``ops.attention`` on CPU tensors: the library for up to ``ATTN_MAX_ROWS`` query tokens in
    float32 or bf16 (same result up to float32 rounding), else the reference."""
    from . import ops

    B, T, H, dh = q.shape
    S, K = k.shape[1], k.shape[2]
    lib = None
    if T <= ATTN_MAX_ROWS and q.dtype in (torch.float32, torch.bfloat16) and k.dtype == v.dtype == q.dtype:
        lib, _ = _library()             # a failed build is reported once by the MoE and by status()
    if lib is None:
        return ops.attention.reference(q, k, v, sinks, q_pos, k_pos, window, scale, keys_by_position)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    strides = (ctypes.c_int64 * 9)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    sk = sinks.float().contiguous()
    qp, kp = q_pos.to(torch.int64).contiguous(), k_pos.to(torch.int64).contiguous()
    out = torch.empty(B, T, H, dh, dtype=q.dtype)                           # [B, T, H, dh]
    rc = lib.gptoss_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), strides, B, T, H, S, K, dh,
                              sk.data_ptr(), qp.data_ptr(), kp.data_ptr(), int(window), float(scale),
                              int(bool(keys_by_position)), out.data_ptr(), int(q.dtype == torch.bfloat16),
                              cpu_threads())
    if rc != 0:
        raise ValueError(f"cpu_ops.attention: bad shapes q {tuple(q.shape)}, k {tuple(k.shape)} (code {rc})")
    return out


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor | None,
    ring_pos: torch.Tensor | None = None, qkv_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ops.rope_store`` on CPU tensors: the library for up to ``SMALL_MAX_ROWS`` tokens in float32
    or bf16 (q, k, v strided views of the qkv projection, read in place; the caches written in
    place), else the reference."""
    from . import ops

    B, T, H, dh = q.shape
    K, S = k.shape[2], k_cache.shape[1]
    dtype = q.dtype
    lib = None
    if (T <= SMALL_MAX_ROWS and dtype in (torch.float32, torch.bfloat16) and dh % 2 == 0
            and all(t.dtype == dtype for t in (k, v, k_cache, v_cache))
            and (qkv_bias is None or qkv_bias.dtype == dtype)
            and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and (ring_pos is None or (ring_pos.dtype == torch.int64 and ring_pos.is_contiguous() and T <= S))):
        lib, _ = _library()
    if lib is None:
        return ops.rope_store.reference(q, k, v, cos, sin, pos, k_cache, v_cache, slots, ring_pos, qkv_bias)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    strides = (ctypes.c_int64 * 15)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                    *k_cache.stride()[:3], *v_cache.stride()[:3])
    c, s = cos.float().contiguous(), sin.float().contiguous()               # [P, dh/2]
    p = pos.to(torch.int64).contiguous()
    sl = None if ring_pos is not None else slots.to(torch.int64).contiguous()
    bias = None if qkv_bias is None else qkv_bias.contiguous()
    out = torch.empty(B, T, H, dh, dtype=dtype)                              # [B, T, H, dh]
    rc = lib.gptoss_rope_store(q.data_ptr(), k.data_ptr(), v.data_ptr(), strides, B, T, H, K, dh, S,
                               c.shape[0], c.data_ptr(), s.data_ptr(), p.data_ptr(), _ptr(sl), _ptr(ring_pos),
                               k_cache.data_ptr(), v_cache.data_ptr(), _ptr(bias), out.data_ptr(),
                               int(dtype == torch.bfloat16))
    if rc != 0:
        raise ValueError(f"cpu_ops.rope_store: bad input (code {rc}): q {tuple(q.shape)}, cache "
                         f"{tuple(k_cache.shape)}, positions {pos.tolist()} of {c.shape[0]}")
    return out


def attention_rows(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
    rows: torch.Tensor, pos: torch.Tensor, k_pos: torch.Tensor | None, window: int, scale: float,
) -> torch.Tensor:
    """``ops.attention_rows`` on CPU tensors: the library for up to ``ROWS_MAX_TOKENS`` tokens in
    float32 or bf16 (same result up to float32 rounding), else the reference. Each (token, kv
    head) is one work item over the threads; q may be a strided view, the caches are read in place."""
    from . import ops

    N, H, dh = q.shape
    B, S, K = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    lib = None
    if (N <= ROWS_MAX_TOKENS and q.dtype in (torch.float32, torch.bfloat16)
            and k_cache.dtype == v_cache.dtype == q.dtype and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1):
        lib, _ = _library()
    if lib is None:
        return ops.attention_rows.reference(q, k_cache, v_cache, sinks, rows, pos, k_pos, window, scale)
    q = q if q.stride(-1) == 1 else q.contiguous()
    strides = (ctypes.c_int64 * 8)(*q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3])
    sk = sinks.float().contiguous()
    r, p = rows.to(torch.int64).contiguous(), pos.to(torch.int64).contiguous()
    kp = None if k_pos is None else k_pos.to(torch.int64).contiguous()
    out = torch.empty(N, H, dh, dtype=q.dtype)                               # [N, H, dh]
    rc = lib.gptoss_attention_rows(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), strides, N, H, B, S, K, dh,
                                   sk.data_ptr(), r.data_ptr(), p.data_ptr(), _ptr(kp), int(window), float(scale),
                                   out.data_ptr(), int(q.dtype == torch.bfloat16), cpu_threads())
    if rc != 0:
        raise ValueError(f"cpu_ops.attention_rows: bad input (code {rc}): q {tuple(q.shape)}, cache "
                         f"{tuple(k_cache.shape)}, rows {rows.tolist()}, positions {pos.tolist()}")
    return out


def rope_store_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    rows: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    ring_pos: torch.Tensor | None = None, qkv_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ops.rope_store_rows`` on CPU tensors: the library for up to ``ROWS_MAX_TOKENS`` tokens in
    float32 or bf16, in the reference's roundings (q, k, v strided views read in place; the
    caches and the ring's table written in place), else the reference."""
    from . import ops

    N, H, dh = q.shape
    K = k.shape[1]
    B, S = k_cache.shape[0], k_cache.shape[1]
    dtype = q.dtype
    lib = None
    if (N <= ROWS_MAX_TOKENS and dtype in (torch.float32, torch.bfloat16) and dh % 2 == 0
            and all(t.dtype == dtype for t in (k, v, k_cache, v_cache))
            and (qkv_bias is None or qkv_bias.dtype == dtype)
            and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and (ring_pos is None or (ring_pos.dtype == torch.int64 and ring_pos.is_contiguous()))):
        lib, _ = _library()
    if lib is None:
        return ops.rope_store_rows.reference(q, k, v, cos, sin, rows, pos, k_cache, v_cache, ring_pos, qkv_bias)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    strides = (ctypes.c_int64 * 12)(*q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
                                    *k_cache.stride()[:3], *v_cache.stride()[:3])
    c, s = cos.float().contiguous(), sin.float().contiguous()               # [P, dh/2]
    r, p = rows.to(torch.int64).contiguous(), pos.to(torch.int64).contiguous()
    bias = None if qkv_bias is None else qkv_bias.contiguous()
    out = torch.empty(N, H, dh, dtype=dtype)                                 # [N, H, dh]
    rc = lib.gptoss_rope_store_rows(q.data_ptr(), k.data_ptr(), v.data_ptr(), strides, N, H, K, dh, B, S,
                                    c.shape[0], c.data_ptr(), s.data_ptr(), r.data_ptr(), p.data_ptr(),
                                    _ptr(ring_pos), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(bias),
                                    out.data_ptr(), int(dtype == torch.bfloat16))
    if rc != 0:
        raise ValueError(f"cpu_ops.rope_store_rows: bad input (code {rc}): q {tuple(q.shape)}, cache "
                         f"{tuple(k_cache.shape)}, rows {rows.tolist()}, positions {pos.tolist()} of {c.shape[0]}")
    return out


def _norm_native(x: torch.Tensor, tensors, router_w: torch.Tensor | None = None):
    """The library when x has at most ``SMALL_MAX_ROWS`` rows in float32 or bf16 and every other
    activation-side tensor (deltas, biases, the router) is in x's dtype; else None."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows > SMALL_MAX_ROWS or x.dtype not in (torch.float32, torch.bfloat16) \
            or any(t is not None and t.dtype != x.dtype for t in tensors):
        return None
    if router_w is not None and router_w.shape[0] > 4096:
        return None
    return _library()[0]


def _add_rmsnorm_call(lib, x, delta, scale, eps, delta_bias=None, router=None):
    """(x_new or None, h, routing or None) from one library call; ``router``: (w, b, top_k)."""
    D = x.shape[-1]
    N = x.numel() // D
    xc = x.reshape(N, D).contiguous()
    dc = None if delta is None else delta.reshape(N, D).contiguous()
    db = None if delta_bias is None else delta_bias.contiguous()
    sc = scale.float().contiguous()
    x_new = None if delta is None else torch.empty(N, D, dtype=x.dtype)
    h = torch.empty(N, D, dtype=x.dtype)
    rw = rb = weights = experts = None
    E = top_k = 0
    if router is not None:
        rw, rb, top_k = router[0].contiguous(), router[1].contiguous(), int(router[2])
        E = rw.shape[0]
        weights = torch.empty(N, top_k, dtype=torch.float32)
        experts = torch.empty(N, top_k, dtype=torch.int64)
    rc = lib.gptoss_add_rmsnorm(xc.data_ptr(), _ptr(dc), _ptr(db), N, D, sc.data_ptr(), float(eps),
                                _ptr(x_new), h.data_ptr(), _ptr(rw), _ptr(rb), E, top_k, _ptr(weights),
                                _ptr(experts), int(x.dtype == torch.bfloat16))
    if rc != 0:
        raise ValueError(f"cpu_ops: bad norm/router shapes x {tuple(x.shape)} (code {rc})")
    x_new = None if x_new is None else x_new.view(x.shape)
    return x_new, h.view(x.shape), (None if router is None else (weights, experts))


def rmsnorm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``ops.rmsnorm`` on CPU tensors: the library for a few rows, else the reference."""
    from . import ops

    lib = _norm_native(x, ())
    if lib is None:
        return ops.rmsnorm.reference(x, scale, eps)
    return _add_rmsnorm_call(lib, x, None, scale, eps)[1]


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float):
    """``ops.add_rmsnorm`` on CPU tensors: the library for a few rows, else the reference."""
    from . import ops

    lib = _norm_native(x, (delta,)) if delta.shape == x.shape else None
    if lib is None:
        return ops.add_rmsnorm.reference(x, delta, scale, eps)
    return _add_rmsnorm_call(lib, x, delta, scale, eps)[:2]


def add_rmsnorm_route(
    x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float,
    router_w: torch.Tensor, router_b: torch.Tensor, top_k: int, delta_bias: torch.Tensor | None = None,
):
    """``ops.add_rmsnorm_route`` on CPU tensors: the library for a few rows (router logits rounded
    to x's dtype as F.linear does, the top-k chosen as torch.topk chooses, ties included), else
    the reference."""
    from . import ops

    lib = None
    if delta.shape == x.shape:
        lib = _norm_native(x, (delta, delta_bias, router_w, router_b), router_w)
    if lib is None:
        return ops.add_rmsnorm_route.reference(x, delta, scale, eps, router_w, router_b, top_k, delta_bias)
    return _add_rmsnorm_call(lib, x, delta, scale, eps, delta_bias, (router_w, router_b, top_k))
