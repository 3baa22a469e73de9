/*
 * codec.c - wire codecs: float32 values to fewer bytes and back.
 *
 * A codec encodes one *frame* (the payload of one send) of `count` float32
 * values; the receiver decodes it knowing only `count`, so the encoded size
 * is a pure function of (codec, count): pc_codec_bytes().
 *
 *   FP16  2 bytes per value, IEEE binary16, round to nearest-even; beyond
 *         +-65504 a value becomes +-inf.
 *   BF16  2 bytes per value, the top half of the float32 rounded to
 *         nearest-even (float32's range, 8 significant bits).
 *   INT8  blocks of PC_CODEC_INT8_BLOCK values (the last may be shorter),
 *         each [f32 lo][f32 step][one uint8 q per value], little-endian,
 *         where lo = the block's minimum, step = (max - lo) / 255 and
 *         value = lo + q * step. A block holding inf or NaN decodes to NaN.
 *
 * Determinism: every step is plain float32 (or float64, for blocks whose
 * range is extreme) arithmetic in a fixed order, with no contraction into
 * fused multiply-adds (the core is built as ISO C99, where GCC keeps them
 * apart), so the same bytes decode to the same bits on every rank, and
 * tests/support/codec_ref.py reproduces encode and decode bit for bit.
 *
 * Error bounds per encode-decode round trip, for finite x (u = 2^-24):
 *   FP16  |err| <= 2^-11 |x| for 2^-14 <= |x| <= 65504, <= 2^-25 below.
 *   BF16  |err| <= 2^-8 |x| (<= 2^-134 in float32's subnormal range).
 *   INT8  |err| <= (hi - lo) / 510 * (1 + 2^-10) + 4u * max(|lo|, |hi|) + 2^-149,
 *         lo and hi being the block's minimum and maximum (a block whose
 *         range exceeds FLT_MAX loses hi - lo - FLT_MAX more at the top:
 *         the step is kept small enough that decoding never overflows).
 */
#include <float.h>
#include <string.h>

#include "floatconv.h"
#include "pycoll.h"

#define BLOCK PC_CODEC_INT8_BLOCK
#define HDR 8u /* lo, step */

uint64_t pc_codec_bytes(int32_t codec, uint64_t count) {
    switch (codec) {
    case PC_CODEC_NONE: return count * 4u;
    case PC_CODEC_FP16:
    case PC_CODEC_BF16: return count * 2u;
    case PC_CODEC_INT8: return count + HDR * ((count + BLOCK - 1) / BLOCK);
    default: return 0;
    }
}

/* ---- int8 min-max ------------------------------------------------------ */

/* The next float towards zero / away from zero (x >= 0, finite). */
static float float_down(float x) {
    bits32 b = {.f = x};
    b.u -= 1;
    return b.f;
}
static float float_up(float x) {
    bits32 b = {.f = x};
    b.u += 1;
    return b.f;
}

/* Whether code 255 of a block (lo, step) decodes to a finite float. */
static int decodes_finitely(float lo, float step) {
    float p = 255.0f * step;
    float top = lo + p;
    return p <= FLT_MAX && top <= FLT_MAX;
}

static void put_f32(uint8_t *p, float v) { memcpy(p, &v, 4); }
static float get_f32(const uint8_t *p) {
    float v;
    memcpy(&v, p, 4);
    return v;
}

static void int8_encode_block(uint8_t *out, const float *x, uint32_t n) {
    float lo = x[0], hi = x[0], probe = 0.0f;
    for (uint32_t i = 0; i < n; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
        probe += x[i] - x[i]; /* NaN iff some value is inf or NaN */
    }
    uint8_t *q = out + HDR;
    if (probe != probe) { /* non-finite block: decodes to NaN */
        bits32 nan = {0x7fc00000u};
        put_f32(out, nan.f);
        put_f32(out + 4, nan.f);
        memset(q, 0, n);
        return;
    }
    lo += 0.0f; /* -0 -> +0: which zero a vectorised min finds must not matter */
    hi += 0.0f;
    double range = (double)hi - (double)lo;
    float step = (float)(range / 255.0);
    if ((double)step * 255.0 < range) step = float_up(step); /* round up: 255 steps must span the block */
    /* Decoding must not overflow: the step becomes the largest float, no larger than this one,
     * whose largest code decodes finitely (computed the way decoding computes it). Both tests are
     * monotone in the step, so jump close to the bound first (a block spanning most of the float
     * range is millions of floats above it) and settle it with a few single steps. */
    if (!decodes_finitely(lo, step)) {
        double bound = ((double)FLT_MAX - (lo > 0 ? (double)lo : 0.0)) / 255.0;
        float start = step;
        if ((double)step > bound) step = (float)bound;
        while (step > 0.0f && !decodes_finitely(lo, step)) step = float_down(step);
        while (step < start && decodes_finitely(lo, float_up(step))) step = float_up(step);
    }
    put_f32(out, lo);
    put_f32(out + 4, step);
    if (step == 0.0f) { /* constant block: exact */
        memset(q, 0, n);
    } else if (step >= FLT_MIN && range <= 1e38) {
        float inv = 1.0f / step;
        for (uint32_t i = 0; i < n; i++) {
            float t = (x[i] - lo) * inv + 0.5f; /* >= 0.5: x >= lo */
            t = t < 255.0f ? t : 255.0f;
            q[i] = (uint8_t)t;                   /* truncation = floor here */
        }
    } else { /* tiny or huge range: float32 would lose the step or overflow */
        double inv = 1.0 / (double)step;
        for (uint32_t i = 0; i < n; i++) {
            double t = ((double)x[i] - (double)lo) * inv + 0.5;
            t = t < 255.0 ? t : 255.0;
            q[i] = (uint8_t)t;
        }
    }
}

