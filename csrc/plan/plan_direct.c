/*
 * plan_direct.c - one-shot all-reduce for small messages.
 *
 * Every rank sends its whole buffer to every other rank at once and
 * reduces what it receives itself: a single step of latency (a ring needs
 * 2(n-1), a double tree about 2 lg n), at the price of n-1 times the
 * ring's traffic per rank. Only worth it while the per-step latency
 * dominates, i.e. for messages of a few KiB (auto decides by the cost model).
 *
 * Reduction order: acc = x_0 (op) x_1 (op) ... (op) x_{n-1}, left to right
 * by rank, the same on every rank, so every rank ends with the same bits.
 * Rank r's own contribution x_r comes from a copy of IN, the others'
 * straight off their connections (PC_OP_RECV_REDUCE reduces on arrival);
 * each step depends on the one before, so the order holds whatever arrives
 * first.
 * The sends depend on nothing: every frame is on its way at the start, and
 * a receive waits only for data that was already sent (no deadlock, however
 * small the connection buffers).
 *
 * The accumulator is scratch: IN must stay readable until every send is
 * done (in place, IN is OUT), so OUT is written by a tail copy after all
 * transfers succeeded, which also keeps the caller's buffer intact on
 * failure (PC_PLAN_PRESERVE_INPUT costs nothing extra here).
 */
#include "plan.h"

#define DIRECT_TAG 0xb0000000u

pc_status pc_plan_direct(pc_collective coll, int32_t nranks, int32_t rank, uint64_t count, int32_t elem_size,
                         int32_t stripes, uint32_t flags, pc_plan **out) {
    *out = NULL;
    if (nranks < 1 || rank < 0 || rank >= nranks || elem_size <= 0 || stripes < 1 || coll != PC_COLL_ALLREDUCE)
        return PC_ERR_ARG;
    if (count > UINT64_MAX / (uint64_t)elem_size) return PC_ERR_ARG;
    pc_plan *plan = plan_new(nranks, rank);
    if (!plan) return PC_ERR_NOMEM;
    uint64_t bytes = count * (uint64_t)elem_size;
    if (nranks == 1 || bytes == 0) {
        if (bytes) plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_IN, 0, PC_BUF_OUT, 0, bytes, NULL, 0);
        return plan_finish(plan, out);
    }
    /* Frames to rank+1, rank+2, ... first: at each step of the rotation every
     * rank sends to a different peer, so no receiver is hit by all at once. */
    for (int32_t k = 1; k < nranks; k++)
        plan_add(plan, PC_OP_SEND, (rank + k) % nranks, 0, DIRECT_TAG, PC_BUF_IN, 0, -1, 0, bytes, NULL, 0);
    /* This rank's own x_r enters through a copy into scratch (after the
     * sends, so with wire compression the copy is the decoded form of what
     * the peers received: plan_codec.c). Scratch: [0, bytes) the
     * accumulator, [bytes, 2 bytes) the copy of x_r (rank 0 copies straight
     * into the accumulator, which x_0 starts). */
    uint64_t own = rank == 0 ? 0 : bytes;
    int32_t mine = plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_IN, 0, PC_BUF_SCRATCH, own, bytes, NULL, 0);
    int32_t prev = rank == 0 ? mine : -1;
    for (int32_t j = rank == 0 ? 1 : 0; j < nranks; j++) {
        if (j == rank) {
            int32_t deps[2] = {prev, mine};
            prev = plan_add(plan, PC_OP_REDUCE, -1, 0, 0, PC_BUF_SCRATCH, own, PC_BUF_SCRATCH, 0, bytes, deps, 2);
        } else if (j == 0) {
            prev = plan_add(plan, PC_OP_RECV, 0, 0, DIRECT_TAG, -1, 0, PC_BUF_SCRATCH, 0, bytes, NULL, 0);
        } else { /* acc = acc (op) x_j */
            prev = plan_add(plan, PC_OP_RECV_REDUCE, j, 0, DIRECT_TAG, PC_BUF_SCRATCH, 0, PC_BUF_SCRATCH, 0, bytes,
                            &prev, 1);
        }
    }
    if (flags & PC_PLAN_AVG) plan_add(plan, PC_OP_SCALE, -1, 0, 0, -1, 0, PC_BUF_SCRATCH, 0, bytes, &prev, 1);
    plan_begin_tail(plan);
    plan_add(plan, PC_OP_COPY, -1, 0, 0, PC_BUF_SCRATCH, 0, PC_BUF_OUT, 0, bytes, NULL, 0);
    return plan_finish(plan, out);
}
