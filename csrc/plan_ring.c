/*
 * plan_ring.c - pipelined ring schedules over one or several ring orders.
 *
 * Terms: a *ring* is an order of all ranks; a rank sends to its successor
 * (right) and receives from its predecessor (left). With several rings (the
 * Hamiltonian multi-ring) the payload is cut into one *share* per ring and
 * each ring runs the schedule below on its share, concurrently. Within a
 * ring's share the data is cut into n *chunks* (one per ring position), and
 * each chunk into S *segments*: the pipeline unit. Segments go round-robin
 * over the connections (stripes) of a pair.
 *
 * All-reduce = reduce-scatter then all-gather. Reduce-scatter step s
 * (s = 0..n-2): send chunk p-s, receive chunk p-s-1 and reduce it into the
 * accumulator; after n-1 steps position p holds the full reduction of chunk
 * p+1. All-gather step s: send chunk p+1-s, receive chunk p-s. A segment of
 * step s+1 depends only on the same segment of step s, so segments flow
 * round the ring back to back and reduction overlaps transfer.
 *
 * Reduction order: chunk c is accumulated starting at ring position c+1 and
 * going round the ring, acc = local (op) incoming at each hop, so every rank
 * ends with the same bits for every element.
 *
 * With PC_PLAN_PRESERVE_INPUT, results accumulate in scratch and a tail of
 * copies writes the caller's buffer only after every transfer succeeded.
 */
#include <stdlib.h>
#include <string.h>

#include "plan.h"

#define TAG(ring, phase, chunk, seg) \
    ((((uint32_t)(ring) & 0xffu) << 24) | (((uint32_t)(phase) & 3u) << 22) | \
     (((uint32_t)(chunk) & 0x3ffu) << 12) | ((uint32_t)(seg) & 0xfffu))

typedef struct {
    int32_t n, p, left, right;
    const int32_t *order;
} ring_view;

static int ring_at(const int32_t *order, int32_t n, int32_t rank, ring_view *rv) {
    rv->n = n;
    rv->order = order;
    rv->p = -1;
    for (int32_t i = 0; i < n; i++)
        if (order[i] == rank) rv->p = i;
    if (rv->p < 0) return 0;
    rv->left = order[(rv->p + n - 1) % n];
    rv->right = order[(rv->p + 1) % n];
    return 1;
}

static inline int32_t mod(int64_t a, int32_t n) { return (int32_t)(((a % n) + n) % n); }

/* Number of pipeline segments for chunks of at most max_chunk_bytes. */
static uint64_t segments_for(uint64_t max_chunk_bytes, uint64_t segment_bytes) {
    if (segment_bytes == 0 || max_chunk_bytes <= segment_bytes) return 1;
    uint64_t s = (max_chunk_bytes + segment_bytes - 1) / segment_bytes;
    return s > 4096 ? 4096 : s;
}

typedef struct {
    pc_plan *plan;
    ring_view rv;
    int32_t ring, stripes, es, op_avg;
    uint64_t segs;
} ctx;

/* Byte range of segment g of a chunk [start, start+len) elements. */
static void seg_range(const ctx *c, uint64_t start, uint64_t len, uint64_t g, uint64_t *off, uint64_t *bytes) {
    *off = (start + split_start(len, c->segs, g)) * (uint64_t)c->es;
    *bytes = split_len(len, c->segs, g) * (uint64_t)c->es;
}

static int32_t stripe_of(const ctx *c, uint64_t g) { return (int32_t)((g + (uint64_t)c->ring) % (uint64_t)c->stripes); }

