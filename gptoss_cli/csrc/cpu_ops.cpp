// Fused MXFP4 mixture of experts for the CPU: gpt-oss's top-k MoE after the router.
//
// Why: the PyTorch reference dequantizes each chosen expert whole into float32 before its
// matmul, so a decode step writes and rereads ~8x the bytes the packed experts hold. Here the
// packed weights are read once: a tile of NR rows is decoded into a small float buffer (L1/L2),
// used for every token routed to that expert, and dropped. Decode (1-8 tokens) and prefill
// (hundreds) run the same code; with few tokens the tile decode is hidden under the memory
// reads, with many it is amortized over the tokens.
//
// Format (OCP Microscaling v1.0, MXFP4): blocks uint8 [E, rows, in/32, 16], two FP4 E2M1 codes
// a byte, low nibble first; scales uint8 [E, rows, in/32], E8M0, value 2^(s-127).
// Layout trick: a decoded block is stored de-interleaved, the 16 low-nibble values (even
// columns) then the 16 high-nibble values (odd columns); the activations are permuted the same
// way once per call, so every dot product is a straight run of 16-wide FMAs.
//
// Threads: a pool of sleeping workers (see Pool) runs each parallel phase: phase 1
// splits W1's output rows (gate/linear pairs) of every used expert, phase 2 splits W2's output
// rows, each thread summing all experts into its own rows of the output (no races, and the
// experts are added in ascending id order, as the reference does).
//
// C ABI (loaded with ctypes): gptoss_moe(...) below; returns 0, or a negative code on bad input.

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "bf16.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#if defined(__AVX512BF16__)
#define GPTOSS_SIMD "avx512, avx512_bf16"
#else
#define GPTOSS_SIMD "avx512"
#endif
#else
#define GPTOSS_SIMD "scalar"
#endif

namespace {

constexpr int NR = 4;   // weight rows per tile
constexpr int NT = 4;   // tokens per micro-kernel call
constexpr int PREFETCH = 4096;  // bytes ahead in each weight row: loads wait on memory otherwise
                                // (measured: 12 -> 7 ms for a 20b decode MoE on one core)
const float FP4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                       -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

struct Scales {
    float v[256];      // 2^(s-127)
    float half[256];   // 2^(s-128)
    Scales() {
        for (int s = 0; s < 256; ++s) {
            v[s] = std::ldexp(1.0f, s - 127);
            half[s] = std::ldexp(1.0f, s - 128);
        }
    }
};
const Scales E8M0;

// One row of G blocks -> G*32 floats, de-interleaved per block (even columns, then odd).
// The codes go through a byte table of twice their values (all integers, -12..12: one cheap
// in-lane shuffle for 16 codes) and are widened and scaled by 2^(s-127)/2, exactly. This keeps
// the wide cross-lane shuffles, the bottleneck of a decode step on Zen 4, to two per block.
inline void decode_row(const uint8_t* blocks, const uint8_t* scales, int64_t G, float* out) {
#if defined(__AVX512F__)
    const __m128i twice = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i nib = _mm_set1_epi8(15);
    for (int64_t g = 0; g < G; ++g) {
        if ((g & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(blocks + 16 * g + PREFETCH), _MM_HINT_T0);
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + 16 * g));
        __m128i lo = _mm_shuffle_epi8(twice, _mm_and_si128(b, nib));
        __m128i hi = _mm_shuffle_epi8(twice, _mm_and_si128(_mm_srli_epi16(b, 4), nib));
        __m512 s = _mm512_set1_ps(E8M0.half[scales[g]]);
        _mm512_storeu_ps(out + 32 * g, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), s));
        _mm512_storeu_ps(out + 32 * g + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), s));
    }
#else
    for (int64_t g = 0; g < G; ++g) {
        float s = E8M0.v[scales[g]];
        for (int j = 0; j < 16; ++j) {
            uint8_t b = blocks[16 * g + j];
            out[32 * g + j] = FP4[b & 15] * s;
            out[32 * g + 16 + j] = FP4[b >> 4] * s;
        }
    }
#endif
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {   // 16 bf16 -> float32 (exact: the top halves)
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

// 16 float32 -> bf16 as to_bf16 rounds them (nearest even, by integer adds on all lanes at once)
inline __m256i round16_bf16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i up = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd);
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(up, 16));
}
#endif

// out[t][r] = dot(x[t], w[r]) over K (a multiple of 16), for T <= NT tokens and R <= NR rows;
// w float32 (a decoded tile) or bf16 (a weight read in place), rows K apart.
template <int T, int R, class W>
inline void micro(const float* const* x, const W* w, int64_t K, float out[NT][NR]) {
#if defined(__AVX512F__)
    __m512 acc[T][R];
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        if (std::is_same<W, uint16_t>::value && (k & 31) == 0)   // weights read in place: stream ahead
            for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + PREFETCH, _MM_HINT_T0);
        __m512 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = load16(w + r * K + k);
        for (int t = 0; t < T; ++t) {
            __m512 xv = _mm512_loadu_ps(x[t] + k);
            for (int r = 0; r < R; ++r) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
        }
    }
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
#else
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; ++k) s += x[t][k] * widen(w[r * K + k]);
            out[t][r] = s;
        }
#endif
}

// fn(std::integral_constant<int, N>{}) for the N = min(max(n, 1), Max) known at compile time:
// the micro-kernels are instantiated per tile size so their accumulators stay in registers.
template <int Max, int N = 1, class Fn>
inline void up_to(int n, Fn fn) {
    if constexpr (N == Max) fn(std::integral_constant<int, N>{});
    else if (n <= N) fn(std::integral_constant<int, N>{});
    else up_to<Max, N + 1>(n, fn);
}

template <class W>
inline void dots(int T, int R, const float* const* x, const W* w, int64_t K, float out[NT][NR]) {
    up_to<NT>(T, [&](auto t) { up_to<NR>(R, [&](auto r) { micro<t(), r()>(x, w, K, out); }); });
}

#if defined(__AVX512F__)
// Block g of a row, decoded into registers: the even columns (lo) and the odd ones (hi).
inline void decode_block(const uint8_t* blocks, const uint8_t* scales, int64_t g, __m512& lo, __m512& hi) {
    const __m128i twice = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i nib = _mm_set1_epi8(15);
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + 16 * g));
    __m512 s = _mm512_set1_ps(E8M0.half[scales[g]]);
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_shuffle_epi8(twice, _mm_and_si128(b, nib)))), s);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_shuffle_epi8(twice, _mm_and_si128(_mm_srli_epi16(b, 4), nib)))), s);
}
#endif

// The same dot products as ``dots`` straight from the packed rows (rows ``stride`` bytes of
// blocks and stride/16 scales apart), decoded in registers: for one or two tokens, where a
// decoded tile would cost more cache traffic than the multiply (a decode step).
template <int T, int R>
inline void packed_dots(const float* const* x, const uint8_t* blocks, const uint8_t* scales,
                        int64_t G, float out[NT][NR]) {
#if defined(__AVX512F__)
    __m512 acc[T][R];
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        if ((g & 3) == 0)
            for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(blocks + r * G * 16 + 16 * g + PREFETCH), _MM_HINT_T0);
        for (int r = 0; r < R; ++r) {
            __m512 lo, hi;
            decode_block(blocks + r * G * 16, scales + r * G, g, lo, hi);
            for (int t = 0; t < T; ++t) {
                acc[t][r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x[t] + 32 * g), acc[t][r]);
                acc[t][r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x[t] + 32 * g + 16), acc[t][r]);
            }
        }
    }
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
#else
    std::vector<float> row(size_t(G * 32));
    for (int r = 0; r < R; ++r) {
        decode_row(blocks + r * G * 16, scales + r * G, G, row.data());
        for (int t = 0; t < T; ++t) {
            float s = 0.0f;
            for (int64_t k = 0; k < G * 32; ++k) s += x[t][k] * row[k];
            out[t][r] = s;
        }
    }
