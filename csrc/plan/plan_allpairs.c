/*
 * plan_allpairs.c - all-reduce as a direct reduce-scatter and all-gather.
 *
 * The buffer is cut into n chunks, chunk c owned by rank c. Reduce-scatter:
 * every rank sends chunk q of its input straight to rank q, and each owner
 * reduces the n contributions to its chunk itself. All-gather: every owner
 * sends its finished chunk straight to every other rank. Two steps of
 * latency (a ring has 2(n-1)) with the ring's bytes per rank, and no chain
 * through the other ranks: each rank's work waits only for its peers'
 * inputs and then for their finished chunks. That matters where ranks
 * share cores (more ranks than CPUs on one host): a ring step cannot start
 * before the rank to its left was scheduled and did its step, while here
 * any rank that runs has work. With shared memory's single copy the owner
 * reads its peers' inputs where they lie (one copy, no relay).
 *
 * Reduction order: chunk p is reduced at its owner p as
 * x_p (op) x_{p+1} (op) ... (op) x_{p-1} (ranks mod n), left to right; every
 * other rank receives those bits, so all ranks end with the same bits. Each
 * chunk is cut into segments (the pipeline unit); segment g's chain waits
 * only for its own previous step, so the reduction of one segment overlaps
 * the reads of the next.
 *
 * Results accumulate in OUT, or with PC_PLAN_PRESERVE_INPUT in scratch and a
 * tail copies them out. A preserving plan is *windowed* (core/window.h): its
 * scratch is the rank's result window, which same-host peers map. Each rank
 * first sends an empty frame to every peer and writes its window only once
 * every peer's has come (so nobody still reads the window from the call
 * before); the all-gather's receives may then leave a peer's chunk where it
 * lies (PC_OPF_WINDOW) and the tail copies each chunk into OUT from
 * wherever it is: one copy per byte instead of two. In place (IN is OUT) the owner overwrites only its
 * own chunk, which no peer reads; a received chunk q lands on input that
 * rank q may still be reading, so it waits until our send of it is done.
 */
#include <stdlib.h>

#include "plan.h"

#define AP_TAG(phase, seg) (0xb8000000u | ((uint32_t)(phase) << 16) | ((uint32_t)(seg) & 0xffffu))

/* Byte range of segment g of chunk c. */
static void seg_range(uint64_t count, int32_t n, uint64_t segs, int32_t es, int32_t c, uint64_t g, uint64_t *off,
                      uint64_t *bytes) {
    uint64_t cs = split_start(count, (uint64_t)n, (uint64_t)c), cl = split_len(count, (uint64_t)n, (uint64_t)c);
    *off = (cs + split_start(cl, segs, g)) * (uint64_t)es;
    *bytes = split_len(cl, segs, g) * (uint64_t)es;
}

