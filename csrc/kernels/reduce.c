/*
 * reduce.c - elementwise reduction kernels, one per (dtype, op).
 *
 * Loops are plain and branch-free so the compiler vectorises them at -O3.
 * Semantics, shared by every algorithm so results are defined bit for bit:
 *  - integers: sum and prod wrap modulo 2^bits (computed in unsigned
 *    arithmetic, no undefined behaviour); avg truncates toward zero.
 *  - floats: IEEE in the element type; min/max propagate NaN and, like
 *    NumPy's minimum/maximum, return the first operand on ties.
 *  - f16 and bf16: each pairwise step widens both operands to f32, computes
 *    in f32 and rounds once to the narrow type, round-to-nearest-even (NaN
 *    stays NaN). A reduction over n ranks is therefore a fixed left-to-right
 *    chain of such steps in the order the plan defines; with the same plan
 *    every rank computes the same bits. This equals NumPy's float16 ufuncs.
 *  - band, bor, bxor: integers and bool only (pc_reduce_check refuses floats).
 *  - bool: bytes read as 0 / non-zero; sum and max are or, prod and min are
 *    and, the bitwise ops act on the truth values; every result is 0 or 1.
 */
#include <string.h>

#include "floatconv.h"
#include "pycoll.h"

int32_t pc_dtype_size(int32_t dtype) {
    static const int32_t sizes[PC_DTYPE_COUNT] = {2, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1};
    if (dtype < 0 || dtype >= PC_DTYPE_COUNT) return 0;
    return sizes[dtype];
}

/* ---- generic kernels --------------------------------------------------- */
#define OP_SUM(a, b) ((a) + (b))
#define OP_PROD(a, b) ((a) * (b))
#define OP_MIN(a, b) (((a) <= (b) || (a) != (a)) ? (a) : (b))
#define OP_MAX(a, b) (((a) >= (b) || (a) != (a)) ? (a) : (b))
#define OP_BAND(a, b) ((a) & (b))
#define OP_BOR(a, b) ((a) | (b))
#define OP_BXOR(a, b) ((a) ^ (b))
/* bool: truth values in, 0 or 1 out */
#define OP_LOR(a, b) ((a) != 0 || (b) != 0)
#define OP_LAND(a, b) ((a) != 0 && (b) != 0)
#define OP_LXOR(a, b) (((a) != 0) != ((b) != 0))

/* Same-type kernels: T is the element type, W the type arithmetic is done
 * in (unsigned for integer sum/prod so overflow wraps without UB). */
#define DEFINE_KERNEL(name, T, W, OPX)                                              \
    static void name(T *dst, const T *a, const T *b, uint64_t n) {                  \
        for (uint64_t i = 0; i < n; i++) dst[i] = (T)OPX((W)a[i], (W)b[i]);         \
    }