#endif
}

// The bf16 decode dots (below) take their activations in "group" order: per group of 4 blocks
// (128 columns), 4 runs of 32 bf16 words, run m holding, for block j of the group, 8 columns
// of the byte order the FP4 codes come in (m 0: the low nibbles of bytes 0-7, i.e. columns
// 0, 2, .., 14; m 1: bytes 8-15; m 2 and 3: the high nibbles, odd columns), block j at words
// 8j..8j+7. Rows are padded with zeros to whole groups.
inline int64_t grouped(int64_t c) {
    const int64_t b = c >> 5, i = c & 31, byte = i >> 1;
    return (b >> 2) * 128 + ((i & 1) * 2 + (byte >> 3)) * 32 + (b & 3) * 8 + (byte & 7);
}
inline int64_t grouped_len(int64_t K) { return (K / 32 + 3) / 4 * 128; }

#if defined(__AVX512BF16__)
// bf16 activations (a decode step with --dtype bfloat16): 4 blocks (64 bytes, 128 codes) at a
// time, the codes of each nibble become the high and the low bytes of their bf16 values by two
// in-lane byte shuffles (every FP4 value is exact in bf16), interleaved into words by two
// unpacks; 4 vdpbf16ps then sum 128 products with each 128-bit lane holding one block, so one
// multiply by the 4 blocks' scales (E8M0 -> float by a shift into the exponent) finishes them.
// About 6 wide operations per block, against 12 for a word permute per block: the float32
// path and the permute were bound by those operations, not by memory. Products are exact; only
// the summation order differs.
template <int T, int R>
inline void packed_dots_bf16(const uint16_t* const* x, const uint8_t* blocks, const uint8_t* scales,
                             int64_t G, float out[NT][NR]) {
    const __m512i nib = _mm512_set1_epi8(15);
    const __m512i hi_bytes = _mm512_broadcast_i32x4(_mm_setr_epi8(
        0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, char(0x80), char(0xBF), char(0xBF), char(0xBF),
        char(0xC0), char(0xC0), char(0xC0), char(0xC0)));
    const __m512i lo_bytes = _mm512_broadcast_i32x4(_mm_setr_epi8(
        0x00, 0x00, char(0x80), char(0xC0), 0x00, 0x40, char(0x80), char(0xC0),
        0x00, 0x00, char(0x80), char(0xC0), 0x00, 0x40, char(0x80), char(0xC0)));
    // 128-bit lane j takes scale byte j into each of its 4 dwords (zero-extended)
    const __m512i spread = _mm512_set_epi32(
        0x80808003, 0x80808003, 0x80808003, 0x80808003, 0x80808002, 0x80808002, 0x80808002, 0x80808002,
        0x80808001, 0x80808001, 0x80808001, 0x80808001, 0x80808000, 0x80808000, 0x80808000, 0x80808000);
    __m512 acc[T][R];
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 4) {
        const int64_t n = std::min<int64_t>(4, G - g);
        for (int r = 0; r < R; ++r) {
            const uint8_t* bp = blocks + r * G * 16 + 16 * g;
            const uint8_t* sp = scales + r * G + g;
            _mm_prefetch(reinterpret_cast<const char*>(bp) + 2 * R * G * 16, _MM_HINT_T0);
            __m512i b;
            __m128i s4;
            if (n == 4) {
                b = _mm512_loadu_si512(bp);
                int32_t four;
                std::memcpy(&four, sp, 4);
                s4 = _mm_cvtsi32_si128(four);
            } else {   // the last, partial group: the missing blocks read as zeros
                b = _mm512_maskz_loadu_epi8((__mmask64(1) << (16 * n)) - 1, bp);
                s4 = _mm_maskz_loadu_epi8(__mmask16((1u << n) - 1), sp);
            }
            const __m512i lo = _mm512_and_si512(b, nib);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
            const __m512i lo_l = _mm512_shuffle_epi8(lo_bytes, lo), lo_h = _mm512_shuffle_epi8(hi_bytes, lo);
            const __m512i hi_l = _mm512_shuffle_epi8(lo_bytes, hi), hi_h = _mm512_shuffle_epi8(hi_bytes, hi);
            const __m512i w0 = _mm512_unpacklo_epi8(lo_l, lo_h), w1 = _mm512_unpackhi_epi8(lo_l, lo_h);
            const __m512i w2 = _mm512_unpacklo_epi8(hi_l, hi_h), w3 = _mm512_unpackhi_epi8(hi_l, hi_h);
            const __m512 sv = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_shuffle_epi8(_mm512_broadcast_i32x4(s4), spread), 23));
            for (int t = 0; t < T; ++t) {
                const uint16_t* xg = x[t] + g * 32;
                __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xg));
                d = _mm512_dpbf16_ps(d, (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xg + 32));
                d = _mm512_dpbf16_ps(d, (__m512bh)w2, (__m512bh)_mm512_loadu_si512(xg + 64));
                d = _mm512_dpbf16_ps(d, (__m512bh)w3, (__m512bh)_mm512_loadu_si512(xg + 96));
                acc[t][r] = _mm512_fmadd_ps(d, sv, acc[t][r]);
            }
        }
    }
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
}
#endif

#if defined(__AVX512BF16__)
// out[t][r] = dot(x[t], w[r]) over K (a multiple of 32), both bf16, read in place: one
// vdpbf16ps per 32 products, no widening (the bf16 projections of a decode step).
template <int T, int R>
inline void bf16_dots(const uint16_t* const* x, const uint16_t* w, int64_t K, float out[NT][NR]) {
    __m512 acc[T][R];
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512i wv[R];
        for (int r = 0; r < R; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + PREFETCH, _MM_HINT_T0);
            wv[r] = _mm512_loadu_si512(w + r * K + k);
        }
        for (int t = 0; t < T; ++t) {
            __m512i xv = _mm512_loadu_si512(x[t] + k);
            for (int r = 0; r < R; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], (__m512bh)wv[r], (__m512bh)xv);
        }
    }
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
}
#endif

