/*
 * plan_exchange.c - one-step plans where every byte goes straight from the
 * rank that has it to the rank that wants it: reduce to a root, the direct
 * exchange behind all_to_all, gather and scatter, and lists of
 * point-to-point transfers.
 *
 * None of them forwards data, so none needs a pipeline for its transfers;
 * the reduce cuts its payloads in segments only so that the root reduces
 * segment g of rank j while later segments (and ranks) still arrive.
 * Sends depend on nothing: every frame is on its way at the start and a
 * receive only ever waits for data already sent (no deadlock, whatever the
 * connection buffers hold). The exception is the staged exchange
 * (PC_PLAN_STAGED, for large all_to_all payloads): n-1 pairwise steps, one
 * payload in flight each way per rank.
 */
#include <stdlib.h>

#include "plan.h"

#define EXCHANGE_TAG 0xc0000000u
#define REDUCE_TAG 0xc1000000u
#define STRIPE_MIN (1ull << 20) /* payloads this big are spread over the stripes */
#define MAX_STRIPES 64          /* the engine's limit (pc_comm_create) */
/* A reduce cuts its payload in at most this many segments: enough to overlap
 * the root's reduction with what still arrives, few enough that large
 * payloads stay large frames (a same-host single-copy frame costs the pair a
 * round trip, which on a busy host means a wait for the CPU each time). */
#define REDUCE_MAX_SEGS 8

static int bad_rank(int32_t nranks, int32_t rank) { return nranks < 1 || rank < 0 || rank >= nranks; }
/* A byte range that ends past 2^63: refused before off + len can wrap to a
 * small buffer size the engine would accept. */
static int bad_range(uint64_t off, uint64_t len) { return len > UINT64_MAX / 2 || off > UINT64_MAX / 2 - len; }

pc_status pc_plan_reduce(int32_t nranks, int32_t rank, int32_t root, uint64_t count, int32_t elem_size,
                         uint64_t segment_bytes, int32_t stripes, uint32_t flags, pc_plan **out) {
    *out = NULL;
    if (bad_rank(nranks, rank) || root < 0 || root >= nranks || elem_size <= 0 || stripes < 1 || segment_bytes == 0)
        return PC_ERR_ARG;
    if (count > UINT64_MAX / (uint64_t)elem_size / 2) return PC_ERR_ARG;
    pc_plan *plan = plan_new(nranks, rank);
    if (!plan) return PC_ERR_NOMEM;
    uint64_t es = (uint64_t)elem_size, bytes = count * es;
    if (nranks > 1 && bytes == 0) plan_agree(plan); /* no data frames to carry the check */
    if (nranks > 1 && bytes) { /* a rank with another root fails the header check: see plan_agree_silent */
        uint8_t *flow = calloc(2, (size_t)nranks);
        if (!flow) {
            pc_plan_free(plan);
            return PC_ERR_NOMEM;
        }
        for (int32_t p = 0; p < nranks; p++) {
            flow[p] = rank != root && p == root;             /* we send our data to the root */
            flow[nranks + p] = rank == root && p != root;    /* the root receives everyone's */
        }
        plan_agree_silent(plan, flow, flow + nranks);
        free(flow);
    }
    if (nranks == 1 || bytes == 0) {
        if (bytes) plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_IN, 0, PC_BUF_OUT, 0, bytes, NULL, 0);
        return plan_finish(plan, out);
    }
    /* segments of whole elements, the same cut on every rank */
    uint64_t seg_elems = segment_bytes / es ? segment_bytes / es : 1;
    uint64_t segs = (count + seg_elems - 1) / seg_elems;
    if (segs > REDUCE_MAX_SEGS) {
        seg_elems = (count + REDUCE_MAX_SEGS - 1) / REDUCE_MAX_SEGS;
        segs = (count + seg_elems - 1) / seg_elems;
    }
    if (rank != root) {
        for (uint64_t g = 0; g < segs; g++) {
            uint64_t off = g * seg_elems * es, len = (g + 1 == segs ? count - g * seg_elems : seg_elems) * es;
            plan_add(plan, PC_OP_SEND, root, (int32_t)(g % (uint64_t)stripes), REDUCE_TAG | (uint32_t)g, PC_BUF_IN,
                     off, -1, 0, len, NULL, 0);
        }
        return plan_finish(plan, out);
    }
    /* The root, per segment: acc = x_0 (op) x_1 (op) ... left to right by rank,
     * as pc_plan_direct, in scratch [0, bytes). The root's own x_root is read
     * where it lies (IN: nothing writes IN before the tail): root 0's first
     * receive-reduce takes it as its left operand. */
    for (uint64_t g = 0; g < segs; g++) {
        uint64_t off = g * seg_elems * es, len = (g + 1 == segs ? count - g * seg_elems : seg_elems) * es;
        int32_t stripe = (int32_t)(g % (uint64_t)stripes);
        uint32_t tag = REDUCE_TAG | (uint32_t)g;
        int32_t prev = -1;
        for (int32_t j = 0; j < nranks; j++) {
            if (j == root) {
                if (j > 0)
                    prev = plan_add(plan, PC_OP_REDUCE, -1, 0, 0, PC_BUF_IN, off, PC_BUF_SCRATCH, off, len, &prev, 1);
            } else if (j == 0) {
                prev = plan_add(plan, PC_OP_RECV, 0, stripe, tag, -1, 0, PC_BUF_SCRATCH, off, len, NULL, 0);
            } else { /* acc (x_0 in IN when the root is rank 0) (op) x_j */
                int32_t left = j == 1 && root == 0 ? PC_BUF_IN : PC_BUF_SCRATCH;
                prev = plan_add(plan, PC_OP_RECV_REDUCE, j, stripe, tag, left, off, PC_BUF_SCRATCH, off, len, &prev, 1);
            }
        }
        if (flags & PC_PLAN_AVG) plan_add(plan, PC_OP_SCALE, -1, 0, 0, -1, 0, PC_BUF_SCRATCH, off, len, &prev, 1);
    }
    plan_begin_tail(plan);
    plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_SCRATCH, 0, PC_BUF_OUT, 0, bytes, NULL, 0);
    return plan_finish(plan, out);
}

