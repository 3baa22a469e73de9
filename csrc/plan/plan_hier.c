/*
 * plan_hier.c - hierarchical ("in-network-style") all-reduce.
 *
 * Terms: every rank belongs to the group of one *aggregator*, agg_of[r]. An
 * aggregator stands in for an aggregating top-of-rack switch: it aggregates
 * itself, its *members* hand it their data and get the result back, and only
 * *ring ranks* (the aggregators, plus every rank of a group that has no
 * aggregator, which is its own aggregator with no members) run the
 * inter-group ring. With one aggregator per rack the ring shrinks from n
 * ranks to one per rack (Rina's "abstracted worker"); racks without one keep
 * their ranks in the ring, so a partial deployment still works.
 *
 * Schedule: the buffer is cut into the *pieces* of the inter-group ring
 * schedule (ring_sched in plan.h: ring share, chunk, segment). Members send
 * their input piece by piece in the order the aggregator's ring needs them
 * (its own chunk first). The aggregator computes, per piece,
 * acc = own (op) m1 (op) m2 ... in ascending member rank, then runs the ring
 * all-reduce on these partials (a piece enters the ring as soon as all its
 * members' data is in), and sends every piece back to all members the
 * moment it is final. Reduction order is fixed by the plans and every rank
 * ends with the bits its aggregator received from the ring, so results are
 * bit-identical on all ranks.
 *
 * With PC_PLAN_PRESERVE_INPUT the partials and results live in scratch and
 * a tail copy writes the caller's buffer after every transfer succeeded.
 */
#include <stdlib.h>

#include "plan.h"

#define HIER_TAG(phase, k) (0x40000000u | (((uint32_t)(phase) & 3u) << 28) | ((uint32_t)(k) & 0x0fffffffu))

enum { TO_AGG = 1, FROM_AGG = 2 };

#define P2P_TAG 0x70000001u

typedef struct {
    ring_sched rs;
    int switch_mode; /* PC_PLAN_SWITCH: this rank aggregates but has no data */
} hier_sched;

/* Pieces in the order the ring schedule reads this ring rank's local data:
 * at reduce-scatter step s it needs chunk p - s of every ring. */
static void need_order(const ring_sched *rs, const int32_t *pos, int32_t *ids) {
    int32_t k = 0, n = rs->n;
    for (int32_t s = 0; s < n; s++)
        for (uint64_t g = 0; g < rs->segs; g++)
            for (int32_t r = 0; r < rs->nrings; r++)
                ids[k++] = (int32_t)(((uint64_t)r * (uint64_t)n + (uint64_t)pc_mod(pos[r] - s, n)) * rs->segs + g);
}

static void piece_range(const ring_sched *rs, int32_t id, uint64_t *off, uint64_t *bytes) {
    uint64_t g = (uint64_t)id % rs->segs, rc = (uint64_t)id / rs->segs;
    ring_piece(rs, (int32_t)(rc / (uint64_t)rs->n), (int32_t)(rc % (uint64_t)rs->n), g, off, bytes);
}

static int valid_layout(int32_t n, const int32_t *agg_of, const int32_t *rings, int32_t nrings, int32_t nring) {
    int32_t ring_ranks = 0;
    for (int32_t r = 0; r < n; r++) {
        int32_t a = agg_of[r];
        if (a < 0 || a >= n || agg_of[a] != a) return 0;
        ring_ranks += a == r;
    }
    if (ring_ranks != nring) return 0;
    uint8_t *seen = malloc((size_t)n);
    if (!seen) return 0;
    int ok = 1;
    for (int32_t q = 0; q < nrings && ok; q++) {
        for (int32_t r = 0; r < n; r++) seen[r] = 0;
        for (int32_t i = 0; i < nring && ok; i++) {
            int32_t v = rings[(size_t)q * nring + i];
            if (v < 0 || v >= n || agg_of[v] != v || seen[v]) ok = 0;
            else seen[v] = 1;
        }
    }
    free(seen);
    return ok;
}

