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
 * Several rings: ops are emitted in (step, segment, ring) order. Only the
 * order of ops on one connection matters to the engine, and both ends of a
 * connection emit in this same order; when two rings share a connection
 * (the balanced multi-ring for 4 and 6 ranks) they alternate segment by
 * segment instead of one ring waiting for the other to finish.
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

uint64_t plan_segments(uint64_t max_piece_bytes, uint64_t segment_bytes) {
    if (segment_bytes == 0 || max_piece_bytes <= segment_bytes) return 1;
    uint64_t s = (max_piece_bytes + segment_bytes - 1) / segment_bytes;
    return s > 4096 ? 4096 : s;
}

int32_t ring_position(const int32_t *order, int32_t n, int32_t rank) {
    for (int32_t i = 0; i < n; i++)
        if (order[i] == rank) return i;
    return -1;
}

static int32_t stripe_of(int32_t stripes, uint64_t g, int32_t ring) {
    return (int32_t)((g + (uint64_t)ring) % (uint64_t)stripes);
}

/* ---- the embeddable all-reduce schedule -------------------------------- */
uint64_t ring_sched_segments(uint64_t count, int32_t nrings, int32_t n, int32_t es, uint64_t segment_bytes) {
    uint64_t share = count / (uint64_t)nrings + 1;
    return plan_segments((share / (uint64_t)n + 1) * (uint64_t)es, segment_bytes);
}

void ring_piece(const ring_sched *rs, int32_t r, int32_t c, uint64_t g, uint64_t *off, uint64_t *bytes) {
    uint64_t base = split_start(rs->count, (uint64_t)rs->nrings, (uint64_t)r);
    uint64_t len = split_len(rs->count, (uint64_t)rs->nrings, (uint64_t)r);
    uint64_t cs = base + split_start(len, (uint64_t)rs->n, (uint64_t)c);
    uint64_t cl = split_len(len, (uint64_t)rs->n, (uint64_t)c);
    *off = (cs + split_start(cl, rs->segs, g)) * (uint64_t)rs->es;
    *bytes = split_len(cl, rs->segs, g) * (uint64_t)rs->es;
}

static int32_t piece_id(const ring_sched *rs, int32_t r, int32_t c, uint64_t g) {
    return (int32_t)(((uint64_t)r * (uint64_t)rs->n + (uint64_t)c) * rs->segs + g);
}

static int32_t ready_of(const ring_sched *rs, int32_t r, int32_t c, uint64_t g) {
    return rs->ready ? rs->ready[piece_id(rs, r, c, g)] : -1;
}

pc_status ring_final_order(const ring_sched *rs, int32_t rank, int32_t *ids) {
    int32_t n = rs->n, k = 0;
    for (int32_t f = 0; f < n; f++) /* f = 0: the owned chunk; f = s+1: all-gather step s */
        for (uint64_t g = 0; g < rs->segs; g++)
            for (int32_t r = 0; r < rs->nrings; r++) {
                int32_t p = ring_position(rs->orders + (size_t)r * n, n, rank);
                if (p < 0) return PC_ERR_ARG;
                int32_t c = n == 1 ? 0 : (f == 0 ? pc_mod(p + 1, n) : pc_mod(p - (f - 1), n));
                ids[k++] = piece_id(rs, r, c, g);
            }
    return PC_OK;
}

pc_status ring_sched_allreduce(ring_sched *rs) {
    pc_plan *plan = rs->plan;
    int32_t n = rs->n, R = rs->nrings, acc = rs->acc_buf;
    uint64_t S = rs->segs;
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)R);
    if (!pos) return PC_ERR_NOMEM;
    for (int32_t r = 0; r < R; r++) {
        pos[r] = ring_position(rs->orders + (size_t)r * n, n, plan->rank);
        if (pos[r] < 0) {
            free(pos);
            return PC_ERR_ARG;
        }
    }
    if (n == 1) { /* nobody to exchange with: the local data is the result */
        for (int32_t r = 0; r < R; r++)
            for (uint64_t g = 0; g < S; g++) {
                uint64_t off, bytes;
                ring_piece(rs, r, 0, g, &off, &bytes);
                int32_t op = ready_of(rs, r, 0, g);
                if (rs->local_buf != acc)
                    op = plan_add(plan, PC_OP_COPY, -1, 0, 0, rs->local_buf, off, acc, off, bytes, &op, 1);
                if (rs->op_avg) op = plan_add(plan, PC_OP_SCALE, -1, 0, 0, -1, 0, acc, off, bytes, &op, 1);
                if (rs->final_op) rs->final_op[piece_id(rs, r, 0, g)] = op;
            }
        free(pos);
        return plan->failed ? PC_ERR_NOMEM : PC_OK;
    }
    size_t nslots = (size_t)(n - 1) * S * (size_t)R;
    int32_t *rs_send = malloc(sizeof(int32_t) * nslots);
    int32_t *rs_recv = malloc(sizeof(int32_t) * nslots);
    int32_t *ag_recv = malloc(sizeof(int32_t) * nslots);
    if (!rs_send || !rs_recv || !ag_recv) {
        free(pos);
        free(rs_send);
        free(rs_recv);
        free(ag_recv);
        return PC_ERR_NOMEM;
    }
