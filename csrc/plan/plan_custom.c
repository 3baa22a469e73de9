/*
 * plan_custom.c - plans built op by op from outside the C planners.
 *
 * Used for schedules that are data rather than an algorithm, such as the
 * point-to-point transfers of a shared-state sync (peer a sends byte range
 * [off, off+len) of a tensor to peer b). Every op is validated as it is
 * appended, so a plan that reaches the engine is well formed: ranks in
 * range, no op sending to itself, dependencies pointing backwards, byte
 * ranges that do not overflow.
 *
 * A *buffer plan* (pc_plan_create_buffers) addresses up to `nbufs` caller
 * buffers by index instead of IN / OUT / SCRATCH, so that one plan can move
 * many tensors at once; it holds sends, receives and local copies only, and
 * runs through pc_comm_run_buffers, which checks every byte range against
 * the buffers it is given.
 */
#include <stdlib.h>

#include "plan.h"

pc_status pc_plan_create(int32_t nranks, int32_t rank, pc_plan **out) {
    if (!out) return PC_ERR_ARG;
    *out = NULL;
    if (nranks < 1 || rank < 0 || rank >= nranks) return PC_ERR_ARG;
    *out = plan_new(nranks, rank);
    return *out ? PC_OK : PC_ERR_NOMEM;
}

pc_status pc_plan_create_buffers(int32_t nranks, int32_t rank, int32_t nbufs, pc_plan **out) {
    if (!out) return PC_ERR_ARG;
    *out = NULL;
    if (nbufs < 1 || nbufs > PC_MAX_BUFFERS) return PC_ERR_ARG;
    pc_status st = pc_plan_create(nranks, rank, out);
    if (st == PC_OK) (*out)->nbufs = nbufs;
    return st;
}

static int valid_buf(const pc_plan *p, int32_t b) { return b >= -1 && b < (p->nbufs ? p->nbufs : PC_BUF_COUNT); }

pc_status pc_plan_append(pc_plan *p, const pc_op *op, const int32_t *deps, int32_t ndeps, int32_t *index) {
    if (index) *index = -1;
    if (!p || !op || ndeps < 0 || (ndeps && !deps)) return PC_ERR_ARG;
    if (p->failed) return PC_ERR_NOMEM;
    if (op->kind < PC_OP_SEND || op->kind > PC_OP_SCALE) return PC_ERR_ARG;
    if (p->nbufs && op->kind != PC_OP_SEND && op->kind != PC_OP_RECV && op->kind != PC_OP_COPY) return PC_ERR_ARG;
    if (!valid_buf(p, op->src_buf) || !valid_buf(p, op->dst_buf)) return PC_ERR_ARG;
    if (op->src_off > UINT64_MAX - op->len || op->dst_off > UINT64_MAX - op->len) return PC_ERR_ARG;
    int net = plan_op_is_net(op->kind);
    if (net && (op->peer < 0 || op->peer >= p->nranks || op->peer == p->rank || op->stripe < 0))
        return PC_ERR_ARG;
    int needs_src = op->kind == PC_OP_SEND || op->kind == PC_OP_RECV_REDUCE || op->kind == PC_OP_COPY ||
                    op->kind == PC_OP_REDUCE;
    int needs_dst = op->kind != PC_OP_SEND;
    if (op->len && ((needs_src && op->src_buf < 0) || (needs_dst && op->dst_buf < 0))) return PC_ERR_ARG;
    for (int32_t i = 0; i < ndeps; i++)
        if (deps[i] < 0 || deps[i] >= p->nops) return PC_ERR_ARG;
    int32_t at = plan_add(p, op->kind, net ? op->peer : -1, net ? op->stripe : 0, op->tag, op->src_buf,
                          op->src_off, op->dst_buf, op->dst_off, op->len, deps, ndeps);
    if (at < 0) return PC_ERR_NOMEM;
    if (index) *index = at;
    return PC_OK;
}

pc_status pc_plan_seal(pc_plan *p) {
    if (!p) return PC_ERR_ARG;
    if (p->failed) return PC_ERR_NOMEM;
    if (p->tail_first < 0) p->tail_first = p->nops;
    return PC_OK;
}
