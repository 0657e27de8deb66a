// The small per-layer ops of a decode step on the CPU: RoPE with the kv-cache store, and the
// residual add + RMSNorm (+ the MoE router), in one call each.
//
// Why: at a decode step their PyTorch references (``ops.rope_store``, ``ops.add_rmsnorm``,
// ``ops.add_rmsnorm_route``) are about 60 tiny tensor ops per layer (~0.9 ms at gpt-oss-20b
// shapes, nearly all per-op overhead); the arithmetic is a few thousand elements. One thread,
// plain loops: the data fits in L1/L2 and a thread start would cost more than the work.
//
// Same arithmetic as the references, in the same order, so that results agree to the last bit
// where they can: float32 throughout, rounded to the activation dtype where the reference
// rounds (a bias added in the dtype, x + delta, the router logits of F.linear), and no fused
// multiply-adds (PyTorch rounds each product). Sums are accumulated in another order than
// PyTorch's, so a norm or a logit may differ in its last float32 bit.
//
// C ABI (loaded with ctypes, built with cpu_ops.cpp into one library): gptoss_rope_store,
// gptoss_rope_store_rows and gptoss_add_rmsnorm below; 0, or a negative code on bad input.

#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "bf16.h"

namespace {



// f rounded to X (float: itself; bf16: to nearest even), as bits and as a float.
inline void store(float* p, float f) { *p = f; }
inline void store(uint16_t* p, float f) { *p = to_bf16(f); }
template <class X> inline float round_to(float f) {
    X r;
    store(&r, f);
    return widen(r);
}

constexpr int64_t MAX_DH = 1024;

// One head of dh values at x (+ bias, rounded to X first) rotated by c, s [dh/2] into out.
template <class X>
inline void rotate(const X* x, const X* bias, const float* c, const float* s, int64_t dh, X* out) {
    float f[MAX_DH];
    for (int64_t i = 0; i < dh; ++i) f[i] = bias ? round_to<X>(widen(x[i]) + widen(bias[i])) : widen(x[i]);
    const int64_t h = dh / 2;
    for (int64_t i = 0; i < h; ++i) {
        store(out + i, f[i] * c[i] - f[i + h] * s[i]);
        store(out + i + h, f[i + h] * c[i] + f[i] * s[i]);
    }
}

template <class X>
void rope_store(const X* q, const X* k, const X* v, const int64_t* st, int64_t B, int64_t T, int64_t H,
                int64_t K, int64_t dh, const float* cos, const float* sin, const int64_t* pos,
                const int64_t* slots, X* kc, X* vc, const X* bias, X* q_out) {
    const X* bq = bias;
    const X* bk = bias ? bias + H * dh : nullptr;
    const X* bv = bias ? bias + (H + K) * dh : nullptr;
    const int64_t h = dh / 2;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
            const float* c = cos + pos[t] * h;
            const float* s = sin + pos[t] * h;
            for (int64_t i = 0; i < H; ++i)
                rotate(q + b * st[0] + t * st[1] + i * st[2], bq ? bq + i * dh : nullptr, c, s, dh,
                       q_out + ((b * T + t) * H + i) * dh);
            for (int64_t j = 0; j < K; ++j) {
                rotate(k + b * st[3] + t * st[4] + j * st[5], bk ? bk + j * dh : nullptr, c, s, dh,
                       kc + b * st[9] + slots[t] * st[10] + j * st[11]);
                const X* vr = v + b * st[6] + t * st[7] + j * st[8];
                X* out = vc + b * st[12] + slots[t] * st[13] + j * st[14];
                for (int64_t d = 0; d < dh; ++d)
                    store(out + d, bv ? widen(vr[d]) + widen(bv[j * dh + d]) : widen(vr[d]));
            }
        }
}

// ``rope_store`` for N sequences, one token each: token n's k, v go to cache row rows[n], slot
// slots[n]. st: q, k, v by token/head (6), k_cache, v_cache by row/slot/head (6).
template <class X>
void rope_store_rows(const X* q, const X* k, const X* v, const int64_t* st, int64_t N, int64_t H, int64_t K,
                     int64_t dh, const float* cos, const float* sin, const int64_t* rows, const int64_t* pos,
                     const int64_t* slots, X* kc, X* vc, const X* bias, X* q_out) {
    const X* bq = bias;
    const X* bk = bias ? bias + H * dh : nullptr;
    const X* bv = bias ? bias + (H + K) * dh : nullptr;
    const int64_t h = dh / 2;
    for (int64_t n = 0; n < N; ++n) {
        const float* c = cos + pos[n] * h;
        const float* s = sin + pos[n] * h;
        for (int64_t i = 0; i < H; ++i)
            rotate(q + n * st[0] + i * st[1], bq ? bq + i * dh : nullptr, c, s, dh, q_out + (n * H + i) * dh);
        for (int64_t j = 0; j < K; ++j) {
            rotate(k + n * st[2] + j * st[3], bk ? bk + j * dh : nullptr, c, s, dh,
                   kc + rows[n] * st[6] + slots[n] * st[7] + j * st[8]);
            const X* vr = v + n * st[4] + j * st[5];
            X* out = vc + rows[n] * st[9] + slots[n] * st[10] + j * st[11];
            for (int64_t d = 0; d < dh; ++d)
                store(out + d, bv ? widen(vr[d]) + widen(bv[j * dh + d]) : widen(vr[d]));
        }
    }
}