#define SLOT(s, g, r) ((((size_t)(s) * S + (g)) * (size_t)R) + (size_t)(r))
#define LEFT(r) rs->orders[(size_t)(r) * n + (size_t)pc_mod(pos[r] - 1, n)]
#define RIGHT(r) rs->orders[(size_t)(r) * n + (size_t)pc_mod(pos[r] + 1, n)]
    for (int32_t s = 0; s < n - 1; s++) {
        for (uint64_t g = 0; g < S; g++)
            for (int32_t r = 0; r < R; r++) {
                int32_t ch = pc_mod(pos[r] - s, n);
                uint64_t off, bytes;
                ring_piece(rs, r, ch, g, &off, &bytes);
                int32_t dep = s ? rs_recv[SLOT(s - 1, g, r)] : ready_of(rs, r, ch, g);
                rs_send[SLOT(s, g, r)] = plan_add(plan, PC_OP_SEND, RIGHT(r), stripe_of(rs->stripes, g, r),
                                                  rs->tag_base | TAG(r, 0, ch, g), s ? acc : rs->local_buf,
                                                  off, -1, 0, bytes, &dep, 1);
            }
        for (uint64_t g = 0; g < S; g++)
            for (int32_t r = 0; r < R; r++) {
                int32_t ch = pc_mod(pos[r] - s - 1, n);
                uint64_t off, bytes;
                ring_piece(rs, r, ch, g, &off, &bytes);
                int32_t dep = ready_of(rs, r, ch, g);
                rs_recv[SLOT(s, g, r)] = plan_add(plan, PC_OP_RECV_REDUCE, LEFT(r), stripe_of(rs->stripes, g, r),
                                                  rs->tag_base | TAG(r, 0, ch, g), rs->local_buf, off, acc, off,
                                                  bytes, &dep, 1);
            }
    }
    /* The owned chunk is complete: average it once, here, so every rank
     * receives the same scaled bits in the all-gather. */
    for (uint64_t g = 0; g < S; g++)
        for (int32_t r = 0; r < R; r++) {
            int32_t own = pc_mod(pos[r] + 1, n);
            int32_t *last = &rs_recv[SLOT(n - 2, g, r)];
            if (rs->op_avg) {
                uint64_t off, bytes;
                ring_piece(rs, r, own, g, &off, &bytes);
                *last = plan_add(plan, PC_OP_SCALE, -1, 0, 0, -1, 0, acc, off, bytes, last, 1);
            }
            if (rs->final_op) rs->final_op[piece_id(rs, r, own, g)] = *last;
        }
    for (int32_t s = 0; s < n - 1; s++) {
        for (uint64_t g = 0; g < S; g++)
            for (int32_t r = 0; r < R; r++) {
                int32_t ch = pc_mod(pos[r] + 1 - s, n);
                uint64_t off, bytes;
                ring_piece(rs, r, ch, g, &off, &bytes);
                int32_t dep = s ? ag_recv[SLOT(s - 1, g, r)] : rs_recv[SLOT(n - 2, g, r)];
                plan_add(plan, PC_OP_SEND, RIGHT(r), stripe_of(rs->stripes, g, r), rs->tag_base | TAG(r, 1, ch, g),
                         acc, off, -1, 0, bytes, &dep, 1);
            }
        for (uint64_t g = 0; g < S; g++)
            for (int32_t r = 0; r < R; r++) {
                int32_t ch = pc_mod(pos[r] - s, n);
                uint64_t off, bytes;
                ring_piece(rs, r, ch, g, &off, &bytes);
                /* In place, this chunk may still be on its way out from the
                 * reduce-scatter: do not overwrite it before that send is done. */
                int32_t dep = rs_send[SLOT(s, g, r)];
                int32_t op = plan_add(plan, PC_OP_RECV, LEFT(r), stripe_of(rs->stripes, g, r),
                                      rs->tag_base | TAG(r, 1, ch, g), -1, 0, acc, off, bytes, &dep, 1);
                ag_recv[SLOT(s, g, r)] = op;
                if (rs->final_op) rs->final_op[piece_id(rs, r, ch, g)] = op;
            }
    }
#undef SLOT
#undef LEFT
#undef RIGHT
    free(pos);
    free(rs_send);
    free(rs_recv);
    free(ag_recv);
    return plan->failed ? PC_ERR_NOMEM : PC_OK;
}

