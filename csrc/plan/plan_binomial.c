/*
 * plan_binomial.c - rooted collectives over a binomial tree: reduce, gather,
 * scatter in ceil(lg n) rounds instead of the one-step plans of
 * plan_exchange.c.
 *
 * Terms: ranks are renumbered relative to the root, v = (rank - root) mod n.
 * Node v > 0 has parent v - lowbit(v); its children are v + 2^j for every
 * 2^j < lowbit(v) with v + 2^j < n (the root: every 2^j < n). The subtree of
 * child c = v + 2^j is the relative range [c, min(c + 2^j, n)). The root
 * handles lg n frames instead of n - 1.
 *
 * Reduce: per segment, node v computes
 *     acc = x_v (op) S(v+1) (op) S(v+2) (op) S(v+4) ...
 * left to right as the children's partial results arrive, S(c) being the
 * subtree result of child c, and sends acc to its parent; the root's acc is
 * the result (divided once, there, for avg). So the order is relative rank
 * order starting at the root, grouped by subtrees: for 4 ranks and root 0,
 * (x0 + x1) + (x2 + x3). It is a fixed function of (n, root), so every call
 * with the same arguments gives the same bits; it differs from the direct
 * plan's rank-order chain in float rounding.
 *
 * Gather / scatter: each frame carries the blocks of a subtree, cut into
 * *pieces* at the child's own block (sent from or received into the
 * caller's buffer) and at the relative rank where actual ranks wrap to 0
 * (so each piece is contiguous in the root's buffer, which holds blocks in
 * actual rank order). Sender and receiver cut a range the same way.
 * Interior nodes keep their subtree's other blocks in scratch, in relative
 * order.
 *
 * Every plan opens with plan_agree's frames (as plan_exchange.c's rooted
 * plans): a rank that names another root fails the header check at once,
 * on every rank. Sends of a node depend only on receives from its children
 * (reduce, gather) or its parent (scatter): the plans are trees, hence no
 * deadlock.
 */
#include "plan.h"

#define BINOM_REDUCE_TAG 0xc4000000u
#define BINOM_BLOCK_TAG 0xc5000000u
#define MAX_PIECES 3   /* a range cut at its first block's end and at the wrap */
#define MAX_LEVELS 32  /* children per node: at most lg n < 31 */

static int32_t lowbit(int32_t x) { return x & -x; }

/* Parent (-1 at the root), children (ascending) and subtree end of relative rank v. */
static int32_t tree_node(int32_t n, int32_t v, int32_t *parent, int32_t *kids) {
    int32_t span = v == 0 ? n : lowbit(v), nk = 0;
    *parent = v == 0 ? -1 : v - lowbit(v);
    for (int64_t d = 1; d < span && v + d < n; d *= 2) kids[nk++] = v + (int32_t)d;
    return nk;
}

static int32_t subtree_end(int32_t n, int32_t c) {
    int64_t e = (int64_t)c + (c == 0 ? n : lowbit(c));
    return e < n ? (int32_t)e : n;
}

static int32_t actual(int32_t v, int32_t root, int32_t n) { return (int32_t)(((int64_t)v + root) % n); }

/* Cuts relative range [a, e) at a + 1 and at `wrap`; returns the number of pieces. */
static int32_t pieces(int32_t a, int32_t e, int32_t wrap, int32_t *start, int32_t *end) {
    int32_t cuts[4] = {a, 0, 0, 0}, nc = 1;
    if (a + 1 < e) cuts[nc++] = a + 1;
    if (wrap > a + 1 && wrap < e) cuts[nc++] = wrap;
    cuts[nc] = e;
    for (int32_t i = 0; i < nc; i++) {
        start[i] = cuts[i];
        end[i] = cuts[i + 1];
    }
    return nc;
}

static int bad_args(int32_t nranks, int32_t rank, int32_t root) {
    return nranks < 1 || rank < 0 || rank >= nranks || root < 0 || root >= nranks;
}

pc_status pc_plan_binomial_reduce(int32_t nranks, int32_t rank, int32_t root, uint64_t count, int32_t elem_size,
                                  uint64_t segment_bytes, int32_t stripes, uint32_t flags, pc_plan **out) {
    *out = NULL;
    if (bad_args(nranks, rank, root) || elem_size <= 0 || stripes < 1 || segment_bytes == 0) return PC_ERR_ARG;
    if (count > UINT64_MAX / (uint64_t)elem_size / 2) return PC_ERR_ARG;
    pc_plan *plan = plan_new(nranks, rank);
    if (!plan) return PC_ERR_NOMEM;
    uint64_t es = (uint64_t)elem_size, bytes = count * es;
    if (nranks > 1) plan_agree(plan);
    if (nranks == 1 || bytes == 0) {
        if (bytes) plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_IN, 0, PC_BUF_OUT, 0, bytes, NULL, 0);
        return plan_finish(plan, out);
    }
    int32_t v = pc_mod((int64_t)rank - root, nranks), parent, kids[MAX_LEVELS];
    int32_t nk = tree_node(nranks, v, &parent, kids);
    /* segments of whole elements, the same cut on every rank: the tree is
     * pipelined, a node forwards segment g while g + 1 arrives */
    uint64_t segs = plan_segments(bytes, segment_bytes);
    if (segs > count) segs = count;
    for (uint64_t g = 0; g < segs; g++) {
        uint64_t off = split_start(count, segs, g) * es, len = split_len(count, segs, g) * es;
        int32_t stripe = (int32_t)(g % (uint64_t)stripes), prev = -1, left = PC_BUF_IN;
        uint32_t tag = BINOM_REDUCE_TAG | (uint32_t)(g & 0xfff);
        for (int32_t k = 0; k < nk; k++) { /* acc = acc (op) S(child k) */
            prev = plan_add(plan, PC_OP_RECV_REDUCE, actual(kids[k], root, nranks), stripe, tag, left, off,
                            PC_BUF_SCRATCH, off, len, &prev, 1);
            left = PC_BUF_SCRATCH;
        }
        if (parent >= 0)
            plan_add(plan, PC_OP_SEND, actual(parent, root, nranks), stripe, tag, left, off, -1, 0, len, &prev, 1);
        else if (flags & PC_PLAN_AVG)
            plan_add(plan, PC_OP_SCALE, -1, 0, 0, -1, 0, PC_BUF_SCRATCH, off, len, &prev, 1);
    }
    if (parent < 0) { /* the root writes its buffer only once everything arrived */
        plan_begin_tail(plan);
        plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_SCRATCH, 0, PC_BUF_OUT, 0, bytes, NULL, 0);
    }
    return plan_finish(plan, out);
}