// dot(a, b) over n in float32, 16 partial sums (vectorized by the compiler without -ffast-math).
template <class X>
inline float dot(const X* a, const X* b, int64_t n) {
    float acc[16] = {};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; ++j) acc[j] += widen(a[i + j]) * widen(b[i + j]);
    float sum = 0.0f;
    for (int j = 0; j < 16; ++j) sum += acc[j];
    for (; i < n; ++i) sum += widen(a[i]) * widen(b[i]);
    return sum;
}

// experts[0..k) = the top k of logits[0..E) as torch.topk(sorted=True) on CPU chooses them, ties
// included: its own algorithm (aten/src/ATen/native/TopKImpl.h), std::partial_sort when
// k * 64 <= E, else std::nth_element at k-1 and std::sort of the first k-1, with its comparator
// (NaN first). Equal logits then come out in the order these std algorithms leave them (not by
// index: measured, the higher index first for 8 or 32 experts), and the same experts are chosen.
using Scored = std::pair<float, int64_t>;
inline void top_k_like_torch(const float* logits, int64_t E, int64_t k, std::vector<Scored>& queue, int64_t* experts) {
    queue.resize(size_t(E));
    for (int64_t e = 0; e < E; ++e) queue[size_t(e)] = {logits[e], e};
    auto greater = [](const Scored& x, const Scored& y) {
        return (std::isnan(x.first) && !std::isnan(y.first)) || x.first > y.first;
    };
    if (k * 64 <= E) {
        std::partial_sort(queue.begin(), queue.begin() + k, queue.end(), greater);
    } else {
        std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), greater);
        std::sort(queue.begin(), queue.begin() + k - 1, greater);
    }
    for (int64_t j = 0; j < k; ++j) experts[j] = queue[size_t(j)].second;
}

// Rows of D: x_out = x + (delta + delta_bias) (each add rounded to X), h = rmsnorm(x_out) * scale;
// delta null: h = rmsnorm(x) (x_out unused). router_w given: the top_k of the logits
// round_X(h . router_w[e] + router_b[e]) (chosen as torch.topk does), descending, and their softmax.
template <class X>
void add_rmsnorm(const X* x, const X* delta, const X* delta_bias, int64_t N, int64_t D, const float* scale,
                 float eps, X* x_out, X* h_out, const X* router_w, const X* router_b, int64_t E,
                 int64_t top_k, float* weights, int64_t* experts, float* logits) {
    std::vector<Scored> queue;
    for (int64_t n = 0; n < N; ++n) {
        const X* xr = x + n * D;
        X* hr = h_out + n * D;
        const X* xs = xr;
        if (delta) {
            X* xo = x_out + n * D;
            const X* dr = delta + n * D;
            for (int64_t i = 0; i < D; ++i) {
                const float d = delta_bias ? round_to<X>(widen(dr[i]) + widen(delta_bias[i])) : widen(dr[i]);
                store(xo + i, widen(xr[i]) + d);
            }
            xs = xo;
        }
        double ssq = 0.0;
        for (int64_t i = 0; i < D; ++i) {
            const float f = widen(xs[i]);
            ssq += double(f * f);
        }
        const float r = 1.0f / std::sqrt(float(ssq / double(D)) + eps);
        for (int64_t i = 0; i < D; ++i) store(hr + i, (widen(xs[i]) * r) * scale[i]);
        if (!router_w) continue;
        for (int64_t e = 0; e < E; ++e) logits[e] = round_to<X>(dot(hr, router_w + e * D, D) + widen(router_b[e]));
        float* w = weights + n * top_k;
        int64_t* ex = experts + n * top_k;
        top_k_like_torch(logits, E, top_k, queue, ex);
        for (int64_t j = 0; j < top_k; ++j) w[j] = logits[ex[j]];
        const float mx = w[0];
        float sum = 0.0f;
        for (int64_t j = 0; j < top_k; ++j) sum += (w[j] = std::exp(w[j] - mx));
        for (int64_t j = 0; j < top_k; ++j) w[j] /= sum;
    }
}

}  // namespace

