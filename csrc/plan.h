/*
 * plan.h - building plans (internal to the C core).
 *
 * A plan is an array of pc_op plus a flat array of dependency indices. The
 * engine keeps one FIFO per (peer, stripe, direction) in plan order, so two
 * ranks agree on the order of frames on a connection simply by adding their
 * matching sends and receives in the same order. Ops from `tail_first` on
 * start only once every earlier op has completed (used to copy results out
 * of scratch only after all transfers succeeded).
 */
#ifndef PYCOLL_PLAN_H
#define PYCOLL_PLAN_H

#include "pycoll.h"

struct pc_plan {
    pc_op *ops;
    int32_t nops, ops_cap;
    int32_t *deps;
    int32_t ndeps, deps_cap;
    int32_t tail_first;       /* == nops when there is no tail */
    int32_t nranks, rank;
    uint64_t need_bytes[PC_BUF_COUNT]; /* minimum size of each buffer */
    int failed;               /* an allocation failed while building */
};

pc_plan *plan_new(int32_t nranks, int32_t rank);
/* Appends an op depending on deps[0..ndeps) (negative entries are ignored);
 * returns its index, or -1 if memory ran out (the plan is then marked failed). */
int32_t plan_add(pc_plan *p, int32_t kind, int32_t peer, int32_t stripe, uint32_t tag,
                 int32_t src_buf, uint64_t src_off, int32_t dst_buf, uint64_t dst_off,
                 uint64_t len, const int32_t *deps, int32_t ndeps);
void plan_begin_tail(pc_plan *p);
pc_status plan_finish(pc_plan *p, pc_plan **out);

/* Split `count` elements into `parts` nearly equal pieces: piece i starts at
 * split_start(count, parts, i) and the first count % parts pieces are one larger. */
static inline uint64_t split_start(uint64_t count, uint64_t parts, uint64_t i) {
    uint64_t base = count / parts, extra = count % parts;
    return i * base + (i < extra ? i : extra);
}
static inline uint64_t split_len(uint64_t count, uint64_t parts, uint64_t i) {
    return count / parts + (i < count % parts ? 1 : 0);
}

#endif