#if defined(__AVX512F__)
// The 16 horizontal sums of a[0..15] in one vector, lane i = sum of a[i]: pairs of vectors fold
// into one by 128-bit chunk shuffles, then within chunks, 4 levels of (2 shuffles, 1 add) and a
// final permute. 46 instructions where 16 separate reductions take ~130; at a small K (64 in
// the tiny model) the reductions, not the dot products, were most of a multi-row projection.
inline __m512 sum16(const __m512* a) {
    __m512 l1[8], l2[4], l3[2];
    for (int i = 0; i < 8; ++i)    // chunks [a0+a2, a1+a3 | b0+b2, b1+b3]: 8 lanes each of a, b
        l1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                              _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)    // one chunk (4 lanes) for each of 4 vectors
        l2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(l1[2 * i], l1[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(l1[2 * i], l1[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)    // 2 lanes of a chunk for each vector
        l3[i] = _mm512_add_ps(_mm512_shuffle_ps(l2[2 * i], l2[2 * i + 1], 0x88),
                              _mm512_shuffle_ps(l2[2 * i], l2[2 * i + 1], 0xDD));
    // lane 4c + l now holds the sum of a[4l + c]
    const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(l3[0], l3[1], 0x88), _mm512_shuffle_ps(l3[0], l3[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, s);
}
#endif

#if defined(__AVX512BF16__)
// A whole NT x NR tile of bf16_dots, its sums stored as 4 rows of 4 outputs: y[t * ldy + r] =
// dot(x[t], w[r]) + bias[r] (bias may be null), float32 into yf or, when yb, rounded to bf16 as
// to_bf16 does (round16_bf16) into yb.
inline void bf16_tile(const uint16_t* const* x, const uint16_t* w, int64_t K, const uint16_t* bias,
                      float* yf, uint16_t* yb, int64_t ldy) {
    static_assert(NT == 4 && NR == 4, "sum16 folds a 4 x 4 tile");
    __m512 acc[NT * NR];
    for (int i = 0; i < NT * NR; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512i wv[NR];
        for (int r = 0; r < NR; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + PREFETCH, _MM_HINT_T0);
            wv[r] = _mm512_loadu_si512(w + r * K + k);
        }
        for (int t = 0; t < NT; ++t) {
            const __m512i xv = _mm512_loadu_si512(x[t] + k);
            for (int r = 0; r < NR; ++r)
                acc[t * NR + r] = _mm512_dpbf16_ps(acc[t * NR + r], (__m512bh)wv[r], (__m512bh)xv);
        }
    }
    __m512 sums = sum16(acc);                                  // lane t * NR + r
    if (bias) {
        alignas(64) float b[16];
        for (int i = 0; i < 16; ++i) b[i] = widen(bias[i % NR]);
        sums = _mm512_add_ps(sums, _mm512_load_ps(b));
    }
    if (yb) {
        alignas(32) uint16_t out[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(out), round16_bf16(sums));
        for (int t = 0; t < NT; ++t) std::memcpy(yb + t * ldy, out + t * NR, NR * sizeof(uint16_t));
    } else {
        alignas(64) float out[16];
        _mm512_store_ps(out, sums);
        for (int t = 0; t < NT; ++t) std::memcpy(yf + t * ldy, out + t * NR, NR * sizeof(float));
    }
}
#endif

#if defined(__AVX512BF16__)
// Rows of 16 dwords: r[i] lane j <- r[j] lane i (4 levels of unpacks and 128-bit shuffles).
inline void transpose16(__m512i* r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    // r[4q + m] now holds, in each 128-bit chunk c, rows 4q..4q+3 of column 4c + m
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);        // chunks 0, 2 of each
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);    // chunks 1, 3
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);        // column i
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);    // column i + 8
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
    }
}

constexpr int64_t NARROW_K = 256;   // at most this K, 4+ tokens: bf16_narrow

// 16 weight rows of a narrow projection (K <= NARROW_K) for M tokens, the outputs in the lanes:
// the block is transposed in registers into K/2 vectors of (k, k + 1) pairs, one lane a row, and
// each token's pair is broadcast into one vdpbf16ps per pair. At a small K the 4 x 4 tiles spend
// as much on folding their 16 lanes as on the products (the tiny model's 201088 x 64
// unembedding at 8 tokens: 1.9 ms against 0.44 for one); here no sum is folded at all.
inline void bf16_narrow(const uint16_t* x, int64_t M, const uint16_t* w, int64_t K, const uint16_t* bias,
                        float* yf, uint16_t* yb, int64_t ldy) {
    alignas(64) __m512i wt[NARROW_K / 2];
    const int64_t pairs = K / 2;                               // a multiple of 16
    for (int64_t c = 0; c < pairs; c += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i)
            r[i] = _mm512_loadu_si512(reinterpret_cast<const uint32_t*>(w + i * K) + c);
        transpose16(r);
        for (int j = 0; j < 16; ++j) wt[c + j] = r[j];
    }
    const __m512 b = bias ? load16(bias) : _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < M; t0 += 8)   // 8 tokens at a time: each pair vector loaded once for them
        up_to<8>(int(std::min<int64_t>(8, M - t0)), [&](auto T) {
            __m512 acc[T()];
            const uint32_t* xt[T()];
            for (int t = 0; t < T(); ++t) {
                acc[t] = b;
                xt[t] = reinterpret_cast<const uint32_t*>(x + (t0 + t) * K);
            }
            for (int64_t p = 0; p < pairs; ++p) {
                const __m512bh wp = (__m512bh)wt[p];
                for (int t = 0; t < T(); ++t)
                    acc[t] = _mm512_dpbf16_ps(acc[t], wp, (__m512bh)_mm512_set1_epi32(int(xt[t][p])));
            }
            for (int t = 0; t < T(); ++t) {
                const int64_t o = (t0 + t) * ldy;
                if (yb) {
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(yb + o), round16_bf16(acc[t]));
                } else {
                    _mm512_storeu_ps(yf + o, acc[t]);
                }
            }
        });
}
#endif

