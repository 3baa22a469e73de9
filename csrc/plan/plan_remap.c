/*
 * plan_remap.c - one plan over several caller buffers (the coalesced collectives).
 *
 * pc_plan_remap() takes any uncompressed plan whose IN and OUT are single
 * buffers and re-addresses them onto *stretches* of the caller's buffers:
 * IN is read as in[0], in[1], ... laid end to end, OUT likewise. An op
 * whose byte range crosses a stretch boundary (of its source or of its
 * destination) becomes one op per piece, in order; every op that depended
 * on it depends on all its pieces, and each piece depends on what the op
 * depended on. Scratch is left as it is.
 *
 * Why this is safe on the wire: both ends of a transfer cut it the same
 * way only if they see the same boundaries. In the plans it accepts, every
 * network op reads or writes IN or OUT (never scratch), and a transfer of
 * bytes [a, b) of the virtual buffer pairs with the peer's op on the same
 * virtual range (ring and multi-ring all-reduce, all-gather and
 * reduce-scatter: every rank cuts the same way because every rank passes
 * the same sizes, which the argument digest in each frame checks). A plan
 * with a network op on scratch is refused (PC_ERR_ARG): its peer could cut
 * the matching op differently (the direct plans receive into scratch what
 * the sender reads from IN); the caller then packs the buffers instead.
 */
#include <stdlib.h>
#include <string.h>

#include "plan.h"

typedef struct {
    const pc_extent *ext;
    int32_t n;
    uint64_t *start; /* start[k]: virtual offset of stretch k; start[n]: the total */
} vbuf;

static int vbuf_init(vbuf *v, const pc_extent *ext, int32_t n, int32_t nbufs) {
    v->ext = ext;
    v->n = n;
    v->start = malloc(sizeof(uint64_t) * ((size_t)n + 1));
    if (!v->start) return 0;
    uint64_t at = 0;
    for (int32_t k = 0; k < n; k++) {
        if (ext[k].buf < 0 || ext[k].buf >= nbufs || ext[k].off > UINT64_MAX - ext[k].len ||
            at > UINT64_MAX - ext[k].len) {
            free(v->start);
            v->start = NULL;
            return -1;
        }
        v->start[k] = at;
        at += ext[k].len;
    }
    v->start[n] = at;
    return 1;
}

/* The stretch holding virtual offset x < total: the last one that starts at or before it
 * (so never an empty one: the next stretch starts at the same place). */
