/*
 * plan_codec.c - compression on the wire as a plan transformation.
 *
 * pc_plan_compress() rewrites any plan so that every payload travels
 * encoded (codec.c) while the engine's network ops stay as they are: they
 * move the encoded bytes, which live in scratch, as opaque data.
 *
 *   SEND R          ENCODE R -> e; SEND e          (or forward, see below)
 *   RECV R          RECV e; DECODE e -> R
 *   RECV_REDUCE R   RECV e; DECODE_REDUCE R = local (op) decode(e)
 *
 * Bit-identical results need more than that: a value must be encoded once,
 * where it is made, and everyone must end up with the decoded form of those
 * very bytes. So the pass tracks, per byte range of OUT and SCRATCH, a
 * *twin*: the encoded bytes e whose decoding is the range's value.
 *   - after RECV + DECODE the range holds decode(e): a later SEND of exactly
 *     that range forwards e unchanged (no re-encoding, so no drift along a
 *     chain of forwarders, and no encoding work either);
 *   - after this rank encodes a range it made (a partial or final sum), the
 *     range's *value* is decode(e) while its memory still holds the raw
 *     sum: the twin is *pending*. Readers get the decoded value (a later
 *     SEND forwards e, a COPY decodes e, a reduction reads a decoded copy),
 *     and a pending range of OUT is overwritten with decode(e) at the very
 *     end (in the plan's tail, when nothing else runs), so the rank that
 *     made a value holds exactly what it sent;
 *   - any write to a range ends its twin.
 * IN is never written; its bytes always encode the same way, and a COPY of
 * IN into OUT (the all-gather's own block), or into scratch once the range
 * was sent (direct's own contribution), decodes the bytes already sent for
 * that range, so the sender holds what its peers received.
 * Every new op depends on what the original op depended on; anything that
 * depended on an original op depends on all the ops that replace it.
 * Encoded bytes and decoded copies get fresh scratch past the original
 * plan's scratch, never reused, so a twin stays valid for the whole plan.
 */
#include <stdlib.h>
#include <string.h>

#include "plan.h"

#define ALIGN 64u

typedef struct {
    uint64_t e_off, raw_len; /* encoded bytes at scratch e_off; raw_len float32 bytes */
    int32_t producer;        /* op after which the encoded bytes are there */
    int32_t mat;             /* op that decoded them into scratch mat_off, -1 if none yet */
    uint64_t mat_off;
} enc_rec;

typedef struct {
    uint64_t a, b;  /* live byte range [a, b) */
    uint64_t fa;    /* start of the range the encoding covers (fa + raw_len) */
    int32_t enc;    /* enc_rec index */
    int32_t pending;/* 1: memory raw, value decode(e); 0: memory == decode(e) */
} twin;

typedef struct {
    twin *v;
    int32_t n, cap;
} twin_list; /* sorted by a, never overlapping */

typedef struct {
    uint64_t off, len;
    int32_t enc;
} in_rec;

typedef struct {
    const pc_plan *src;
    pc_plan *p;
    int32_t codec;
    uint64_t top; /* next free scratch byte */
    enc_rec *encs;
    int32_t nencs, encs_cap;
    twin_list tw[2]; /* OUT, SCRATCH */
    in_rec *ins;     /* encodings of IN ranges, sorted by off */
    int32_t nins, ins_cap;
    int32_t *rep_start, *reps; /* original op -> new ops that replace it */
    int32_t nreps, reps_cap;
    int32_t *deps; /* deps of the op being built */
    int32_t ndeps, deps_cap;
    int failed;
} cx;

static int grow(void **arr, int32_t *cap, int32_t need, size_t elem) {
    if (need <= *cap) return 1;
    int32_t ncap = *cap ? *cap * 2 : 32;
    while (ncap < need) ncap *= 2;
    void *n = realloc(*arr, (size_t)ncap * elem);
    if (!n) return 0;
    *arr = n;
    *cap = ncap;
    return 1;
}