#if defined(__AVX512BF16__)
// dot(x, w) over K (a multiple of 32) for one bf16 row read in place, with 4 accumulators: a
// decode step's projections read row after row, one sequential stream (prefetched ahead),
// which streams faster than interleaving several rows (measured 34-58 against 22-35 GB/s for
// the 1.16 GB unembedding of gpt-oss-20b on 2 threads of this machine's shared EPYC).
inline float bf16_row_dot(const uint16_t* x, const uint16_t* w, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        for (int j = 0; j < 4; ++j)
            _mm_prefetch(reinterpret_cast<const char*>(w + k) + PREFETCH + 64 * j, _MM_HINT_T0);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + k + 64), (__m512bh)_mm512_loadu_si512(x + k + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + k + 96), (__m512bh)_mm512_loadu_si512(x + k + 96));
    }
    for (; k < K; k += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#endif


// out[t][r] for T tokens and R rows of a packed expert matrix: in registers for T <= 2 (from
// the bf16 copies ``xb`` when given and the CPU has AVX512-BF16), else through a decoded tile
// (``tile``, R rows of K floats) shared by all T tokens.
inline void expert_dots(int T, int R, const float* const* x, const uint16_t* const* xb, const uint8_t* blocks,
                        const uint8_t* scales, int64_t G, float* tile, bool tile_ready, float out[NT][NR]) {
    const bool packed = T == 1 || (T == 2 && !tile_ready);
#if defined(__AVX512BF16__)
    if (xb && packed)
        return up_to<NR>(R, [&](auto r) {
            if (T == 1) packed_dots_bf16<1, r()>(xb, blocks, scales, G, out);
            else packed_dots_bf16<2, r()>(xb, blocks, scales, G, out);
        });
#else
    (void)xb;
#endif
    if (packed)
        return up_to<NR>(R, [&](auto r) {
            if (T == 1) packed_dots<1, r()>(x, blocks, scales, G, out);
            else packed_dots<2, r()>(x, blocks, scales, G, out);
        });
    dots(T, R, x, tile, G * 32, out);
}

// Position of column c in the de-interleaved order of its 32-wide block.
inline int64_t permuted(int64_t c) { return (c & ~int64_t(31)) + ((c & 31) >> 1) + ((c & 1) << 4); }

inline float bias_at(const void* bias, int bf16, int64_t i) {
    return bf16 ? widen(static_cast<const uint16_t*>(bias)[i]) : static_cast<const float*>(bias)[i];
}

// A thread costs tens of microseconds to start (more on a busy machine): only for work that
// amortizes it.
constexpr int64_t MIN_WORK_PER_THREAD = int64_t(1) << 20;   // multiply-adds
inline int threads_for(int asked, int64_t work) {
    return int(std::max<int64_t>(1, std::min<int64_t>(asked, work / MIN_WORK_PER_THREAD)));
}

// Worker threads kept between calls, asleep on a condition variable when there is no work (so
// nothing spins on a shared machine): starting and joining a thread per parallel phase cost
// about 45 us each here, ~100 times a 24-layer decode step. One parallel() runs at a time (a
// second caller waits). After a fork the child starts a fresh pool (the parent's threads do not
// exist there; the old pool is left behind, not destroyed).
//
// A phase is cut into PARTS_PER_THREAD parts per thread, claimed one at a time from a shared
// counter by the caller and by the workers that are running. On a machine that another process
// also uses, a woken worker may not get a core for a whole time slice (milliseconds); with a
// fixed share per thread the phase waited for it (issue 26: 4-26x slower than one thread).
// Here the caller takes the parts nobody has started, and waits only for parts in progress.
constexpr int PARTS_PER_THREAD = 4;

class Pool {
  public:
    // fn(part) for every part in [0, parts), on the caller and up to n - 1 workers.
    void run(int n, int parts, const std::function<void(int)>& fn) {
        std::lock_guard<std::mutex> one_call(call_mu_);
        uint32_t gen;
        {
            std::lock_guard<std::mutex> lock(mu_);
            while (int(workers_.size()) < n - 1) {
                const int id = int(workers_.size()) + 1;
                workers_.emplace_back([this, id] { work(id); });
            }
            job_ = &fn;
            parts_ = parts;
            helpers_ = n - 1;
            gen = uint32_t(++generation_);
            done_.store(0);
            claim_.store(uint64_t(gen) << 32);
        }
        wake_.notify_all();
        drain(gen, parts, fn);
        std::unique_lock<std::mutex> lock(mu_);
        finished_.wait(lock, [&] { return done_.load() == parts; });
        job_ = nullptr;
    }

  private:
    // Claim and run parts of job ``gen`` until none is left. A part is claimed before the job is
    // touched, so a worker that wakes after the job ended (its generation is gone) touches nothing.
    void drain(uint32_t gen, int parts, const std::function<void(int)>& fn) {
        uint64_t cur = claim_.load();
        while (uint32_t(cur >> 32) == gen && int(uint32_t(cur)) < parts) {
            if (!claim_.compare_exchange_weak(cur, cur + 1)) continue;   // cur reloaded
            fn(int(uint32_t(cur)));
            if (done_.fetch_add(1) + 1 == parts) {
                std::lock_guard<std::mutex> lock(mu_);
                finished_.notify_one();
            }
            cur = claim_.load();
        }
    }

    void work(int id) {
        int64_t seen = 0;
        std::unique_lock<std::mutex> lock(mu_);
        for (;;) {
            wake_.wait(lock, [&] { return generation_ != seen; });
            seen = generation_;
            if (id > helpers_ || job_ == nullptr) continue;   // a job with fewer threads, or over
            const std::function<void(int)>* job = job_;
            const int parts = parts_;
            lock.unlock();
            drain(uint32_t(seen), parts, *job);
            lock.lock();
        }
    }

    std::mutex call_mu_, mu_;
    std::condition_variable wake_, finished_;
    std::vector<std::thread> workers_;
    const std::function<void(int)>* job_ = nullptr;
    int parts_ = 0, helpers_ = 0;
    int64_t generation_ = 0;
    std::atomic<uint64_t> claim_{0};   // generation << 32 | next part to claim
    std::atomic<int> done_{0};         // parts finished in the current job
};

Pool* the_pool = nullptr;   // made at first use, never destroyed (its threads may be waiting)
std::once_flag pool_once;

void forget_pool_after_fork() { the_pool = new Pool(); }

Pool& pool() {
    std::call_once(pool_once, [] {
        the_pool = new Pool();
        pthread_atfork(nullptr, nullptr, forget_pool_after_fork);
    });
    return *the_pool;
}

// fn(part, parts) for each part of a phase, on up to n_threads threads; ``max_parts`` caps the
// parts where the work has fewer natural items. fn must write only what its part owns.
template <class Fn>
void parallel(int n_threads, Fn fn, int64_t max_parts = int64_t(1) << 30) {
    if (n_threads <= 1) return fn(0, 1);
    const int parts = int(std::max<int64_t>(1, std::min<int64_t>(max_parts, int64_t(n_threads) * PARTS_PER_THREAD)));
    pool().run(n_threads, parts, std::function<void(int)>([&](int part) { fn(part, parts); }));
}

// A per-thread scratch buffer of at least n elements, kept between calls (a phase runs several
// parts on each thread; allocating per part would fault fresh pages in each time).
template <class T, int Tag>
T* scratch(size_t n) {
    thread_local std::vector<T> buf;
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

struct Expert {
    int64_t id;
    std::vector<int64_t> tokens;   // token index per routed slot
    std::vector<float> weights;    // router weight per routed slot
    float* act;                    // [n, F] SwiGLU outputs, de-interleaved along F
};

}  // namespace

extern "C" {

const char* gptoss_moe_simd() { return GPTOSS_SIMD; }

// x [N, D] float32; experts [N, k] int64 and weights [N, k] float32 (the router's top-k);
// w1 blocks/scales [E, 2F, D/32, 16|.], bias [E, 2F]; w2 blocks/scales [E, D, F/32, 16|.],
// bias [E, D] (biases float32, or bf16 when bias_bf16); out [N, D] float32, overwritten.
// bf16_dots: x holds bf16 values, and a decode step may multiply in bf16 (see packed_dots_bf16).
int gptoss_moe(const float* x, int64_t N, int64_t D, int64_t F, int64_t E,
               const int64_t* experts, const float* weights, int64_t k,
               const uint8_t* w1_blocks, const uint8_t* w1_scales, const void* w1_bias,
               const uint8_t* w2_blocks, const uint8_t* w2_scales, const void* w2_bias,
               int bias_bf16, float limit, float* out, int n_threads, int bf16_dots) {
    if (N < 0 || D <= 0 || F <= 0 || D % 32 || F % 32 || k <= 0) return -1;
    n_threads = threads_for(n_threads, N * k * 3 * D * F);
    const int64_t GD = D / 32, GF = F / 32;

    // group the routed slots by expert, ascending id
    std::vector<int64_t> slot_of(E, -1);
    std::vector<Expert> used;
    for (int64_t e = 0; e < E; ++e) {
        bool any = false;
        for (int64_t i = 0; i < N * k && !any; ++i) any = experts[i] == e;
        if (any) used.push_back(Expert{e, {}, {}, nullptr});
    }
    for (size_t u = 0; u < used.size(); ++u) slot_of[used[u].id] = int64_t(u);
    for (int64_t i = 0; i < N * k; ++i) {
        int64_t e = experts[i];
        if (e < 0 || e >= E) return -2;
        used[slot_of[e]].tokens.push_back(i / k);
        used[slot_of[e]].weights.push_back(weights[i]);
    }
    int64_t slots = 0;
    for (auto& ex : used) slots += int64_t(ex.tokens.size());
    std::vector<float> act(size_t(slots * F));
    std::vector<float> xp(size_t(N * D));   // x, de-interleaved per 32-wide block
    for (int64_t t = 0; t < N; ++t)
        for (int64_t c = 0; c < D; ++c) xp[t * D + permuted(c)] = x[t * D + c];
    float* next = act.data();
    for (auto& ex : used) { ex.act = next; next += ex.tokens.size() * F; }
    // bf16 copies for the bf16 decode dots (x is bf16 already there: exact)
    const int64_t LD = grouped_len(D), LF = grouped_len(F);
    std::vector<uint16_t> xpb(bf16_dots ? size_t(N * LD) : 0), actb(bf16_dots ? size_t(slots * LF) : 0);
    if (bf16_dots)
        for (int64_t t = 0; t < N; ++t)
            for (int64_t c = 0; c < D; ++c) xpb[t * LD + grouped(c)] = to_bf16(x[t * D + c]);

    // phase 1: h = W1 x + b1 on pairs of rows (gate 2f, linear 2f+1), a = SwiGLU(h)
    parallel(n_threads, [&](int part, int parts) {
        const int64_t p0 = F * part / parts, p1 = F * (part + 1) / parts;
        float* tile = scratch<float, 1>(size_t(NR * D));
        float h[NT][NR];
        const float* xs[NT];
        const uint16_t* xbs[NT];
        for (const auto& ex : used) {
            const int64_t n = int64_t(ex.tokens.size());
            const uint8_t* blk = w1_blocks + ex.id * 2 * F * GD * 16;
            const uint8_t* scl = w1_scales + ex.id * 2 * F * GD;
            for (int64_t p = p0; p < p1; p += NR / 2) {
                const int R = int(std::min<int64_t>(NR / 2, p1 - p)) * 2;
                const uint8_t* rb = blk + 2 * p * GD * 16;
                const uint8_t* rs = scl + 2 * p * GD;
                const bool tiled = n > 2;
                if (tiled)
                    for (int r = 0; r < R; ++r) decode_row(rb + r * GD * 16, rs + r * GD, GD, tile + r * D);
                for (int64_t t0 = 0; t0 < n; t0 += NT) {
                    const int T = int(std::min<int64_t>(NT, n - t0));
                    for (int t = 0; t < T; ++t) {
                        xs[t] = xp.data() + ex.tokens[t0 + t] * D;
                        if (bf16_dots) xbs[t] = xpb.data() + ex.tokens[t0 + t] * LD;
                    }
                    expert_dots(T, R, xs, bf16_dots ? xbs : nullptr, rb, rs, GD, tile, tiled, h);
                    for (int t = 0; t < T; ++t)
                        for (int r = 0; r < R; r += 2) {
                            const int64_t f = p + r / 2;
                            float g = h[t][r] + bias_at(w1_bias, bias_bf16, ex.id * 2 * F + 2 * f);
                            float l = h[t][r + 1] + bias_at(w1_bias, bias_bf16, ex.id * 2 * F + 2 * f + 1);
                            g = std::min(g, limit);
                            l = std::min(std::max(l, -limit), limit);
                            const float glu = g / (1.0f + std::exp(-1.702f * g));
                            ex.act[(t0 + t) * F + permuted(f)] = glu * (l + 1.0f);
                        }
                }
            }
        }
    });

    // phase 2: out[tok] = sum over experts of weight * (W2 a + b2), rows split over threads
    if (bf16_dots)
        for (int64_t s = 0; s < slots; ++s)
            for (int64_t f = 0; f < F; ++f) actb[s * LF + grouped(f)] = to_bf16(act[s * F + permuted(f)]);
    std::fill(out, out + N * D, 0.0f);
    parallel(n_threads, [&](int part, int parts) {
        const int64_t r0 = D * part / parts, r1 = D * (part + 1) / parts;
        float* tile = scratch<float, 2>(size_t(NR * F));
        float y[NT][NR];
        const float* as[NT];
        const uint16_t* abs_[NT];
        for (int64_t row = r0; row < r1; row += NR) {
            const int R = int(std::min<int64_t>(NR, r1 - row));
            for (const auto& ex : used) {
                const int64_t n = int64_t(ex.tokens.size());
                const uint8_t* rb = w2_blocks + (ex.id * D + row) * GF * 16;
                const uint8_t* rs = w2_scales + (ex.id * D + row) * GF;
                const bool tiled = n > 2;
                if (tiled)
                    for (int r = 0; r < R; ++r) decode_row(rb + r * GF * 16, rs + r * GF, GF, tile + r * F);
                for (int64_t t0 = 0; t0 < n; t0 += NT) {
                    const int T = int(std::min<int64_t>(NT, n - t0));
                    for (int t = 0; t < T; ++t) {
                        as[t] = ex.act + (t0 + t) * F;
                        if (bf16_dots) abs_[t] = actb.data() + ((ex.act - act.data()) / F + t0 + t) * LF;
                    }
                    expert_dots(T, R, as, bf16_dots ? abs_ : nullptr, rb, rs, GF, tile, tiled, y);
                    for (int t = 0; t < T; ++t)
                        for (int r = 0; r < R; ++r) {
                            const float b = bias_at(w2_bias, bias_bf16, ex.id * D + row + r);
                            out[ex.tokens[t0 + t] * D + row + r] += (y[t][r] + b) * ex.weights[t0 + t];
                        }
                }
            }
        }
    });
    return 0;
}

// y [M, O] = x [M, K] @ w [O, K]^T + bias [O] (bias may be null), x, w, bias bf16, K a
// multiple of 16; y float32, or bf16 (rounded to nearest even) when y_bf16. For the few rows of a
// decode step, where PyTorch's bf16 matmul on CPU reads its weight at a fraction of the memory
// bandwidth: rows of w are split over threads, each read once and widened to float32 in
// registers. Rounding here saves a pass over y (0.6 ms for 8 rows of the 201,088 logits).
int gptoss_linear_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t O,
                       const uint16_t* bias, void* y_out, int y_bf16, int n_threads) {
    if (M <= 0 || K <= 0 || K % 16 || O <= 0) return -1;
    float* yf = static_cast<float*>(y_out);
    uint16_t* yb = static_cast<uint16_t*>(y_out);
    auto put = [&](int64_t i, float v) {
        if (y_bf16) yb[i] = to_bf16(v);
        else yf[i] = v;
    };
    n_threads = threads_for(n_threads, M * O * K);
    std::vector<float> xf(size_t(M * K));
    for (int64_t i = 0; i < M * K; ++i) xf[i] = widen(x[i]);
#if defined(__AVX512BF16__)
    const bool native_bf16 = K % 32 == 0;
#else
    const bool native_bf16 = false;
#endif
    parallel(n_threads, [&](int part, int parts) {
        const int64_t r0 = O * part / parts, r1 = O * (part + 1) / parts;
        float acc[NT][NR];
        const float* xs[NT];
        const uint16_t* xbs[NT];
#if defined(__AVX512BF16__)
        if (native_bf16 && M == 1) {
            for (int64_t row = r0; row < r1; ++row)
                put(row, bf16_row_dot(x, w + row * K, K) + (bias ? widen(bias[row]) : 0.0f));
            return;
        }
#endif
        int64_t row = r0;
#if defined(__AVX512BF16__)
        if (native_bf16 && K <= NARROW_K && M >= 4)
            for (; row + 16 <= r1; row += 16)
                bf16_narrow(x, M, w + row * K, K, bias ? bias + row : nullptr, y_bf16 ? nullptr : yf + row,
                            y_bf16 ? yb + row : nullptr, O);
#endif
        for (; row < r1; row += NR) {
            const int R = int(std::min<int64_t>(NR, r1 - row));
            for (int64_t t0 = 0; t0 < M; t0 += NT) {
                const int T = int(std::min<int64_t>(NT, M - t0));
                for (int t = 0; t < T; ++t) {
                    xs[t] = xf.data() + (t0 + t) * K;
                    xbs[t] = x + (t0 + t) * K;
                }
#if defined(__AVX512BF16__)
                if (native_bf16 && T == NT && R == NR) {   // a whole tile: its sums folded together
                    const int64_t y0 = t0 * O + row;
                    bf16_tile(xbs, w + row * K, K, bias ? bias + row : nullptr, y_bf16 ? nullptr : yf + y0,
                              y_bf16 ? yb + y0 : nullptr, O);
                    continue;
                }
                if (native_bf16)   // one vdpbf16ps per 32 products, any number of tokens
                    up_to<NR>(R, [&](auto r) {
                        up_to<NT>(T, [&](auto t) { bf16_dots<t(), r()>(xbs, w + row * K, K, acc); });
                    });
                else
#endif
                dots(T, R, xs, w + row * K, K, acc);
                for (int t = 0; t < T; ++t)
                    for (int r = 0; r < R; ++r)
                        put((t0 + t) * O + row + r, acc[t][r] + (bias ? widen(bias[row + r]) : 0.0f));
            }
        }
    });
    return 0;
}

// y [M, O] float32 = x [M, K] @ w [O, K]^T + bias [O] (bias may be null), all float32: a batched
// decode step's projections in float32. PyTorch's sgemm for 2-16 rows read its weight 2-3x
// slower than its one-row gemv (8 rows of a 2880-wide, 50,000-row weight: 84 ms against 32 ms
// for one row, 2 cores), which undid batching, and its gemv streams one row at 18 GB/s. Here 4
// weight rows at a time are read once for every 4 tokens (fused multiply-adds, 16 sums folded
// together); a partial tile repeats its first token or row and keeps only what is real: one
// row in 19.5 ms where the gemv took 31.7. Returns -2 without AVX-512 (PyTorch then).
int gptoss_linear_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t O, const float* bias,
                      float* y, int n_threads) {
    if (M <= 0 || K <= 0 || O <= 0) return -1;
#if defined(__AVX512F__)
    n_threads = threads_for(n_threads, M * O * K);
    parallel(n_threads, [&](int part, int parts) {
        const int64_t r0 = O * part / parts, r1 = O * (part + 1) / parts;
        const __mmask16 tail = __mmask16((1u << (K % 16)) - 1);
        for (int64_t row = r0; row < r1; row += NR) {
            const int R = int(std::min<int64_t>(NR, r1 - row));
            const float* ws[NR];
            for (int r = 0; r < NR; ++r) ws[r] = w + (row + (r < R ? r : 0)) * K;
            for (int64_t t0 = 0; t0 < M; t0 += NT) {
                const int T = int(std::min<int64_t>(NT, M - t0));
                const float* xs[NT];
                for (int t = 0; t < NT; ++t) xs[t] = x + (t0 + (t < T ? t : 0)) * K;
                __m512 acc[NT * NR];
                for (int i = 0; i < NT * NR; ++i) acc[i] = _mm512_setzero_ps();
                int64_t k = 0;
                for (; k + 16 <= K; k += 16) {
                    __m512 wv[NR];
                    for (int r = 0; r < NR; ++r) {
                        _mm_prefetch(reinterpret_cast<const char*>(ws[r] + k) + PREFETCH, _MM_HINT_T0);
                        wv[r] = _mm512_loadu_ps(ws[r] + k);
                    }
                    for (int t = 0; t < NT; ++t) {
                        const __m512 xv = _mm512_loadu_ps(xs[t] + k);
                        for (int r = 0; r < NR; ++r) acc[t * NR + r] = _mm512_fmadd_ps(wv[r], xv, acc[t * NR + r]);
                    }
                }
                if (k < K) {
                    __m512 wv[NR];
                    for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_ps(tail, ws[r] + k);
                    for (int t = 0; t < NT; ++t) {
                        const __m512 xv = _mm512_maskz_loadu_ps(tail, xs[t] + k);
                        for (int r = 0; r < NR; ++r) acc[t * NR + r] = _mm512_fmadd_ps(wv[r], xv, acc[t * NR + r]);
                    }
                }
                alignas(64) float out[16];
                _mm512_store_ps(out, sum16(acc));               // lane t * NR + r
                for (int t = 0; t < T; ++t)
                    for (int r = 0; r < R; ++r)
                        y[(t0 + t) * O + row + r] = out[t * NR + r] + (bias ? bias[row + r] : 0.0f);
            }
        }
    });
    return 0;
#else
    (void)x; (void)w; (void)bias; (void)y; (void)n_threads;
    return -2;
#endif
}