/* ---- the other collectives --------------------------------------------- */
typedef struct {
    pc_plan *plan;
    const int32_t *orders;
    int32_t nrings, n, stripes, es, op_avg;
    int32_t *pos;          /* this rank's position per ring */
    uint64_t count, segs;  /* count: elements per block (the split unit) */
} multi;

#define M_LEFT(m, r) (m)->orders[(size_t)(r) * (m)->n + (size_t)pc_mod((m)->pos[r] - 1, (m)->n)]
#define M_RIGHT(m, r) (m)->orders[(size_t)(r) * (m)->n + (size_t)pc_mod((m)->pos[r] + 1, (m)->n)]

/* Byte range of segment g of ring r's share inside block `block` (block
 * -1: the share of a buffer that holds one block at offset 0). */
static void share_seg(const multi *m, int32_t r, int64_t block, uint64_t g, uint64_t *off, uint64_t *bytes) {
    uint64_t start = split_start(m->count, (uint64_t)m->nrings, (uint64_t)r);
    uint64_t len = split_len(m->count, (uint64_t)m->nrings, (uint64_t)r);
    uint64_t base = block < 0 ? 0 : (uint64_t)block * m->count;
    *off = (base + start + split_start(len, m->segs, g)) * (uint64_t)m->es;
    *bytes = split_len(len, m->segs, g) * (uint64_t)m->es;
}

/* ---- reduce-scatter: IN has n blocks of `count`, OUT one block --------- */
static pc_status multi_reduce_scatter(multi *m) {
    int32_t n = m->n, R = m->nrings;
    uint64_t S = m->segs;
    int32_t *rs_recv = malloc(sizeof(int32_t) * (size_t)(n - 1) * S * (size_t)R);
    if (!rs_recv) return PC_ERR_NOMEM;
#define SLOT(s, g, r) ((((size_t)(s) * S + (g)) * (size_t)R) + (size_t)(r))
    /* chunk at ring position q is the block of rank order[q-1]: position p
     * finishes with chunk p+1, the block of order[p] = this rank. */
#define BLOCK(r, pos) ((int64_t)m->orders[(size_t)(r) * n + (size_t)pc_mod((pos) - 1, n)])
    for (int32_t s = 0; s < n - 1; s++) {
        int last = s == n - 2;
        for (uint64_t g = 0; g < S; g++)
            for (int32_t r = 0; r < R; r++) {
                int32_t ch = pc_mod(m->pos[r] - s, n);
                uint64_t off, bytes;
                share_seg(m, r, BLOCK(r, ch), g, &off, &bytes);
                int32_t dep = s ? rs_recv[SLOT(s - 1, g, r)] : -1;
                plan_add(m->plan, PC_OP_SEND, M_RIGHT(m, r), stripe_of(m->stripes, g, r), TAG(r, 2, ch, g),
                         s ? PC_BUF_SCRATCH : PC_BUF_IN, off, -1, 0, bytes, &dep, 1);
            }
        for (uint64_t g = 0; g < S; g++)
            for (int32_t r = 0; r < R; r++) {
                int32_t ch = pc_mod(m->pos[r] - s - 1, n);
                uint64_t off, bytes, out_off, out_bytes;
                share_seg(m, r, BLOCK(r, ch), g, &off, &bytes);
                share_seg(m, r, -1, g, &out_off, &out_bytes);
                int32_t op = plan_add(m->plan, PC_OP_RECV_REDUCE, M_LEFT(m, r), stripe_of(m->stripes, g, r),
                                      TAG(r, 2, ch, g), PC_BUF_IN, off, last ? PC_BUF_OUT : PC_BUF_SCRATCH,
                                      last ? out_off : off, bytes, NULL, 0);
                rs_recv[SLOT(s, g, r)] = op;
                if (last && m->op_avg)
                    plan_add(m->plan, PC_OP_SCALE, -1, 0, 0, -1, 0, PC_BUF_OUT, out_off, out_bytes, &op, 1);
            }
    }
#undef BLOCK
#undef SLOT
    free(rs_recv);
    return PC_OK;
}