static int32_t vbuf_find(const vbuf *v, uint64_t x) {
    int32_t lo = 0, hi = v->n - 1;
    while (lo < hi) {
        int32_t mid = lo + (hi - lo + 1) / 2;
        if (v->start[mid] <= x) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

static const vbuf *view_of(const vbuf *in, const vbuf *out, int32_t buf) {
    return buf == PC_BUF_IN ? in : buf == PC_BUF_OUT ? out : NULL;
}

/* Where the piece of `len` bytes at `off` of buffer `buf` lives, and how many bytes of it the
 * stretch there holds (*room). Scratch (and "no buffer") stays where it is. */
static void place(const vbuf *v, int32_t buf, uint64_t off, int32_t *nbuf, uint64_t *noff, uint64_t *room) {
    if (!v) {
        *nbuf = buf;
        *noff = off;
        *room = UINT64_MAX;
        return;
    }
    int32_t k = vbuf_find(v, off);
    *nbuf = PC_BUF_COUNT + v->ext[k].buf;
    *noff = v->ext[k].off + (off - v->start[k]);
    *room = v->start[k + 1] - off;
}

pc_status pc_plan_remap(const pc_plan *plan, int32_t nbufs, int32_t n_in, const pc_extent *in, int32_t n_out,
                        const pc_extent *out, pc_plan **remapped) {
    if (!remapped) return PC_ERR_ARG;
    *remapped = NULL;
    if (!plan || plan->nbufs || plan->remapped || plan->codec != PC_CODEC_NONE || plan->tail_first < 0 ||
        nbufs < 1 || nbufs > PC_MAX_BUFFERS || n_in < 1 || n_out < 1 || !in || !out)
        return PC_ERR_ARG;
    vbuf vin = {0}, vout = {0};
    int a = vbuf_init(&vin, in, n_in, nbufs), b = a == 1 ? vbuf_init(&vout, out, n_out, nbufs) : 1;
    pc_status st = PC_OK;
    if (a < 0 || b < 0) st = PC_ERR_ARG;
    else if (a == 0 || b == 0) st = PC_ERR_NOMEM;
    else if (plan->need_bytes[PC_BUF_IN] > vin.start[n_in] || plan->need_bytes[PC_BUF_OUT] > vout.start[n_out])
        st = PC_ERR_ARG; /* the stretches hold less than the plan reads or writes */
    for (int32_t i = 0; st == PC_OK && i < plan->nops; i++) {
        const pc_op *o = &plan->ops[i];
        if (o->kind > PC_OP_SCALE) st = PC_ERR_ARG;
        else if (plan_op_is_net(o->kind) && o->len &&
                 ((o->src_buf == PC_BUF_SCRATCH && o->kind != PC_OP_RECV) ||
                  (o->dst_buf == PC_BUF_SCRATCH && o->kind != PC_OP_SEND)))
            st = PC_ERR_ARG; /* see the top of the file */
    }
    pc_plan *p = NULL;
    int32_t *first = NULL, *count = NULL, *deps = NULL;
    size_t deps_cap = 0;
    if (st == PC_OK) {
        p = plan_new(plan->nranks, plan->rank);
        first = malloc(sizeof(int32_t) * ((size_t)plan->nops + 1));
        count = malloc(sizeof(int32_t) * ((size_t)plan->nops + 1));
        if (!p || !first || !count) st = PC_ERR_NOMEM;
    }
    for (int32_t i = 0; st == PC_OK && i < plan->nops; i++) {
        const pc_op *o = &plan->ops[i];
        if (i == plan->tail_first) plan_begin_tail(p);
        /* the new deps: every piece of every op this one waited for */
        size_t nd = 0;
        for (int32_t d = 0; d < o->dep_count; d++) nd += (size_t)count[plan->deps[o->dep_first + d]];
        if (nd > deps_cap) {
            int32_t *grown = realloc(deps, sizeof(int32_t) * nd);
            if (!grown) {
                st = PC_ERR_NOMEM;
                break;
            }
            deps = grown;
            deps_cap = nd;
        }
        nd = 0;
        for (int32_t d = 0; d < o->dep_count; d++) {
            int32_t dep = plan->deps[o->dep_first + d];
            for (int32_t k = 0; k < count[dep]; k++) deps[nd++] = first[dep] + k;
        }
        if (nd > INT32_MAX) {
            st = PC_ERR_NOMEM;
            break;
        }
        const vbuf *vs = view_of(&vin, &vout, o->src_buf), *vd = view_of(&vin, &vout, o->dst_buf);
        first[i] = p->nops;
        uint64_t done = 0;
        do { /* (an empty op, a barrier frame, stays one op; it addresses no memory) */
            int32_t sb = -1, db = -1;
            uint64_t so = 0, dof = 0, sroom = UINT64_MAX, droom = UINT64_MAX;
            if (o->len) {
                if (o->src_buf >= 0) place(vs, o->src_buf, o->src_off + done, &sb, &so, &sroom);
                if (o->dst_buf >= 0) place(vd, o->dst_buf, o->dst_off + done, &db, &dof, &droom);
            } else {
                sb = vs ? -1 : o->src_buf;
                db = vd ? -1 : o->dst_buf;
            }
            uint64_t piece = o->len - done;
            if (sroom < piece) piece = sroom;
            if (droom < piece) piece = droom;
            int32_t at = plan_add(p, o->kind, o->peer, o->stripe, o->tag, sb, so, db, dof, piece, deps, (int32_t)nd);
            if (at < 0) {
                st = PC_ERR_NOMEM;
                break;
            }
            done += piece;
        } while (done < o->len);
        count[i] = p->nops - first[i];
        if (count[i] > 1 && plan_op_is_net(o->kind)) p->cut_transfers++;
    }
    if (st == PC_OK && p->failed) st = PC_ERR_NOMEM;
    if (st == PC_OK) {
        if (plan->tail_first >= plan->nops) plan_begin_tail(p);
        for (int b2 = 0; b2 < PC_BUF_COUNT; b2++) p->need_bytes[b2] = 0;
        p->need_bytes[PC_BUF_SCRATCH] = plan->need_bytes[PC_BUF_SCRATCH];
        p->remapped = nbufs;
        *remapped = p;
        p = NULL;
    }
    pc_plan_free(p);
    free(vin.start);
    free(vout.start);
    free(first);
    free(count);
    free(deps);
    return st;
}

int32_t pc_plan_cut_transfers(const pc_plan *plan) { return plan ? plan->cut_transfers : 0; }