static void int8_decode_block(float *y, const uint8_t *in, uint32_t n) {
    float lo = get_f32(in), step = get_f32(in + 4);
    const uint8_t *q = in + HDR;
    for (uint32_t i = 0; i < n; i++) {
        float p = (float)q[i] * step; /* two roundings, never fused */
        y[i] = lo + p;
    }
}

/* ---- public entry points ----------------------------------------------- */
pc_status pc_codec_encode(int32_t codec, void *dst, const float *src, uint64_t count) {
    switch (codec) {
    case PC_CODEC_NONE:
        if (count) memcpy(dst, src, count * 4u);
        return PC_OK;
    case PC_CODEC_FP16: {
        uint16_t *o = dst;
        for (uint64_t i = 0; i < count; i++) o[i] = float_to_half(src[i]);
        return PC_OK;
    }
    case PC_CODEC_BF16: {
        uint16_t *o = dst;
        for (uint64_t i = 0; i < count; i++) o[i] = float_to_bf16(src[i]);
        return PC_OK;
    }
    case PC_CODEC_INT8: {
        uint8_t *o = dst;
        for (uint64_t b = 0; b < count; b += BLOCK) {
            uint32_t n = (uint32_t)(count - b < BLOCK ? count - b : BLOCK);
            int8_encode_block(o, src + b, n);
            o += HDR + n;
        }
        return PC_OK;
    }
    default:
        return PC_ERR_ARG;
    }
}

pc_status pc_codec_decode(int32_t codec, float *dst, const void *src, uint64_t count) {
    switch (codec) {
    case PC_CODEC_NONE:
        if (count) memcpy(dst, src, count * 4u);
        return PC_OK;
    case PC_CODEC_FP16: {
        const uint16_t *s = src;
        for (uint64_t i = 0; i < count; i++) dst[i] = half_to_float(s[i]);
        return PC_OK;
    }
    case PC_CODEC_BF16: {
        const uint16_t *s = src;
        for (uint64_t i = 0; i < count; i++) dst[i] = bf16_to_float(s[i]);
        return PC_OK;
    }
    case PC_CODEC_INT8: {
        const uint8_t *s = src;
        for (uint64_t b = 0; b < count; b += BLOCK) {
            uint32_t n = (uint32_t)(count - b < BLOCK ? count - b : BLOCK);
            int8_decode_block(dst + b, s, n);
            s += HDR + n;
        }
        return PC_OK;
    }
    default:
        return PC_ERR_ARG;
    }
}

/* dst = a (op) decode(src), in pieces that stay in cache. The pieces are
 * whole int8 blocks, so encoded offsets follow from element offsets. */
pc_status pc_codec_decode_reduce(int32_t codec, float *dst, const float *a, const void *src, uint64_t count,
                                 int32_t op) {
    enum { PIECE = 16 * BLOCK };
    float tmp[PIECE];
    if (codec < 0 || codec >= PC_CODEC_COUNT || op < 0 || op >= PC_OP_COUNT) return PC_ERR_ARG;
    const uint8_t *s = src;
    for (uint64_t done = 0; done < count; done += PIECE) {
        uint64_t n = count - done < PIECE ? count - done : PIECE;
        pc_codec_decode(codec, tmp, s, n);
        s += pc_codec_bytes(codec, n);
        pc_reduce(dst + done, a + done, tmp, n, PC_F32, op);
    }
    return PC_OK;
}
