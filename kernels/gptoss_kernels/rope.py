"""RoPE (Su et al. 2021, arXiv:2104.09864) on q and k, fused with the write of k and v into the
KV cache.

gpt-oss rotates the two halves of each head (not interleaved pairs) with YaRN-scaled cos/sin
tables (``gptoss_cli.ops.rope_table``). After the qkv projection every token's q is rotated for
attention, and its k is rotated and stored in the cache together with v. One program per token
reads that token's cos/sin row by its position (a device tensor, so the same launch serves the
CUDA-graph decode step at any position), rotates all its q and k heads in float32, and stores
q for attention and k, v straight into their cache slots: the rotated k never makes a round trip
through memory before it reaches the cache. For a ring cache at decode the kernel also works out
the slot (position mod window) and records the position in the ring's table, so the decode step
spends no launches on ring bookkeeping. The qkv projection's bias is added here too, as q, k, v are
loaded, so the projection itself is one bias-free cuBLAS launch at decode.

``rope_store_rows`` (continuous batching): one token for each of N sequences, token n's k and v
going to row ``rows[n]`` of a pooled cache at slot ``pos[n]`` (a ring: ``pos[n] mod S``, and the
row's table records it), rows and positions read on the device so one launch serves any batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_cli import ops


@triton.jit
def _rope_store_kernel(
    Q, K, V, Cos, Sin, Pos, Slots, RingPos, QKVBias, QOut, KCache, VCache,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch,
    stride_db, stride_ds, stride_dh,
    T, n_heads, n_kv_heads, n_slots,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, RING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    pos = tl.load(Pos + t).to(tl.int64)
    c = tl.load(Cos + pos * HALF + i, mask=i_ok, other=0.0)[None, :]
    s = tl.load(Sin + pos * HALF + i, mask=i_ok, other=0.0)[None, :]
    hh = tl.arange(0, BLOCK_H)

    # q: [n_heads, dh] of this token -> QOut
    m = (hh[:, None] < n_heads) & i_ok[None, :]
    src = Q + b * stride_qb + t * stride_qt + hh[:, None] * stride_qh + i[None, :]
    x1, x2 = _load_halves(src, QKVBias + hh[:, None] * (2 * HALF) + i[None, :], m, HALF, HAS_BIAS)
    dst = QOut + b * stride_ob + t * stride_ot + hh[:, None] * stride_oh + i[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(QOut.dtype.element_ty), mask=m)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(QOut.dtype.element_ty), mask=m)

    # k (rotated) and v (as is): [n_kv_heads, dh] -> cache slot
    if RING:                          # slot = pos mod S, and the ring's table records pos
        slot = pos % n_slots
        if b == 0:
            tl.store(RingPos + slot, pos)
    else:
        slot = tl.load(Slots + t).to(tl.int64)
    m = (hh[:, None] < n_kv_heads) & i_ok[None, :]
    src = K + b * stride_kb + t * stride_kt + hh[:, None] * stride_kh + i[None, :]
    k_bias = QKVBias + (n_heads + hh[:, None]) * (2 * HALF) + i[None, :]
    x1, x2 = _load_halves(src, k_bias, m, HALF, HAS_BIAS)
    dst = KCache + b * stride_cb + slot * stride_cs + hh[:, None] * stride_ch + i[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(KCache.dtype.element_ty), mask=m)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(KCache.dtype.element_ty), mask=m)
    src = V + b * stride_vb + t * stride_vt + hh[:, None] * stride_vh + i[None, :]
    dst = VCache + b * stride_db + slot * stride_ds + hh[:, None] * stride_dh + i[None, :]
    v1, v2 = _load_halves(src, k_bias + n_kv_heads * (2 * HALF), m, HALF, HAS_BIAS)
    tl.store(dst, v1.to(VCache.dtype.element_ty), mask=m)
    tl.store(dst + HALF, v2.to(VCache.dtype.element_ty), mask=m)


@triton.jit
def _load_halves(src, bias, mask, HALF: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Both halves of some heads, float32, the bias added first and rounded to the input's dtype
    (as the reference's ``q + bq`` is)."""
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    if HAS_BIAS:
        x1 = (x1.to(tl.float32) + tl.load(bias, mask=mask, other=0.0).to(tl.float32)).to(src.dtype.element_ty)
        x2 = (x2.to(tl.float32) + tl.load(bias + HALF, mask=mask, other=0.0).to(tl.float32)).to(src.dtype.element_ty)
    return x1.to(tl.float32), x2.to(tl.float32)


def rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor | None,
    ring_pos: torch.Tensor | None = None, qkv_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``gptoss_cli.ops.rope_store``: q [B, T, H, dh], k, v [B, T, K, dh] (views
    into the qkv projection are fine); cos/sin [n_positions, dh/2] float32; pos, slots [T];
    k_cache, v_cache [B, S, K, dh]; ring_pos [S] or None; qkv_bias [(H + 2K) dh] or None.
    Returns rotated q [B, T, H, dh]."""
    B, T, H, dh = q.shape
    K = k.shape[2]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
    out = torch.empty(B, T, H, dh, dtype=q.dtype, device=q.device)
    if B * T:
        _rope_store_kernel[(B * T,)](
            q, k, v, cos.contiguous(), sin.contiguous(), pos, pos if slots is None else slots,
            pos if ring_pos is None else ring_pos, cos if qkv_bias is None else qkv_bias, out, k_cache, v_cache,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            T, H, K, k_cache.shape[1],
            HALF=dh // 2, BLOCK_HALF=triton.next_power_of_2(dh // 2),
            BLOCK_H=triton.next_power_of_2(max(H, K)), RING=ring_pos is not None, HAS_BIAS=qkv_bias is not None,
        )
    return out


rope_store_torch = ops.rope_store.reference


# ---- several sequences, one token each (continuous batching) ------------------------------------
@triton.jit
def _rope_store_rows_kernel(
    Q, K, V, Cos, Sin, Rows, Pos, RingPos, QKVBias, QOut, KCache, VCache,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    stride_cb, stride_cs, stride_ch,
    stride_db, stride_ds, stride_dh,
    stride_rb, n_heads, n_kv_heads, n_slots,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, RING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """One program per token n: its row of the cache ``Rows[n]`` and its position ``Pos[n]``
    are read on the device; slot = pos (full) or pos mod S (ring, recorded in the row's table)."""
    n = tl.program_id(0).to(tl.int64)
    b = tl.load(Rows + n).to(tl.int64)
    pos = tl.load(Pos + n).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    c = tl.load(Cos + pos * HALF + i, mask=i_ok, other=0.0)[None, :]
    s = tl.load(Sin + pos * HALF + i, mask=i_ok, other=0.0)[None, :]
    hh = tl.arange(0, BLOCK_H)

    m = (hh[:, None] < n_heads) & i_ok[None, :]
    src = Q + n * stride_qn + hh[:, None] * stride_qh + i[None, :]
    x1, x2 = _load_halves(src, QKVBias + hh[:, None] * (2 * HALF) + i[None, :], m, HALF, HAS_BIAS)
    dst = QOut + n * stride_on + hh[:, None] * stride_oh + i[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(QOut.dtype.element_ty), mask=m)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(QOut.dtype.element_ty), mask=m)

    if RING:
        slot = pos % n_slots
        tl.store(RingPos + b * stride_rb + slot, pos)
    else:
        slot = pos
    m = (hh[:, None] < n_kv_heads) & i_ok[None, :]
    src = K + n * stride_kn + hh[:, None] * stride_kh + i[None, :]
    k_bias = QKVBias + (n_heads + hh[:, None]) * (2 * HALF) + i[None, :]
    x1, x2 = _load_halves(src, k_bias, m, HALF, HAS_BIAS)
    dst = KCache + b * stride_cb + slot * stride_cs + hh[:, None] * stride_ch + i[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(KCache.dtype.element_ty), mask=m)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(KCache.dtype.element_ty), mask=m)
    src = V + n * stride_vn + hh[:, None] * stride_vh + i[None, :]
    dst = VCache + b * stride_db + slot * stride_ds + hh[:, None] * stride_dh + i[None, :]
    v1, v2 = _load_halves(src, k_bias + n_kv_heads * (2 * HALF), m, HALF, HAS_BIAS)
    tl.store(dst, v1.to(VCache.dtype.element_ty), mask=m)
    tl.store(dst + HALF, v2.to(VCache.dtype.element_ty), mask=m)


def rope_store_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    rows: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    ring_pos: torch.Tensor | None = None, qkv_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``gptoss_cli.ops.rope_store_rows``: q [N, H, dh], k, v [N, K, dh] (views
    into the qkv projection are fine); rows, pos [N] int64 on the device; k_cache, v_cache
    [B, S, K, dh]; ring_pos [B, S] or None; qkv_bias [(H + 2K) dh] or None. One program per
    token, grid (N,): the same launch replays in a CUDA graph whatever rows and pos hold.
    Returns rotated q [N, H, dh]."""
    N, H, dh = q.shape
    K = k.shape[1]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
    assert ring_pos is None or ring_pos.stride(-1) == 1
    out = torch.empty(N, H, dh, dtype=q.dtype, device=q.device)
    if N:
        _rope_store_rows_kernel[(N,)](
            q, k, v, cos.contiguous(), sin.contiguous(), rows, pos,
            pos if ring_pos is None else ring_pos, cos if qkv_bias is None else qkv_bias, out, k_cache, v_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            0 if ring_pos is None else ring_pos.stride(0), H, K, k_cache.shape[1],
            HALF=dh // 2, BLOCK_HALF=triton.next_power_of_2(dh // 2),
            BLOCK_H=triton.next_power_of_2(max(H, K)), RING=ring_pos is not None, HAS_BIAS=qkv_bias is not None,
        )
    return out


rope_store_rows_torch = ops.rope_store_rows.reference