pc_status pc_plan_allpairs(pc_collective coll, int32_t nranks, int32_t rank, uint64_t count, int32_t elem_size,
                           uint64_t segment_bytes, int32_t stripes, uint32_t flags, pc_plan **out) {
    *out = NULL;
    if (nranks < 1 || rank < 0 || rank >= nranks || elem_size <= 0 || stripes < 1 || coll != PC_COLL_ALLREDUCE)
        return PC_ERR_ARG;
    if (count > UINT64_MAX / (uint64_t)elem_size) return PC_ERR_ARG;
    pc_plan *plan = plan_new(nranks, rank);
    if (!plan) return PC_ERR_NOMEM;
    int32_t n = nranks, p = rank, es = elem_size;
    uint64_t bytes = count * (uint64_t)es;
    if (n == 1 || bytes == 0) {
        if (bytes) plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_IN, 0, PC_BUF_OUT, 0, bytes, NULL, 0);
        return plan_finish(plan, out);
    }
    int preserve = (flags & PC_PLAN_PRESERVE_INPUT) != 0;
    int32_t acc = preserve ? PC_BUF_SCRATCH : PC_BUF_OUT;
    /* segments of the largest chunk; 16 bits of the tag hold the segment */
    uint64_t segs = plan_segments(split_len(count, (uint64_t)n, 0) * (uint64_t)es, segment_bytes);
    if (segs > 0xffff) segs = 0xffff;
    int32_t *rs_send = malloc(sizeof(int32_t) * (size_t)n * segs);
    if (!rs_send) {
        pc_plan_free(plan);
        return PC_ERR_NOMEM;
    }
    /* Windowed: an empty frame to and from every peer first; our window waits for all of them. */
    int32_t *arrived = NULL;
    if (preserve) {
        arrived = malloc(sizeof(int32_t) * (size_t)n);
        if (!arrived) {
            free(rs_send);
            pc_plan_free(plan);
            return PC_ERR_NOMEM;
        }
        plan->windowed = 1;
        int32_t first = plan_agree(plan);
        for (int32_t k = 1; k < n; k++) arrived[k - 1] = first + k - 1;
    }
    /* Reduce-scatter: every input chunk to its owner, rank+1, rank+2, ... first (at each step of
     * the rotation every rank sends to a different peer). */
    for (uint64_t g = 0; g < segs; g++)
        for (int32_t k = 1; k < n; k++) {
            int32_t q = (p + k) % n;
            uint64_t off, len;
            seg_range(count, n, segs, es, q, g, &off, &len);
            rs_send[(size_t)q * segs + g] = plan_add(plan, PC_OP_SEND, q, (int32_t)(g % (uint64_t)stripes),
                                                     AP_TAG(0, g), PC_BUF_IN, off, -1, 0, len, NULL, 0);
        }
    int32_t *last = malloc(sizeof(int32_t) * segs);
    int32_t *ag_recv = malloc(sizeof(int32_t) * (size_t)n * segs);
    if (!last || !ag_recv) {
        free(last);
        free(ag_recv);
        free(arrived);
        free(rs_send);
        pc_plan_free(plan);
        return PC_ERR_NOMEM;
    }
    /* ... and our own chunk's chain: acc = x_p (op) x_{p+1} (op) ... */
    for (uint64_t g = 0; g < segs; g++) {
        uint64_t off, len;
        seg_range(count, n, segs, es, p, g, &off, &len);
        int32_t prev = -1;
        for (int32_t k = 1; k < n; k++)
            prev = plan_add(plan, PC_OP_RECV_REDUCE, (p + k) % n, (int32_t)(g % (uint64_t)stripes), AP_TAG(0, g),
                            k == 1 ? PC_BUF_IN : acc, off, acc, off, len, k == 1 && arrived ? arrived : &prev,
                            k == 1 && arrived ? n - 1 : 1);
        if (flags & PC_PLAN_AVG) prev = plan_add(plan, PC_OP_SCALE, -1, 0, 0, -1, 0, acc, off, len, &prev, 1);
        last[g] = prev;
    }
    /* All-gather: our finished chunk to everyone, everyone's into acc. */
    for (uint64_t g = 0; g < segs; g++)
        for (int32_t k = 1; k < n; k++) {
            uint64_t off, len;
            seg_range(count, n, segs, es, p, g, &off, &len);
            plan_add(plan, PC_OP_SEND, (p + k) % n, (int32_t)(g % (uint64_t)stripes), AP_TAG(1, g), acc, off, -1, 0,
                     len, &last[g], 1);
        }
    for (uint64_t g = 0; g < segs; g++)
        for (int32_t k = 1; k < n; k++) {
            int32_t q = (p + n - k) % n;
            uint64_t off, len;
            seg_range(count, n, segs, es, q, g, &off, &len);
            int32_t at = plan_add(plan, PC_OP_RECV, q, (int32_t)(g % (uint64_t)stripes), AP_TAG(1, g), -1, 0, acc,
                                  off, len, &rs_send[(size_t)q * segs + g], 1);
            ag_recv[(size_t)q * segs + g] = at;
            if (preserve && at >= 0) plan->ops[at].flags = PC_OPF_WINDOW;
        }
    if (preserve) { /* the tail: every chunk into OUT from where it lies */
        plan_begin_tail(plan);
        for (int32_t c = 0; c < n; c++)
            for (uint64_t g = 0; g < segs; g++) {
                uint64_t off, len;
                seg_range(count, n, segs, es, c, g, &off, &len);
                if (!len) continue;
                int32_t at = plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_SCRATCH, off, PC_BUF_OUT, off, len, NULL, 0);
                if (c != p && at >= 0) {
                    plan->ops[at].flags = PC_OPF_FROM_RECV;
                    plan->ops[at].aux_off = (uint64_t)ag_recv[(size_t)c * segs + g];
                }
            }
    }
    free(ag_recv);
    free(last);
    free(arrived);
    free(rs_send);
    return plan_finish(plan, out);
}
