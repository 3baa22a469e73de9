/*
 * plan_tree.c - pipelined double binary tree: all-reduce and broadcast.
 *
 * Terms: a *tree* spans m ranks laid out on *positions* 0..m-1. Position 0
 * is the root and has one child: the largest power of two below m. Any
 * other position q, with lowest set bit b, has a left child q - b/2 (when
 * b >= 2) and a right child q + b/2, or failing that q + b/4, ..., q + 1,
 * the first one below m. Its parent is q + b when that is below m and has
 * lowest set bit 2b, else q - b. Every position but the root has exactly
 * one parent, odd positions are leaves, and the depth is about lg m.
 *
 * *Double* tree: tree 0 puts rank r at position r; tree 1 mirrors the
 * positions (r = m-1-q) when m is even and shifts them (r = q+1 mod m) when
 * m is odd. Odd positions are leaves, so a rank that is interior in one
 * tree is a leaf of the other (only rank 0 is interior in both when m is
 * odd): each tree carries half of the data, and every rank forwards about
 * the same number of bytes.
 *
 * All-reduce: half t of the buffer is cut into S *segments*. Up phase:
 * for each segment a node computes acc = in (op) child0 (op) child1 as the
 * children's partial sums arrive, then sends acc to its parent; the root's
 * acc is the full reduction (divided once, at the root, for avg). Down
 * phase: the root sends the result to its children, every node receives it
 * from its parent into acc and forwards it. Every rank ends with the root's
 * bits, so results are bit-identical everywhere.
 *
 * Pipelining: ops on one connection run in plan order, and both trees may
 * use the same connection (up traffic of one tree, down traffic of the
 * other). Ops are emitted in a loop over steps i: up ops of segment i,
 * then down ops of segment i - LAG, so a connection carries down traffic of
 * segment g only after up traffic of segment g + LAG: by then segment g has
 * normally come back down, and the up stream never waits for a round trip.
 * Every op depends only on ops emitted earlier, hence no deadlock.
 *
 * Broadcast: the root sends half t to the top of tree t, a double tree over
 * the other n-1 ranks; every node forwards each segment to its children.
 */
#include <stdlib.h>

#include "plan.h"

#define TREE_TAG(tree, phase, seg) \
    (0x80000000u | (((uint32_t)(tree) & 1u) << 24) | (((uint32_t)(phase) & 3u) << 22) | ((uint32_t)(seg) & 0xfffu))

enum { UP = 0, DOWN = 1, BCAST = 2 };

static int32_t lowbit(int32_t x) { return x & -x; }

/* Parent (-1 for the root) and children (-1 where absent) of position q. */
static void pos_links(int32_t m, int32_t q, int32_t *parent, int32_t kids[2]) {
    kids[0] = kids[1] = -1;
    *parent = -1;
    if (m <= 1) return;
    if (q == 0) {
        int32_t top = 1;
        while (top <= (m - 1) / 2) top *= 2;
        kids[0] = top;
        return;
    }
    int32_t b = lowbit(q);
    *parent = (q + b < m && lowbit(q + b) == 2 * b) ? q + b : q - b;
    if (b >= 2) {
        kids[0] = q - b / 2;
        for (int32_t d = b / 2; d >= 1; d /= 2)
            if (q + d < m) {
                kids[1] = q + d;
                break;
            }
    }
}

static int32_t tree_rank(int32_t m, int32_t tree, int32_t q) {
    if (tree == 0) return q;
    return (m % 2 == 0) ? m - 1 - q : (q + 1) % m;
}

static int32_t tree_pos(int32_t m, int32_t tree, int32_t r) {
    if (tree == 0) return r;
    return (m % 2 == 0) ? m - 1 - r : (r + m - 1) % m;
}

/* Links of index r (0..m-1) in tree t, as indices. */
static void links(int32_t m, int32_t t, int32_t r, int32_t *parent, int32_t kids[2]) {
    int32_t p, k[2];
    pos_links(m, tree_pos(m, t, r), &p, k);
    *parent = p < 0 ? -1 : tree_rank(m, t, p);
    for (int i = 0; i < 2; i++) kids[i] = k[i] < 0 ? -1 : tree_rank(m, t, k[i]);
}

