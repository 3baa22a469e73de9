/*
 * copy.h - bulk copies for the engine's local steps (internal).
 */
#ifndef PYCOLL_COPY_H
#define PYCOLL_COPY_H

#include <stdint.h>

/* From this many bytes on, a copy streams its stores past the cache. */
#define PC_STREAM_COPY_MIN (4u << 20)

/* memcpy for buffers that do not overlap; a large one (PC_STREAM_COPY_MIN)
 * writes with non-temporal stores: the destination is not read into the
 * cache first and does not evict what the next steps read. */
void pc_copy(void *dst, const void *src, uint64_t n);
/* The same with non-temporal stores whatever n: for one piece of a large copy done in pieces
 * (a tail that copies a large result out segment by segment). */
void pc_copy_streaming(void *dst, const void *src, uint64_t n);

#endif