// out[r] = the index of the largest of x[r, 0..n) (float32 rows, contiguous), torch.argmax's
// answer: the first of equal maxima, and the first NaN if there is one (NaN counts as the
// largest). A batch's greedy tokens: PyTorch's argmax took 0.7 ms over 8 rows of the 201,088
// logits, about 9 GB/s; this reads them at the memory's rate (16 lanes, each keeping its own
// first maximum, then the lowest index among the lanes that hold the row's maximum).
int gptoss_argmax_rows(const float* x, int64_t rows, int64_t n, int64_t* out, int n_threads) {
    if (rows <= 0 || n <= 0) return -1;
    parallel(threads_for(n_threads, rows * n), [&](int part, int parts) {
        for (int64_t r = rows * part / parts; r < rows * (part + 1) / parts; ++r) {
            const float* v = x + r * n;
            int64_t i = 0, best = 0;
            bool nan = false;
#if defined(__AVX512F__)
            if (n >= 16) {
                __m512 mv = _mm512_loadu_ps(v);
                __m512i mi = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                __m512i idx = mi;
                const __m512i step = _mm512_set1_epi32(16);
                __mmask16 unordered = _mm512_cmp_ps_mask(mv, mv, _CMP_UNORD_Q);
                for (i = 16; i + 16 <= n; i += 16) {
                    const __m512 c = _mm512_loadu_ps(v + i);
                    idx = _mm512_add_epi32(idx, step);
                    const __mmask16 gt = _mm512_cmp_ps_mask(c, mv, _CMP_GT_OQ);   // strictly: the first stays
                    mv = _mm512_mask_mov_ps(mv, gt, c);
                    mi = _mm512_mask_mov_epi32(mi, gt, idx);
                    unordered |= _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q);
                }
                if (unordered) {
                    nan = true;
                } else {
                    alignas(64) float mval[16];
                    alignas(64) int32_t mind[16];
                    _mm512_store_ps(mval, mv);
                    _mm512_store_si512(mind, mi);
                    best = mind[0];
                    for (int l = 1; l < 16; ++l)
                        if (mval[l] > v[best] || (mval[l] == v[best] && mind[l] < best)) best = mind[l];
                }
            }
#endif
            if (nan || i == 0) {                  // from the start: scalar, NaN-aware
                best = 0;
                for (int64_t j = 0; j < n; ++j) {
                    if (std::isnan(v[j])) { best = j; nan = true; break; }
                    if (v[j] > v[best]) best = j;
                }
                if (nan) { out[r] = best; continue; }
                i = n;
            }
            for (; i < n; ++i) {                  // the tail after the vector loop
                if (std::isnan(v[i])) { best = i; break; }
                if (v[i] > v[best]) best = i;
            }
            out[r] = best;
        }
    }, rows);
    return 0;
}

}  // extern "C"

