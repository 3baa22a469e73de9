/*
 * huge_pages.c - which single-copy buffers to move onto huge pages.
 *
 * Over 4 KiB pages a 28 MiB all-reduce between 2 ranks took 16-35 ms, over
 * huge pages 5 ms: a peer's process_vm_readv pins our pages one by one.
 * MADV_COLLAPSE (Linux 6.1) turns the 2 MiB-aligned interior of a buffer
 * into huge pages in place, contents unchanged and whatever the THP
 * "madvise" setting, but copies every page: 28 MiB took 60-100 ms with 4
 * ranks on 2 cores. That pays back only on a buffer that is used again.
 *
 * Seeing the same address again does not prove the same memory: malloc hands
 * a freed block's address to the next block of that size, so a tensor
 * allocated for each call (torch.cat, FSDP's unsharded parameters) comes
 * back at a handful of addresses, each time on new small pages. Collapsing
 * those cost 60-130 ms on every few calls of a 4-rank 28 MiB all-reduce
 * that otherwise takes 25-30 ms. So a range is judged by what became of
 * its pages, which PAGEMAP_SCAN (Linux 6.7) tells cheaply (1-15 us for 28
 * MiB: it stops at the first small page):
 *   - seen the first time: left alone (it may be this call's only buffer);
 *   - seen again, still on small pages: collapsed, if a credit is left;
 *   - seen after its collapse: still huge, the buffer is used again (its
 *     credit comes back); on small pages again, the address gets new memory
 *     every call: it is left alone for REPLACED_BACKOFF runs, twice as long
 *     each time it is found so again (a buffer that stays may come to live
 *     there later: DDP's buckets where its start-up broadcasts' were);
 *   - already huge (NumPy's arrays, THP "always"): nothing to do.
 * Credits bound what memory that is never seen again can cost: at most
 * CREDITS collapses are out unconfirmed at once, and a lost credit comes
 * back every CREDIT_RUNS runs. Without PAGEMAP_SCAN (older kernels, a
 * sandbox) a range is collapsed the second time it is seen and never again.
 * Where MADV_COLLAPSE fails (an old kernel, THP off, fragmented memory) it is
 * left alone for COLLAPSE_BACKOFF runs.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "huge_pages.h"

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#define COLLAPSE_BACKOFF 256
#define CREDITS 8
#define CREDIT_RUNS 256
#define REPLACED_BACKOFF 16
#define REPLACED_BACKOFF_MAX 4096

/* PAGEMAP_SCAN's interface (linux/fs.h from 6.7), spelled out for older headers. */
struct pc_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
struct pc_page_region {
    uint64_t start, end, categories;
};
#define PC_PAGEMAP_SCAN _IOWR('f', 16, struct pc_pm_scan_arg)
#define PC_PAGE_IS_HUGE (1u << 6)

enum {
    RANGE_SMALL_ONCE, /* seen once on small pages */
    RANGE_COLLAPSED,  /* collapsed by us, not seen since */
    RANGE_KEPT,       /* on huge pages when last seen */
    RANGE_REPLACED    /* collapsed, then found on new small pages: left alone until retry_at */
};

void huge_pages_init(huge_pages *h) {
    *h = (huge_pages){.credits = CREDITS, .pagemap_fd = -1};
}

void huge_pages_free(huge_pages *h) {
    if (h->pagemap_fd >= 0) close(h->pagemap_fd);
    h->pagemap_fd = -1;
}

/* 1: [start, end) is all on huge pages; 0: some of it is not; -1: cannot tell. */
static int range_is_huge(huge_pages *h, uintptr_t start, uintptr_t end) {
    if (h->pagemap_fd == -2) return -1;
    pid_t pid = getpid();
    if (h->pagemap_fd >= 0 && h->pagemap_pid != pid) { /* opened by the process we were forked from */
        close(h->pagemap_fd);
        h->pagemap_fd = -1;
    }
    if (h->pagemap_fd < 0) {
        h->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        if (h->pagemap_fd < 0) {
            h->pagemap_fd = -2;
            return -1;
        }
        h->pagemap_pid = pid;
    }
    /* the first page that is not huge, if any */
    struct pc_page_region region;
    struct pc_pm_scan_arg arg = {.size = sizeof arg, .start = start, .end = end, .vec = (uintptr_t)&region,
                                 .vec_len = 1, .max_pages = 1, .category_inverted = PC_PAGE_IS_HUGE,
                                 .category_mask = PC_PAGE_IS_HUGE, .return_mask = PC_PAGE_IS_HUGE};
    long found = ioctl(h->pagemap_fd, PC_PAGEMAP_SCAN, &arg);
    if (found < 0) { /* a kernel without PAGEMAP_SCAN (ENOTTY, EINVAL), or one that refuses it */
        close(h->pagemap_fd);
        h->pagemap_fd = -2;
        return -1;
    }
    return found == 0;
}

