/*
 * huge_pages.h - moving single-copy buffers onto huge pages, when it pays.
 *
 * A peer's process_vm_readv pins our buffer page by page, so a buffer on
 * 2 MiB pages is read several times faster than one on 4 KiB pages. torch's
 * allocator never asks for huge pages; MADV_COLLAPSE moves a buffer onto
 * them in place, but copies every page doing so, which a buffer used again
 * (DDP's buckets) pays back and one allocated for a single call never does.
 * This module decides, run by run, which buffers to collapse: see
 * huge_pages.c.
 */
#ifndef PYCOLL_HUGE_PAGES_H
#define PYCOLL_HUGE_PAGES_H

#include <stdint.h>
#include <sys/types.h>

#define PC_HUGE_PAGE (2u << 20)
#define HUGE_RANGES 256 /* DDP buckets of a model of 6 GiB of gradients at 25 MiB each */

/* A single-copy buffer's 2 MiB-aligned interior, as huge_pages_of_run saw it. */
typedef struct {
    uintptr_t start, end;
    uint64_t seen_run; /* the run that last saw it (0: free entry) */
    int state;         /* RANGE_* in huge_pages.c */
    uint32_t backoff;  /* runs a replaced range waits before it is tried again (doubles each time) */
    uint64_t retry_at; /* ... the run from which it may be */
} huge_range;

typedef struct {
    huge_range seen[HUGE_RANGES]; /* the buffers of recent runs, least recently seen replaced first */
    uint64_t runs;                /* single-copy runs so far: the clock of `seen` */
    int32_t collapse_skip;        /* runs left before a failed collapse is tried again */
    int32_t credits;              /* collapses still allowed on memory not yet seen to stay huge */
    int pagemap_fd;               /* /proc/self/pagemap for PAGEMAP_SCAN: -1 not open, -2 unusable */
    pid_t pagemap_pid;            /* whose pagemap it is (a forked child must not read its parent's) */
} huge_pages;

void huge_pages_init(huge_pages *h);
void huge_pages_free(huge_pages *h);
/* A single-copy run begins: one sighting of each of its n buffers (a buffer given twice, IN and
 * OUT of an in-place run, is seen once; NULL ones not at all). reused[i] (if not NULL) is set
 * to 1 where buffer i is known to be the same memory as in an earlier run: found on huge pages
 * then and now (core/shared_buffers.h moves such buffers). */
void huge_pages_of_run(huge_pages *h, int32_t n, void *const *bufs, const uint64_t *bytes, uint8_t *reused);

#endif
