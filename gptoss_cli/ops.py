"""The model's operations, one function each, in plain PyTorch, and the switch to Triton.

The bodies here are the references: the forward pass (``model.py``) calls only these functions.
Each op marked ``@_kernel_op`` runs its Triton kernel from ``gptoss_kernels`` instead when
``use_kernels`` says so for its first tensor's device (the one place that decides):

- ``GPTOSS_KERNELS`` unset or ``auto``: kernels on CUDA tensors when triton imports, else the
  reference;
- ``GPTOSS_KERNELS=0``: always the reference (A/B on a GPU);
- ``GPTOSS_KERNELS=1``: always the kernels, on CPU too (only useful under ``TRITON_INTERPRET=1``:
  the tests run the whole engine that way).

On CPU tensors in ``auto`` mode, an op given ``cpu=`` runs that native implementation instead
(``moe``, ``linear``, ``attention``, ``attention_rows`` and, for a decode step's few tokens,
``rope_store``, ``rope_store_rows``, ``rmsnorm``, ``add_rmsnorm`` and ``add_rmsnorm_route``: ``cpu_ops``, a small C++ library built at
first use; where it cannot be built the MoE warns once and all of them run the reference).

``op.reference`` is the plain-PyTorch body of every dispatched op (the kernels' ``*_torch``
references point at it); ``fast_impl`` gives the kernel or native function that would run instead.
An op whose fast implementation failed its check on this machine (``selfcheck``: the engine's
load check, ``gptoss doctor``) is switched to its reference for the rest of the process with
``fall_back``; otherwise the chosen implementation's errors propagate.
Norms, softmax, RoPE and sinks are computed in float32 whatever the activation dtype.

Shapes: ``n_tokens`` T, batch B, ``n_heads`` H, ``n_kv_heads`` K, ``d_head`` dh, ``n_experts`` E,
``d_model`` D, ``d_ff`` F.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os

import torch
import torch.nn.functional as F

KERNELS_ENV = "GPTOSS_KERNELS"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernels(device: torch.device) -> bool:
    """Whether ops on tensors of ``device`` run the Triton kernels (see the module docstring)."""
    mode = os.environ.get(KERNELS_ENV, "auto")
    if mode == "0":
        return False
    if mode == "1":
        return True           # forced: an ImportError of triton surfaces at the first call
    if mode != "auto":
        raise ValueError(f"{KERNELS_ENV}={mode!r}: use auto, 0 or 1")
    return device.type == "cuda" and triton_available()


# op name -> (gptoss_kernels module, Triton kernel names), for runtime_info and benchmarks
KERNEL_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {}
CPU_NATIVE: dict[str, str] = {}          # op name -> gptoss_cli module of its native CPU version
OPS: dict[str, object] = {}              # op name -> the dispatched op (every one with a fast path)
_FELL_BACK: dict[tuple[str, str], str] = {}   # (op name, device type) -> why it runs its reference


def use_cpu_native(device: torch.device) -> bool:
    """Whether ops on tensors of ``device`` run their native CPU implementation (``cpu=``)."""
    return device.type == "cpu" and os.environ.get(KERNELS_ENV, "auto") == "auto"


def fall_back(name: str, device: torch.device, why: str) -> None:
    """Run op ``name`` as its reference on ``device``'s type for the rest of the process."""
    _FELL_BACK[(name, torch.device(device).type)] = why


def fallbacks(device: torch.device) -> dict[str, str]:
    """The ops switched to their reference on ``device``'s type: name -> why."""
    kind = torch.device(device).type
    return {name: why for (name, k), why in _FELL_BACK.items() if k == kind}


def clear_fallbacks() -> None:
    _FELL_BACK.clear()


@contextlib.contextmanager
def references_only(device: torch.device):
    """Every op runs its reference on ``device``'s type inside the block (``gptoss doctor``'s
    reference decode step); the fallbacks in force before it are kept."""
    saved = dict(_FELL_BACK)
    for name in OPS:
        _FELL_BACK.setdefault((name, torch.device(device).type), "the reference run")
    try:
        yield
    finally:
        _FELL_BACK.clear()
        _FELL_BACK.update(saved)


