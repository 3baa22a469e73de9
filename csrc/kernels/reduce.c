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
 */
#include <string.h>

#include "floatconv.h"
#include "pycoll.h"

int32_t pc_dtype_size(int32_t dtype) {
    static const int32_t sizes[PC_DTYPE_COUNT] = {2, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8};
    if (dtype < 0 || dtype >= PC_DTYPE_COUNT) return 0;
    return sizes[dtype];
}

/* ---- generic kernels --------------------------------------------------- */
#define OP_SUM(a, b) ((a) + (b))
#define OP_PROD(a, b) ((a) * (b))
#define OP_MIN(a, b) (((a) <= (b) || (a) != (a)) ? (a) : (b))
#define OP_MAX(a, b) (((a) >= (b) || (a) != (a)) ? (a) : (b))

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
    DEFINE_KERNEL(max_##suffix, T, T, OP_MAX)

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

/* Narrow floats: widen, compute in f32, round once. */
#define DEFINE_NARROW_KERNEL(name, TO_F, FROM_F, OPX)                               \
    static void name(uint16_t *dst, const uint16_t *a, const uint16_t *b, uint64_t n) { \
        for (uint64_t i = 0; i < n; i++) {                                          \
            float x = TO_F(a[i]), y = TO_F(b[i]);                                   \
            dst[i] = FROM_F(OPX(x, y));                                             \
        }                                                                           \
    }

DEFINE_NARROW_KERNEL(sum_f16, half_to_float, float_to_half, OP_SUM)
DEFINE_NARROW_KERNEL(prod_f16, half_to_float, float_to_half, OP_PROD)
DEFINE_NARROW_KERNEL(min_f16, half_to_float, float_to_half, OP_MIN)
DEFINE_NARROW_KERNEL(max_f16, half_to_float, float_to_half, OP_MAX)
DEFINE_NARROW_KERNEL(sum_bf16, bf16_to_float, float_to_bf16, OP_SUM)
DEFINE_NARROW_KERNEL(prod_bf16, bf16_to_float, float_to_bf16, OP_PROD)
DEFINE_NARROW_KERNEL(min_bf16, bf16_to_float, float_to_bf16, OP_MIN)
DEFINE_NARROW_KERNEL(max_bf16, bf16_to_float, float_to_bf16, OP_MAX)

typedef void (*kernel_fn)(void *, const void *, const void *, uint64_t);

#define ROW(s) {(kernel_fn)sum_##s, (kernel_fn)prod_##s, (kernel_fn)min_##s, (kernel_fn)max_##s}
static const kernel_fn kernels[PC_DTYPE_COUNT][4] = {
    ROW(f16), ROW(bf16), ROW(f32), ROW(f64), ROW(i8), ROW(i16),
    ROW(i32), ROW(i64), ROW(u8), ROW(u16), ROW(u32), ROW(u64),
};

pc_status pc_reduce(void *dst, const void *a, const void *b, uint64_t count,
                    int32_t dtype, int32_t op) {
    if (dtype < 0 || dtype >= PC_DTYPE_COUNT || op < 0 || op >= PC_OP_COUNT) return PC_ERR_ARG;
    if (op == PC_AVG) op = PC_SUM;
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