/* One payload to or from `peer`: spread over the stripes when it is large
 * (both ends cut the same length the same way). Each part waits for
 * deps[0..ndeps); `last`, when given, gets the index of every part's op
 * appended at *nlast. */
static void add_transfer(pc_plan *plan, int32_t kind, int32_t peer, int32_t stripes, uint32_t tag, int32_t buf,
                         uint64_t off, uint64_t len, const int32_t *deps, int32_t ndeps, int32_t *last,
                         int32_t *nlast) {
    uint64_t parts = len >= STRIPE_MIN * 2 && stripes > 1 ? (uint64_t)stripes : 1;
    for (uint64_t s = 0; s < parts; s++) {
        uint64_t a = split_start(len, parts, s), n = split_len(len, parts, s);
        int32_t i;
        if (kind == PC_OP_SEND)
            i = plan_add(plan, kind, peer, (int32_t)s, tag, buf, off + a, -1, 0, n, deps, ndeps);
        else
            i = plan_add(plan, kind, peer, (int32_t)s, tag, -1, 0, buf, off + a, n, deps, ndeps);
        if (last) last[(*nlast)++] = i;
    }
}

/* plan_agree_silent for the exchange's frames. */
static pc_status agree_silent(pc_plan *plan, int32_t nranks, const uint64_t *send_len, const uint64_t *recv_len) {
    uint8_t *flow = malloc(2 * (size_t)nranks);
    if (!flow) return PC_ERR_NOMEM;
    for (int32_t p = 0; p < nranks; p++) {
        flow[p] = send_len[p] != PC_NO_FRAME;
        flow[nranks + p] = recv_len[p] != PC_NO_FRAME;
    }
    plan_agree_silent(plan, flow, flow + nranks);
    free(flow);
    return PC_OK;
}

/* This rank's own block, IN to OUT. */
static void local_copy(pc_plan *plan, int32_t rank, const uint64_t *send_off, const uint64_t *send_len,
                       const uint64_t *recv_off) {
    if (send_len[rank] != PC_NO_FRAME && send_len[rank])
        plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_IN, send_off[rank], PC_BUF_OUT, recv_off[rank], send_len[rank],
                 NULL, 0);
}