// Attention for a few query rows (a decode step): ``ops.attention`` on CPU, same semantics.
//
// Why: the PyTorch reference costs ~1 ms per layer per decode step at gpt-oss-20b shapes, almost
// all of it op overhead on tiny tensors. Here one work item is one query token and the G = H/K
// query heads sharing a kv head: each allowed key and value row is read once for all G heads.
// Two passes in float32: scores of the allowed slots (a query at p sees k_pos in
// [p-window+1, p], window 0: [0, p]; k_pos < 0 is an empty slot), then the softmax with the
// sink as one more logit (it takes mass, adds no value), normalized, and sum_s p_s v_s.
// AVX-512 when d_head is a multiple of 16, scalar loops otherwise. Threads split the work items
// (batch, kv head, token) only when the work amortizes starting them (``threads_for``).
namespace {

struct AttnCall {
    const void* q;
    const void* k;
    const void* v;
    const int64_t* st;     // element strides: q (b, t, h), k (b, s, h), v (b, s, h); last dims 1
    int64_t B, T, H, S, K, dh;
    const float* sinks;
    const int64_t* q_pos;
    const int64_t* k_pos;
    int64_t window;
    float scale;
    int keys_by_position;  // slot n holds position n or one past every query: scan only [lo, p]
    void* out;             // [B, T, H, dh] contiguous, float32 or bf16
    // attention_rows (B = 1, T = N tokens): token t reads cache row rows[t] (k, v batch strides),
    // k_pos a [rows, S] table (row rows[t]), or null: slot s holds position s. Null: attention.
    const int64_t* rows = nullptr;
};

struct AttnScratch {
    std::vector<int64_t> slots;   // allowed slots of the current query
    std::vector<float> q;         // [G, dh] scaled query rows
    std::vector<float> p;         // [G, S] scores, then probabilities
    std::vector<float> o;         // [G, dh] outputs
};

#if defined(__AVX512F__)
// e^x for 16 lanes (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor polynomial,
// ~1e-7 relative); x <= 0 here (scores minus their max), clamped so that -inf gives 0.
inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 e = _mm512_set1_ps(1.0f / 720);
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 120));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 24));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 6));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(e, n);
}