static pc_status hier_allreduce(hier_sched *hs, const int32_t *agg_of) {
    ring_sched *rs = &hs->rs;
    pc_plan *plan = rs->plan;
    int32_t rank = plan->rank, n = plan->nranks, agg = agg_of[rank];
    int32_t npieces = (int32_t)((uint64_t)rs->nrings * (uint64_t)rs->n * rs->segs);
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)rs->nrings);
    int32_t *need = malloc(sizeof(int32_t) * (size_t)npieces);
    int32_t *fin = malloc(sizeof(int32_t) * (size_t)npieces);
    int32_t *ready = malloc(sizeof(int32_t) * (size_t)npieces);
    int32_t *final_op = malloc(sizeof(int32_t) * (size_t)npieces);
    pc_status st = PC_ERR_NOMEM;
    if (!pos || !need || !fin || !ready || !final_op) goto out;
    for (int32_t r = 0; r < rs->nrings; r++) pos[r] = ring_position(rs->orders + (size_t)r * rs->n, rs->n, agg);
    need_order(rs, pos, need);
    st = ring_final_order(rs, agg, fin);
    if (st != PC_OK) goto out;

    if (agg != rank) { /* a member: data up, results down, nothing else */
        int32_t dst = rs->acc_buf;
        for (int32_t k = 0; k < npieces; k++) {
            uint64_t off, bytes;
            piece_range(rs, need[k], &off, &bytes);
            ready[need[k]] = plan_add(plan, PC_OP_SEND, agg, k % rs->stripes, HIER_TAG(TO_AGG, k), PC_BUF_IN, off,
                                      -1, 0, bytes, NULL, 0);
        }
        for (int32_t k = 0; k < npieces; k++) {
            uint64_t off, bytes;
            piece_range(rs, fin[k], &off, &bytes);
            /* in place, the piece must have left before it is overwritten */
            plan_add(plan, PC_OP_RECV, agg, k % rs->stripes, HIER_TAG(FROM_AGG, k), -1, 0, dst, off, bytes,
                     &ready[fin[k]], 1);
        }
        st = plan->failed ? PC_ERR_NOMEM : PC_OK;
        goto out;
    }
    int32_t nmembers = 0;
    for (int32_t r = 0; r < n; r++) nmembers += agg_of[r] == rank && r != rank;
    if (hs->switch_mode && !nmembers) {
        st = PC_ERR_ARG; /* a switch with nobody to aggregate has nothing to contribute */
        goto out;
    }
    if (nmembers) {
        for (int32_t k = 0; k < npieces; k++) {
            uint64_t off, bytes;
            piece_range(rs, need[k], &off, &bytes);
            int32_t prev = -1, src = PC_BUF_IN;
            for (int32_t r = 0; r < n; r++) {
                if (agg_of[r] != rank || r == rank) continue;
                if (hs->switch_mode && prev < 0) /* no own data: the first member's is the start */
                    prev = plan_add(plan, PC_OP_RECV, r, k % rs->stripes, HIER_TAG(TO_AGG, k), -1, 0,
                                    rs->acc_buf, off, bytes, NULL, 0);
                else
                    prev = plan_add(plan, PC_OP_RECV_REDUCE, r, k % rs->stripes, HIER_TAG(TO_AGG, k), src, off,
                                    rs->acc_buf, off, bytes, &prev, 1);
                src = rs->acc_buf;
            }
            ready[need[k]] = prev;
        }
        rs->local_buf = rs->acc_buf;
        rs->ready = ready;
    }
    rs->final_op = final_op;
    st = ring_sched_allreduce(rs);
    if (st != PC_OK || !nmembers) goto out;
    for (int32_t k = 0; k < npieces; k++) {
        uint64_t off, bytes;
        piece_range(rs, fin[k], &off, &bytes);
        for (int32_t r = 0; r < n; r++)
            if (agg_of[r] == rank && r != rank)
                plan_add(plan, PC_OP_SEND, r, k % rs->stripes, HIER_TAG(FROM_AGG, k), rs->acc_buf, off, -1, 0,
                         bytes, &final_op[fin[k]], 1);
    }
    st = plan->failed ? PC_ERR_NOMEM : PC_OK;