/* ---- all-reduce over one ring share [base, base+len) elements ---------- */
static void ring_allreduce(ctx *c, uint64_t base, uint64_t len, uint32_t flags) {
    const ring_view *rv = &c->rv;
    int32_t n = rv->n, p = rv->p;
    uint64_t S = c->segs;
    int32_t acc = (flags & PC_PLAN_PRESERVE_INPUT) ? PC_BUF_SCRATCH : PC_BUF_OUT;
    int32_t *rs_send = malloc(sizeof(int32_t) * (size_t)(n - 1) * S);
    int32_t *rs_recv = malloc(sizeof(int32_t) * (size_t)(n - 1) * S);
    int32_t *ag_recv = malloc(sizeof(int32_t) * (size_t)(n - 1) * S);
    if (!rs_send || !rs_recv || !ag_recv) {
        c->plan->failed = 1;
        goto out;
    }
#define CH_START(ch) (base + split_start(len, (uint64_t)n, (uint64_t)(ch)))
#define CH_LEN(ch) split_len(len, (uint64_t)n, (uint64_t)(ch))
    for (int32_t s = 0; s < n - 1; s++) {
        int32_t send_ch = mod(p - s, n), recv_ch = mod(p - s - 1, n);
        for (uint64_t g = 0; g < S; g++) {
            uint64_t off, bytes;
            seg_range(c, CH_START(send_ch), CH_LEN(send_ch), g, &off, &bytes);
            int32_t dep = s ? rs_recv[(s - 1) * S + g] : -1;
            rs_send[s * S + g] = plan_add(c->plan, PC_OP_SEND, rv->right, stripe_of(c, g),
                                          TAG(c->ring, 0, send_ch, g), s ? acc : PC_BUF_IN, off,
                                          -1, 0, bytes, &dep, 1);
        }
        for (uint64_t g = 0; g < S; g++) {
            uint64_t off, bytes;
            seg_range(c, CH_START(recv_ch), CH_LEN(recv_ch), g, &off, &bytes);
            rs_recv[s * S + g] = plan_add(c->plan, PC_OP_RECV_REDUCE, rv->left, stripe_of(c, g),
                                          TAG(c->ring, 0, recv_ch, g), PC_BUF_IN, off, acc, off,
                                          bytes, NULL, 0);
        }
    }
    /* The owned chunk is complete: average it once, here, so every rank
     * receives the same scaled bits in the all-gather. */
    int32_t own = mod(p + 1, n);
    if (c->op_avg) {
        for (uint64_t g = 0; g < S; g++) {
            uint64_t off, bytes;
            seg_range(c, CH_START(own), CH_LEN(own), g, &off, &bytes);
            int32_t dep = rs_recv[(n - 2) * S + g];
            rs_recv[(n - 2) * S + g] = plan_add(c->plan, PC_OP_SCALE, -1, 0, 0, -1, 0, acc, off, bytes, &dep, 1);
        }
    }
    for (int32_t s = 0; s < n - 1; s++) {
        int32_t send_ch = mod(p + 1 - s, n), recv_ch = mod(p - s, n);
        for (uint64_t g = 0; g < S; g++) {
            uint64_t off, bytes;
            seg_range(c, CH_START(send_ch), CH_LEN(send_ch), g, &off, &bytes);
            int32_t dep = s ? ag_recv[(s - 1) * S + g] : rs_recv[(n - 2) * S + g];
            plan_add(c->plan, PC_OP_SEND, rv->right, stripe_of(c, g), TAG(c->ring, 1, send_ch, g),
                     acc, off, -1, 0, bytes, &dep, 1);
        }
        for (uint64_t g = 0; g < S; g++) {
            uint64_t off, bytes;
            seg_range(c, CH_START(recv_ch), CH_LEN(recv_ch), g, &off, &bytes);
            /* In place, this chunk may still be on its way out from the
             * reduce-scatter: do not overwrite it before that send is done. */
            int32_t dep = s < n - 1 ? rs_send[s * S + g] : -1;
            ag_recv[s * S + g] = plan_add(c->plan, PC_OP_RECV, rv->left, stripe_of(c, g),
                                          TAG(c->ring, 1, recv_ch, g), -1, 0, acc, off, bytes, &dep, 1);
        }
    }
#undef CH_START
#undef CH_LEN
out:
    free(rs_send);
    free(rs_recv);
    free(ag_recv);
}

/* ---- reduce-scatter: IN has n blocks of `count`, OUT one block --------- */
static void ring_reduce_scatter(ctx *c, uint64_t count, uint64_t share_start, uint64_t share_len) {
    const ring_view *rv = &c->rv;
    int32_t n = rv->n, p = rv->p;
    uint64_t S = c->segs;
    int32_t *rs_recv = malloc(sizeof(int32_t) * (size_t)(n - 1) * S);
    if (!rs_recv) {
        c->plan->failed = 1;
        return;
    }
    /* chunk at ring position q is the block of rank order[q-1]: position p
     * finishes with chunk p+1, the block of order[p] = this rank. */
#define BLOCK_START(pos) ((uint64_t)rv->order[mod((pos) - 1, n)] * count + share_start)
    for (int32_t s = 0; s < n - 1; s++) {
        int32_t send_ch = mod(p - s, n), recv_ch = mod(p - s - 1, n);
        int last = s == n - 2;
        for (uint64_t g = 0; g < S; g++) {
            uint64_t off, bytes;
            seg_range(c, BLOCK_START(send_ch), share_len, g, &off, &bytes);
            int32_t dep = s ? rs_recv[(s - 1) * S + g] : -1;
            plan_add(c->plan, PC_OP_SEND, rv->right, stripe_of(c, g), TAG(c->ring, 2, send_ch, g),
                     s ? PC_BUF_SCRATCH : PC_BUF_IN, off, -1, 0, bytes, &dep, 1);
        }
        for (uint64_t g = 0; g < S; g++) {
            uint64_t off, bytes, out_off, out_bytes;
            seg_range(c, BLOCK_START(recv_ch), share_len, g, &off, &bytes);
            seg_range(c, share_start, share_len, g, &out_off, &out_bytes);
            rs_recv[s * S + g] = plan_add(c->plan, PC_OP_RECV_REDUCE, rv->left, stripe_of(c, g),
                                          TAG(c->ring, 2, recv_ch, g), PC_BUF_IN, off,
                                          last ? PC_BUF_OUT : PC_BUF_SCRATCH, last ? out_off : off,
                                          bytes, NULL, 0);
            if (last && c->op_avg)
                plan_add(c->plan, PC_OP_SCALE, -1, 0, 0, -1, 0, PC_BUF_OUT, out_off, out_bytes,
                         &rs_recv[s * S + g], 1);
        }
    }
#undef BLOCK_START
    free(rs_recv);
}