static int collapse(huge_pages *h, uintptr_t start, uintptr_t end) {
    if (h->credits <= 0) return 0;
    if (madvise((void *)start, end - start, MADV_COLLAPSE) != 0) {
        h->collapse_skip = COLLAPSE_BACKOFF;
        return 0;
    }
    h->credits--;
    return 1;
}

/* The entry of [start, end), or the least recently seen one, reset to it (seen_run 0). */
static huge_range *range_entry(huge_pages *h, uintptr_t start, uintptr_t end) {
    huge_range *oldest = &h->seen[0];
    for (int i = 0; i < HUGE_RANGES; i++) {
        huge_range *e = &h->seen[i];
        if (e->start == start && e->end == end && e->seen_run) return e;
        if (e->seen_run < oldest->seen_run) oldest = e;
    }
    *oldest = (huge_range){start, end, 0, RANGE_SMALL_ONCE, 0, 0};
    return oldest;
}

static int sight(huge_pages *h, void *buf, uint64_t bytes) {
    uintptr_t start = ((uintptr_t)buf + PC_HUGE_PAGE - 1) & ~(uintptr_t)(PC_HUGE_PAGE - 1);
    uintptr_t end = ((uintptr_t)buf + bytes) & ~(uintptr_t)(PC_HUGE_PAGE - 1);
    if (end <= start) return 0;
    huge_range *e = range_entry(h, start, end);
    if (e->seen_run == h->runs) return e->state == RANGE_KEPT; /* IN and OUT of one in-place run */
    int first = e->seen_run == 0;
    e->seen_run = h->runs;
    if (e->state == RANGE_REPLACED && h->runs < e->retry_at) return 0;
    int huge = range_is_huge(h, start, end);
    if (first) {
        e->state = huge == 1 ? RANGE_KEPT : RANGE_SMALL_ONCE;
        return 0;
    }
    int reused = 0;
    switch (e->state) {
    case RANGE_SMALL_ONCE:
    case RANGE_REPLACED: /* its backoff is over: one more try */
        if (huge == 1)
            e->state = RANGE_KEPT;
        else if (collapse(h, start, end))
            e->state = RANGE_COLLAPSED;
        break;
    case RANGE_COLLAPSED:
        if (huge == 0) {
            e->state = RANGE_REPLACED;
            e->backoff = e->backoff ? e->backoff * 2 : REPLACED_BACKOFF;
            if (e->backoff > REPLACED_BACKOFF_MAX) e->backoff = REPLACED_BACKOFF_MAX;
            e->retry_at = h->runs + e->backoff;
        } else { /* used again (or cannot tell: trusted, as before PAGEMAP_SCAN) */
            e->state = RANGE_KEPT;
            if (h->credits < CREDITS) h->credits++;
            reused = huge == 1;
        }
        break;
    case RANGE_KEPT:
        if (huge == 0) e->state = RANGE_SMALL_ONCE; /* new memory where a kept buffer was: start over */
        reused = huge == 1;
        break;
    }
    return reused;
}

void huge_pages_of_run(huge_pages *h, int32_t n, void *const *bufs, const uint64_t *bytes, uint8_t *reused) {
    if (reused) memset(reused, 0, (size_t)n);
    h->runs++;
    if (h->credits < CREDITS && h->runs % CREDIT_RUNS == 0) h->credits++;
    if (h->collapse_skip > 0) {
        h->collapse_skip--;
        return;
    }
    for (int32_t i = 0; i < n; i++)
        if (bufs[i] && bytes[i] && sight(h, bufs[i], bytes[i]) && reused) reused[i] = 1;
}