static uint64_t enc_bytes(const cx *c, uint64_t raw) { return pc_codec_bytes(c->codec, raw / 4u); }

static uint64_t alloc(cx *c, uint64_t bytes) {
    uint64_t off = (c->top + ALIGN - 1) / ALIGN * ALIGN;
    c->top = off + bytes;
    return off;
}

/* ---- dependency lists -------------------------------------------------- */
static void dep_reset(cx *c) { c->ndeps = 0; }
static void dep_add(cx *c, int32_t d) {
    if (d < 0) return;
    if (!grow((void **)&c->deps, &c->deps_cap, c->ndeps + 1, sizeof(int32_t))) {
        c->failed = 1;
        return;
    }
    c->deps[c->ndeps++] = d;
}
/* The new ops standing for original op o's dependencies. */
static void dep_add_orig(cx *c, int32_t o) {
    const pc_op *op = &c->src->ops[o];
    for (int32_t k = 0; k < op->dep_count; k++) {
        int32_t d = c->src->deps[op->dep_first + k];
        for (int32_t j = c->rep_start[d]; j < c->rep_start[d + 1]; j++) dep_add(c, c->reps[j]);
    }
}
static void rep_add(cx *c, int32_t i) {
    if (i < 0) {
        c->failed = 1;
        return;
    }
    if (!grow((void **)&c->reps, &c->reps_cap, c->nreps + 1, sizeof(int32_t))) {
        c->failed = 1;
        return;
    }
    c->reps[c->nreps++] = i;
}

/* ---- emitting ops ------------------------------------------------------ */
/* Buffers of the encoded side are patched in after plan_add, so that the
 * plan's extent bookkeeping only sees float32 ranges (scratch is sized from
 * c->top at the end). */
static int32_t emit(cx *c, int32_t kind, int32_t peer, int32_t stripe, uint32_t tag, int32_t sb, uint64_t so,
                    int32_t db, uint64_t dof, uint64_t len, int src_encoded, int dst_encoded) {
    if (c->failed) return -1;
    int32_t i = plan_add(c->p, kind, peer, stripe, tag, src_encoded ? -1 : sb, so, dst_encoded ? -1 : db, dof, len,
                         c->deps, c->ndeps);
    if (i < 0) {
        c->failed = 1;
        return -1;
    }
    c->p->ops[i].src_buf = sb;
    c->p->ops[i].dst_buf = db;
    return i;
}

static int32_t emit_local(cx *c, int32_t kind, int32_t sb, uint64_t so, int32_t db, uint64_t dof, uint64_t len) {
    return emit(c, kind, -1, 0, 0, sb, so, db, dof, len, kind == PC_OP_DECODE, kind == PC_OP_ENCODE);
}

static int32_t new_enc(cx *c, uint64_t raw_len, int32_t producer_placeholder) {
    if (!grow((void **)&c->encs, &c->encs_cap, c->nencs + 1, sizeof(enc_rec))) {
        c->failed = 1;
        return -1;
    }
    enc_rec *e = &c->encs[c->nencs];
    e->raw_len = raw_len;
    e->e_off = alloc(c, enc_bytes(c, raw_len));
    e->producer = producer_placeholder;
    e->mat = -1;
    e->mat_off = 0;
    return c->nencs++;
}

/* ENCODE src -> a new enc record (deps: whatever is in c->deps). */
static int32_t encode_into_new(cx *c, int32_t sb, uint64_t so, uint64_t len) {
    int32_t id = new_enc(c, len, -1);
    if (id < 0) return -1;
    c->encs[id].producer = emit_local(c, PC_OP_ENCODE, sb, so, PC_BUF_SCRATCH, c->encs[id].e_off, len);
    return id;
}