/* ---- all-gather: IN one block of `count`, OUT n blocks ----------------- */
static void ring_allgather(ctx *c, uint64_t count, uint64_t share_start, uint64_t share_len) {
    const ring_view *rv = &c->rv;
    int32_t n = rv->n, p = rv->p;
    uint64_t S = c->segs;
    int32_t *recv_ops = malloc(sizeof(int32_t) * (size_t)(n - 1) * S);
    if (!recv_ops) {
        c->plan->failed = 1;
        return;
    }
#define BLOCK_START(pos) ((uint64_t)rv->order[mod((pos), n)] * count + share_start)
    for (int32_t s = 0; s < n - 1; s++) {
        int32_t send_pos = mod(p - s, n), recv_pos = mod(p - s - 1, n);
        for (uint64_t g = 0; g < S; g++) {
            uint64_t off, bytes;
            if (s == 0)
                seg_range(c, share_start, share_len, g, &off, &bytes); /* straight from IN */
            else
                seg_range(c, BLOCK_START(send_pos), share_len, g, &off, &bytes);
            int32_t dep = s ? recv_ops[(s - 1) * S + g] : -1;
            plan_add(c->plan, PC_OP_SEND, rv->right, stripe_of(c, g), TAG(c->ring, 3, send_pos, g),
                     s ? PC_BUF_OUT : PC_BUF_IN, off, -1, 0, bytes, &dep, 1);
        }
        for (uint64_t g = 0; g < S; g++) {
            uint64_t off, bytes;
            seg_range(c, BLOCK_START(recv_pos), share_len, g, &off, &bytes);
            recv_ops[s * S + g] = plan_add(c->plan, PC_OP_RECV, rv->left, stripe_of(c, g),
                                           TAG(c->ring, 3, recv_pos, g), -1, 0, PC_BUF_OUT, off,
                                           bytes, NULL, 0);
        }
    }
#undef BLOCK_START
    free(recv_ops);
}

/* ---- broadcast: a pipelined chain from the root along the ring --------- */
static void ring_broadcast(ctx *c, int32_t root, uint64_t base, uint64_t len, uint32_t flags) {
    const ring_view *rv = &c->rv;
    int32_t n = rv->n, p = rv->p, root_pos = -1;
    for (int32_t i = 0; i < n; i++)
        if (rv->order[i] == root) root_pos = i;
    int32_t q = mod(p - root_pos, n); /* distance from the root along the ring */
    int32_t dst = (flags & PC_PLAN_PRESERVE_INPUT) ? PC_BUF_SCRATCH : PC_BUF_OUT;
    for (uint64_t g = 0; g < c->segs; g++) {
        uint64_t off, bytes;
        seg_range(c, base, len, g, &off, &bytes);
        int32_t got = -1;
        if (q > 0)
            got = plan_add(c->plan, PC_OP_RECV, rv->left, stripe_of(c, g), TAG(c->ring, 0, 0, g),
                           -1, 0, dst, off, bytes, NULL, 0);
        if (q < n - 1)
            plan_add(c->plan, PC_OP_SEND, rv->right, stripe_of(c, g), TAG(c->ring, 0, 0, g),
                     q == 0 ? PC_BUF_IN : dst, off, -1, 0, bytes, &got, 1);
    }
}