/* Where relative block u lives at node v: the caller's block buffer (own),
 * the root's whole buffer (actual rank order) or scratch (relative order). */
static void block_at(int32_t v, int32_t u, int32_t root, int32_t n, int32_t own_buf, int32_t whole_buf,
                     uint64_t nbytes, int32_t *buf, uint64_t *off) {
    if (v == 0) {
        *buf = whole_buf;
        *off = (uint64_t)actual(u, root, n) * nbytes;
    } else if (u == v) {
        *buf = own_buf;
        *off = 0;
    } else {
        *buf = PC_BUF_SCRATCH;
        *off = (uint64_t)(u - v - 1) * nbytes;
    }
}

pc_status pc_plan_binomial_rooted(pc_collective coll, int32_t nranks, int32_t rank, int32_t root, uint64_t nbytes,
                                  pc_plan **out) {
    *out = NULL;
    if (bad_args(nranks, rank, root) || (coll != PC_COLL_GATHER && coll != PC_COLL_SCATTER)) return PC_ERR_ARG;
    if (nbytes > UINT64_MAX / 2 / (uint64_t)nranks) return PC_ERR_ARG;
    int gather = coll == PC_COLL_GATHER;
    pc_plan *plan = plan_new(nranks, rank);
    if (!plan) return PC_ERR_NOMEM;
    if (nranks > 1) plan_agree(plan);
    int32_t n = nranks, v = pc_mod((int64_t)rank - root, n), wrap = n - root, parent, kids[MAX_LEVELS];
    int32_t nk = tree_node(n, v, &parent, kids);
    /* gather: own block in IN, the whole in OUT; scatter: the reverse */
    int32_t own = gather ? PC_BUF_IN : PC_BUF_OUT, whole = gather ? PC_BUF_OUT : PC_BUF_IN;
    if (v == 0 && nbytes)
        plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_IN, gather ? 0 : (uint64_t)root * nbytes, PC_BUF_OUT,
                 gather ? (uint64_t)root * nbytes : 0, nbytes, NULL, 0);
    int32_t ps[MAX_PIECES], pe[MAX_PIECES], got[MAX_LEVELS * MAX_PIECES], ngot = 0;
    /* the frames that bring this node its data: from the children (gather)
     * or from the parent (scatter) */
    if (gather) {
        for (int32_t k = 0; k < nk; k++) {
            int32_t np = pieces(kids[k], subtree_end(n, kids[k]), wrap, ps, pe);
            for (int32_t i = 0; i < np; i++) {
                int32_t buf;
                uint64_t off;
                block_at(v, ps[i], root, n, own, whole, nbytes, &buf, &off);
                got[ngot++] = plan_add(plan, PC_OP_RECV, actual(kids[k], root, n), 0, BINOM_BLOCK_TAG | (uint32_t)i,
                                       -1, 0, buf, off, (uint64_t)(pe[i] - ps[i]) * nbytes, NULL, 0);
            }
        }
    } else if (parent >= 0) {
        int32_t np = pieces(v, subtree_end(n, v), wrap, ps, pe);
        for (int32_t i = 0; i < np; i++) {
            int32_t buf;
            uint64_t off;
            block_at(v, ps[i], root, n, own, whole, nbytes, &buf, &off);
            got[ngot++] = plan_add(plan, PC_OP_RECV, actual(parent, root, n), 0, BINOM_BLOCK_TAG | (uint32_t)i, -1,
                                   0, buf, off, (uint64_t)(pe[i] - ps[i]) * nbytes, NULL, 0);
        }
    }
    /* the frames this node passes on, once it holds their blocks: its
     * subtree to the parent (gather; its own block at once), or each
     * child's subtree, the largest (deepest) first (scatter) */
    int32_t nto = gather ? (parent >= 0) : nk;
    for (int32_t k = 0; k < nto; k++) {
        int32_t first = gather ? v : kids[nk - 1 - k], to = gather ? parent : first;
        int32_t np = pieces(first, subtree_end(n, first), wrap, ps, pe);
        for (int32_t i = 0; i < np; i++) {
            int32_t buf;
            uint64_t off;
            block_at(v, ps[i], root, n, own, whole, nbytes, &buf, &off);
            plan_add(plan, PC_OP_SEND, actual(to, root, n), 0, BINOM_BLOCK_TAG | (uint32_t)i, buf, off, -1, 0,
                     (uint64_t)(pe[i] - ps[i]) * nbytes, got, gather && ps[i] == v ? 0 : ngot);
        }
    }
    return plan_finish(plan, out);
}