pc_status pc_plan_exchange(int32_t nranks, int32_t rank, const uint64_t *send_off, const uint64_t *send_len,
                           const uint64_t *recv_off, const uint64_t *recv_len, int32_t stripes, uint32_t flags,
                           pc_plan **out) {
    *out = NULL;
    if (bad_rank(nranks, rank) || !send_off || !send_len || !recv_off || !recv_len || stripes < 1 ||
        stripes > MAX_STRIPES)
        return PC_ERR_ARG;
    for (int32_t p = 0; p < nranks; p++) {
        if ((send_len[p] != PC_NO_FRAME && bad_range(send_off[p], send_len[p])) ||
            (recv_len[p] != PC_NO_FRAME && bad_range(recv_off[p], recv_len[p])))
            return PC_ERR_ARG;
    }
    if (send_len[rank] != recv_len[rank]) return PC_ERR_ARG; /* the local copy */
    pc_plan *plan = plan_new(nranks, rank);
    if (!plan) return PC_ERR_NOMEM;
    if ((flags & PC_PLAN_AGREE) && nranks > 1) {
        if (flags & PC_PLAN_STAGED) {
            plan_agree(plan); /* staged sends wait: plan_agree_silent's reasoning needs sends that do not */
        } else if (agree_silent(plan, nranks, send_len, recv_len) != PC_OK) {
            pc_plan_free(plan);
            return PC_ERR_NOMEM;
        }
    }
    if (flags & PC_PLAN_STAGED) {
        /* step d: to rank+d, from rank-d; the sends of step d wait for the
         * receive of step d-1, which its sender posted at step d-1 without
         * waiting for anything of step d: by induction no step waits forever */
        int32_t prev[MAX_STRIPES], nprev = 0, cur[MAX_STRIPES], ncur;
        for (int32_t d = 1; d < nranks; d++) {
            int32_t to = (rank + d) % nranks, from = (rank + nranks - d) % nranks;
            if (send_len[to] != PC_NO_FRAME)
                add_transfer(plan, PC_OP_SEND, to, stripes, EXCHANGE_TAG, PC_BUF_IN, send_off[to], send_len[to], prev,
                             nprev, NULL, NULL);
            ncur = 0;
            if (recv_len[from] != PC_NO_FRAME)
                add_transfer(plan, PC_OP_RECV, from, stripes, EXCHANGE_TAG, PC_BUF_OUT, recv_off[from],
                             recv_len[from], NULL, 0, cur, &ncur);
            for (nprev = 0; nprev < ncur; nprev++) prev[nprev] = cur[nprev];
            if (d == 1) local_copy(plan, rank, send_off, send_len, recv_off);
        }
        return plan_finish(plan, out);
    }
    /* rank+1, rank+2, ... first: at each step every rank sends to another peer */
    for (int32_t d = 1; d < nranks; d++) {
        int32_t p = (rank + d) % nranks;
        if (send_len[p] != PC_NO_FRAME)
            add_transfer(plan, PC_OP_SEND, p, stripes, EXCHANGE_TAG, PC_BUF_IN, send_off[p], send_len[p], NULL, 0,
                         NULL, NULL);
    }
    local_copy(plan, rank, send_off, send_len, recv_off);
    for (int32_t d = 1; d < nranks; d++) {
        int32_t p = (rank + nranks - d) % nranks;
        if (recv_len[p] != PC_NO_FRAME)
            add_transfer(plan, PC_OP_RECV, p, stripes, EXCHANGE_TAG, PC_BUF_OUT, recv_off[p], recv_len[p], NULL, 0,
                         NULL, NULL);
    }
    return plan_finish(plan, out);
}

pc_status pc_plan_p2p_list(int32_t nranks, int32_t rank, int32_t n, const int32_t *peer, const int32_t *is_send,
                           const uint64_t *off, const uint64_t *len, const uint32_t *tag, pc_plan **out) {
    *out = NULL;
    if (bad_rank(nranks, rank) || n < 0 || (n && (!peer || !is_send || !off || !len || !tag))) return PC_ERR_ARG;
    for (int32_t i = 0; i < n; i++)
        if (peer[i] < 0 || peer[i] >= nranks || peer[i] == rank || bad_range(off[i], len[i])) return PC_ERR_ARG;
    pc_plan *plan = plan_new(nranks, rank);
    if (!plan) return PC_ERR_NOMEM;
    for (int32_t i = 0; i < n; i++) {
        if (is_send[i])
            plan_add(plan, PC_OP_SEND, peer[i], 0, tag[i], PC_BUF_IN, off[i], -1, 0, len[i], NULL, 0);
        else
            plan_add(plan, PC_OP_RECV, peer[i], 0, tag[i], -1, 0, PC_BUF_OUT, off[i], len[i], NULL, 0);
    }
    return plan_finish(plan, out);
}
