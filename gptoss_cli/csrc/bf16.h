// bfloat16 <-> float32 for the native CPU ops (cpu_ops.cpp, small_ops.cpp): bf16 is the top
// half of a float32, so widening is exact and narrowing rounds to nearest even.
#pragma once

#include <cstdint>
#include <cstring>

namespace {

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
    uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t to_bf16(float f) {   // round to nearest even
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    return uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

}  // namespace
