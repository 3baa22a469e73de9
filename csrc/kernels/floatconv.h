/*
 * floatconv.h - conversions between float32 and the 16-bit float formats,
 * shared by the reduction kernels (reduce.c) and the wire codecs (codec.c).
 * Both round to nearest-even; f16 overflows to infinity; NaN stays NaN
 * (quiet). Internal to the C core.
 */
#ifndef PYCOLL_FLOATCONV_H
#define PYCOLL_FLOATCONV_H

#include <stdint.h>

typedef union { uint32_t u; float f; } bits32;

static inline float half_to_float(uint16_t h) {
    bits32 o;
    uint32_t em = h & 0x7fffu;
    o.u = em << 13;
    o.f *= 0x1.0p112f;                       /* rebias; also handles subnormals */
    o.u |= (em >= 0x7c00u) ? 0x7f800000u : 0u; /* inf / NaN keep their payload */
    o.u |= (uint32_t)(h & 0x8000u) << 16;
    return o.f;
}

static inline uint16_t float_to_half(float f) {
    bits32 v, denorm_magic;
    v.f = f;
    uint32_t sign = v.u & 0x80000000u;
    v.u ^= sign;
    uint16_t out;
    if (v.u >= (143u << 23)) {                 /* overflow, inf or NaN */
        out = (v.u > (255u << 23)) ? 0x7e00u : 0x7c00u;
    } else if (v.u < (113u << 23)) {           /* result is subnormal or zero */
        denorm_magic.u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
        v.f += denorm_magic.f;                 /* the FPU rounds (RNE) for us */
        out = (uint16_t)(v.u - denorm_magic.u);
    } else {                                   /* normal: rebias and round */
        uint32_t odd = (v.u >> 13) & 1u;
        v.u += 0xc8000fffu + odd;              /* (15-127)<<23 + 0xfff, mod 2^32 */
        out = (uint16_t)(v.u >> 13);
    }
    return (uint16_t)(out | (sign >> 16));
}

static inline float bf16_to_float(uint16_t h) {
    bits32 o;
    o.u = (uint32_t)h << 16;
    return o.f;
}

static inline uint16_t float_to_bf16(float f) {
    bits32 v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* quiet NaN */
    uint32_t rounding = 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)((v.u + rounding) >> 16);
}

#endif
