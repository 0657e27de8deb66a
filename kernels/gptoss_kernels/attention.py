"""Causal GQA attention with learned sinks and a sliding window, for prefill and decode.

The algorithm is FlashAttention-2 (Dao 2023, arXiv:2307.08691): keys are visited in blocks with
an online softmax (running max ``m``, running sum ``l``), so the [T, S] score matrix is never
stored. gpt-oss adds two things (the layout follows openai/gpt-oss ``triton/attention.py``):

- a learned sink logit per query head joins each row's softmax and contributes no value. The
  running max starts at the sink, which also keeps fully-masked rows finite; the sink's mass
  ``exp(sink - m)`` is added to ``l`` once, at the end;
- a sliding window (query at p sees p-window+1 .. p) on every other layer.

Which keys a query may see is decided from position arrays, exactly as in the reference
(``gptoss_cli.ops.attention``): ``q_pos`` [T] and ``k_pos`` [S] (``k_pos < 0``: an empty slot).
So one kernel serves a full cache (``k_pos`` = slot index), the ring buffer of a windowed layer
(``k_pos`` = what each slot holds), a prompt that extends a cached prefix (``q_pos`` starts at an
offset), and the CUDA-graph decode step (the whole preallocated cache; causality masks what lies
beyond the current position). Key blocks with no visible key are skipped.

GQA: one program owns the ``G = H/K`` query heads that share a kv head, laid out as rows
``t*G + g`` of one tile, so each key block is loaded once for all of them (at decode: 8 heads of
1 token fill one tile).

Decode (few rows, long cache): the keys are split into chunks, one program per chunk (split-K,
"flash-decoding"), each leaving a partial (m, l, acc); the last program of a tile to finish
merges them in split order and adds the sink (``arrive.py``: no second launch). When slot n holds
position n (``keys_by_position``: the full cache) the number of splits is fixed (~256 programs)
and each program sizes its chunk to the live keys 0 .. last query position, on the device: the
CUDA-graph decode step attends over the whole preallocated buffer, and at 2k of a 128k context
its programs still share 2k keys, not 128k. K and V of a block are loaded together. Prefill uses
a single split and normalises in place.

Continuous batching (``attention_rows``, ``_attn_rows_fwd``): N sequences, one query token each,
each in its own row of a pooled cache [B, S, K, dh] at its own position. The row and position of
each token are read on the device; one program per (token, kv head, key split), the splits fixed
from shapes. A full cache's programs split only their own token's live slots (its window, or
0 .. pos), so a token at position 5 beside one at 2000 reads 6 slots; a ring's table [B, S] is
read per slot. Partials merge as above (a counter per token and kv head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_cli import ops

from .arrive import arrive, counters, reset

LOG2E = 1.4426950408889634  # log2(e): host side only; kernels inline the literal
DECODE_SPLIT_KEYS = 256      # keys per split-K program when few query rows face many keys
DECODE_MAX_ROWS = 64         # T*G up to this: the decode layout (split-K)
DECODE_PROGRAMS = 256        # keys sorted by position: about this many programs (132 SMs, twice)


@triton.jit
def _attn_fwd(
    Q, K, V, Sinks, QPos, KPos, Out, MPart, LPart, AccPart, Counter,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, S, H, n_kv_heads, window, qk_scale, split_len,
    G: tl.constexpr, D_HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, BY_POS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bk = tl.program_id(1)                  # batch * n_kv_heads + kv head
    pid_s = tl.program_id(2)                   # split of the keys
    b = pid_bk // n_kv_heads
    kh = pid_bk % n_kv_heads

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)        # row = t * G + g
    t = rows // G
    h = kh * G + rows % G
    row_ok = t < T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D_HEAD

    q_ptrs = (Q + b.to(tl.int64) * stride_qb + t[:, None].to(tl.int64) * stride_qt
              + h[:, None] * stride_qh + d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qp = tl.load(QPos + t, mask=row_ok, other=-1)           # -1: a padding row sees nothing
    sink = tl.load(Sinks + h, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634

    # running max starts at the sink (log2 domain): finite even for rows with no visible key
    m_i = sink
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    qp_max = tl.max(qp, axis=0)
    qp_min = tl.min(tl.where(row_ok, qp, qp_max), axis=0)
    if BY_POS:
        # slot n holds position n: keys past the last query are never visible, so the splits
        # share out the live keys 0 .. qp_max only (the grid is fixed: a CUDA graph replays it)
        live = tl.minimum(qp_max + 1, S)
        split_len = tl.cdiv(tl.cdiv(live, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    else:
        live = S
    lo = pid_s * split_len
    hi = tl.minimum(lo + split_len, live)
    k_base = K + b.to(tl.int64) * stride_kb + kh * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kh * stride_vh
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kp = tl.load(KPos + n, mask=n < hi, other=-1)
        # cheap block test on positions first: any key in [qp_min - window + 1, qp_max]?
        kp_lo = tl.min(tl.where(kp >= 0, kp, qp_max + 1), axis=0)
        kp_hi = tl.max(kp, axis=0)
        visible = (kp_hi >= 0) & (kp_lo <= qp_max)
        if window > 0:
            visible = visible & (kp_hi > qp_min - window)
        if visible:
            allowed = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None])
            if window > 0:
                allowed = allowed & (kp[None, :] > qp[:, None] - window)
            kv_mask = (n[:, None] < hi) & d_ok[None, :]
            k = tl.load(k_base + n[:, None].to(tl.int64) * stride_ks + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + n[:, None].to(tl.int64) * stride_vs + d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(allowed, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    if SPLIT:
        # partials [n_splits, B, T, H] (+ [dh]); the last split of this tile to finish merges them
        n_splits = tl.num_programs(2)
        rows_per_split = (tl.num_programs(1) // n_kv_heads) * T * H
        part = ((pid_s * (tl.num_programs(1) // n_kv_heads) + b) * T + t).to(tl.int64) * H + h
        tl.store(MPart + part, m_i, mask=row_ok)
        tl.store(LPart + part, l_i, mask=row_ok)
        tl.store(AccPart + part[:, None] * D_HEAD + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        counter = Counter + pid_bk * tl.num_programs(0) + pid_m
        if arrive(counter, n_splits):
            used = n_splits
            if BY_POS:
                used = tl.cdiv(live, split_len)                         # the splits that saw keys
            _combine(MPart, LPart, AccPart, Out, part - pid_s * rows_per_split, rows_per_split, used, sink,
                     b, t, h, row_ok, d, d_ok, stride_ob, stride_ot, stride_oh, D_HEAD)
            reset(counter)
    else:
        l_i = l_i + tl.math.exp2(sink - m_i)
        o = acc / l_i[:, None]
        o_ptrs = (Out + b.to(tl.int64) * stride_ob + t[:, None].to(tl.int64) * stride_ot
                  + h[:, None] * stride_oh + d[None, :])
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine(MPart, LPart, AccPart, Out, part0, rows_per_split, n_used, sink, b, t, h, row_ok, d, d_ok,
             stride_ob, stride_ot, stride_oh, D_HEAD: tl.constexpr):
    """Merge the partials (m, l, acc) of splits 0 .. n_used-1 for the rows of one tile, in split
    order (an online softmax over splits), add the sink's mass and store the output rows."""
    m_run = sink
    l_run = tl.zeros_like(sink)
    acc = tl.zeros([sink.shape[0], d.shape[0]], dtype=tl.float32)
    for sp in range(0, n_used):
        idx = part0 + sp * rows_per_split
        m_s = tl.load(MPart + idx, mask=row_ok, other=0.0, cache_modifier=".cg")
        l_s = tl.load(LPart + idx, mask=row_ok, other=0.0, cache_modifier=".cg")
        a_s = tl.load(AccPart + idx[:, None] * D_HEAD + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                      other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, m_s)
        old, new = tl.math.exp2(m_run - m_new), tl.math.exp2(m_s - m_new)
        l_run = l_run * old + l_s * new
        acc = acc * old[:, None] + a_s * new[:, None]
        m_run = m_new
    o = acc / (l_run + tl.math.exp2(sink - m_run))[:, None]
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + t[:, None].to(tl.int64) * stride_ot
              + h[:, None] * stride_oh + d[None, :])
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, scale: float, keys_by_position: bool = False,
) -> torch.Tensor:
    """Same contract as ``gptoss_cli.ops.attention``: q [B, T, H, dh]; k, v [B, S, K, dh] (any
    strides with a unit last dimension); sinks [H] float32; q_pos [T], k_pos [S] int. Returns
    [B, T, H, dh] in q's dtype."""
    B, T, H, dh = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "unit stride along dh"
    out = torch.empty(B, T, H, dh, dtype=q.dtype, device=q.device)
    rows = T * G
    # fp32 dots run on the FMA units (no tensor cores): smaller tiles keep them in registers
    big = 32 if q.dtype == torch.float32 else 64
    block_n = big if S >= big else max(16, triton.next_power_of_2(S))
    if rows <= DECODE_MAX_ROWS:
        block_m = max(16, triton.next_power_of_2(rows))
        n_splits = max(1, triton.cdiv(S, DECODE_SPLIT_KEYS))
        if keys_by_position:   # a fixed number of splits, each sized to the live keys in-kernel
            n_splits = max(1, min(triton.cdiv(S, block_n), DECODE_PROGRAMS // (B * K * triton.cdiv(rows, block_m))))
    else:
        block_m, n_splits = big, 1
    split_len = triton.cdiv(S, n_splits) if S else 0
    split_len = triton.cdiv(split_len, block_n) * block_n
    n_splits = max(1, triton.cdiv(S, split_len)) if S else 1
    if n_splits > 1:
        m_part = torch.empty(n_splits, B, T, H, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(n_splits, B, T, H, dh, dtype=torch.float32, device=q.device)
    else:
        m_part = l_part = acc_part = out       # unused
    grid = (triton.cdiv(rows, block_m), B * K, n_splits)
    _attn_fwd[grid](
        q, k, v, sinks, q_pos, k_pos, out, m_part, l_part, acc_part, counters(q.device, grid[0] * grid[1]),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        T, S, H, K, window, scale * LOG2E, split_len,
        G=G, D_HEAD=dh, BLOCK_D=triton.next_power_of_2(dh), BLOCK_M=block_m, BLOCK_N=block_n,
        SPLIT=n_splits > 1, IEEE=q.dtype == torch.float32, BY_POS=keys_by_position,
    )
    return out


attention_torch = ops.attention.reference


# ---- several sequences, one query token each (continuous batching) ------------------------------
@triton.jit
def _attn_rows_fwd(
    Q, K, V, Sinks, Rows, Pos, KPos, Out, MPart, LPart, AccPart, Counter,
    stride_qn, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_pb, stride_on, stride_oh,
    S, H, n_kv_heads, window, qk_scale, split_len,
    G: tl.constexpr, D_HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, RING: tl.constexpr,
):
    """One program: token n's G query heads of kv head kh (rows g of one tile) over split pid_s of
    its sequence's keys, in cache row ``Rows[n]``. Full cache (not RING): slot s holds position
    s, so the splits share out the live slots max(0, pos-window+1) .. pos, sized on the device."""
    pid_nk = tl.program_id(0)                  # token * n_kv_heads + kv head
    pid_s = tl.program_id(1)                   # split of the keys
    n_tok = pid_nk // n_kv_heads
    kh = pid_nk % n_kv_heads
    b = tl.load(Rows + n_tok).to(tl.int64)     # the sequence's row of the cache
    qp = tl.load(Pos + n_tok)

    g = tl.arange(0, BLOCK_M)
    h = kh * G + g
    row_ok = g < G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D_HEAD
    q = tl.load(Q + n_tok.to(tl.int64) * stride_qn + h[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    sink = tl.load(Sinks + h, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    m_i = sink
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if RING:
        first = 0
        live = S
    else:               # the visible slots are first .. qp: split them, whatever S is
        first = tl.where(window > 0, tl.maximum(qp - window + 1, 0), 0)
        live = tl.minimum(qp + 1, S)
        split_len = tl.cdiv(tl.cdiv(tl.maximum(live - first, 1), tl.num_programs(1)), BLOCK_N) * BLOCK_N
    lo = first + pid_s * split_len
    hi = tl.minimum(lo + split_len, live)
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_vb + kh * stride_vh
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        in_range = n < hi
        if RING:
            kp = tl.load(KPos + b * stride_pb + n, mask=in_range, other=-1)
        else:
            kp = tl.where(in_range, n, -1)
        allowed = (kp >= 0) & (kp <= qp)
        if window > 0:
            allowed = allowed & (kp > qp - window)
        if tl.max(allowed.to(tl.int32), axis=0) > 0:
            kv_mask = in_range[:, None] & d_ok[None, :]
            k = tl.load(k_base + n[:, None].to(tl.int64) * stride_ks + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + n[:, None].to(tl.int64) * stride_vs + d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(allowed[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    t = n_tok + g * 0                          # the output row of every tile row
    if SPLIT:
        # partials [n_splits, N, H] (+ [dh]); the last split of this (token, kv head) merges them
        n_splits = tl.num_programs(1)
        rows_per_split = (tl.num_programs(0) // n_kv_heads) * H
        part = (pid_s * (tl.num_programs(0) // n_kv_heads) + t).to(tl.int64) * H + h
        tl.store(MPart + part, m_i, mask=row_ok)
        tl.store(LPart + part, l_i, mask=row_ok)
        tl.store(AccPart + part[:, None] * D_HEAD + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        counter = Counter + pid_nk
        if arrive(counter, n_splits):
            used = n_splits
            if not RING:
                used = tl.cdiv(tl.maximum(live - first, 1), split_len)   # the splits that saw keys
            _combine(MPart, LPart, AccPart, Out, part - pid_s * rows_per_split, rows_per_split, used, sink,
                     n_tok * 0, t, h, row_ok, d, d_ok, 0, stride_on, stride_oh, D_HEAD)
            reset(counter)
    else:
        l_i = l_i + tl.math.exp2(sink - m_i)
        o = acc / l_i[:, None]
        o_ptrs = Out + t[:, None].to(tl.int64) * stride_on + h[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def attention_rows(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
    rows: torch.Tensor, pos: torch.Tensor, k_pos: torch.Tensor | None, window: int, scale: float,
) -> torch.Tensor:
    """Same contract as ``gptoss_cli.ops.attention_rows``: q [N, H, dh] (a view is fine);
    k_cache, v_cache [B, S, K, dh] (unit last stride); rows, pos [N] int64 on the device; k_pos
    [B, S] (a ring's table, -1 empty) or None (full cache: each program reads only its token's
    live slots). The grid depends on shapes only (CUDA-graph capture): N*K programs times a
    fixed number of key splits (~``DECODE_PROGRAMS`` programs in all). Returns [N, H, dh]."""
    N, H, dh = q.shape
    B, S, K = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    G = H // K
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "unit stride along dh"
    assert k_pos is None or k_pos.stride(-1) == 1
    out = torch.empty(N, H, dh, dtype=q.dtype, device=q.device)
    if N == 0:
        return out
    big = 32 if q.dtype == torch.float32 else 64
    block_n = big if S >= big else max(16, triton.next_power_of_2(S))
    block_m = max(16, triton.next_power_of_2(G))
    n_splits = max(1, min(triton.cdiv(S, block_n), DECODE_PROGRAMS // (N * K)))
    if k_pos is not None:       # a ring: every slot may hold a key; split them evenly
        split_len = triton.cdiv(triton.cdiv(S, n_splits), block_n) * block_n
        n_splits = triton.cdiv(S, split_len)
    else:
        split_len = 0           # sized in the kernel to each token's live slots
    if n_splits > 1:
        m_part = torch.empty(n_splits, N, H, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(n_splits, N, H, dh, dtype=torch.float32, device=q.device)
    else:
        m_part = l_part = acc_part = out       # unused
    grid = (N * K, n_splits)
    _attn_rows_fwd[grid](
        q, k_cache, v_cache, sinks, rows, pos, pos if k_pos is None else k_pos, out,
        m_part, l_part, acc_part, counters(q.device, grid[0]),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        0 if k_pos is None else k_pos.stride(0), out.stride(0), out.stride(1),
        S, H, K, window, scale * LOG2E, split_len,
        G=G, D_HEAD=dh, BLOCK_D=triton.next_power_of_2(dh), BLOCK_M=block_m, BLOCK_N=block_n,
        SPLIT=n_splits > 1, IEEE=q.dtype == torch.float32, RING=k_pos is not None,
    )
    return out


attention_rows_torch = ops.attention_rows.reference
