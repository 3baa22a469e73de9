/*
 * copy.c - bulk copies for the engine's local steps.
 *
 * A plan's tail copy moves a whole result out of scratch (preserve_input):
 * 16 MiB per rank at 16 MiB, and nobody reads it again in this collective.
 * A plain memcpy of that size first reads every destination line into the
 * cache (read-for-ownership) and then writes it back: three passes of
 * memory traffic for two passes of data. Streaming (non-temporal) stores
 * skip the read; with several ranks copying at once on a memory-bound host
 * this made the 4-rank 16 MiB shared-memory all-reduce about 10 % faster
 * (measured in bench/shm.py's setting, 2 cores).
 */
#include <string.h>

#if defined(__x86_64__)
#include <emmintrin.h> /* SSE2: part of the x86-64 baseline */
#endif

#include "copy.h"

void pc_copy(void *dst, const void *src, uint64_t n) {
    if (n >= PC_STREAM_COPY_MIN)
        pc_copy_streaming(dst, src, n);
    else
        memcpy(dst, src, n);
}

void pc_copy_streaming(void *dst, const void *src, uint64_t n) {
#if defined(__x86_64__)
    if (n >= 64) {
        uint8_t *d = dst;
        const uint8_t *s = src;
        uint64_t head = (16u - ((uintptr_t)d & 15u)) & 15u; /* streaming stores want 16-byte alignment */
        memcpy(d, s, head);
        d += head, s += head, n -= head;
        for (uint64_t left = n / 64u; left; left--, d += 64, s += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)s), b = _mm_loadu_si128((const __m128i *)(s + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(s + 32)), e = _mm_loadu_si128((const __m128i *)(s + 48));
            _mm_stream_si128((__m128i *)d, a);
            _mm_stream_si128((__m128i *)(d + 16), b);
            _mm_stream_si128((__m128i *)(d + 32), c);
            _mm_stream_si128((__m128i *)(d + 48), e);
        }
        _mm_sfence(); /* the stores are visible before anyone is told the copy is done */
        memcpy(d, s, n % 64u);
        return;
    }
#endif
    memcpy(dst, src, n);
}