// p[g][j] = dot(q[g], k row slots[j]) for GB heads; each key row loaded once for all of them.
template <int GB, class KV>
inline void qk_rows(const float* q, int64_t dh, const KV* k, int64_t ks, const int64_t* slots, int64_t n,
                    float* p, int64_t ps) {
    for (int64_t j = 0; j < n; ++j) {
        const KV* kr = k + slots[j] * ks;
        __m512 acc[GB];
        for (int g = 0; g < GB; ++g) acc[g] = _mm512_setzero_ps();
        for (int64_t c = 0; c < dh; c += 16) {
            const __m512 kv = load16(kr + c);
            for (int g = 0; g < GB; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * dh + c), kv, acc[g]);
        }
        for (int g = 0; g < GB; ++g) p[g * ps + j] = _mm512_reduce_add_ps(acc[g]);
    }
}

// o[g][0:16*CB] = sum_j p[g][j] v row slots[j] (from column 0 of ``v``), GB heads x CB chunks
// held in registers.
template <int GB, int CB, class KV>
inline void pv_rows(const float* p, int64_t ps, const KV* v, int64_t vs, const int64_t* slots, int64_t n,
                    float* o, int64_t dh) {
    __m512 acc[GB][CB];
    for (int g = 0; g < GB; ++g)
        for (int c = 0; c < CB; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
        const KV* vr = v + slots[j] * vs;
        __m512 vv[CB];
        for (int c = 0; c < CB; ++c) vv[c] = load16(vr + 16 * c);
        for (int g = 0; g < GB; ++g) {
            const __m512 pj = _mm512_set1_ps(p[g * ps + j]);
            for (int c = 0; c < CB; ++c) acc[g][c] = _mm512_fmadd_ps(pj, vv[c], acc[g][c]);
        }
    }
    for (int g = 0; g < GB; ++g)
        for (int c = 0; c < CB; ++c) _mm512_storeu_ps(o + g * dh + 16 * c, acc[g][c]);
}

// One softmax row in place over p[0:n] with the sink logit: p_j <- e^(p_j - m) / (sum + e^(sink - m)).
inline void softmax_row(float* p, int64_t n, float sink) {
    __m512 mv = _mm512_set1_ps(sink);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
        mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(_mm512_set1_ps(sink), m, p + j));
    }
    const float mx = _mm512_reduce_max_ps(mv);
    const __m512 mxv = _mm512_set1_ps(mx);
    __m512 sv = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + j), mxv));
        sv = _mm512_mask_add_ps(sv, m, sv, e);
        _mm512_mask_storeu_ps(p + j, m, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / (_mm512_reduce_add_ps(sv) + std::exp(sink - mx)));
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
        _mm512_mask_storeu_ps(p + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + j), inv));
    }
}
#endif

inline void softmax_row_scalar(float* p, int64_t n, float sink) {
    float mx = sink;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, p[j]);
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
    const float inv = 1.0f / (sum + std::exp(sink - mx));
    for (int64_t j = 0; j < n; ++j) p[j] *= inv;
}

// One work item: query token t of batch b, the G heads of kv head kh.
template <class X>
void attend_item(const AttnCall& a, int64_t b, int64_t kh, int64_t t, AttnScratch& w) {
    const int64_t G = a.H / a.K, dh = a.dh, S = a.S;
    const int64_t* st = a.st;
    const X* q = static_cast<const X*>(a.q) + b * st[0] + t * st[1] + kh * G * st[2];
    const int64_t bk = a.rows ? a.rows[t] : b;    // the batch row of the keys and values
    const X* k = static_cast<const X*>(a.k) + bk * st[3] + kh * st[5];
    const X* v = static_cast<const X*>(a.v) + bk * st[6] + kh * st[8];
    const int64_t* k_pos = a.k_pos ? a.k_pos + (a.rows ? bk * S : 0) : nullptr;   // null: slot s at s
    const int64_t pos = a.q_pos[t];
    const int64_t first = a.window > 0 ? pos - a.window + 1 : 0;
    int64_t lo = 0, hi = S;                       // slots scanned
    if (a.keys_by_position) {
        lo = std::max<int64_t>(0, first);
        hi = std::max<int64_t>(lo, std::min<int64_t>(S, pos + 1));
    }
    int64_t n = 0;
    for (int64_t s = lo; s < hi; ++s) {
        const int64_t kp = k_pos ? k_pos[s] : s;
        if (kp >= 0 && kp <= pos && kp >= first) w.slots[n++] = s;
    }
    for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < dh; ++d) w.q[g * dh + d] = widen(q[g * st[2] + d]) * a.scale;
    float* p = w.p.data();
    const int64_t* slots = w.slots.data();