static int32_t depth_of(int32_t m) {
    int32_t d = 0;
    while ((1 << d) < m) d++;
    return d + 1;
}

pc_status pc_tree_links(int32_t nranks, int32_t tree, int32_t rank, int32_t *parent, int32_t *child0,
                        int32_t *child1) {
    if (nranks < 1 || tree < 0 || tree > 1 || rank < 0 || rank >= nranks) return PC_ERR_ARG;
    int32_t kids[2];
    links(nranks, tree, rank, parent, kids);
    *child0 = kids[0];
    *child1 = kids[1];
    return PC_OK;
}

typedef struct {
    pc_plan *plan;
    int32_t stripes, es;
    uint64_t count, segs;
} tree_ctx;

/* Byte range of segment g of half t. */
static void half_seg(const tree_ctx *c, int32_t t, uint64_t g, uint64_t *off, uint64_t *bytes) {
    uint64_t start = split_start(c->count, 2, (uint64_t)t), len = split_len(c->count, 2, (uint64_t)t);
    *off = (start + split_start(len, c->segs, g)) * (uint64_t)c->es;
    *bytes = split_len(len, c->segs, g) * (uint64_t)c->es;
}

static int32_t stripe_of(const tree_ctx *c, int32_t t, uint64_t g) {
    return (int32_t)((g + (uint64_t)t) % (uint64_t)c->stripes);
}

static pc_status tree_allreduce(tree_ctx *c, int32_t n, int32_t rank, uint32_t flags) {
    pc_plan *plan = c->plan;
    uint64_t S = c->segs;
    int32_t acc = (flags & PC_PLAN_PRESERVE_INPUT) ? PC_BUF_SCRATCH : PC_BUF_OUT;
    int op_avg = (flags & PC_PLAN_AVG) != 0;
    int32_t parent[2], kids[2][2];
    for (int32_t t = 0; t < 2; t++) links(n, t, rank, &parent[t], kids[t]);
    /* per (tree, segment): the up-send (or, at the root, the op that
     * completes the result) */
    int32_t *up = malloc(sizeof(int32_t) * 2 * (size_t)S);
    if (!up) return PC_ERR_NOMEM;
    uint64_t lag = (uint64_t)(2 * depth_of(n) + 2);
    for (uint64_t i = 0; i < S + lag; i++) {
        for (int32_t t = 0; t < 2 && i < S; t++) {
            uint64_t g = i, off, bytes;
            half_seg(c, t, g, &off, &bytes);
            int32_t prev = -1, src = PC_BUF_IN;
            for (int k = 0; k < 2; k++) {
                if (kids[t][k] < 0) continue;
                prev = plan_add(plan, PC_OP_RECV_REDUCE, kids[t][k], stripe_of(c, t, g), TREE_TAG(t, UP, g), src,
                                off, acc, off, bytes, &prev, 1);
                src = acc;
            }
            if (parent[t] >= 0) {
                prev = plan_add(plan, PC_OP_SEND, parent[t], stripe_of(c, t, g), TREE_TAG(t, UP, g), src, off, -1,
                                0, bytes, &prev, 1);
            } else if (op_avg) {
                prev = plan_add(plan, PC_OP_SCALE, -1, 0, 0, -1, 0, acc, off, bytes, &prev, 1);
            }
            up[(size_t)t * S + g] = prev;
        }
        for (int32_t t = 0; t < 2 && i >= lag; t++) {
            uint64_t g = i - lag, off, bytes;
            half_seg(c, t, g, &off, &bytes);
            int32_t have = up[(size_t)t * S + g];
            if (parent[t] >= 0) /* after our up-send has read the partial (in place) */
                have = plan_add(plan, PC_OP_RECV, parent[t], stripe_of(c, t, g), TREE_TAG(t, DOWN, g), -1, 0, acc,
                                off, bytes, &have, 1);
            for (int k = 0; k < 2; k++)
                if (kids[t][k] >= 0)
                    plan_add(plan, PC_OP_SEND, kids[t][k], stripe_of(c, t, g), TREE_TAG(t, DOWN, g), acc, off, -1,
                             0, bytes, &have, 1);
        }
    }
    free(up);
    return plan->failed ? PC_ERR_NOMEM : PC_OK;
}