/* ---- barrier: dissemination, ceil(lg n) rounds of empty frames --------- */
static void plan_barrier(pc_plan *plan, int32_t n, int32_t rank) {
    int32_t prev = -1;
    for (int32_t k = 0, dist = 1; dist < n; k++, dist *= 2) {
        int32_t to = (rank + dist) % n, from = (rank - dist + n) % n;
        plan_add(plan, PC_OP_SEND, to, 0, (uint32_t)k, -1, 0, -1, 0, 0, &prev, 1);
        prev = plan_add(plan, PC_OP_RECV, from, 0, (uint32_t)k, -1, 0, -1, 0, 0, NULL, 0);
    }
}

/* Every ring must visit each rank exactly once. */
static int rings_are_permutations(const int32_t *rings, int32_t nrings, int32_t n) {
    uint8_t *seen = calloc((size_t)n, 1);
    if (!seen) return 0;
    int ok = 1;
    for (int32_t r = 0; r < nrings && ok; r++) {
        memset(seen, 0, (size_t)n);
        for (int32_t i = 0; i < n && ok; i++) {
            int32_t v = rings[(size_t)r * n + i];
            if (v < 0 || v >= n || seen[v]) ok = 0;
            else seen[v] = 1;
        }
    }
    free(seen);
    return ok;
}

pc_status pc_plan_rings(pc_collective coll, int32_t nranks, int32_t rank,
                        const int32_t *rings, int32_t nrings, int32_t root,
                        uint64_t count, int32_t elem_size, uint64_t segment_bytes,
                        int32_t stripes, uint32_t flags, pc_plan **out) {
    *out = NULL;
    if (nranks < 1 || rank < 0 || rank >= nranks || elem_size <= 0 || stripes < 1 ||
        (coll != PC_COLL_BARRIER && (nrings < 1 || !rings)) || (root < 0 || root >= nranks))
        return PC_ERR_ARG;
    if (coll != PC_COLL_BARRIER && !rings_are_permutations(rings, nrings, nranks)) return PC_ERR_ARG;
    pc_plan *plan = plan_new(nranks, rank);
    if (!plan) return PC_ERR_NOMEM;
    uint64_t es = (uint64_t)elem_size;
    int op_avg = (flags & PC_PLAN_AVG) != 0;

    if (coll == PC_COLL_BARRIER) {
        plan_barrier(plan, nranks, rank);
        return plan_finish(plan, out);
    }
    if (nranks == 1) {
        /* No peers: the result is the input (avg over one rank is a no-op). */
        uint64_t bytes = count * es;
        if (coll != PC_COLL_BARRIER && bytes)
            plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_IN, 0, PC_BUF_OUT, 0, bytes, NULL, 0);
        return plan_finish(plan, out);
    }
    for (int32_t r = 0; r < nrings; r++) {
        ctx c = {.plan = plan, .ring = r, .stripes = stripes, .es = elem_size, .op_avg = op_avg};
        if (!ring_at(rings + (size_t)r * nranks, nranks, rank, &c.rv)) {
            pc_plan_free(plan);
            return PC_ERR_ARG;
        }
        uint64_t share_start = split_start(count, (uint64_t)nrings, (uint64_t)r);
        uint64_t share_len = split_len(count, (uint64_t)nrings, (uint64_t)r);
        switch (coll) {
        case PC_COLL_ALLREDUCE:
            c.segs = segments_for((share_len / (uint64_t)nranks + 1) * es, segment_bytes);
            ring_allreduce(&c, share_start, share_len, flags);
            break;
        case PC_COLL_REDUCE_SCATTER:
            c.segs = segments_for(share_len * es, segment_bytes);
            ring_reduce_scatter(&c, count, share_start, share_len);
            break;
        case PC_COLL_ALLGATHER:
            c.segs = segments_for(share_len * es, segment_bytes);
            ring_allgather(&c, count, share_start, share_len);
            break;
        case PC_COLL_BROADCAST:
            c.segs = segments_for(share_len * es, segment_bytes);
            ring_broadcast(&c, root, share_start, share_len, flags);
            break;
        default:
            pc_plan_free(plan);
            return PC_ERR_ARG;
        }
    }
    if (coll == PC_COLL_ALLGATHER) {
        /* Our own block: a local copy (skipped by the engine when IN is
         * already that block of OUT). */
        plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_IN, 0, PC_BUF_OUT, (uint64_t)rank * count * es,
                 count * es, NULL, 0);
    }
    if ((flags & PC_PLAN_PRESERVE_INPUT) && count &&
        (coll == PC_COLL_ALLREDUCE || (coll == PC_COLL_BROADCAST && rank != root))) {
        plan_begin_tail(plan);
        plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_SCRATCH, 0, PC_BUF_OUT, 0, count * es, NULL, 0);
    }
    return plan_finish(plan, out);
}