/* Decoded copy of an encoding in scratch (made once, on first need). */
static int32_t materialise(cx *c, int32_t id) {
    enc_rec *e = &c->encs[id];
    if (e->mat >= 0) return e->mat;
    uint64_t off = alloc(c, e->raw_len);
    int32_t saved = c->ndeps;
    int32_t *saved_deps = NULL;
    if (saved) { /* emit with just the producer as dep, then restore */
        saved_deps = malloc(sizeof(int32_t) * (size_t)saved);
        if (!saved_deps) {
            c->failed = 1;
            return -1;
        }
        memcpy(saved_deps, c->deps, sizeof(int32_t) * (size_t)saved);
    }
    dep_reset(c);
    dep_add(c, c->encs[id].producer);
    int32_t m = emit_local(c, PC_OP_DECODE, PC_BUF_SCRATCH, c->encs[id].e_off, PC_BUF_SCRATCH, off, c->encs[id].raw_len);
    dep_reset(c);
    for (int32_t k = 0; k < saved; k++) dep_add(c, saved_deps[k]);
    free(saved_deps);
    e = &c->encs[id];
    e->mat = m;
    e->mat_off = off;
    return m;
}

/* ---- twin lists -------------------------------------------------------- */
static twin_list *list_of(cx *c, int32_t buf) {
    if (buf == PC_BUF_OUT) return &c->tw[0];
    if (buf == PC_BUF_SCRATCH) return &c->tw[1];
    return NULL;
}