def fast_impl(name: str, device: torch.device):
    """The function that runs instead of op ``name``'s reference on ``device`` (a Triton kernel, or
    the native CPU library's version), whatever ``fall_back`` said; None where the reference runs
    anyway (no kernel for it, ``GPTOSS_KERNELS=0``, or the native library could not be built)."""
    device = torch.device(device)
    if name in KERNEL_TABLE and use_kernels(device):
        return getattr(importlib.import_module(f"gptoss_kernels.{KERNEL_TABLE[name][0]}"), name)
    if name in CPU_NATIVE and use_cpu_native(device):
        module = importlib.import_module(f"gptoss_cli.{CPU_NATIVE[name]}")
        if module._library()[0] is not None:
            return getattr(module, name)
    return None


def _lazy(module: str, name: str):
    """``module.name``, its module imported at the first call (Triton and the native library load
    only when an op first runs on their device). The name is looked up at every call, so the
    function that runs is always the module's current one (what ``fast_impl`` returns)."""
    found = []

    def call(*args, **kwargs):
        if not found:
            found.append(importlib.import_module(module))
        return getattr(found[0], name)(*args, **kwargs)

    return call


def _cpu_op(module: str):
    """Run ``gptoss_cli.<module>.<op name>`` instead of the decorated reference on CPU tensors
    when ``use_cpu_native`` holds."""

    def deco(ref):
        native = _lazy(f"gptoss_cli.{module}", ref.__name__)

        @functools.wraps(ref)
        def op(*args, **kwargs):
            device = args[0].device
            if use_cpu_native(device) and not (_FELL_BACK and (ref.__name__, device.type) in _FELL_BACK):
                return native(*args, **kwargs)
            return ref(*args, **kwargs)

        op.reference = ref
        CPU_NATIVE[ref.__name__] = module
        OPS[ref.__name__] = op
        return op

    return deco


def _kernel_op(module: str, kernels: tuple[str, ...], cpu: str | None = None):
    """Run ``gptoss_kernels.<module>.<op name>`` instead of the decorated reference when
    ``use_kernels`` holds for the first argument's device; ``cpu``: as ``_cpu_op(cpu)`` on CPU."""

    def deco(ref):
        impl = _lazy(f"gptoss_kernels.{module}", ref.__name__)
        other = _cpu_op(cpu)(ref) if cpu else ref

        @functools.wraps(ref)
        def op(*args, **kwargs):
            device = args[0].device
            if _FELL_BACK and (ref.__name__, device.type) in _FELL_BACK:
                return ref(*args, **kwargs)
            if use_kernels(device):
                return impl(*args, **kwargs)
            return other(*args, **kwargs)

        op.reference = ref
        KERNEL_TABLE[ref.__name__] = (module, kernels)
        OPS[ref.__name__] = op
        return op

    return deco


def new_kernel_counters(device: torch.device) -> torch.Tensor | None:
    """A fresh buffer of the arrival counters the kernels' last-program epilogues count with
    (``gptoss_kernels.arrive``), for one engine: None where the kernels do not run."""
    if not use_kernels(device):
        return None
    from gptoss_kernels import arrive

    return arrive.new_counters(device)


@contextlib.contextmanager
def kernel_counters(buffer: torch.Tensor | None):
    """Kernels launched inside the block count with ``buffer`` (``new_kernel_counters``); None:
    nothing changes. Enter it around synchronous work only, never across a ``yield``."""
    if buffer is None:
        yield
        return
    from gptoss_kernels import arrive

    with arrive.using(buffer):
        yield


def kernel_names(device: torch.device) -> list[str]:
    """The Triton kernels the ops run on ``device`` ([] on the reference path; an op switched to
    its reference by ``fall_back`` takes its kernels off the list unless another op runs them)."""
    if not use_kernels(device):
        return []
    gone = fallbacks(device)
    return sorted({k for name, (_, names) in KERNEL_TABLE.items() if name not in gone for k in names})


# FP4 E2M1 code -> value (OCP Microscaling spec, table 5); the high bit is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_LUTS: dict[tuple, torch.Tensor] = {}