#if defined(__AVX512F__)
    const bool vec = dh % 16 == 0;
#else
    const bool vec = false;
#endif
    if (vec) {
#if defined(__AVX512F__)
        for (int64_t g0 = 0; g0 < G; g0 += 8)
            up_to<8>(int(std::min<int64_t>(8, G - g0)), [&](auto gb) {
                qk_rows<gb()>(w.q.data() + g0 * dh, dh, k, st[4], slots, n, p + g0 * S, S);
            });
        for (int64_t g = 0; g < G; ++g) softmax_row(p + g * S, n, a.sinks[kh * G + g]);
        for (int64_t g0 = 0; g0 < G; g0 += 4)
            for (int64_t c0 = 0; c0 < dh; c0 += 64)
                up_to<4>(int(std::min<int64_t>(4, G - g0)), [&](auto gb) {
                    up_to<4>(int(std::min<int64_t>(4, (dh - c0) / 16)), [&](auto cb) {
                        pv_rows<gb(), cb()>(p + g0 * S, S, v + c0, st[7], slots, n, w.o.data() + g0 * dh + c0, dh);
                    });
                });
#endif
    } else {
        for (int64_t g = 0; g < G; ++g) {
            float* pg = p + g * S;
            for (int64_t j = 0; j < n; ++j) {
                const X* kr = k + slots[j] * st[4];
                float s = 0.0f;
                for (int64_t d = 0; d < dh; ++d) s += w.q[g * dh + d] * widen(kr[d]);
                pg[j] = s;
            }
            softmax_row_scalar(pg, n, a.sinks[kh * G + g]);
            float* og = w.o.data() + g * dh;
            std::fill(og, og + dh, 0.0f);
            for (int64_t j = 0; j < n; ++j) {
                const X* vr = v + slots[j] * st[7];
                for (int64_t d = 0; d < dh; ++d) og[d] += pg[j] * widen(vr[d]);
            }
        }
    }
    const int64_t base = ((b * a.T + t) * a.H + kh * G) * dh;   // out [B, T, H, dh]
    for (int64_t i = 0; i < G * dh; ++i) {
        if (std::is_same<X, float>::value) static_cast<float*>(a.out)[base + i] = w.o[i];
        else static_cast<uint16_t*>(a.out)[base + i] = to_bf16(w.o[i]);
    }
}

template <class X>
void attend_all(const AttnCall& a, int n_threads) {
    const int64_t G = a.H / a.K, items = a.B * a.K * a.T;
    const int64_t keys = a.window > 0 ? std::min(a.S, a.window) : a.S;
    n_threads = int(std::min<int64_t>(threads_for(n_threads, a.B * a.T * a.H * keys * a.dh * 2), items));
    parallel(n_threads, [&](int part, int parts) {
        thread_local AttnScratch w;
        w.slots.resize(size_t(a.S));
        w.q.resize(size_t(G * a.dh));
        w.p.resize(size_t(G * a.S));
        w.o.resize(size_t(G * a.dh));
        for (int64_t i = items * part / parts; i < items * (part + 1) / parts; ++i) {
            if (a.rows)   // i = t K + kh: a token's kv heads one after another, so the lines of its
                          // cache rows that one head's item brings in (prefetch) serve the next
                attend_item<X>(a, 0, i % a.K, i / a.K, w);
            else
                attend_item<X>(a, i / (a.K * a.T), i / a.T % a.K, i % a.T, w);   // i = (b K + kh) T + t
        }
    }, items);
}

}  // namespace

extern "C" {

// q [B, T, H, dh], k, v [B, S, K, dh] (float32, or bf16 when bf16), strides in elements
// (strides[9]: q b/t/h, k b/s/h, v b/s/h; the last dim of each is contiguous); sinks [H]
// float32, q_pos [T], k_pos [S] int64; out [B, T, H, dh] contiguous, in the inputs' dtype.
int gptoss_attention(const void* q, const void* k, const void* v, const int64_t* strides,
                     int64_t B, int64_t T, int64_t H, int64_t S, int64_t K, int64_t dh,
                     const float* sinks, const int64_t* q_pos, const int64_t* k_pos,
                     int64_t window, float scale, int keys_by_position, void* out, int bf16, int n_threads) {
    if (B < 0 || T < 0 || S < 0 || H <= 0 || K <= 0 || dh <= 0 || H % K || window < 0) return -1;
    if (B == 0 || T == 0) return 0;
    const AttnCall a{q, k, v, strides, B, T, H, S, K, dh, sinks, q_pos, k_pos, window, scale, keys_by_position, out};
    if (bf16) attend_all<uint16_t>(a, n_threads);
    else attend_all<float>(a, n_threads);
    return 0;
}

// ``ops.attention_rows``: q [N, H, dh] (strides[0..1]: token, head), k, v caches [B, S, K, dh]
// (strides[2..7]: k row/slot/head, v row/slot/head); rows, pos [N] int64; k_pos [B, S] int64
// contiguous (a ring's table) or null (full cache: slot s holds s, slots past pos not read);
// out [N, H, dh] contiguous. Work items: (kv head, token), each reading its own row's keys once
// for the G heads that share them; split over the threads as for ``gptoss_attention``.
int gptoss_attention_rows(const void* q, const void* k, const void* v, const int64_t* strides,
                          int64_t N, int64_t H, int64_t B, int64_t S, int64_t K, int64_t dh,
                          const float* sinks, const int64_t* rows, const int64_t* pos, const int64_t* k_pos,
                          int64_t window, float scale, void* out, int bf16, int n_threads) {
    if (N < 0 || B <= 0 || S < 0 || H <= 0 || K <= 0 || dh <= 0 || H % K || window < 0) return -1;
    for (int64_t n = 0; n < N; ++n)
        if (rows[n] < 0 || rows[n] >= B || pos[n] < 0) return -2;
    if (N == 0 || S == 0) {
        if (N) std::memset(out, 0, size_t(N * H * dh) * (bf16 ? 2 : 4));   // only the sink: output 0
        return 0;
    }
    const int64_t st[9] = {0, strides[0], strides[1], strides[2], strides[3], strides[4],
                           strides[5], strides[6], strides[7]};
    AttnCall a{q, k, v, st, 1, N, H, S, K, dh, sinks, pos, k_pos, window, scale, k_pos == nullptr, out};
    a.rows = rows;
    if (bf16) attend_all<uint16_t>(a, n_threads);
    else attend_all<float>(a, n_threads);
    return 0;
}

}  // extern "C"
