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
    int32_t codec;            /* pc_codec of the payloads on the wire */
    int32_t nbufs;            /* > 0: a buffer plan over that many caller buffers (plan_custom.c) */
    int32_t remapped;         /* > 0: IN and OUT remapped onto that many caller buffers (plan_remap.c) */
    int32_t cut_transfers;    /* of a remapped plan: network ops cut in pieces */
    int32_t windowed;         /* its scratch is the comm's result window (PC_OPF_WINDOW ops) */
};

pc_plan *plan_new(int32_t nranks, int32_t rank);
/* Appends an op depending on deps[0..ndeps) (negative entries are ignored);
 * returns its index, or -1 if memory ran out (the plan is then marked failed). */
int32_t plan_add(pc_plan *p, int32_t kind, int32_t peer, int32_t stripe, uint32_t tag,
                 int32_t src_buf, uint64_t src_off, int32_t dst_buf, uint64_t dst_off,
                 uint64_t len, const int32_t *deps, int32_t ndeps);
void plan_begin_tail(pc_plan *p);
/* An empty frame to rank+1 and one from rank-1, first on those connections.
 * Schedules in which some ranks begin by waiting (trees, aggregators) add it
 * so that mismatched calls across ranks fail the header check at once
 * instead of every rank waiting for its timeout. */
void plan_announce(pc_plan *p);
/* An empty frame to every other rank and one from every other rank, first on
 * those connections, all in one step. For schedules in which some rank would
 * otherwise finish without receiving anything from some other rank (a
 * broadcast root, the head of a chain): every frame's header carries the
 * digest of the sender's arguments, so a rank whose call differs from any
 * other's fails the check on every rank, in the same call, instead of some
 * ranks returning normally. Returns the index of the first of its nranks-1
 * receives (they follow one another): an op that depends on all of them runs
 * only once every other rank has entered the same call. */
int32_t plan_agree(pc_plan *p);
/* plan_agree's empty frames only where no data flows: to each rank q with
 * !sends[q], from each rank q with !recvs[q]. For plans whose sends wait for
 * nothing and that move at most one payload per direction and pair (the
 * direct gather, scatter, reduce): every rank then sends exactly one first
 * frame to, and receives one from, every other rank, whatever root each
 * names, so a rank whose arguments differ fails the header check on the
 * data frames themselves, on every rank, at once, and the rooted pairs need
 * no separate frames (2 frames per pair instead of 3). */
void plan_agree_silent(pc_plan *p, const uint8_t *sends, const uint8_t *recvs);
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

static inline int32_t pc_mod(int64_t a, int32_t n) { return (int32_t)(((a % n) + n) % n); }

/* Whether an op of this kind moves bytes over a connection (the rest run locally). */
static inline int plan_op_is_net(int32_t kind) {
    return kind == PC_OP_SEND || kind == PC_OP_RECV || kind == PC_OP_RECV_REDUCE;
}

/* Pipeline segments needed so no segment of a piece of max_piece_bytes is
 * larger than segment_bytes (at least 1, at most 4096: tags hold 12 bits). */
uint64_t plan_segments(uint64_t max_piece_bytes, uint64_t segment_bytes);

/*
 * A ring all-reduce schedule that other planners can embed (plan_ring.c
 * implements it; plan_hier.c runs it among group aggregators).
 *
 * The `count` elements are split into one *share* per ring order; share r
 * is cut into n *chunks* (one per ring position) and each chunk into `segs`
 * *segments*. A *piece* is (ring r, chunk c, segment g) with id
 * (r * n + c) * segs + g. This rank's own contribution is read from
 * `local_buf` (IN for a plain ring; the group's partial in plan_hier.c)
 * and results accumulate in `acc_buf`; both use the same byte offsets.
 * `ready[piece]` (optional) is an op that must finish before the local data
 * of that piece may be read; `final_op[piece]` (optional, filled in) is the
 * op after which `acc_buf` holds the piece's final (scaled) result.
 * Ops of all rings are interleaved per (step, segment), so rings that share
 * a connection take turns on it instead of waiting for each other.
 */
typedef struct {
    pc_plan *plan;
    const int32_t *orders; /* nrings * n ranks */
    int32_t nrings, n;
    int32_t stripes, es, op_avg;
    uint64_t count, segs;
    int32_t local_buf, acc_buf;
    const int32_t *ready;
    int32_t *final_op;
    uint32_t tag_base;     /* OR-ed into every tag */
} ring_sched;

/* Position of rank in a ring order, -1 if absent. */
int32_t ring_position(const int32_t *order, int32_t n, int32_t rank);
/* Segments for a ring schedule of `count` elements over nrings rings of n. */
uint64_t ring_sched_segments(uint64_t count, int32_t nrings, int32_t n, int32_t es, uint64_t segment_bytes);
/* Byte range of piece (r, c, g). */
void ring_piece(const ring_sched *rs, int32_t r, int32_t c, uint64_t g, uint64_t *off, uint64_t *bytes);
/* Order in which pieces become final at `rank` (npieces = nrings*n*segs
 * ids); used by planners that forward results as soon as they are final. */
pc_status ring_final_order(const ring_sched *rs, int32_t rank, int32_t *ids);
/* Appends the all-reduce ops of this rank (plan->rank) to rs->plan. */
pc_status ring_sched_allreduce(ring_sched *rs);

#endif