def _fp4_lut(device, dtype) -> torch.Tensor:
    key = (str(device), dtype)
    if key not in _LUTS:
        _LUTS[key] = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    return _LUTS[key]


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 to dense: ``blocks`` uint8 [..., G, 16] (two codes a byte, low nibble first),
    ``scales`` uint8 [..., G] (E8M0: 2^(s-127)) -> [..., G*32] in ``dtype``.

    Exact in bf16 and fp32 for the scales a real checkpoint holds (every FP4 value has at most two
    significant bits).
    """
    lut = _fp4_lut(blocks.device, torch.float32)
    lo = lut[(blocks & 0x0F).long()]
    hi = lut[(blocks >> 4).long()]
    vals = torch.stack((lo, hi), dim=-1).flatten(-2)                        # [..., G, 32]
    vals = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - 127)
    return vals.flatten(-2).to(dtype)                                        # [..., G*32]


@_cpu_op("cpu_ops")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``: the dense projections (attention, unembedding); native on CPU only."""
    return F.linear(x, weight, bias)


@_kernel_op("norm", ("_rmsnorm_kernel",), cpu="cpu_ops")
def rmsnorm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32; ``scale`` is float32 [D]; returns x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * scale).to(x.dtype)


@_kernel_op("norm", ("_rmsnorm_kernel",), cpu="cpu_ops")
def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float):
    """The pre-norm residual step: ``x + delta`` (in x's dtype) and its RMSNorm."""
    x = x + delta
    return x, rmsnorm.reference(x, scale, eps)