/* ---- all-gather: IN one block of `count`, OUT n blocks ----------------- */
static pc_status multi_allgather(multi *m) {
    int32_t n = m->n, R = m->nrings;
    uint64_t S = m->segs;
    int32_t *recv_ops = malloc(sizeof(int32_t) * (size_t)(n - 1) * S * (size_t)R);
    if (!recv_ops) return PC_ERR_NOMEM;
#define SLOT(s, g, r) ((((size_t)(s) * S + (g)) * (size_t)R) + (size_t)(r))
#define BLOCK(r, pos) ((int64_t)m->orders[(size_t)(r) * n + (size_t)pc_mod((pos), n)])
    for (int32_t s = 0; s < n - 1; s++) {
        for (uint64_t g = 0; g < S; g++)
            for (int32_t r = 0; r < R; r++) {
                int32_t sp = pc_mod(m->pos[r] - s, n);
                uint64_t off, bytes;
                share_seg(m, r, s ? BLOCK(r, sp) : -1, g, &off, &bytes); /* step 0: straight from IN */
                int32_t dep = s ? recv_ops[SLOT(s - 1, g, r)] : -1;
                plan_add(m->plan, PC_OP_SEND, M_RIGHT(m, r), stripe_of(m->stripes, g, r), TAG(r, 3, sp, g),
                         s ? PC_BUF_OUT : PC_BUF_IN, off, -1, 0, bytes, &dep, 1);
            }
        for (uint64_t g = 0; g < S; g++)
            for (int32_t r = 0; r < R; r++) {
                int32_t rp = pc_mod(m->pos[r] - s - 1, n);
                uint64_t off, bytes;
                share_seg(m, r, BLOCK(r, rp), g, &off, &bytes);
                recv_ops[SLOT(s, g, r)] = plan_add(m->plan, PC_OP_RECV, M_LEFT(m, r), stripe_of(m->stripes, g, r),
                                                   TAG(r, 3, rp, g), -1, 0, PC_BUF_OUT, off, bytes, NULL, 0);
            }
    }
#undef BLOCK
#undef SLOT
    free(recv_ops);
    return PC_OK;
}

/* ---- broadcast: a pipelined chain from the root along each ring -------- */
static pc_status multi_broadcast(multi *m, int32_t root, uint32_t flags) {
    int32_t n = m->n, R = m->nrings;
    int32_t dst = (flags & PC_PLAN_PRESERVE_INPUT) ? PC_BUF_SCRATCH : PC_BUF_OUT;
    for (uint64_t g = 0; g < m->segs; g++)
        for (int32_t r = 0; r < R; r++) {
            int32_t q = pc_mod(m->pos[r] - ring_position(m->orders + (size_t)r * n, n, root), n);
            uint64_t off, bytes;
            share_seg(m, r, -1, g, &off, &bytes);
            int32_t got = -1;
            if (q > 0)
                got = plan_add(m->plan, PC_OP_RECV, M_LEFT(m, r), stripe_of(m->stripes, g, r), TAG(r, 0, 0, g), -1,
                               0, dst, off, bytes, NULL, 0);
            if (q < n - 1)
                plan_add(m->plan, PC_OP_SEND, M_RIGHT(m, r), stripe_of(m->stripes, g, r), TAG(r, 0, 0, g),
                         q == 0 ? PC_BUF_IN : dst, off, -1, 0, bytes, &got, 1);
        }
    return PC_OK;
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
        (coll != PC_COLL_BARRIER && (nrings < 1 || nrings > 256 || !rings)) || (root < 0 || root >= nranks))
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
        if (bytes) plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_IN, 0, PC_BUF_OUT, 0, bytes, NULL, 0);
        return plan_finish(plan, out);
    }
    if (coll == PC_COLL_BROADCAST) plan_agree(plan); /* the root receives nothing else: see plan.h */
    pc_status st = PC_OK;
    if (coll == PC_COLL_ALLREDUCE) {
        ring_sched rs = {.plan = plan, .orders = rings, .nrings = nrings, .n = nranks, .stripes = stripes,
                         .es = elem_size, .op_avg = op_avg, .count = count,
                         .segs = ring_sched_segments(count, nrings, nranks, elem_size, segment_bytes),
                         .local_buf = PC_BUF_IN,
                         .acc_buf = (flags & PC_PLAN_PRESERVE_INPUT) ? PC_BUF_SCRATCH : PC_BUF_OUT};
        st = ring_sched_allreduce(&rs);
    } else {
        int32_t *pos = malloc(sizeof(int32_t) * (size_t)nrings);
        if (!pos) {
            pc_plan_free(plan);
            return PC_ERR_NOMEM;
        }
        for (int32_t r = 0; r < nrings; r++) pos[r] = ring_position(rings + (size_t)r * nranks, nranks, rank);
        multi m = {.plan = plan, .orders = rings, .nrings = nrings, .n = nranks, .stripes = stripes,
                   .es = elem_size, .op_avg = op_avg, .pos = pos, .count = count,
                   .segs = plan_segments((count / (uint64_t)nrings + 1) * es, segment_bytes)};
        switch (coll) {
        case PC_COLL_REDUCE_SCATTER: st = multi_reduce_scatter(&m); break;
        case PC_COLL_ALLGATHER: st = multi_allgather(&m); break;
        case PC_COLL_BROADCAST: st = multi_broadcast(&m, root, flags); break;
        default: st = PC_ERR_ARG; break;
        }
        free(pos);
    }
    if (st != PC_OK) {
        pc_plan_free(plan);
        return st;
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
