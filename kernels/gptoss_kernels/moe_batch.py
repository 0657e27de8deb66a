"""The MoE of a batched decode step (continuous batching): 5 to 32 tokens, each expert read once.

``moe_decode``'s GEMVs read one expert matrix per (token, slot) pair: at 32 tokens (128 pairs)
the 32 experts of gpt-oss-20b would be read about 4 times each. Here the pairs are sorted by
expert on the device (``moe._tiles``: one tile per expert in use, as the grouped GEMMs do; no
host sync, sized from the shapes, so a CUDA graph replays it) and one program owns a block of an
expert's W1 or W2 rows for **all** the tokens routed to that expert: the weight tile is
dequantised once and multiplied by up to ``BLOCK_T`` token columns at once. The GEMV's tensor-core
product already had 16 columns, all holding the one token (``moe_decode._dot_chunk``); here the
columns are the expert's tokens, so the weight side of the loop (loads, whole-word
dequantisation, the MMA's A fragments) is the same instruction for instruction and the instruction
budget per weight value is that of the GEMV plus the token tile's loads (``PERF.md``).

- ``_moe_bgemv1``: grid (W1 row blocks, expert tiles, K parts); h = W1[e] x_t + b1 for the
  tile's tokens, the SwiGLU, one row of A per pair. The last K part of a block adds the parts;
- ``_moe_bgemv2``: grid (W2 row blocks, expert tiles, K parts); each pair's part of W2[e] a is
  stored; then for each of the tile's tokens, the last of that token's k * SPLITS programs of the
  block (``arrive.py``) writes its output: the k slots in slot order, parts in order, so the
  result is the same bits whichever program finishes last.

Unused tiles (fewer experts in use than the grid has room for) return at once. bf16 only (the
tensor-core path; what a GPU decodes in): fp32 and fp16 batches run the grouped GEMMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arrive import arrive, counters, reset
from .moe_decode import (_DOT_GROUPS, DOT_STAGES, _bf16_halves, _f32_halves, _interpreted, _rounded, _swiglu,
                         _tile_row, _weight_values, _words)

BATCH_MAX_TOKENS = 32          # up to this many tokens (from DECODE_MAX_TOKENS + 1) this path runs
BGEMV1, BGEMV2 = (128, 2), (128, 4)   # (rows per program, K parts), as the GEMVs


@triton.jit
def _dot_chunk_t(w_ptr, s_ptr, x_ptr, groups_left, q, j, acc,
                 BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, G: tl.constexpr, MASKED: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """``moe_decode._dot_chunk`` with BLOCK_T token columns instead of one broadcast token:
    x_ptr [4 (q), G (j), 2 (h), 2 (i // 2), BLOCK_T] words of the tokens' activations."""
    m = q[:, None] * G + j[None, :]                                      # word of the chunk [4, G]
    if MASKED:
        ok = m < groups_left * 4
        w = tl.load(w_ptr, mask=ok[None, :, :], other=0)
        s = tl.load(s_ptr, mask=(q * G < groups_left * 4)[None, :], other=0)
        xw = tl.load(x_ptr, mask=ok[:, :, None, None, None], other=0)
    else:
        w = tl.load(w_ptr)                                               # [R, 4, G] words
        s = tl.load(s_ptr)                                               # [R, 4] scales
        xw = tl.load(x_ptr)                                              # [4, G, 2, 2, T] words of x
    a = tl.permute(_weight_values(w, s, BLOCK_R, G, INTERPRET), 0, 2, 5, 4, 1, 3)   # [R, j, i//2, i%2, q, h]
    a = tl.reshape(a, [BLOCK_R // 64, 2, 4, 8, G * 32])
    a = tl.reshape(tl.permute(a, 0, 2, 1, 3, 4), [BLOCK_R, G * 32])
    x = _f32_halves(xw) if INTERPRET else _bf16_halves(xw)               # [q, j, h, i//2, T, i%2]
    x = tl.reshape(tl.permute(x, 1, 3, 5, 0, 2, 4), [G * 32, BLOCK_T])   # [j, i//2, i%2, q, h] x T
    if INTERPRET:
        return tl.dot(a, x, acc, input_precision="ieee")
    return tl.dot(a, x, acc)


@triton.jit
def _mxfp4_dot_tokens(W, S, XW, x_off, row0, n_rows, g_lo, g_hi, n_groups,
                      BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, G: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 [BLOCK_R, BLOCK_T]: rows row0.. of one packed expert times the bf16 activations of
    BLOCK_T tokens, token t's words at XW + x_off[t], over the groups g_lo .. g_hi-1."""
    r = tl.arange(0, BLOCK_R)
    rows = tl.minimum(row0 + _tile_row(r), n_rows - 1).to(tl.int64)
    q = tl.arange(0, 4)
    j = tl.arange(0, G)
    h = tl.arange(0, 2)
    p1 = tl.arange(0, 2)
    w_ptr = W + rows[:, None, None] * (n_groups * 4) + (q * G)[None, :, None] + j[None, None, :]
    s_ptr = S + rows[:, None] * n_groups + (q * G // 4)[None, :]
    x_ptr = (XW + x_off[None, None, None, None, :]
             + (((q * G)[:, None, None, None] + j[None, :, None, None]) * 4 + (2 * h)[None, None, :, None]
                + p1[None, None, None, :])[:, :, :, :, None])
    acc = tl.zeros([BLOCK_R, BLOCK_T], tl.float32)
    g_full = g_lo + (g_hi - g_lo) // G * G
    for g0 in range(g_lo, g_full, G):
        acc = _dot_chunk_t(w_ptr + g0 * 4, s_ptr + g0, x_ptr + g0 * 16, 0, q, j, acc,
                           BLOCK_R, BLOCK_T, G, False, INTERPRET)
    if g_full < g_hi:
        acc = _dot_chunk_t(w_ptr + g_full * 4, s_ptr + g_full, x_ptr + g_full * 16, g_hi - g_full, q, j, acc,
                           BLOCK_R, BLOCK_T, G, True, INTERPRET)
    return acc


@triton.jit
def _tile_tokens(Order, TileExpert, Row0, RowEnd, u, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tile u's expert, its pairs [BLOCK_T] (past its end: its last pair again) and which are real."""
    e = tl.load(TileExpert + u)
    r0 = tl.load(Row0 + u)
    r_end = tl.load(RowEnd + u)
    t = tl.arange(0, BLOCK_T)
    valid = r0 + t < r_end
    pair = tl.load(Order + tl.minimum(r0 + t, r_end - 1)).to(tl.int64)
    return e, pair, valid


@triton.jit
def _moe_bgemv1(
    XW, Order, TileExpert, Row0, RowEnd, W1, S1, B1, Part, A, Counter, F, n_groups, limit,
    TOP_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rb = tl.program_id(0)
    u = tl.program_id(1)
    split = tl.program_id(2)
    if tl.load(TileExpert + u) < 0:                                     # no expert: nothing to do
        return
    e, pair, valid = _tile_tokens(Order, TileExpert, Row0, RowEnd, u, TOP_K, BLOCK_T)
    e = e.to(tl.int64)
    per = tl.cdiv(tl.cdiv(n_groups, SPLITS), _DOT_GROUPS) * _DOT_GROUPS
    g_lo = tl.minimum(split * per, n_groups)
    h = _mxfp4_dot_tokens(W1 + e * (2 * F) * (n_groups * 4), S1 + e * (2 * F) * n_groups, XW,
                          (pair // TOP_K) * (n_groups * 16), rb * BLOCK_R, 2 * F, g_lo,
                          tl.minimum(g_lo + per, n_groups), n_groups, BLOCK_R, BLOCK_T, _DOT_GROUPS, INTERPRET)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)                         # 2f (gate), 2f+1 (linear)
    if SPLITS > 1:
        ok = (rows < 2 * F)[:, None] & valid[None, :]
        part = Part + (pair[None, :] * SPLITS + split) * (2 * F) + rows[:, None]
        tl.store(part, h, mask=ok)
        counter = Counter + u * tl.num_programs(0) + rb
        if arrive(counter, SPLITS):
            h = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
            for s in tl.static_range(SPLITS):
                h += tl.load(Part + (pair[None, :] * SPLITS + s) * (2 * F) + rows[:, None], mask=ok, other=0.0,
                             cache_modifier=".cg")
            _bgemv1_epilogue(h, e, pair, valid, rb, B1, A, F, limit, BLOCK_R, BLOCK_T, INTERPRET)
            reset(counter)
    else:
        _bgemv1_epilogue(h, e, pair, valid, rb, B1, A, F, limit, BLOCK_R, BLOCK_T, INTERPRET)


@triton.jit
def _bgemv1_epilogue(h, e, pair, valid, rb, B1, A, F, limit,
                     BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, INTERPRET: tl.constexpr):
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    h += tl.load(B1 + e * 2 * F + rows, mask=rows < 2 * F, other=0.0).to(tl.float32)[:, None]
    gate, lin = tl.split(tl.reshape(tl.trans(h), [BLOCK_T, BLOCK_R // 2, 2]))     # [T, R/2] each
    f = rb * (BLOCK_R // 2) + tl.arange(0, BLOCK_R // 2)
    tl.store(A + pair[:, None] * F + f[None, :], _rounded(_swiglu(gate, lin, limit), A.dtype.element_ty, INTERPRET),
             mask=valid[:, None] & (f < F)[None, :])


@triton.jit
def _moe_bgemv2(
    AW, Order, TileExpert, Row0, RowEnd, Experts, Weights, W2, S2, B2, Part, Out, Counter, D, n_groups,
    TOP_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rb = tl.program_id(0)
    u = tl.program_id(1)
    split = tl.program_id(2)
    if tl.load(TileExpert + u) < 0:
        return
    e, pair, valid = _tile_tokens(Order, TileExpert, Row0, RowEnd, u, TOP_K, BLOCK_T)
    e = e.to(tl.int64)
    per = tl.cdiv(tl.cdiv(n_groups, SPLITS), _DOT_GROUPS) * _DOT_GROUPS
    g_lo = tl.minimum(split * per, n_groups)
    y = _mxfp4_dot_tokens(W2 + e * D * (n_groups * 4), S2 + e * D * n_groups, AW, pair * (n_groups * 16),
                          rb * BLOCK_R, D, g_lo, tl.minimum(g_lo + per, n_groups), n_groups,
                          BLOCK_R, BLOCK_T, _DOT_GROUPS, INTERPRET)
    d = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    d_ok = d < D
    tl.store(Part + (pair[None, :] * SPLITS + split) * D + d[:, None], y, mask=d_ok[:, None] & valid[None, :])
    # each of the tile's tokens: the last of its k * SPLITS programs of this block writes its row
    r0 = tl.load(Row0 + u)
    for i in range(0, tl.load(RowEnd + u) - r0):
        n = tl.load(Order + r0 + i).to(tl.int64) // TOP_K
        counter = Counter + n * tl.num_programs(0) + rb
        if arrive(counter, TOP_K * SPLITS):
            out = tl.zeros([BLOCK_R], dtype=tl.float32)
            for jj in tl.static_range(TOP_K):
                pj = n * TOP_K + jj
                yj = tl.load(B2 + tl.load(Experts + pj) * D + d, mask=d_ok, other=0.0).to(tl.float32)
                for s in tl.static_range(SPLITS):
                    yj += tl.load(Part + (pj * SPLITS + s) * D + d, mask=d_ok, other=0.0, cache_modifier=".cg")
                out += tl.load(Weights + pj) * yj
            tl.store(Out + n * D + d, _rounded(out, Out.dtype.element_ty, INTERPRET), mask=d_ok)
            reset(counter)


def batch_moe(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
              w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
              top_k: int, swiglu_limit: float, out: torch.Tensor) -> torch.Tensor:
    """out [N, D] = the MoE of N <= BATCH_MAX_TOKENS bf16 tokens x [N, D] (routing given), each
    expert in use read once: a tile table (``moe._tiles``, torch ops on the device) and two
    launches. Scales must fit the bf16 dot (``moe_decode.scales_fit``): the caller checks."""
    from .moe import _tiles

    N, D = x.shape
    E, F = w1_blocks.shape[0], w1_blocks.shape[1] // 2
    P = N * top_k
    assert x.dtype == torch.bfloat16 and N <= BATCH_MAX_TOKENS
    block_t = max(16, triton.next_power_of_2(N))     # an expert gets each token at most once
    order, tile_expert, row0, row_end = _tiles(experts, E, block_t)
    n_tiles = min(E, P)                              # one tile per expert in use, those first
    tile_expert, row0, row_end = tile_expert[:n_tiles], row0[:n_tiles], row_end[:n_tiles]
    (r1, s1), (r2, s2) = BGEMV1, BGEMV2
    rb1, rb2 = triton.cdiv(2 * F, r1), triton.cdiv(D, r2)
    a = torch.empty(P, F, dtype=x.dtype, device=x.device)            # SwiGLU outputs, one row a pair
    part1 = torch.empty(P * s1 * 2 * F if s1 > 1 else 1, dtype=torch.float32, device=x.device)
    part2 = torch.empty(P * s2 * D, dtype=torch.float32, device=x.device)
    flags = dict(TOP_K=top_k, BLOCK_T=block_t, INTERPRET=_interpreted(), num_stages=DOT_STAGES)
    _moe_bgemv1[(rb1, n_tiles, s1)](
        _words(x), order, tile_expert, row0, row_end, w1_blocks.view(torch.int32), w1_scales, w1_bias, part1, a,
        counters(x.device, n_tiles * rb1), F, D // 32, swiglu_limit, BLOCK_R=r1, SPLITS=s1, **flags)
    _moe_bgemv2[(rb2, n_tiles, s2)](
        _words(a), order, tile_expert, row0, row_end, experts, weights, w2_blocks.view(torch.int32), w2_scales,
        w2_bias, part2, out, counters(x.device, N * rb2), D, F // 32, BLOCK_R=r2, SPLITS=s2, **flags)
    return out