extern "C" {

// q [B, T, H, dh], k, v [B, T, K, dh] (float32, or bf16 when bf16), k_cache, v_cache [B, S, K, dh];
// strides[15] in elements: q, k, v by b/t/head, k_cache, v_cache by b/slot/head (last dims
// contiguous). cos, sin [P, dh/2] float32; pos [T]; slots [T] (null: ring, slot pos mod S and
// ring_pos[slot] = pos); bias [H*dh + 2*K*dh] or null; q_out [B, T, H, dh] contiguous.
int gptoss_rope_store(const void* q, const void* k, const void* v, const int64_t* strides,
                      int64_t B, int64_t T, int64_t H, int64_t K, int64_t dh, int64_t S, int64_t P,
                      const float* cos, const float* sin, const int64_t* pos, const int64_t* slots,
                      int64_t* ring_pos, void* k_cache, void* v_cache, const void* bias, void* q_out, int bf16) {
    if (B < 0 || T < 0 || T > 64 || H <= 0 || K <= 0 || dh <= 0 || dh % 2 || dh > MAX_DH || S <= 0) return -1;
    int64_t ring_slots[64];
    for (int64_t t = 0; t < T; ++t) {
        if (pos[t] < 0 || pos[t] >= P) return -2;
        if (!slots) ring_slots[t] = pos[t] % S;
        else if (slots[t] < 0 || slots[t] >= S) return -3;
    }
    if (!slots) {
        for (int64_t t = 0; t < T; ++t) ring_pos[ring_slots[t]] = pos[t];
        slots = ring_slots;
    }
    if (bf16)
        rope_store(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v),
                   strides, B, T, H, K, dh, cos, sin, pos, slots, static_cast<uint16_t*>(k_cache),
                   static_cast<uint16_t*>(v_cache), static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(q_out));
    else
        rope_store(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v),
                   strides, B, T, H, K, dh, cos, sin, pos, slots, static_cast<float*>(k_cache),
                   static_cast<float*>(v_cache), static_cast<const float*>(bias), static_cast<float*>(q_out));
    return 0;
}

// ``ops.rope_store_rows``: q [N, H, dh], k, v [N, K, dh] (float32, or bf16 when bf16), k_cache,
// v_cache [B, S, K, dh]; strides[12] in elements: q, k, v by token/head, k_cache, v_cache by
// row/slot/head (last dims contiguous). cos, sin [P, dh/2] float32; rows, pos [N] int64;
// ring_pos [B, S] int64 contiguous (a ring: slot pos mod S, ring_pos[row, slot] = pos) or null
// (full: slot pos, which must be < S); bias [H*dh + 2*K*dh] or null; q_out [N, H, dh] contiguous.
// One thread: at 64 tokens of gpt-oss-20b it is ~1 MB of activations, tens of microseconds.
int gptoss_rope_store_rows(const void* q, const void* k, const void* v, const int64_t* strides,
                           int64_t N, int64_t H, int64_t K, int64_t dh, int64_t B, int64_t S, int64_t P,
                           const float* cos, const float* sin, const int64_t* rows, const int64_t* pos,
                           int64_t* ring_pos, void* k_cache, void* v_cache, const void* bias, void* q_out, int bf16) {
    if (N < 0 || H <= 0 || K <= 0 || dh <= 0 || dh % 2 || dh > MAX_DH || B <= 0 || S <= 0) return -1;
    std::vector<int64_t> slots(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) {
        if (pos[n] < 0 || pos[n] >= P) return -2;
        if (rows[n] < 0 || rows[n] >= B) return -3;
        slots[size_t(n)] = ring_pos ? pos[n] % S : pos[n];
        if (slots[size_t(n)] >= S) return -4;
    }
    if (ring_pos)
        for (int64_t n = 0; n < N; ++n) ring_pos[rows[n] * S + slots[size_t(n)]] = pos[n];
    if (bf16)
        rope_store_rows(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k),
                        static_cast<const uint16_t*>(v), strides, N, H, K, dh, cos, sin, rows, pos, slots.data(),
                        static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache),
                        static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(q_out));
    else
        rope_store_rows(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v),
                        strides, N, H, K, dh, cos, sin, rows, pos, slots.data(), static_cast<float*>(k_cache),
                        static_cast<float*>(v_cache), static_cast<const float*>(bias), static_cast<float*>(q_out));
    return 0;
}

// x, delta [N, D] contiguous (float32, or bf16 when bf16), delta_bias [D] or null, scale [D]
// float32; x_out, h_out [N, D]. delta null: RMSNorm of x alone. router_w [E, D], router_b [E]
// in x's dtype, or null (no routing); weights [N, top_k] float32, experts [N, top_k] int64.
int gptoss_add_rmsnorm(const void* x, const void* delta, const void* delta_bias, int64_t N, int64_t D,
                       const float* scale, float eps, void* x_out, void* h_out, const void* router_w,
                       const void* router_b, int64_t E, int64_t top_k, float* weights, int64_t* experts, int bf16) {
    if (N < 0 || D <= 0 || (router_w && (E <= 0 || E > 4096 || top_k <= 0 || top_k > E))) return -1;
    float logits[4096];
    if (bf16)
        add_rmsnorm(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(delta),
                    static_cast<const uint16_t*>(delta_bias), N, D, scale, eps, static_cast<uint16_t*>(x_out),
                    static_cast<uint16_t*>(h_out), static_cast<const uint16_t*>(router_w),
                    static_cast<const uint16_t*>(router_b), E, top_k, weights, experts, logits);
    else
        add_rmsnorm(static_cast<const float*>(x), static_cast<const float*>(delta),
                    static_cast<const float*>(delta_bias), N, D, scale, eps, static_cast<float*>(x_out),
                    static_cast<float*>(h_out), static_cast<const float*>(router_w),
                    static_cast<const float*>(router_b), E, top_k, weights, experts, logits);
    return 0;
}

}  // extern "C"