def rope_table(
    n_positions: int, d_head: int, theta: float, factor: float, initial_context: int,
    beta_slow: float, beta_fast: float, concentration: float, device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [n_positions, d_head/2] in float32, with YaRN (arXiv:2309.00071) scaling.

    NTK-by-parts: dims that rotate fewer than ``beta_slow`` times over the original context are
    interpolated (divided by ``factor``), those rotating more than ``beta_fast`` times are kept,
    a linear ramp (bounds not rounded) blends between. cos and sin are multiplied by
    ``concentration`` (0.1 ln(factor) + 1).
    """
    d_half = d_head // 2
    freq = theta ** (torch.arange(0, d_head, 2, dtype=torch.float32, device=device) / d_head)
    if factor > 1.0:
        low = d_half * math.log(initial_context / (beta_fast * 2 * math.pi)) / math.log(theta)
        high = d_half * math.log(initial_context / (beta_slow * 2 * math.pi)) / math.log(theta)
        low, high = max(low, 0.0), min(high, d_head - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d_half, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp                                   # 1: extrapolate (original frequency)
        inv_freq = (1.0 / (factor * freq)) * (1 - keep) + (1.0 / freq) * keep
    else:
        inv_freq = 1.0 / freq
    pos = torch.arange(n_positions, dtype=torch.float32, device=device)
    angles = pos[:, None] * inv_freq[None, :]             # [n_positions, d_half]
    return torch.cos(angles) * concentration, torch.sin(angles) * concentration


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head: x [B, T, heads, dh], cos/sin [T, dh/2] float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


@_kernel_op("rope", ("_rope_store_kernel",), cpu="cpu_ops")
def rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor | None,
    ring_pos: torch.Tensor | None = None, qkv_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoPE on q and k at positions ``pos`` [T] (rows of the full cos/sin tables), with the rotated
    k and v stored in the cache: ``k_cache[:, slots[t]] = rope(k[:, t])``, same for v unrotated.
    q [B, T, H, dh]; k, v [B, T, K, dh]; k_cache, v_cache [B, S, K, dh]. Returns rotated q.

    ``ring_pos``: the [S] table of which position each slot of a ring cache holds. Given, the
    slots are ``pos mod S`` (``slots`` is unused) and the table is updated with ``pos``: the ring
    bookkeeping of a decode step rides in this launch instead of two of its own.
    ``qkv_bias`` [H*dh + 2*K*dh]: the qkv projection's bias, added to q, k, v first (in their
    dtype). The projection then runs without one: at one token cuBLAS would copy it into the
    output in a launch of its own (PyTorch's addmm takes the bias epilogue only for M > 1)."""
    if qkv_bias is not None:
        bq, bk, bv = qkv_bias.split((q.shape[2] * q.shape[3], k.shape[2] * k.shape[3], v.shape[2] * v.shape[3]))
        q, k, v = q + bq.view(q.shape[2:]), k + bk.view(k.shape[2:]), v + bv.view(v.shape[2:])
    if ring_pos is not None:
        slots = pos % k_cache.shape[1]
        ring_pos.index_copy_(0, slots, pos)
    c, s = cos[pos], sin[pos]                                                # [T, dh/2]
    k_cache.index_copy_(1, slots, apply_rope(k, c, s))
    v_cache.index_copy_(1, slots, v)
    return apply_rope(q, c, s)


@_kernel_op("attention", ("_attn_fwd",), cpu="cpu_ops")
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, scale: float, keys_by_position: bool = False,
) -> torch.Tensor:
    """Causal GQA attention with learned sinks and an optional sliding window.

    q [B, T, H, dh]; k, v [B, S, K, dh]; sinks [H] float32; q_pos [T] and k_pos [S] the absolute
    positions of queries and cache slots (k_pos < 0: empty slot). A query at p sees keys at
    positions p-window+1 .. p (window 0: all of 0 .. p). Query head h reads kv head h // (H/K).
    The sink is one more logit per head in each row's softmax; it takes mass, adds no value.
    ``keys_by_position``: a promise that slot n holds position n or a position past every query
    (the full cache); kernels use it to skip the dead slots, the result is the same.
    Returns [B, T, H, dh] in q's dtype. Computed in float32, in chunks of queries.
    """
    B, T, H, dh = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    kf, vf = k.float(), v.float()
    sink = sinks.float().view(1, K, G, 1, 1)
    out = torch.empty_like(q)
    chunk = max(1, (1 << 24) // max(1, B * H * S))
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        qc = q[:, t0:t1].float().view(B, t1 - t0, K, G, dh)
        s = torch.einsum("btkgd,bskd->bkgts", qc, kf) * scale             # [B, K, G, t, S]
        qp, kp = q_pos[t0:t1, None], k_pos[None, :]
        allowed = (kp >= 0) & (kp <= qp)
        if window:
            allowed &= kp > qp - window
        s = s.masked_fill(~allowed, float("-inf"))
        s = torch.cat((s, sink.expand(B, K, G, t1 - t0, 1)), dim=-1)
        p = torch.softmax(s, dim=-1)[..., :-1]
        o = torch.einsum("bkgts,bskd->btkgd", p, vf)                        # [B, t, K, G, dh]
        out[:, t0:t1] = o.reshape(B, t1 - t0, H, dh).to(q.dtype)
    return out


def swiglu(h: torch.Tensor, limit: float, alpha: float = 1.702) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on interleaved [.., 2F] (even: gate, odd: linear) -> [.., F]."""
    gate, lin = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    lin = lin.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (lin + 1)


@_kernel_op("moe", ("_route_kernel",))
def route(x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor, top_k: int):
    """Router: top-k of the logits, softmax over those k only. x [N, D] -> (weights [N, k] float32,
    experts [N, k] int64)."""
    logits = F.linear(x, router_w, router_b)                                 # [N, E]
    top, experts = torch.topk(logits, top_k, dim=-1, sorted=True)
    return torch.softmax(top.float(), dim=-1), experts


@_kernel_op("moe", ("_add_rmsnorm_route_kernel", "_route_kernel", "_rmsnorm_kernel"), cpu="cpu_ops")
def add_rmsnorm_route(
    x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float,
    router_w: torch.Tensor, router_b: torch.Tensor, top_k: int, delta_bias: torch.Tensor | None = None,
):
    """``add_rmsnorm`` then ``route`` of the normed rows: (x + delta, h, (weights, experts)),
    h [..., D] and the routing of its rows [N, k]. One op so that a decode step can do the
    residual add, the norm and the router in one launch. ``delta_bias`` [D] (the attention's
    output bias) is added to delta first, in its dtype (see ``rope_store``'s ``qkv_bias``)."""
    if delta_bias is not None:
        delta = delta + delta_bias
    x, h = add_rmsnorm.reference(x, delta, scale, eps)
    return x, h, route.reference(h.reshape(-1, h.shape[-1]), router_w, router_b, top_k)


@_kernel_op("moe", ("_route_kernel", "_moe_gemv1", "_moe_gemv2", "_moe_bgemv1", "_moe_bgemv2", "_moe_gemm1",
                    "_moe_gemm2", "_moe_sum"),
            cpu="cpu_ops")
def moe(
    x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor,
    w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
    w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor,
    top_k: int, swiglu_limit: float, *, routing: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Top-k mixture of MXFP4 experts. x [N, D] -> [N, D] in x's dtype.

    Each expert in use is dequantized on its own (never all of them): W1 [2F, D] with the
    clamped SwiGLU after it, then W2 [D, F]; outputs are summed with the router weights.
    ``routing``: (weights, experts) of ``route`` already computed for x (``add_rmsnorm_route``).
    """
    weights, experts = routing if routing is not None else route.reference(x, router_w, router_b, top_k)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(experts).tolist():
        tok, slot = torch.nonzero(experts == e, as_tuple=True)
        w1 = dequant_mxfp4(w1_blocks[e], w1_scales[e], x.dtype)              # [2F, D]
        a = swiglu(F.linear(x[tok], w1, w1_bias[e]), swiglu_limit)           # [n, F]
        w2 = dequant_mxfp4(w2_blocks[e], w2_scales[e], x.dtype)              # [D, F]
        y = F.linear(a, w2, w2_bias[e])                                      # [n, D]
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    return out.to(x.dtype)


# ---- decode of several sequences at once (continuous batching) ---------------------------------
# One query token per sequence, each sequence in its own slot of a pooled cache ([B, S, K, dh]:
# ``cache.KVPool``) and at its own position. ``rows`` [N] names each token's slot, ``pos`` [N] its
# position; both are device tensors, so a CUDA graph replays the same launches whatever they hold.


@_kernel_op("rope", ("_rope_store_rows_kernel",), cpu="cpu_ops")
def rope_store_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    rows: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    ring_pos: torch.Tensor | None = None, qkv_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rope_store`` for N sequences, one token each: q [N, H, dh], k, v [N, K, dh] (views into the
    qkv projection are fine); rows, pos [N] int64; k_cache, v_cache [B, S, K, dh].

    Token n's rotated k and its v go to ``k_cache[rows[n], slot]``: slot ``pos[n]`` for a full
    cache; for a ring (``ring_pos`` [B, S] given, which position each slot holds) slot
    ``pos[n] mod S``, and ``ring_pos[rows[n], slot] = pos[n]``. ``qkv_bias`` as in ``rope_store``.
    Returns rotated q [N, H, dh]. Rows must be distinct, except rows that only pad a batch (their
    writes land in a slot nobody reads)."""
    if qkv_bias is not None:
        bq, bk, bv = qkv_bias.split((q.shape[1] * q.shape[2], k.shape[1] * k.shape[2], v.shape[1] * v.shape[2]))
        q, k, v = q + bq.view(q.shape[1:]), k + bk.view(k.shape[1:]), v + bv.view(v.shape[1:])
    slots = pos % k_cache.shape[1] if ring_pos is not None else pos
    if ring_pos is not None:
        ring_pos[rows, slots] = pos
    c, s = cos[pos], sin[pos]                                                # [N, dh/2]
    # apply_rope's [B, T, heads, dh] with B = 1, T = N: row n rotates by position pos[n]
    k_cache[rows, slots] = apply_rope(k.unsqueeze(0), c, s)[0]
    v_cache[rows, slots] = v
    return apply_rope(q.unsqueeze(0), c, s)[0]


@_kernel_op("attention", ("_attn_rows_fwd",), cpu="cpu_ops")
def attention_rows(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
    rows: torch.Tensor, pos: torch.Tensor, k_pos: torch.Tensor | None, window: int, scale: float,
) -> torch.Tensor:
    """``attention`` for N sequences, one query token each, over their own slots of a cache.

    q [N, H, dh]; k_cache, v_cache [B, S, K, dh]; rows, pos [N] int64 (slot and position of each
    token). ``k_pos`` [B, S]: the position each slot of a ring holds (-1: empty); None for a full
    cache, whose slot s holds position s (slots past ``pos[n]`` are not read). Masks, window, sinks
    and GQA as ``attention``. Returns [N, H, dh] in q's dtype, computed in float32."""
    N, H, dh = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    if k_pos is None:
        # a full cache: only the first max(pos)+1 slots can be read (the reference may sync)
        S = int(pos.max()) + 1 if N else 0
        kp = torch.arange(S, device=q.device).expand(N, S)
    else:
        kp = k_pos[rows]                                                     # [N, S]
    out = torch.empty_like(q)
    for n in range(N):                # one sequence at a time: a [S, K, dh] gather each
        r = rows[n]
        o = attention.reference(q[n].view(1, 1, H, dh), k_cache[r, :S].unsqueeze(0), v_cache[r, :S].unsqueeze(0),
                                sinks, pos[n].view(1), kp[n], window, scale)
        out[n] = o[0, 0]
    return out
