"""The MoE's decode GEMVs: a handful of tokens times the 4 chosen MXFP4 experts each.

At batch 1 these two launches read ~53 MB a layer (4 experts, MXFP4 at 4.25 bits) and nothing else
of note, so they must run at copy bandwidth, and copy bandwidth leaves ~5.3 SASS instructions per
weight value on an H100 and ~3.7 on an H200 (DESIGN.md 5). The bf16 path is designed to spend at
most 4 (``tests/kernels_budget.py`` counts the compiled loop; PERF.md has the figures):

- **a coalesced tile, laid out as the tensor core wants it.** A thread reads 16 bytes (4 words of
  8 codes) of each of its rows per iteration, lanes along a row's bytes. The dot's K order is
  free (x is permuted the same way), so it is chosen such that the dequantised words *are* the
  MMA's A fragment registers: no shared-memory round trip. Likewise the load's row ``r`` is the
  MMA tile's row ``_tile_row(r)``, so a tile row is a memory row and the output needs no
  permutation;
- **whole-word dequantisation** (``_DEQUANT_ASM``): a 32-bit word of 8 E2M1 codes becomes 4
  bf16x2 words. Codes ``i`` and ``i + 4`` sit 16 bits apart, so one AND isolates both, one IMAD
  by ``2^a + 2^b`` places the magnitude (into bf16's exponent and top mantissa bit) and the sign
  in one go, one AND masks the copies (3 instructions a pair); that is the code's value times
  2^-126 (``e = 0`` lands on bf16's subnormals), and one bf16x2 multiply by the group's
  ``2^(s-1)`` applies the E8M0 scale and makes it normal (the bit placement of the Marlin
  kernels' FP4 dequantisation, cf. arXiv:2408.11743; tensor cores see only normal numbers);
- **tensor-core products**: ``tl.dot`` with the weight tile as M (wgmma on Hopper) and the
  activations broadcast to N = 16 (the minimum), accumulating in fp32; column 0 is the result;
- **loads in flight across iterations**: the loop is software-pipelined (``num_stages``: cp.async
  into shared memory two chunks ahead);
- **a grid over the SMs**: 128-row tiles, split along K (2 parts for W1, 4 for W2) so both launches
  have ~360 programs, 2.7 an SM on 132 SMs; the last of a row block's parts (``arrive.py``)
  adds them in a fixed order.

Exactness: every product is exact in the tensor core (bf16 x bf16 into fp32). The scale
multiply is exact for E8M0 scales up to 2^1 (``s <= 128``, weights up to 12 in magnitude: far
beyond a trained MLP's); larger scales would overflow the ``2^(s-1)`` factor, so
``moe`` checks the scales once per weight tensor (``scales_fit``) and sends such weights to the
grouped GEMMs, which are exact for any scale.

fp32 and fp16 activations take the CUDA-core path (``_mxfp4_fma_rows``: fp32 FMAs, 16-byte code
loads, the scale as an exponent once per group), which the budget does not cover: decode on a GPU
runs bf16. Under Triton's interpreter the dequantisation runs as plain integer ops (the interpreter
has no inline assembly) and the bf16 dot in fp32 (its bf16 ``tl.dot`` is garbage): same bits.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .arrive import arrive, counters, reset

DECODE_MAX_TOKENS = 4          # up to this many tokens the GEMVs run; past it the grouped GEMMs
MAX_DOT_SCALE = 128            # E8M0 scales up to this (2^1) are exact on the bf16 dot path

# (rows per program, K parts): W1 has 5760 rows (45 tiles), W2 2880 (23 tiles, the last half
# full); x 4 pairs, ~360 programs each. The CUDA-core path keeps smaller tiles, one K part.
GEMV1_DOT, GEMV2_DOT = (128, 2), (128, 4)
GEMV1_FMA, GEMV2_FMA = (64, 1), (32, 1)
DOT_GROUPS = 4                 # groups of 32 values a dot iteration reads: 16 bytes a thread a row
_DOT_GROUPS = tl.constexpr(DOT_GROUPS)
DOT_STAGES = 2                 # chunks in flight (cp.async) beyond the one being multiplied

# A word of 8 codes (code t in bits 4t..4t+3) -> 4 words of bf16x2, word i holding codes i (low
# half) and i + 4, times the bf16x2 ``$5`` (2^(s-1) twice). With x the two codes of a pair
# (16 bits apart) isolated: x * (2^a + 2^b) puts the 3 magnitude bits at 6..8 (a copy shifted
# by a) and the sign at 15 (a copy shifted by b), the two copies not overlapping; the AND keeps
# those 4 bits of each half. Codes 2, 3, 6, 7 are the same after shifting the word by 8. The
# multiply is an FMA with -0 (sm_80 has bf16x2 FMA, not MUL; x * c + -0 is x * c, signs too).
_DEQUANT_ASM = tl.constexpr("""{
.reg .b32 t0, t1, t2, t3, w8, z;
mov.b32 z, 0x80008000;
shr.b32 w8, $4, 8;
and.b32 t0, $4, 0x000F000F;
and.b32 t1, $4, 0x00F000F0;
and.b32 t2, w8, 0x000F000F;
and.b32 t3, w8, 0x00F000F0;
mul.lo.u32 t0, t0, 0x1040;
mul.lo.u32 t1, t1, 0x0104;
mul.lo.u32 t2, t2, 0x1040;
mul.lo.u32 t3, t3, 0x0104;
and.b32 t0, t0, 0x81C081C0;
and.b32 t1, t1, 0x81C081C0;
and.b32 t2, t2, 0x81C081C0;
and.b32 t3, t3, 0x81C081C0;
fma.rn.bf16x2 $0, t0, $5, z;
fma.rn.bf16x2 $1, t1, $5, z;
fma.rn.bf16x2 $2, t2, $5, z;
fma.rn.bf16x2 $3, t3, $5, z;
}""")


# ---- the bf16 tensor-core path -----------------------------------------------------------------
@triton.jit
def _bf16_halves(b):
    """int32 words of two bf16 -> [..., 2] (low half first)."""
    return tl.join(b.to(tl.uint16).to(tl.bfloat16, bitcast=True),
                   (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True))


@triton.jit
def _f32_halves(b):
    """int32 words of two bf16 -> [..., 2] float32 (exact), low half first."""
    u = b.to(tl.uint32, bitcast=True)
    return tl.join((u << 16).to(tl.float32, bitcast=True), (u >> 16 << 16).to(tl.float32, bitcast=True))


@triton.jit
def _weight_values(w, s, BLOCK_R: tl.constexpr, G: tl.constexpr, INTERPRET: tl.constexpr):
    """Words of codes w [R, 4, G] and their scales s [R, 4] -> the values [R, 4, G, 2(h), 2(i % 2),
    2(i // 2)], value i + 4h of each word: bf16 from ``_DEQUANT_ASM``, or under the interpreter (no
    inline assembly) the same numbers in float32, from the same bits with vectorised integer ops."""
    if INTERPRET:
        u = w.to(tl.uint32, bitcast=True)
        bits = ((u[:, :, :, None] >> (tl.arange(0, 4) * 4)) & 0x000F000F) * 0x1040 \
            & tl.full([1, 1, 1, 4], 0x81C081C0, tl.uint32)                      # [R, 4, G, 4 (i)]
        v = _f32_halves(bits) * (((s.to(tl.int32) + 126) << 23).to(tl.float32, bitcast=True))[:, :, None, None, None]
        return tl.permute(tl.reshape(v, [BLOCK_R, 4, G, 2, 2, 2]), 0, 1, 2, 5, 4, 3)
    c = ((s.to(tl.int32) + 126) << 7) * 0x10001                              # bf16x2 of 2^(s-1)
    c = tl.broadcast_to(c[:, :, None], [BLOCK_R, 4, G])
    p0, p1, p2, p3 = tl.inline_asm_elementwise(_DEQUANT_ASM, "=r,=r,=r,=r,r,r", [w, c],
                                               dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    return tl.join(tl.join(_bf16_halves(p0), _bf16_halves(p1)), tl.join(_bf16_halves(p2), _bf16_halves(p3)))


@triton.jit
def _tile_row(r):
    """The MMA tile row that load row ``r`` holds. The load puts rows 32b + 8w + a on register b,
    warp w, lane group a; Hopper's wgmma puts rows 64(b // 2) + 16w + 8(b % 2) + a there."""
    return (r // 64) * 64 + (r // 8 % 4) * 16 + (r // 32 % 2) * 8 + r % 8


@triton.jit
def _dot_chunk(w_ptr, s_ptr, x_ptr, groups_left, q, j, h, p1, acc,
               BLOCK_R: tl.constexpr, G: tl.constexpr, MASKED: tl.constexpr, INTERPRET: tl.constexpr):
    """acc += this chunk's G groups of the tile times x. Thread q of a row reads its words
    q*G .. q*G+G-1 (memory values 8m .. 8m+7 of word m); the dot's K index of value i + 4h of the
    thread's j-th word is 32j + 16(i // 2) + 8(i % 2) + 2q + h, which is where wgmma expects the
    halves of the dequantised words; x is permuted alike."""
    m = q[:, None] * G + j[None, :]                                      # word of the chunk [4, G]
    if MASKED:                                                           # the K tail: zeros
        ok = m < groups_left * 4
        w = tl.load(w_ptr, mask=ok[None, :, :], other=0)
        s = tl.load(s_ptr, mask=(q * G < groups_left * 4)[None, :], other=0)
        xw = tl.load(x_ptr, mask=ok[:, :, None, None], other=0)
    else:
        w = tl.load(w_ptr)                                               # [R, 4, G] words
        s = tl.load(s_ptr)                                               # [R, 4] scales
        xw = tl.load(x_ptr)                                              # [4, G, 2, 2] words of x
    a = tl.permute(_weight_values(w, s, BLOCK_R, G, INTERPRET), 0, 2, 5, 4, 1, 3)   # [R, j, i//2, i%2, q, h]
    a = tl.reshape(a, [BLOCK_R // 64, 2, 4, 8, G * 32])  # rows 64b' + 32b + 8w + a -> _tile_row
    a = tl.reshape(tl.permute(a, 0, 2, 1, 3, 4), [BLOCK_R, G * 32])
    x = _f32_halves(xw) if INTERPRET else _bf16_halves(xw)               # [q, j, h, i//2, i%2]
    x = tl.permute(x, 1, 3, 4, 0, 2)                                     # [j, i//2, i%2, q, h]
    x = tl.broadcast_to(tl.reshape(x, [G * 32, 1]), [G * 32, 16])
    if INTERPRET:                                        # its bf16 dot is garbage: exact fp32 values
        return tl.dot(a, x, acc, input_precision="ieee")
    return tl.dot(a, x, acc)


@triton.jit
def _mxfp4_dot_rows(W, S, XW, row0, n_rows, g_lo, g_hi, n_groups,
                    BLOCK_R: tl.constexpr, G: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 [BLOCK_R]: rows row0 .. row0+BLOCK_R-1 of one packed expert (codes W as int32 words
    [n_rows, n_groups*4], scales S [n_rows, n_groups]) times the bf16 activations at XW (int32
    words of two), over the groups g_lo .. g_hi-1. Rows past n_rows repeat the last (not stored)."""
    r = tl.arange(0, BLOCK_R)
    rows = tl.minimum(row0 + _tile_row(r), n_rows - 1).to(tl.int64)
    q = tl.arange(0, 4)
    j = tl.arange(0, G)
    h = tl.arange(0, 2)
    p1 = tl.arange(0, 2)
    w_ptr = W + rows[:, None, None] * (n_groups * 4) + (q * G)[None, :, None] + j[None, None, :]
    s_ptr = S + rows[:, None] * n_groups + (q * G // 4)[None, :]
    x_ptr = XW + ((q * G)[:, None, None, None] + j[None, :, None, None]) * 4 + (2 * h)[None, None, :, None] \
        + p1[None, None, None, :]
    acc = tl.zeros([BLOCK_R, 16], tl.float32)
    g_full = g_lo + (g_hi - g_lo) // G * G
    for g0 in range(g_lo, g_full, G):
        acc = _dot_chunk(w_ptr + g0 * 4, s_ptr + g0, x_ptr + g0 * 16, 0, q, j, h, p1, acc,
                         BLOCK_R, G, False, INTERPRET)
    if g_full < g_hi:
        acc = _dot_chunk(w_ptr + g_full * 4, s_ptr + g_full, x_ptr + g_full * 16, g_hi - g_full, q, j, h, p1,
                         acc, BLOCK_R, G, True, INTERPRET)
    n = tl.arange(0, 16)
    return tl.sum(tl.where(n[None, :] == 0, acc, 0.0), axis=1)            # every column is the same


# ---- the CUDA-core path (fp32, fp16) -----------------------------------------------------------
@triton.jit
def _fp4x2_to_f32(codes):
    """uint8 bytes of two E2M1 codes -> (low, high) float32 values, each times 2^-14: the code's
    bits go straight into an fp16's (sign to 15, e1 e0 to the lowest exponent bits, m to the top
    mantissa bit); e = 0 lands on fp16's subnormals, which the conversion keeps."""
    b = codes.to(tl.int16)
    lo = ((b & 0x07) << 9) | ((b & 0x08) << 12)
    hi = ((b & 0x70) << 5) | ((b & 0x80) << 8)
    return lo.to(tl.float16, bitcast=True).to(tl.float32), hi.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pairs(words, X_DTYPE: tl.constexpr):
    """Words of two activations each -> (even, odd) float32 (16-bit activations as int32 words,
    fp32 ones as int64, so one 16-byte load brings 8 or 4 of them)."""
    if X_DTYPE == tl.float32:
        even = words.to(tl.int32).to(tl.float32, bitcast=True)
        odd = (words >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        even = words.to(tl.int16).to(X_DTYPE, bitcast=True).to(tl.float32)
        odd = (words >> 16).to(tl.int16).to(X_DTYPE, bitcast=True).to(tl.float32)
    return even, odd


@triton.jit
def _mxfp4_fma_rows(W, S, XP, row0, n_rows, n_groups,
                    X_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """fp32 [BLOCK_R]: rows row0.. of one packed expert (codes W [n_rows, n_groups*16] bytes,
    scales S [n_rows, n_groups]) times the activations at XP (pairs, ``_pairs``), on the CUDA
    cores: a thread holds whole 16-byte groups, sums their 32 products in registers, applies the
    scale once per group as an exponent; the sum across threads happens once, after the loop."""
    rows = row0 + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, 16)
    n_bytes = n_groups * 16
    w_rows = W + rows[:, None, None].to(tl.int64) * n_bytes + j[None, None, :]   # [R, 1, 16]
    s_rows = S + rows[:, None].to(tl.int64) * n_groups                            # [R, 1]
    acc = tl.zeros([BLOCK_R, BLOCK_G], dtype=tl.float32)
    for g0 in range(0, n_groups, BLOCK_G):
        gg = g0 + g
        g_ok = gg < n_groups
        codes = tl.load(w_rows + (gg * 16)[None, :, None], mask=row_ok[:, None, None] & g_ok[None, :, None], other=0)
        scale = tl.load(s_rows + gg[None, :], mask=row_ok[:, None] & g_ok[None, :], other=0)
        words = tl.load(XP + (gg * 16)[:, None] + j[None, :], mask=g_ok[:, None], other=0)   # [G, 16]
        x_even, x_odd = _pairs(words, X_DTYPE)
        lo, hi = _fp4x2_to_f32(codes)                                                 # [R, G, 16]
        part = tl.sum(lo * x_even[None, :, :] + hi * x_odd[None, :, :], axis=2)       # [R, G]
        # E8M0 as an fp32 exponent field: 2^(s-127) exactly for s >= 1 (s = 0, 2^-127, becomes 0)
        acc += part * (scale.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    return tl.sum(acc, axis=1) * 16384.0                                              # undo the 2^-14


@triton.jit
def _expert_rows(W, S, XW, row0, n_rows, n_groups, split, n_splits,
                 X_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """Part ``split`` of ``n_splits`` (along K, whole dot iterations each) of a row block."""
    if DOT:
        per = tl.cdiv(tl.cdiv(n_groups, n_splits), _DOT_GROUPS) * _DOT_GROUPS
        g_lo = tl.minimum(split * per, n_groups)
        return _mxfp4_dot_rows(W, S, XW, row0, n_rows, g_lo, tl.minimum(g_lo + per, n_groups), n_groups,
                               BLOCK_R, _DOT_GROUPS, INTERPRET)
    return _mxfp4_fma_rows(W, S, XW, row0, n_rows, n_groups, X_DTYPE, BLOCK_R, 16 if BLOCK_R <= 32 else 8)


@triton.jit
def _rounded(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 -> dtype, to nearest even. The interpreter's own float32 -> bf16 truncates, which
    would bias every output of a bf16 test, so there the rounding is spelt out in integer ops."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@triton.jit
def _swiglu(gate, lin, limit):
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    return gate * tl.sigmoid(1.702 * gate) * (lin + 1.0)


# ---- the two launches --------------------------------------------------------------------------
@triton.jit
def _moe_gemv1(
    XW, Experts, W1, S1, B1, Part, A, Counter, F, n_groups, limit,
    TOP_K: tl.constexpr, X_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS: tl.constexpr,
    DOT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """A[pair, f] = swiglu(W1[e] x + b1[e]) for a block of BLOCK_R rows of W1, i.e. the gate and
    linear rows of BLOCK_R/2 outputs f (grid: row blocks x pairs x K parts, pair = token * k +
    slot). Each part stores its partial rows; the last part of the block to finish adds them in
    order, then the bias and the SwiGLU."""
    rb = tl.program_id(0)
    pair = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    e = tl.load(Experts + pair)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)                         # 2f (gate), 2f+1 (linear)
    per_row: tl.constexpr = 4 if DOT else 16                            # int32 words / bytes of a group
    h = _expert_rows(W1 + e * (2 * F) * (n_groups * per_row), S1 + e * (2 * F) * n_groups,
                     XW + (pair // TOP_K) * (n_groups * 16), rb * BLOCK_R, 2 * F, n_groups, split, SPLITS,
                     X_DTYPE, BLOCK_R, DOT, INTERPRET)
    if SPLITS > 1:
        part = Part + (pair * SPLITS + split) * (2 * F) + rows
        tl.store(part, h, mask=rows < 2 * F)
        counter = Counter + pair * tl.num_programs(0) + rb
        if arrive(counter, SPLITS):
            h = tl.zeros([BLOCK_R], dtype=tl.float32)
            for s in tl.static_range(SPLITS):
                h += tl.load(Part + (pair * SPLITS + s) * (2 * F) + rows, mask=rows < 2 * F, other=0.0,
                             cache_modifier=".cg")
            _gemv1_epilogue(h, e, pair, rb, B1, A, F, limit, BLOCK_R, INTERPRET)
            reset(counter)
    else:
        _gemv1_epilogue(h, e, pair, rb, B1, A, F, limit, BLOCK_R, INTERPRET)


@triton.jit
def _gemv1_epilogue(h, e, pair, rb, B1, A, F, limit, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    h += tl.load(B1 + e * 2 * F + rows, mask=rows < 2 * F, other=0.0).to(tl.float32)
    gate, lin = tl.split(tl.reshape(h, [BLOCK_R // 2, 2]))
    f = rb * (BLOCK_R // 2) + tl.arange(0, BLOCK_R // 2)
    tl.store(A + pair * F + f, _rounded(_swiglu(gate, lin, limit), A.dtype.element_ty, INTERPRET), mask=f < F)


@triton.jit
def _moe_gemv2(
    AW, Experts, Weights, W2, S2, B2, Part, Out, Counter, D, n_groups,
    TOP_K: tl.constexpr, X_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS: tl.constexpr,
    DOT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Part[pair, split, d] = (W2[e] A[pair])[d] over one K part, for a block of rows d (grid: row
    blocks x pairs x K parts). The last of a token's k * SPLITS programs of a block to finish
    writes Out[token, d] = sum over slots j (in order) of weight[j] * (its parts, in order, +
    b2[e_j])."""
    rb = tl.program_id(0)
    pair = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n = pair // TOP_K
    e = tl.load(Experts + pair)
    d = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    d_ok = d < D
    per_row: tl.constexpr = 4 if DOT else 16                            # int32 words / bytes of a group
    y = _expert_rows(W2 + e * D * (n_groups * per_row), S2 + e * D * n_groups, AW + pair * (n_groups * 16),
                     rb * BLOCK_R, D, n_groups, split, SPLITS, X_DTYPE, BLOCK_R, DOT, INTERPRET)
    tl.store(Part + (pair * SPLITS + split) * D + d, y, mask=d_ok)
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


# ---- host side ---------------------------------------------------------------------------------
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_SCALES_FIT: dict[int, tuple[int, bool]] = {}      # id(scales) -> (its version, fits)


def scales_fit(scales: torch.Tensor) -> bool:
    """Whether every E8M0 scale of ``scales`` is at most ``MAX_DOT_SCALE`` (the bf16 dot path is
    exact for those). Computed once per tensor and version (a device sync), remembered while the
    tensor lives; while a CUDA graph is being captured an unknown tensor counts as not fitting
    (no sync there: the engine's first, eager, step has seen its weights by then)."""
    known = _SCALES_FIT.get(id(scales))
    if known is not None and known[0] == scales._version:
        return known[1]
    if scales.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    fit = bool(scales.max() <= MAX_DOT_SCALE) if scales.numel() else True
    if known is None:
        weakref.finalize(scales, _SCALES_FIT.pop, id(scales), None)
    _SCALES_FIT[id(scales)] = (scales._version, fit)
    return fit


def _interpreted() -> bool:
    return isinstance(_moe_gemv1, InterpretedFunction)


def _words(t: torch.Tensor) -> torch.Tensor:
    """[.., n] activations -> [.., n/2] words of two (fp32: int64 words, else int32)."""
    return t.contiguous().view(torch.int64 if t.dtype == torch.float32 else torch.int32)


def gemv_moe(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
             w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias,
             top_k: int, swiglu_limit: float, out: torch.Tensor) -> torch.Tensor:
    """out [N, D] = the MoE of N <= DECODE_MAX_TOKENS tokens x [N, D] (routing given); two
    launches. bf16 weights whose scales do not fit (``scales_fit``) are the caller's to route
    elsewhere."""
    N, D = x.shape
    F = w1_blocks.shape[1] // 2
    P = N * top_k
    dot = x.dtype == torch.bfloat16
    flags = dict(TOP_K=top_k, X_DTYPE=_TL_DTYPES[x.dtype], DOT=dot, INTERPRET=_interpreted())
    if dot:                                  # codes as int32 words: [E, R, G, 16] bytes -> [E, R, G*4]
        w1, w2 = w1_blocks.view(torch.int32), w2_blocks.view(torch.int32)
        (r1, s1), (r2, s2), stages = GEMV1_DOT, GEMV2_DOT, DOT_STAGES
    else:
        w1, w2 = w1_blocks, w2_blocks
        (r1, s1), (r2, s2), stages = GEMV1_FMA, GEMV2_FMA, 3
    a = torch.empty(P, F, dtype=x.dtype, device=x.device)            # SwiGLU outputs, one row a pair
    rb1, rb2 = triton.cdiv(2 * F, r1), triton.cdiv(D, r2)
    part1 = torch.empty(P * s1 * 2 * F if s1 > 1 else 1, dtype=torch.float32, device=x.device)
    part2 = torch.empty(P * s2 * D, dtype=torch.float32, device=x.device)
    _moe_gemv1[(rb1, P, s1)](
        _words(x), experts, w1, w1_scales, w1_bias, part1, a, counters(x.device, P * rb1), F, D // 32,
        swiglu_limit, BLOCK_R=r1, SPLITS=s1, num_stages=stages, **flags)
    _moe_gemv2[(rb2, P, s2)](
        _words(a), experts, weights, w2, w2_scales, w2_bias, part2, out, counters(x.device, N * rb2), D,
        F // 32, BLOCK_R=r2, SPLITS=s2, num_stages=stages, **flags)
    return out