static pc_status tree_broadcast(tree_ctx *c, int32_t n, int32_t rank, int32_t root, uint32_t flags) {
    pc_plan *plan = c->plan;
    int32_t dst = (flags & PC_PLAN_PRESERVE_INPUT) ? PC_BUF_SCRATCH : PC_BUF_OUT;
    int32_t m = n - 1; /* the other ranks, as indices 0..m-1 after the root */
#define RANK_OF(idx) (((idx) + root + 1) % n)
    int32_t me = pc_mod((int64_t)rank - root - 1, n), parent[2], kids[2][2];
    for (int32_t t = 0; t < 2 && rank != root; t++) {
        links(m, t, me, &parent[t], kids[t]);
        parent[t] = parent[t] < 0 ? root : RANK_OF(parent[t]);
        for (int k = 0; k < 2; k++) kids[t][k] = kids[t][k] < 0 ? -1 : RANK_OF(kids[t][k]);
    }
    for (uint64_t g = 0; g < c->segs; g++)
        for (int32_t t = 0; t < 2; t++) {
            uint64_t off, bytes;
            half_seg(c, t, g, &off, &bytes);
            if (rank == root) {
                plan_add(plan, PC_OP_SEND, RANK_OF(tree_rank(m, t, 0)), stripe_of(c, t, g), TREE_TAG(t, BCAST, g),
                         PC_BUF_IN, off, -1, 0, bytes, NULL, 0);
                continue;
            }
            int32_t got = plan_add(plan, PC_OP_RECV, parent[t], stripe_of(c, t, g), TREE_TAG(t, BCAST, g), -1, 0,
                                   dst, off, bytes, NULL, 0);
            for (int k = 0; k < 2; k++)
                if (kids[t][k] >= 0)
                    plan_add(plan, PC_OP_SEND, kids[t][k], stripe_of(c, t, g), TREE_TAG(t, BCAST, g), dst, off, -1,
                             0, bytes, &got, 1);
        }
#undef RANK_OF
    return plan->failed ? PC_ERR_NOMEM : PC_OK;
}

pc_status pc_plan_tree(pc_collective coll, int32_t nranks, int32_t rank, int32_t root, uint64_t count,
                       int32_t elem_size, uint64_t segment_bytes, int32_t stripes, uint32_t flags, pc_plan **out) {
    *out = NULL;
    if (nranks < 1 || rank < 0 || rank >= nranks || elem_size <= 0 || stripes < 1 || root < 0 ||
        root >= nranks || (coll != PC_COLL_ALLREDUCE && coll != PC_COLL_BROADCAST))
        return PC_ERR_ARG;
    pc_plan *plan = plan_new(nranks, rank);
    if (!plan) return PC_ERR_NOMEM;
    uint64_t es = (uint64_t)elem_size;
    if (nranks == 1) {
        if (count) plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_IN, 0, PC_BUF_OUT, 0, count * es, NULL, 0);
        return plan_finish(plan, out);
    }
    if (coll == PC_COLL_BROADCAST)
        plan_agree(plan); /* the root receives nothing else: see plan.h */
    else
        plan_announce(plan); /* some ranks begin by waiting: see plan.h */
    tree_ctx c = {.plan = plan, .stripes = stripes, .es = elem_size, .count = count,
                  .segs = plan_segments((count / 2 + 1) * es, segment_bytes)};
    pc_status st = coll == PC_COLL_ALLREDUCE ? tree_allreduce(&c, nranks, rank, flags)
                                             : tree_broadcast(&c, nranks, rank, root, flags);
    if (st != PC_OK) {
        pc_plan_free(plan);
        return st;
    }
    if ((flags & PC_PLAN_PRESERVE_INPUT) && count && (coll == PC_COLL_ALLREDUCE || rank != root)) {
        plan_begin_tail(plan);
        plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_SCRATCH, 0, PC_BUF_OUT, 0, count * es, NULL, 0);
    }
    return plan_finish(plan, out);
}