/* First twin with b > x. */
static int32_t tl_first(const twin_list *l, uint64_t x) {
    int32_t lo = 0, hi = l->n;
    while (lo < hi) {
        int32_t mid = (lo + hi) / 2;
        if (l->v[mid].b <= x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static int tl_insert_at(cx *c, twin_list *l, int32_t at, twin t) {
    if (!grow((void **)&l->v, &l->cap, l->n + 1, sizeof(twin))) {
        c->failed = 1;
        return 0;
    }
    memmove(&l->v[at + 1], &l->v[at], sizeof(twin) * (size_t)(l->n - at));
    l->v[at] = t;
    l->n++;
    return 1;
}

/* A write to [lo, hi) ends the twins there (trimming those that stick out). */
static void tl_clear(cx *c, int32_t buf, uint64_t lo, uint64_t hi) {
    twin_list *l = list_of(c, buf);
    if (!l || lo >= hi) return;
    int32_t i = tl_first(l, lo);
    while (i < l->n && l->v[i].a < hi) {
        twin t = l->v[i];
        if (t.a < lo && t.b > hi) { /* split in two */
            l->v[i].b = lo;
            twin right = t;
            right.a = hi;
            if (!tl_insert_at(c, l, i + 1, right)) return;
            return;
        }
        if (t.a < lo) {
            l->v[i].b = lo;
            i++;
        } else if (t.b > hi) {
            l->v[i].a = hi;
            i++;
        } else {
            memmove(&l->v[i], &l->v[i + 1], sizeof(twin) * (size_t)(l->n - i - 1));
            l->n--;
        }
    }
}

static void tl_set(cx *c, int32_t buf, uint64_t a, uint64_t b, uint64_t fa, int32_t enc, int pending) {
    twin_list *l = list_of(c, buf);
    if (!l || enc < 0) return;
    tl_clear(c, buf, a, b);
    twin t = {a, b, fa, enc, pending};
    tl_insert_at(c, l, tl_first(l, a), t);
}

static int intact(const cx *c, const twin *t) {
    return t->a == t->fa && t->b == t->fa + c->encs[t->enc].raw_len;
}

/* The twin that is exactly [a, b) and intact, or NULL. */
static twin *tl_exact(cx *c, int32_t buf, uint64_t a, uint64_t b) {
    twin_list *l = list_of(c, buf);
    if (!l) return NULL;
    int32_t i = tl_first(l, a);
    if (i < l->n && l->v[i].a == a && l->v[i].b == b && intact(c, &l->v[i])) return &l->v[i];
    return NULL;
}

static int any_pending(cx *c, int32_t buf, uint64_t lo, uint64_t hi) {
    twin_list *l = list_of(c, buf);
    if (!l) return 0;
    for (int32_t i = tl_first(l, lo); i < l->n && l->v[i].a < hi; i++)
        if (l->v[i].pending) return 1;
    return 0;
}

/* ---- reading values ---------------------------------------------------- */
/*
 * Where to read the *value* of [off, off+len) of buf: the range itself
 * unless pending twins overlap it; then a decoded copy, or (mixed ranges) a
 * scratch range assembled from pieces. Deps for the reader are appended to
 * c->deps (which must already hold the reader's own deps: assembly copies
 * read when the reader would).
 */
static void read_value(cx *c, int32_t buf, uint64_t off, uint64_t len, int32_t *rb, uint64_t *ro) {
    *rb = buf;
    *ro = off;
    if (buf == PC_BUF_IN || !any_pending(c, buf, off, off + len)) return;
    twin_list *l = list_of(c, buf);
    int32_t i = tl_first(l, off);
    twin *t = &l->v[i];
    if (t->pending && t->a <= off && t->b >= off + len) { /* inside one pending twin */
        int32_t id = t->enc;
        uint64_t fa = t->fa;
        int32_t m = materialise(c, id);
        dep_add(c, m);
        *rb = PC_BUF_SCRATCH;
        *ro = c->encs[id].mat_off + (off - fa);
        return;
    }
    /* Mixed: assemble in fresh scratch. The pieces' ops become deps. */
    uint64_t v = alloc(c, len);
    int32_t nd = c->ndeps;
    int32_t *base = malloc(sizeof(int32_t) * ((size_t)nd + 1));
    if (!base) {
        c->failed = 1;
        return;
    }
    memcpy(base, c->deps, sizeof(int32_t) * (size_t)nd);
    int32_t *pieces = NULL, npieces = 0, pcap = 0;
    uint64_t x = off, end = off + len;
    while (x < end && !c->failed) {
        l = list_of(c, buf);
        i = tl_first(l, x);
        uint64_t y;
        int32_t from_b = buf;
        uint64_t from_o = x;
        int32_t extra = -1;
        if (i < l->n && l->v[i].a <= x) {
            twin tt = l->v[i];
            y = tt.b < end ? tt.b : end;
            if (tt.pending) {
                extra = materialise(c, tt.enc);
                from_b = PC_BUF_SCRATCH;
                from_o = c->encs[tt.enc].mat_off + (x - tt.fa);
            }
        } else {
            y = (i < l->n && l->v[i].a < end) ? l->v[i].a : end;
        }
        dep_reset(c);
        for (int32_t k = 0; k < nd; k++) dep_add(c, base[k]);
        dep_add(c, extra);
        int32_t op = emit_local(c, PC_OP_COPY, from_b, from_o, PC_BUF_SCRATCH, v + (x - off), y - x);
        if (grow((void **)&pieces, &pcap, npieces + 1, sizeof(int32_t))) pieces[npieces++] = op;
        else c->failed = 1;
        x = y;
    }
    dep_reset(c);
    for (int32_t k = 0; k < nd; k++) dep_add(c, base[k]);
    for (int32_t k = 0; k < npieces; k++) dep_add(c, pieces[k]);
    free(base);
    free(pieces);
    *rb = PC_BUF_SCRATCH;
    *ro = v;
}

/*
 * Before an op that reads and writes [off, off+len) of buf in place (SCALE,
 * REDUCE): give pending parts their decoded value, in place. Safe: in the
 * original plan nothing may touch a range concurrently with an op that
 * writes it. The new ops are appended to c->deps (which holds the op's deps).
 */
static void resolve_in_place(cx *c, int32_t buf, uint64_t off, uint64_t len) {
    twin_list *l = list_of(c, buf);
    if (!l || !any_pending(c, buf, off, off + len)) return;
    int32_t nd = c->ndeps;
    int32_t *base = malloc(sizeof(int32_t) * ((size_t)nd + 1));
    if (!base) {
        c->failed = 1;
        return;
    }
    memcpy(base, c->deps, sizeof(int32_t) * (size_t)nd);
    int32_t *made = NULL, nmade = 0, mcap = 0;
    uint64_t end = off + len;
    for (int32_t i = tl_first(l, off); i < l->n && l->v[i].a < end && !c->failed; i++) {
        twin t = l->v[i];
        if (!t.pending) continue;
        uint64_t a = t.a > off ? t.a : off, b = t.b < end ? t.b : end;
        dep_reset(c);
        for (int32_t k = 0; k < nd; k++) dep_add(c, base[k]);
        int32_t op;
        if (a == t.a && b == t.b && intact(c, &t)) {
            dep_add(c, c->encs[t.enc].producer);
            op = emit_local(c, PC_OP_DECODE, PC_BUF_SCRATCH, c->encs[t.enc].e_off, buf, a, b - a);
        } else {
            dep_add(c, materialise(c, t.enc));
            op = emit_local(c, PC_OP_COPY, PC_BUF_SCRATCH, c->encs[t.enc].mat_off + (a - t.fa), buf, a, b - a);
        }
        l = list_of(c, buf); /* materialise may not move it, but stay safe */
        if (grow((void **)&made, &mcap, nmade + 1, sizeof(int32_t))) made[nmade++] = op;
        else c->failed = 1;
    }
    dep_reset(c);
    for (int32_t k = 0; k < nd; k++) dep_add(c, base[k]);
    for (int32_t k = 0; k < nmade; k++) dep_add(c, made[k]);
    free(base);
    free(made);
}

/* ---- IN encodings ------------------------------------------------------ */
static void in_record(cx *c, uint64_t off, uint64_t len, int32_t enc) {
    if (!grow((void **)&c->ins, &c->ins_cap, c->nins + 1, sizeof(in_rec))) {
        c->failed = 1;
        return;
    }
    int32_t at = c->nins;
    while (at > 0 && c->ins[at - 1].off > off) at--;
    memmove(&c->ins[at + 1], &c->ins[at], sizeof(in_rec) * (size_t)(c->nins - at));
    c->ins[at] = (in_rec){off, len, enc};
    c->nins++;
}

/* The encoding of exactly IN[off, off+len), or -1. */
static int32_t in_exact(const cx *c, uint64_t off, uint64_t len) {
    for (int32_t k = 0; k < c->nins; k++)
        if (c->ins[k].off == off && c->ins[k].len == len) return c->ins[k].enc;
    return -1;
}

/* ---- one original op --------------------------------------------------- */
static void rewrite_send(cx *c, int32_t o, const pc_op *op) {
    dep_reset(c);
    dep_add_orig(c, o);
    uint64_t elen = enc_bytes(c, op->len);
    int32_t id;
    twin *t = op->src_buf == PC_BUF_IN ? NULL : tl_exact(c, op->src_buf, op->src_off, op->src_off + op->len);
    if (t) { /* forward the bytes we hold */
        id = t->enc;
        dep_add(c, c->encs[id].producer);
    } else if (op->src_buf == PC_BUF_IN && (id = in_exact(c, op->src_off, op->len)) >= 0) {
        dep_add(c, c->encs[id].producer); /* sent before: IN never changes, send the same bytes again */
    } else if (op->src_buf == PC_BUF_IN) {
        id = encode_into_new(c, PC_BUF_IN, op->src_off, op->len);
        if (id < 0) return;
        in_record(c, op->src_off, op->len, id);
        dep_reset(c);
        dep_add(c, c->encs[id].producer);
    } else { /* a value this rank made: encode it once, it is pending from now on */
        int32_t rb;
        uint64_t ro;
        read_value(c, op->src_buf, op->src_off, op->len, &rb, &ro);
        id = encode_into_new(c, rb, ro, op->len);
        if (id < 0) return;
        tl_set(c, op->src_buf, op->src_off, op->src_off + op->len, op->src_off, id, 1);
        dep_reset(c);
        dep_add(c, c->encs[id].producer);
    }
    rep_add(c, emit(c, PC_OP_SEND, op->peer, op->stripe, op->tag, PC_BUF_SCRATCH, c->encs[id].e_off, -1, 0, elen, 1,
                    0));
}

static void rewrite_recv(cx *c, int32_t o, const pc_op *op) {
    dep_reset(c);
    dep_add_orig(c, o);
    int32_t id = new_enc(c, op->len, -1);
    if (id < 0) return;
    int32_t r = emit(c, PC_OP_RECV, op->peer, op->stripe, op->tag, -1, 0, PC_BUF_SCRATCH, c->encs[id].e_off,
                     enc_bytes(c, op->len), 0, 1);
    c->encs[id].producer = r;
    dep_reset(c);
    dep_add(c, r);
    if (op->kind == PC_OP_RECV) {
        rep_add(c, emit_local(c, PC_OP_DECODE, PC_BUF_SCRATCH, c->encs[id].e_off, op->dst_buf, op->dst_off, op->len));
        tl_set(c, op->dst_buf, op->dst_off, op->dst_off + op->len, op->dst_off, id, 0);
        return;
    }
    int32_t lb;
    uint64_t lo;
    read_value(c, op->src_buf, op->src_off, op->len, &lb, &lo);
    int32_t i = emit(c, PC_OP_DECODE_REDUCE, -1, 0, 0, lb, lo, op->dst_buf, op->dst_off, op->len, 0, 0);
    if (i >= 0) {
        c->p->ops[i].aux_buf = PC_BUF_SCRATCH;
        c->p->ops[i].aux_off = c->encs[id].e_off;
    }
    rep_add(c, i);
    tl_clear(c, op->dst_buf, op->dst_off, op->dst_off + op->len);
}

/* COPY of IN into OUT: the decoded form of the bytes sent for that range
 * (encoded here, in the same pieces, where nothing was sent). */
static void rewrite_copy_in(cx *c, int32_t o, const pc_op *op) {
    uint64_t x = op->src_off, end = op->src_off + op->len;
    int32_t ia = 0;
    while (x < end && !c->failed) {
        while (ia < c->nins && c->ins[ia].off < x) ia++;
        int32_t hit = -1;
        for (int32_t k = ia; k < c->nins && c->ins[k].off == x; k++)
            if (x + c->ins[k].len <= end) hit = k;
        dep_reset(c);
        dep_add_orig(c, o);
        uint64_t y;
        int32_t id;
        if (hit >= 0) {
            id = c->ins[hit].enc;
            y = x + c->ins[hit].len;
            dep_add(c, c->encs[id].producer);
        } else {
            y = end;
            for (int32_t k = ia; k < c->nins; k++)
                if (c->ins[k].off > x && c->ins[k].off < y) {
                    y = c->ins[k].off;
                    break;
                }
            id = encode_into_new(c, PC_BUF_IN, x, y - x);
            if (id < 0) return;
            dep_reset(c);
            dep_add(c, c->encs[id].producer);
            /* IN may be this very block of OUT (an in-place all-gather):
             * decode only once every encoding of that range has read it */
            for (int32_t k = 0; k < c->nins; k++)
                if (c->ins[k].off < y && c->ins[k].off + c->ins[k].len > x) dep_add(c, c->encs[c->ins[k].enc].producer);
        }
        uint64_t d = op->dst_off + (x - op->src_off);
        rep_add(c, emit_local(c, PC_OP_DECODE, PC_BUF_SCRATCH, c->encs[id].e_off, op->dst_buf, d, y - x));
        tl_set(c, op->dst_buf, d, d + (y - x), d, id, 0);
        x = y;
    }
}

static void rewrite_copy(cx *c, int32_t o, const pc_op *op) {
    if (op->src_buf == PC_BUF_IN) {
        /* Into OUT, or into scratch once exactly that range went out
         * (direct's own contribution): the decoded form of what the peers
         * received. */
        if (op->dst_buf == PC_BUF_OUT || (op->len && in_exact(c, op->src_off, op->len) >= 0)) {
            rewrite_copy_in(c, o, op);
            return;
        }
        dep_reset(c);
        dep_add_orig(c, o);
        rep_add(c, emit_local(c, PC_OP_COPY, op->src_buf, op->src_off, op->dst_buf, op->dst_off, op->len));
        tl_clear(c, op->dst_buf, op->dst_off, op->dst_off + op->len);
        return;
    }
    /* Piecewise along the source's twins; the destination's new twins are
     * collected first (source and destination may share a buffer). */
    typedef struct { uint64_t a, b, fa; int32_t enc; } nt;
    nt *news = NULL;
    int32_t nnews = 0, ncap = 0;
    uint64_t x = op->src_off, end = op->src_off + op->len;
    int64_t shift = (int64_t)op->dst_off - (int64_t)op->src_off;
    while (x < end && !c->failed) {
        twin_list *l = list_of(c, op->src_buf);
        int32_t i = l ? tl_first(l, x) : 0;
        dep_reset(c);
        dep_add_orig(c, o);
        uint64_t y;
        int32_t kind = PC_OP_COPY, sb = op->src_buf;
        uint64_t so = x;
        if (l && i < l->n && l->v[i].a <= x) {
            twin t = l->v[i];
            y = t.b < end ? t.b : end;
            int whole = x == t.a && y == t.b && intact(c, &t);
            if (whole) {
                if (t.pending) {
                    kind = PC_OP_DECODE;
                    sb = PC_BUF_SCRATCH;
                    so = c->encs[t.enc].e_off;
                    dep_add(c, c->encs[t.enc].producer);
                }
                if (grow((void **)&news, &ncap, nnews + 1, sizeof(nt)))
                    news[nnews++] = (nt){(uint64_t)((int64_t)x + shift), (uint64_t)((int64_t)y + shift),
                                         (uint64_t)((int64_t)x + shift), t.enc};
                else c->failed = 1;
            } else if (t.pending) {
                dep_add(c, materialise(c, t.enc));
                sb = PC_BUF_SCRATCH;
                so = c->encs[t.enc].mat_off + (x - t.fa);
            }
        } else {
            y = (l && i < l->n && l->v[i].a < end) ? l->v[i].a : end;
        }
        rep_add(c, emit_local(c, kind, sb, so, op->dst_buf, (uint64_t)((int64_t)x + shift), y - x));
        x = y;
    }
    tl_clear(c, op->dst_buf, op->dst_off, op->dst_off + op->len);
    for (int32_t k = 0; k < nnews; k++) tl_set(c, op->dst_buf, news[k].a, news[k].b, news[k].fa, news[k].enc, 0);
    free(news);
}

static void rewrite_rmw(cx *c, int32_t o, const pc_op *op) {
    dep_reset(c);
    dep_add_orig(c, o);
    int32_t sb = op->src_buf;
    uint64_t so = op->src_off;
    if (op->kind == PC_OP_REDUCE) read_value(c, op->src_buf, op->src_off, op->len, &sb, &so);
    resolve_in_place(c, op->dst_buf, op->dst_off, op->len);
    rep_add(c, emit_local(c, op->kind, sb, so, op->dst_buf, op->dst_off, op->len));
    tl_clear(c, op->dst_buf, op->dst_off, op->dst_off + op->len);
}

static void rewrite_plain(cx *c, int32_t o, const pc_op *op) {
    dep_reset(c);
    dep_add_orig(c, o);
    rep_add(c, emit(c, op->kind, op->peer, op->stripe, op->tag, op->src_buf, op->src_off, op->dst_buf, op->dst_off,
                    op->len, 0, 0));
}

/* At the end: pending ranges of OUT take their decoded value. */
static void finish_out(cx *c) {
    twin_list *l = &c->tw[0];
    int started = c->p->tail_first >= 0;
    for (int32_t i = 0; i < l->n && !c->failed; i++) {
        twin t = l->v[i];
        if (!t.pending) continue;
        if (!started) {
            plan_begin_tail(c->p);
            started = 1;
        }
        dep_reset(c);
        if (intact(c, &t)) {
            dep_add(c, c->encs[t.enc].producer);
            emit_local(c, PC_OP_DECODE, PC_BUF_SCRATCH, c->encs[t.enc].e_off, PC_BUF_OUT, t.a, t.b - t.a);
        } else {
            dep_add(c, materialise(c, t.enc));
            emit_local(c, PC_OP_COPY, PC_BUF_SCRATCH, c->encs[t.enc].mat_off + (t.a - t.fa), PC_BUF_OUT, t.a,
                       t.b - t.a);
        }
        l = &c->tw[0];
    }
}


/* Plans this pass accepts: original ops only, float32-aligned ranges. */
static int acceptable(const pc_plan *in, int *has_payload) {
    *has_payload = 0;
    for (int32_t i = 0; i < in->nops; i++) {
        const pc_op *op = &in->ops[i];
        if (op->kind < PC_OP_SEND || op->kind > PC_OP_SCALE) return 0;
        if (op->len % 4u || op->src_off % 4u || op->dst_off % 4u) return 0;
        if (op->len && op->kind != PC_OP_SCALE && op->src_buf < 0 && op->kind != PC_OP_RECV) return 0;
        if (op->len && op->kind != PC_OP_SEND && op->dst_buf < 0) return 0;
        if (op->dst_buf == PC_BUF_IN) return 0;
        if (plan_op_is_net(op->kind) && op->len) *has_payload = 1;
    }
    return 1;
}

pc_status pc_plan_compress(const pc_plan *in, int32_t codec, pc_plan **out) {
    *out = NULL;
    int has_payload;
    /* (a buffer or remapped plan addresses caller buffers past IN/OUT/SCRATCH, which the
     * compressed plan, run by pc_comm_run, would index as its own three) */
    if (!in || in->codec != PC_CODEC_NONE || in->nbufs || in->remapped || codec < 0 || codec >= PC_CODEC_COUNT ||
        !acceptable(in, &has_payload))
        return PC_ERR_ARG;
    cx c;
    memset(&c, 0, sizeof c);
    c.src = in;
    c.codec = has_payload ? codec : PC_CODEC_NONE; /* nothing on the wire: nothing to encode */
    c.p = plan_new(in->nranks, in->rank);
    c.rep_start = calloc((size_t)in->nops + 1, sizeof(int32_t));
    if (!c.p || !c.rep_start) {
        pc_plan_free(c.p);
        free(c.rep_start);
        return PC_ERR_NOMEM;
    }
    c.p->codec = c.codec;
    c.top = in->need_bytes[PC_BUF_SCRATCH];
    for (int32_t o = 0; o < in->nops && !c.failed; o++) {
        if (o == in->tail_first) plan_begin_tail(c.p);
        c.rep_start[o] = c.nreps;
        const pc_op *op = &in->ops[o];
        if (c.codec == PC_CODEC_NONE || op->len == 0) {
            rewrite_plain(&c, o, op);
            continue;
        }
        switch (op->kind) {
        case PC_OP_SEND: rewrite_send(&c, o, op); break;
        case PC_OP_RECV:
        case PC_OP_RECV_REDUCE: rewrite_recv(&c, o, op); break;
        case PC_OP_COPY: rewrite_copy(&c, o, op); break;
        default: rewrite_rmw(&c, o, op); break;
        }
        c.rep_start[o + 1] = c.nreps;
    }
    if (in->nops) c.rep_start[in->nops] = c.nreps;
    finish_out(&c);
    pc_plan *p = c.p;
    for (int b = 0; b < PC_BUF_COUNT; b++)
        if (in->need_bytes[b] > p->need_bytes[b]) p->need_bytes[b] = in->need_bytes[b];
    if (c.top > p->need_bytes[PC_BUF_SCRATCH]) p->need_bytes[PC_BUF_SCRATCH] = c.top;
    if (c.failed) p->failed = 1;
    free(c.rep_start);
    free(c.reps);
    free(c.deps);
    free(c.encs);
    free(c.ins);
    free(c.tw[0].v);
    free(c.tw[1].v);
    return plan_finish(p, out);
}