#define DEFINE_INT_KERNELS(suffix, T, UT)              \
    DEFINE_KERNEL(sum_##suffix, T, UT, OP_SUM)         \
    DEFINE_KERNEL(prod_##suffix, T, UT, OP_PROD)       \
    DEFINE_KERNEL(min_##suffix, T, T, OP_MIN)          \
    DEFINE_KERNEL(max_##suffix, T, T, OP_MAX)          \
    DEFINE_KERNEL(band_##suffix, T, UT, OP_BAND)       \
    DEFINE_KERNEL(bor_##suffix, T, UT, OP_BOR)         \
    DEFINE_KERNEL(bxor_##suffix, T, UT, OP_BXOR)

#define DEFINE_FLOAT_KERNELS(suffix, T)                \
    DEFINE_KERNEL(sum_##suffix, T, T, OP_SUM)          \
    DEFINE_KERNEL(prod_##suffix, T, T, OP_PROD)        \
    DEFINE_KERNEL(min_##suffix, T, T, OP_MIN)          \
    DEFINE_KERNEL(max_##suffix, T, T, OP_MAX)

DEFINE_INT_KERNELS(i8, int8_t, uint8_t)
DEFINE_INT_KERNELS(i16, int16_t, uint32_t) /* 16-bit products promote to int: widen */
DEFINE_INT_KERNELS(i32, int32_t, uint32_t)
DEFINE_INT_KERNELS(i64, int64_t, uint64_t)
DEFINE_INT_KERNELS(u8, uint8_t, uint8_t)
DEFINE_INT_KERNELS(u16, uint16_t, uint32_t)
DEFINE_INT_KERNELS(u32, uint32_t, uint32_t)
DEFINE_INT_KERNELS(u64, uint64_t, uint64_t)
DEFINE_FLOAT_KERNELS(f32, float)
DEFINE_FLOAT_KERNELS(f64, double)
/* bool has three kernels: sum, max and bor are or; prod, min and band are and */
DEFINE_KERNEL(lor_bool, uint8_t, uint8_t, OP_LOR)
DEFINE_KERNEL(land_bool, uint8_t, uint8_t, OP_LAND)
DEFINE_KERNEL(lxor_bool, uint8_t, uint8_t, OP_LXOR)

/* Narrow floats: widen, compute in f32, round once. */
#define DEFINE_NARROW_KERNEL(name, TO_F, FROM_F, OPX)                               \
    static void name(uint16_t *dst, const uint16_t *a, const uint16_t *b, uint64_t n) { \
        for (uint64_t i = 0; i < n; i++) {                                          \
            float x = TO_F(a[i]), y = TO_F(b[i]);                                   \
            dst[i] = FROM_F(OPX(x, y));                                             \
        }                                                                           \
    }

#define DEFINE_NARROW_KERNELS(suffix, TO_F, FROM_F)                  \
    DEFINE_NARROW_KERNEL(sum_##suffix, TO_F, FROM_F, OP_SUM)          \
    DEFINE_NARROW_KERNEL(prod_##suffix, TO_F, FROM_F, OP_PROD)        \
    DEFINE_NARROW_KERNEL(min_##suffix, TO_F, FROM_F, OP_MIN)          \
    DEFINE_NARROW_KERNEL(max_##suffix, TO_F, FROM_F, OP_MAX)

DEFINE_NARROW_KERNELS(f16, half_to_float, float_to_half)
DEFINE_NARROW_KERNELS(bf16, bf16_to_float, float_to_bf16)

typedef void (*kernel_fn)(void *, const void *, const void *, uint64_t);

/* Columns: sum, prod, min, max, avg, band, bor, bxor; NULL: not defined.
 * avg reduces with sum (the plan divides at the end): not on bool. */
#define K(f) (kernel_fn)(f)
#define ROW(s, band, bor, bxor) {K(sum_##s), K(prod_##s), K(min_##s), K(max_##s), K(sum_##s), band, bor, bxor}
#define FROW(s) ROW(s, NULL, NULL, NULL)
#define IROW(s) ROW(s, K(band_##s), K(bor_##s), K(bxor_##s))
static const kernel_fn kernels[PC_DTYPE_COUNT][PC_OP_COUNT] = {
    FROW(f16), FROW(bf16), FROW(f32), FROW(f64), IROW(i8), IROW(i16),
    IROW(i32), IROW(i64), IROW(u8), IROW(u16), IROW(u32), IROW(u64),
    {K(lor_bool), K(land_bool), K(land_bool), K(lor_bool), NULL, K(land_bool), K(lor_bool), K(lxor_bool)},
};

pc_status pc_reduce_check(int32_t dtype, int32_t op) {
    if (dtype < 0 || dtype >= PC_DTYPE_COUNT || op < 0 || op >= PC_OP_COUNT || !kernels[dtype][op])
        return PC_ERR_ARG;
    return PC_OK;
}

pc_status pc_reduce(void *dst, const void *a, const void *b, uint64_t count,
                    int32_t dtype, int32_t op) {
    if (pc_reduce_check(dtype, op) != PC_OK) return PC_ERR_ARG;
    if (count) kernels[dtype][op](dst, a, b, count);
    return PC_OK;
}

#define SCALE_LOOP(T, W)                                              \
    do {                                                              \
        T *p = (T *)dst;                                              \
        for (uint64_t i = 0; i < count; i++) p[i] = (T)((W)p[i] / (W)divisor); \
    } while (0)

pc_status pc_scale(void *dst, uint64_t count, int32_t dtype, int32_t divisor) {
    if (divisor <= 0) return PC_ERR_ARG;
    switch (dtype) {
    case PC_F16: {
        uint16_t *p = (uint16_t *)dst;
        for (uint64_t i = 0; i < count; i++) p[i] = float_to_half(half_to_float(p[i]) / (float)divisor);
        return PC_OK;
    }
    case PC_BF16: {
        uint16_t *p = (uint16_t *)dst;
        for (uint64_t i = 0; i < count; i++) p[i] = float_to_bf16(bf16_to_float(p[i]) / (float)divisor);
        return PC_OK;
    }
    case PC_F32: SCALE_LOOP(float, float); return PC_OK;
    case PC_F64: SCALE_LOOP(double, double); return PC_OK;
    case PC_I8: SCALE_LOOP(int8_t, int64_t); return PC_OK;
    case PC_I16: SCALE_LOOP(int16_t, int64_t); return PC_OK;
    case PC_I32: SCALE_LOOP(int32_t, int64_t); return PC_OK;
    case PC_I64: SCALE_LOOP(int64_t, int64_t); return PC_OK;
    case PC_U8: SCALE_LOOP(uint8_t, uint64_t); return PC_OK;
    case PC_U16: SCALE_LOOP(uint16_t, uint64_t); return PC_OK;
    case PC_U32: SCALE_LOOP(uint32_t, uint64_t); return PC_OK;
    case PC_U64: SCALE_LOOP(uint64_t, uint64_t); return PC_OK;
    default: return PC_ERR_ARG;
    }
}