out:
    free(pos);
    free(need);
    free(fin);
    free(ready);
    free(final_op);
    return st;
}

pc_status pc_plan_hier(pc_collective coll, int32_t nranks, int32_t rank, const int32_t *agg_of,
                       const int32_t *rings, int32_t nrings, int32_t nring, uint64_t count, int32_t elem_size,
                       uint64_t segment_bytes, int32_t stripes, uint32_t flags, pc_plan **out) {
    *out = NULL;
    if (nranks < 1 || rank < 0 || rank >= nranks || elem_size <= 0 || stripes < 1 || !agg_of || !rings ||
        nrings < 1 || nrings > 256 || nring < 1 || nring > nranks || coll != PC_COLL_ALLREDUCE)
        return PC_ERR_ARG;
    if (!valid_layout(nranks, agg_of, rings, nrings, nring)) return PC_ERR_ARG;
    pc_plan *plan = plan_new(nranks, rank);
    if (!plan) return PC_ERR_NOMEM;
    uint64_t es = (uint64_t)elem_size;
    if (nranks == 1) {
        if (count) plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_IN, 0, PC_BUF_OUT, 0, count * es, NULL, 0);
        return plan_finish(plan, out);
    }
    plan_announce(plan); /* members and aggregators begin by waiting: see plan.h */
    uint32_t sw = flags & PC_PLAN_SWITCH;
    if (sw && (agg_of[rank] != rank || (flags & PC_PLAN_AVG))) { /* avg would divide by the engine size */
        pc_plan_free(plan);
        return PC_ERR_ARG;
    }
    hier_sched hs = {.switch_mode = sw != 0};
    hs.rs = (ring_sched){.plan = plan, .orders = rings, .nrings = nrings, .n = nring, .stripes = stripes,
                     .es = elem_size, .op_avg = (flags & PC_PLAN_AVG) != 0, .count = count,
                     .segs = ring_sched_segments(count, nrings, nring, elem_size, segment_bytes),
                     .local_buf = PC_BUF_IN,
                     .acc_buf = (flags & (PC_PLAN_PRESERVE_INPUT | PC_PLAN_SWITCH)) ? PC_BUF_SCRATCH : PC_BUF_OUT};
    pc_status st = hier_allreduce(&hs, agg_of);
    if (st != PC_OK) {
        pc_plan_free(plan);
        return st;
    }
    if ((flags & PC_PLAN_PRESERVE_INPUT) && !sw && count) {
        plan_begin_tail(plan);
        plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_SCRATCH, 0, PC_BUF_OUT, 0, count * es, NULL, 0);
    }
    return plan_finish(plan, out);
}

pc_status pc_plan_p2p(int32_t nranks, int32_t rank, int32_t peer, uint64_t nbytes, int32_t send, pc_plan **out) {
    *out = NULL;
    if (nranks < 2 || rank < 0 || rank >= nranks || peer < 0 || peer >= nranks || peer == rank ||
        nbytes > (1u << 20))
        return PC_ERR_ARG;
    pc_plan *plan = plan_new(nranks, rank);
    if (!plan) return PC_ERR_NOMEM;
    if (send)
        plan_add(plan, PC_OP_SEND, peer, 0, P2P_TAG, PC_BUF_IN, 0, -1, 0, nbytes, NULL, 0);
    else
        plan_add(plan, PC_OP_RECV, peer, 0, P2P_TAG, -1, 0, PC_BUF_OUT, 0, nbytes, NULL, 0);
    return plan_finish(plan, out);
}
