/* plan.c - growable plan storage shared by every planner. */
#include <stdlib.h>
#include <string.h>

#include "plan.h"

pc_plan *plan_new(int32_t nranks, int32_t rank) {
    pc_plan *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->nranks = nranks;
    p->rank = rank;
    p->tail_first = -1;
    return p;
}

static int grow(void **arr, int32_t *cap, int32_t need, size_t elem) {
    if (need <= *cap) return 1;
    int32_t ncap = *cap ? *cap * 2 : 64;
    while (ncap < need) ncap *= 2;
    void *n = realloc(*arr, (size_t)ncap * elem);
    if (!n) return 0;
    *arr = n;
    *cap = ncap;
    return 1;
}

static void note_extent(pc_plan *p, int32_t buf, uint64_t off, uint64_t len) {
    if (!p->nbufs && buf >= 0 && buf < PC_BUF_COUNT && off + len > p->need_bytes[buf]) p->need_bytes[buf] = off + len;
}

int32_t plan_add(pc_plan *p, int32_t kind, int32_t peer, int32_t stripe, uint32_t tag,
                 int32_t src_buf, uint64_t src_off, int32_t dst_buf, uint64_t dst_off,
                 uint64_t len, const int32_t *deps, int32_t ndeps) {
    if (p->failed) return -1;
    int32_t real = 0;
    for (int32_t i = 0; i < ndeps; i++) real += deps[i] >= 0;
    if (!grow((void **)&p->ops, &p->ops_cap, p->nops + 1, sizeof(pc_op)) ||
        !grow((void **)&p->deps, &p->deps_cap, p->ndeps + real, sizeof(int32_t))) {
        p->failed = 1;
        return -1;
    }
    pc_op *op = &p->ops[p->nops];
    memset(op, 0, sizeof *op);
    op->kind = kind;
    op->peer = peer;
    op->stripe = stripe;
    op->tag = tag;
    op->src_buf = src_buf;
    op->dst_buf = dst_buf;
    op->src_off = src_off;
    op->dst_off = dst_off;
    op->len = len;
    op->aux_buf = -1;
    op->dep_first = p->ndeps;
    for (int32_t i = 0; i < ndeps; i++)
        if (deps[i] >= 0) p->deps[p->ndeps++] = deps[i];
    op->dep_count = p->ndeps - op->dep_first;
    note_extent(p, src_buf, src_off, len);
    note_extent(p, dst_buf, dst_off, len);
    return p->nops++;
}

#define ANNOUNCE_TAG 0xa0000000u

void plan_announce(pc_plan *p) {
    if (p->nranks < 2) return;
    plan_add(p, PC_OP_SEND, (p->rank + 1) % p->nranks, 0, ANNOUNCE_TAG, -1, 0, -1, 0, 0, NULL, 0);
    plan_add(p, PC_OP_RECV, (p->rank + p->nranks - 1) % p->nranks, 0, ANNOUNCE_TAG, -1, 0, -1, 0, 0, NULL, 0);
}

#define AGREE_TAG 0xa1000000u

int32_t plan_agree(pc_plan *p) {
    for (int32_t d = 1; d < p->nranks; d++)
        plan_add(p, PC_OP_SEND, (p->rank + d) % p->nranks, 0, AGREE_TAG, -1, 0, -1, 0, 0, NULL, 0);
    int32_t first = p->nops;
    for (int32_t d = 1; d < p->nranks; d++)
        plan_add(p, PC_OP_RECV, (p->rank + p->nranks - d) % p->nranks, 0, AGREE_TAG, -1, 0, -1, 0, 0, NULL, 0);
    return first;
}

void plan_agree_silent(pc_plan *p, const uint8_t *sends, const uint8_t *recvs) {
    for (int32_t d = 1; d < p->nranks; d++) {
        int32_t q = (p->rank + d) % p->nranks;
        if (!sends[q]) plan_add(p, PC_OP_SEND, q, 0, AGREE_TAG, -1, 0, -1, 0, 0, NULL, 0);
    }
    for (int32_t d = 1; d < p->nranks; d++) {
        int32_t q = (p->rank + p->nranks - d) % p->nranks;
        if (!recvs[q]) plan_add(p, PC_OP_RECV, q, 0, AGREE_TAG, -1, 0, -1, 0, 0, NULL, 0);
    }
}

void plan_begin_tail(pc_plan *p) {
    if (p->tail_first < 0) p->tail_first = p->nops;
}

pc_status plan_finish(pc_plan *p, pc_plan **out) {
    if (p->failed) {
        pc_plan_free(p);
        return PC_ERR_NOMEM;
    }
    if (p->tail_first < 0) p->tail_first = p->nops;
    *out = p;
    return PC_OK;
}

void pc_plan_free(pc_plan *p) {
    if (!p) return;
    free(p->ops);
    free(p->deps);
    free(p);
}

int32_t pc_plan_nops(const pc_plan *p) { return p->nops; }
const pc_op *pc_plan_ops(const pc_plan *p) { return p->ops; }
const int32_t *pc_plan_deps(const pc_plan *p) { return p->deps; }
int32_t pc_plan_tail_first(const pc_plan *p) { return p->tail_first; }
int32_t pc_plan_codec(const pc_plan *p) { return p->codec; }
uint64_t pc_plan_need_bytes(const pc_plan *p, int32_t buf) {
    return (buf >= 0 && buf < PC_BUF_COUNT) ? p->need_bytes[buf] : 0;
}
