"""Top-k mixture of MXFP4 experts: router, expert matmuls with in-register dequantisation.

Formats: MXFP4 of the OCP Microscaling spec v1.0 (FP4 E2M1 codes, two a byte, low nibble first;
one E8M0 scale ``2^(s-127)`` per 32 values along the input dimension). The experts stay packed
in memory; every kernel loads codes and scales and dequantises the tile it is about to multiply,
in registers, so no bf16 copy of an expert ever exists (DESIGN.md 3).

The expert MLP of gpt-oss: ``h = W1 x + b1`` (rows interleaved: even = gate, odd = linear),
``a = swiglu(h)`` (clamped at 7), ``y = W2 a + b2``, output = sum over the k chosen experts of
``router_weight * y``. The kernels fuse it as follows:

- ``_route_kernel``: router logits (fp32 accumulate, rounded to the activation dtype as the
  reference's linear is), spread over programs of 4 experts at decode sizes, the last of a
  token's programs taking the top-k by repeated argmax (ties: lowest expert; NaN never wins and
  the ids are always k distinct experts) and the softmax over the k. ``_add_rmsnorm_route_kernel``
  does the same after the residual add and the MoE's RMSNorm, in one launch (``arrive.py``);
- decode, a handful of tokens (``moe_decode.py``): ``_moe_gemv1`` (W1 with the SwiGLU epilogue)
  and ``_moe_gemv2`` (W2, the last of a token's k pairs summing them in slot order) read only
  the chosen experts, ~360 programs each; bf16 runs on the tensor cores within an instruction
  budget (that module's docstring), fp32 and fp16 on the CUDA cores; a batched decode step of
  5-32 bf16 tokens (``moe_batch.py``): the same GEMV loop with the expert's tokens as the MMA's
  columns, one program per (row block, expert in use), so each expert is read once;
- prefill, many tokens (tiled grouped GEMM, cf. MegaBlocks arXiv:2211.15841 and triton_kernels'
  ``matmul_ogs``): the (token, expert) pairs are sorted by expert and cut into tiles of
  ``BLOCK_M`` rows of one expert (a tile table built on the device, no host sync). ``_moe_gemm1``
  is W1 with the SwiGLU epilogue; ``_moe_gemm2`` is W2 with bias and router weight fused, writing
  each pair's weighted output; ``_moe_sum`` adds a token's k rows in slot order (deterministic:
  no atomics, so repeated runs and graph replays give identical bits).

FP4 E2M1 to value without a table (the prefill path): code = sign.e1e0.m; |v| = m/2 for e = 0,
else ``2^(e-1) * (1 + m/2)``. Odd and even input columns are the low and high nibbles, so each K
step does two dots (even columns of x with the low nibbles, odd with the high) instead of
interleaving registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_cli import ops

from .arrive import arrive, counters, reset
from .moe_batch import BATCH_MAX_TOKENS, batch_moe
from .moe_decode import DECODE_MAX_TOKENS, _swiglu, gemv_moe, scales_fit

# DECODE_MAX_TOKENS: up to that many tokens the GEMVs (moe_decode.py) read one expert matrix per
# (token, slot) pair. Past it the grouped GEMMs read each chosen expert once: the 8-token tail
# before a prompt's end (the engine's ring snapshot) is 32 pairs, every 20b expert about once.



# ---- helpers ----------------------------------------------------------------------------------
@triton.jit
def _fp4_to_f32(code):
    """FP4 E2M1 codes (int32 in 0..15) -> float32 values."""
    mag = code & 7
    e = (mag >> 1).to(tl.float32)
    m = (mag & 1).to(tl.float32)
    v = tl.where(e == 0.0, m * 0.5, tl.math.exp2(e - 1.0) * (1.0 + 0.5 * m))
    return tl.where(code >= 8, -v, v)


@triton.jit
def _load_mxfp4(Blocks, Scales, rows, row_ok, c, c_ok, n_bytes):
    """Dequantise rows x byte-columns ``c`` of one expert's packed matrix (bytes [R, n_bytes],
    scales [R, n_bytes/16]) -> (low-nibble values, high-nibble values), float32 [len(rows), len(c)].
    Byte c holds input columns 2c (low) and 2c+1 (high); its scale is that of group c // 16."""
    mask = row_ok[:, None] & c_ok[None, :]
    rows64 = rows.to(tl.int64)
    byte = tl.load(Blocks + rows64[:, None] * n_bytes + c[None, :], mask=mask, other=0).to(tl.int32)
    s = tl.load(Scales + rows64[:, None] * (n_bytes // 16) + (c // 16)[None, :], mask=mask, other=127)
    scale = tl.math.exp2(s.to(tl.float32) - 127.0)
    return _fp4_to_f32(byte & 15) * scale, _fp4_to_f32(byte >> 4) * scale


# ---- router -----------------------------------------------------------------------------------
@triton.jit
def _top_k_softmax(logits, e, E, Weights, Experts, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store the top-k experts of one row of fp32 ``logits`` (indexed by ``e``) and the softmax
    over those k. NaN never wins (it counts as -inf) and a taken expert is never taken again, so
    the ids are always k distinct experts in 0..E-1 whatever the logits hold."""
    avail = e < E
    logits = tl.where(logits == logits, logits, float("-inf"))           # NaN -> -inf
    kk = tl.arange(0, BLOCK_K)
    top = tl.full([BLOCK_K], float("-inf"), tl.float32)
    idx = tl.zeros([BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        m = tl.max(tl.where(avail, logits, float("-inf")), axis=0)
        i = tl.min(tl.where(avail & (logits == m), e, 1 << 30), axis=0)  # ties: lowest expert
        top = tl.where(kk == j, m, top)
        idx = tl.where(kk == j, i, idx)
        avail = avail & (e != i)
    p = tl.where(top > float("-inf"), tl.math.exp2((top - tl.max(top, axis=0)) * 1.4426950408889634), 0.0)
    p = p / tl.maximum(tl.sum(p, axis=0), 1e-30)
    tl.store(Weights + kk, p, mask=kk < TOP_K)
    tl.store(Experts + kk, idx, mask=kk < TOP_K)


@triton.jit
def _route_tail(logits, e, n, Logits, Weights, Experts, Counter, E,
                TOP_K: tl.constexpr, BLOCK_ALL: tl.constexpr, BLOCK_K: tl.constexpr, SPREAD: tl.constexpr):
    """This program's fp32 logits (experts ``e``) -> the token's top-k, directly when the program
    holds all of them, else (``SPREAD``) stored, and the last expert block to finish takes it."""
    if SPREAD:
        tl.store(Logits + n * E + e, logits, mask=e < E)
        if arrive(Counter + n, tl.num_programs(1)):
            e_all = tl.arange(0, BLOCK_ALL)
            all_logits = tl.load(Logits + n * E + e_all, mask=e_all < E, other=float("-inf"), cache_modifier=".cg")
            _top_k_softmax(all_logits, e_all, E, Weights + n * TOP_K, Experts + n * TOP_K, TOP_K, BLOCK_K)
            reset(Counter + n)
    else:
        _top_k_softmax(logits, e, E, Weights + n * TOP_K, Experts + n * TOP_K, TOP_K, BLOCK_K)


@triton.jit
def _route_kernel(
    X, W, Bias, Logits, Weights, Experts, Counter, D, E,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_ALL: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, SPREAD: tl.constexpr,
):
    """Router logits of one token for ``BLOCK_E`` experts (grid: tokens x expert blocks), then
    ``_route_tail``."""
    n = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + n * D + d, mask=d < D, other=0.0).to(tl.float32)
        w = tl.load(W + e[:, None] * D + d[None, :], mask=e_ok[:, None] & (d[None, :] < D), other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    b = tl.load(Bias + e, mask=e_ok, other=0.0).to(tl.float32)
    logits = (acc + b).to(X.dtype.element_ty).to(tl.float32)       # the reference's linear rounds
    _route_tail(logits, e, n, Logits, Weights, Experts, Counter, E, TOP_K, BLOCK_ALL, BLOCK_K, SPREAD)


@triton.jit
def _add_rmsnorm_route_kernel(
    X, Delta, DeltaBias, Scale, Sum, Y, W, Bias, Logits, Weights, Experts, Counter, D, E, eps,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_ALL: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """The residual add, the MoE's RMSNorm and the router of one token in one launch (grid:
    tokens x expert blocks). Every program recomputes the norm of the row (2880 values, from L2:
    cheaper than a launch) and block 0 stores it; then each program takes its experts' logits."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + n * D + cols, mask=mask, other=0.0).to(tl.float32)
    delta = tl.load(Delta + n * D + cols, mask=mask, other=0.0)
    if HAS_BIAS:                                                     # rounded, as delta + bias is
        delta = (delta.to(tl.float32) + tl.load(DeltaBias + cols, mask=mask, other=0.0).to(tl.float32)).to(Sum.dtype.element_ty)
    x = (x + delta.to(tl.float32)).to(Sum.dtype.element_ty)          # the unfused path stores x + delta
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    y = (xf * rstd * tl.load(Scale + cols, mask=mask, other=0.0)).to(Y.dtype.element_ty)
    if tl.program_id(1) == 0:
        tl.store(Sum + n * D + cols, x, mask=mask)
        tl.store(Y + n * D + cols, y, mask=mask)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    w = tl.load(W + e[:, None] * D + cols[None, :], mask=e_ok[:, None] & mask[None, :], other=0.0)
    acc = tl.sum(w.to(tl.float32) * y.to(tl.float32)[None, :], axis=1)
    logits = (acc + tl.load(Bias + e, mask=e_ok, other=0.0).to(tl.float32)).to(Y.dtype.element_ty).to(tl.float32)
    _route_tail(logits, e, n, Logits, Weights, Experts, Counter, E, TOP_K, BLOCK_ALL, BLOCK_K, True)


ROUTE_SPREAD_TOKENS = 64     # up to this many tokens, each token's router runs on several programs
ROUTE_EXPERTS_PER_PROGRAM = 4


def _routing_buffers(N: int, E: int, top_k: int, device):
    weights = torch.empty(N, top_k, dtype=torch.float32, device=device)
    experts = torch.empty(N, top_k, dtype=torch.int64, device=device)
    logits = torch.empty(N, E, dtype=torch.float32, device=device)
    return weights, experts, logits


def route(x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor, top_k: int):
    """x [N, D] -> (weights [N, k] float32, experts [N, k] int64), as ``ops.route``.

    At decode sizes the experts' rows are spread over programs (20b: 8 a token, 120b: 32) instead
    of one program reading all of them in turn; prefill has tokens enough to fill the GPU."""
    N, D = x.shape
    E = router_w.shape[0]
    weights, experts, logits = _routing_buffers(N, E, top_k, x.device)
    if N:
        spread = N <= ROUTE_SPREAD_TOKENS
        block_e = ROUTE_EXPERTS_PER_PROGRAM if spread else triton.next_power_of_2(E)
        _route_kernel[(N, triton.cdiv(E, block_e))](
            x.contiguous(), router_w.contiguous(), router_b, logits, weights, experts,
            counters(x.device, N), D, E,
            TOP_K=top_k, BLOCK_E=block_e, BLOCK_ALL=triton.next_power_of_2(E),
            BLOCK_D=min(256 if spread else 128, triton.next_power_of_2(D)),
            BLOCK_K=triton.next_power_of_2(top_k), SPREAD=spread,
        )
    return weights, experts


def add_rmsnorm_route(x: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float,
                      router_w: torch.Tensor, router_b: torch.Tensor, top_k: int,
                      delta_bias: torch.Tensor | None = None):
    """Same contract as ``gptoss_cli.ops.add_rmsnorm_route``; one launch at decode sizes."""
    D = x.shape[-1]
    N = x.numel() // D
    if N > ROUTE_SPREAD_TOKENS:
        from .norm import add_rmsnorm

        x, h = add_rmsnorm(x, delta if delta_bias is None else delta + delta_bias, scale, eps)
        return x, h, route(h.reshape(N, D), router_w, router_b, top_k)
    E = router_w.shape[0]
    x2, d2 = x.reshape(N, D).contiguous(), delta.reshape(N, D).contiguous()     # [N, D]
    total, h = torch.empty_like(x2), torch.empty_like(x2)
    weights, experts, logits = _routing_buffers(N, E, top_k, x.device)
    if N:
        _add_rmsnorm_route_kernel[(N, triton.cdiv(E, ROUTE_EXPERTS_PER_PROGRAM))](
            x2, d2, d2 if delta_bias is None else delta_bias, scale.contiguous(), total, h,
            router_w.contiguous(), router_b, logits, weights, experts, counters(x.device, N), D, E, eps,
            TOP_K=top_k, BLOCK_E=ROUTE_EXPERTS_PER_PROGRAM, BLOCK_ALL=triton.next_power_of_2(E),
            BLOCK_D=triton.next_power_of_2(D), BLOCK_K=triton.next_power_of_2(top_k),
            HAS_BIAS=delta_bias is not None,
        )
    return total.view(x.shape), h.view(x.shape), (weights, experts)


# ---- prefill: grouped GEMMs over tiles of one expert ------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _moe_gemm1(
    X, Order, TileExpert, TileRow0, TileRowEnd, W1, S1, B1, A, D, F, limit,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    IEEE: tl.constexpr,
):
    """A[r, f] = swiglu(W1[e] x + b1[e]) for sorted rows r of one tile (one expert e)."""
    tile = tl.program_id(0)
    e = tl.load(TileExpert + tile).to(tl.int64)
    if e >= 0:
        r = tl.load(TileRow0 + tile) + tl.arange(0, BLOCK_M)
        r_ok = r < tl.load(TileRowEnd + tile)
        token = tl.load(Order + r, mask=r_ok, other=0) // TOP_K
        f = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        f_ok = f < F
        n_bytes = D // 2
        w_base = W1 + e * (2 * F) * n_bytes
        s_base = S1 + e * (2 * F) * (n_bytes // 16)
        x_rows = X + token[:, None].to(tl.int64) * D
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        lin = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, n_bytes, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < n_bytes
            x_mask = r_ok[:, None] & c_ok[None, :]
            x_even = tl.load(x_rows + 2 * c[None, :], mask=x_mask, other=0.0)
            x_odd = tl.load(x_rows + 2 * c[None, :] + 1, mask=x_mask, other=0.0)
            g_lo, g_hi = _load_mxfp4(w_base, s_base, 2 * f, f_ok, c, c_ok, n_bytes)
            l_lo, l_hi = _load_mxfp4(w_base, s_base, 2 * f + 1, f_ok, c, c_ok, n_bytes)
            dt = X.dtype.element_ty
            gate += _dot(x_even, tl.trans(g_lo.to(dt)), IEEE) + _dot(x_odd, tl.trans(g_hi.to(dt)), IEEE)
            lin += _dot(x_even, tl.trans(l_lo.to(dt)), IEEE) + _dot(x_odd, tl.trans(l_hi.to(dt)), IEEE)
        gate += tl.load(B1 + e * 2 * F + 2 * f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        lin += tl.load(B1 + e * 2 * F + 2 * f + 1, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        a = _swiglu(gate, lin, limit)
        tl.store(A + r[:, None].to(tl.int64) * F + f[None, :], a.to(A.dtype.element_ty),
                 mask=r_ok[:, None] & f_ok[None, :])


@triton.jit
def _moe_gemm2(
    A, Order, TileExpert, TileRow0, TileRowEnd, Weights, W2, S2, B2, Y, D, F,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr,
):
    """Y[pair, d] = weight[pair] * (W2[e] A[r] + b2[e]) for sorted rows r of one tile."""
    tile = tl.program_id(0)
    e = tl.load(TileExpert + tile).to(tl.int64)
    if e >= 0:
        r = tl.load(TileRow0 + tile) + tl.arange(0, BLOCK_M)
        r_ok = r < tl.load(TileRowEnd + tile)
        pair = tl.load(Order + r, mask=r_ok, other=0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        d_ok = d < D
        n_bytes = F // 2
        w_base = W2 + e * D * n_bytes
        s_base = S2 + e * D * (n_bytes // 16)
        a_rows = A + r[:, None].to(tl.int64) * F
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, n_bytes, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < n_bytes
            a_mask = r_ok[:, None] & c_ok[None, :]
            a_even = tl.load(a_rows + 2 * c[None, :], mask=a_mask, other=0.0)
            a_odd = tl.load(a_rows + 2 * c[None, :] + 1, mask=a_mask, other=0.0)
            w_lo, w_hi = _load_mxfp4(w_base, s_base, d, d_ok, c, c_ok, n_bytes)
            dt = A.dtype.element_ty
            acc += _dot(a_even, tl.trans(w_lo.to(dt)), IEEE) + _dot(a_odd, tl.trans(w_hi.to(dt)), IEEE)
        acc += tl.load(B2 + e * D + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        acc *= tl.load(Weights + pair, mask=r_ok, other=0.0)[:, None]
        tl.store(Y + pair[:, None] * D + d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _moe_sum(Y, Out, D, TOP_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out[n] = sum over slots j (in order) of Y[n * k + j]."""
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(Y + (n * TOP_K + j) * D + d, mask=d < D, other=0.0)
    tl.store(Out + n * D + d, acc.to(Out.dtype.element_ty), mask=d < D)


def _tiles(experts: torch.Tensor, n_experts: int, block_m: int):
    """Sort the (token, slot) pairs by expert and cut them into tiles of one expert each.

    Returns (order [P]: pair index by sorted row, tile_expert [max_tiles] (-1: unused tile),
    tile_row0, tile_row_end [max_tiles]), all on the device, sized from P alone (no host sync).
    """
    flat = experts.flatten()                                                 # [P]
    P = flat.numel()
    order = torch.argsort(flat, stable=True).to(torch.int32)
    # not bincount: on CUDA it reads the max back to size its output (a host sync)
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))                        # [E]
    starts = torch.cumsum(counts, 0) - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)                                        # [E]
    max_tiles = triton.cdiv(P, block_m) + n_experts
    ids = torch.arange(max_tiles, device=flat.device)
    tile_expert = torch.searchsorted(tile_end, ids, right=True)              # E: past the end
    used = tile_expert < n_experts
    e = tile_expert.clamp(max=n_experts - 1)
    row0 = starts[e] + (ids - (tile_end - tiles)[e]) * block_m
    row_end = starts[e] + counts[e]
    tile_expert = torch.where(used, tile_expert, -1).to(torch.int32)
    return order, tile_expert, row0.to(torch.int32), row_end.to(torch.int32)


def uses_gemv(x: torch.Tensor, w1_scales: torch.Tensor, w2_scales: torch.Tensor) -> bool:
    """Whether ``moe`` runs the decode GEMVs on x [N, D] (else the grouped GEMMs): a few tokens,
    and for bf16 scales the tensor-core GEMVs are exact for (``moe_decode.scales_fit``)."""
    if x.shape[0] > DECODE_MAX_TOKENS:
        return False
    return x.dtype != torch.bfloat16 or (scales_fit(w1_scales) and scales_fit(w2_scales))


def uses_batch_gemv(x: torch.Tensor, w1_scales: torch.Tensor, w2_scales: torch.Tensor) -> bool:
    """Whether ``moe`` runs the batched decode GEMVs (``moe_batch``: each expert read once for
    all its tokens) on x [N, D]: bf16, more tokens than the GEMVs take and at most
    ``BATCH_MAX_TOKENS`` (a batched decode step), scales the bf16 dot is exact for."""
    return (x.dtype == torch.bfloat16 and DECODE_MAX_TOKENS < x.shape[0] <= BATCH_MAX_TOKENS
            and scales_fit(w1_scales) and scales_fit(w2_scales))


def moe(
    x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor,
    w1_blocks: torch.Tensor, w1_scales: torch.Tensor, w1_bias: torch.Tensor,
    w2_blocks: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor,
    top_k: int, swiglu_limit: float, *, routing: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Same contract as ``gptoss_cli.ops.moe``: x [N, D] -> [N, D] in x's dtype."""
    N, D = x.shape
    E, F2 = w1_blocks.shape[0], w1_blocks.shape[1]
    F = F2 // 2
    x = x.contiguous()
    weights, experts = routing if routing is not None else route(x, router_w, router_b, top_k)
    out = torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    P = N * top_k
    if uses_gemv(x, w1_scales, w2_scales):
        return gemv_moe(x, weights, experts, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
                        top_k, swiglu_limit, out)
    if uses_batch_gemv(x, w1_scales, w2_scales):
        return batch_moe(x, weights, experts, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
                         top_k, swiglu_limit, out)
    a = torch.empty(P, F, dtype=x.dtype, device=x.device)       # SwiGLU outputs, one row a pair
    # fp32 dots run on the FMA units (no tensor cores): smaller tiles keep them in registers
    block_m, block_n, block_c = (32, 32, 16) if x.dtype == torch.float32 else (64, 64, 32)
    order, tile_expert, row0, row_end = _tiles(experts, E, block_m)
    ieee = x.dtype == torch.float32
    _moe_gemm1[(tile_expert.numel(), triton.cdiv(F, block_n))](
        x, order, tile_expert, row0, row_end, w1_blocks, w1_scales, w1_bias, a, D, F, swiglu_limit,
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, IEEE=ieee,
    )
    y = torch.empty(P, D, dtype=torch.float32, device=x.device)   # weighted output of each pair
    _moe_gemm2[(tile_expert.numel(), triton.cdiv(D, block_n))](
        a, order, tile_expert, row0, row_end, weights, w2_blocks, w2_scales, w2_bias, y, D, F,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, IEEE=ieee,
    )
    _moe_sum[(N, triton.cdiv(D, 256))](y, out, D, TOP_K=top_k, BLOCK_D=256)
    return out


route_torch = ops.route.reference
add_rmsnorm_route_torch = ops.add_rmsnorm_route.reference
moe_torch = ops.moe.reference
