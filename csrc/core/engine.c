/*
 * engine.c - runs any plan over a comm's connections.
 *
 * One non-blocking loop per collective. Each (peer, stripe) connection is a
 * *channel* with a send FIFO and a receive FIFO holding the plan's ops in
 * plan order. An op may start when all its dependencies are done and it is
 * at the head of its FIFO; local ops (copy, reduce, scale) run as soon as
 * they are ready. Sends write header + payload with one sendmsg; receives
 * read the header and payload with one recvmsg, straight into the
 * destination, or, for receive-reduce, through a small per-channel staging
 * buffer that is reduced into the destination while it is still in cache.
 * A transport that can show received bytes in place (peek/consume: shared
 * memory) skips the staging buffer: the reduction reads the peer's bytes
 * where they lie. Such transports ask for frames padded to 8 bytes
 * (conn->align), so every payload element lies naturally aligned there.
 * When nothing moves the loop may spin briefly, then sleeps in poll() on
 * the channels it waits for plus the comm's cancel pipe, never past the
 * deadline (shared-memory channels sleep on their eventfd doorbells, see
 * transport_shm.c). Spinning only pays when the reply comes sooner than a
 * sleep and a wake-up would take, and only costs nothing when no other
 * task wants the core: so the spin budget is learned from how long the
 * comm's recent waits took (see the waiting policy below), and is zero
 * while the host has more runnable tasks than CPUs. On any
 * failure every connection of the comm is shut
 * down, so peers blocked on us fail at once instead of waiting out a
 * timeout; the comm is then unusable and the caller builds a new one.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>

#include "copy.h"
#include "copy_choice.h"
#include "huge_pages.h"
#include "shared_buffers.h"
#include "shared_peer.h"
#include "plan.h"
#include "pycoll.h"
#include "transport.h"
#include "window.h"
#include "wire.h"

#define STAGE_BYTES (256u * 1024u)
#define REMOTE_BUDGET (4ull << 20) /* bytes copied from a peer per pump call */
#define REMOTE_OP_MIN (64u * 1024u) /* smaller payloads always go through the ring */
#define MAX_POSTED 64               /* descriptors out on one channel at once */
/* Buffer runs (pc_comm_run_buffers): a single-copy receive is read in chunks small enough to be
 * hashed while they are still in the reading core's cache, on several threads when it is long. */
#define READ_CHUNK (512u * 1024u)     /* a multiple of PC_HASH_BLOCK */
#define READ_PARALLEL_MIN (8u << 20)  /* a receive with this much left to read uses the threads */
#define READ_ROUND (64ull << 20)      /* bytes read per pump call: the loop still sees its deadline */
#define MAX_READ_THREADS 8
#define HASHED_RECV_MAX (1u << 20)    /* a hashed receive off a socket or ring takes this much per call */

/* Kinds of wait, each with its own learned spin budget: all channels it waits
 * on are shared memory; or some is a socket, in a small collective (a big
 * one never spins on sockets: its waits are long and the kernel does the
 * copying, on the cores a spinner would take). */
enum { WAIT_SHM, WAIT_SOCK, WAIT_KINDS, WAIT_NONE = -1 };

typedef struct {
    int32_t *send_q, nsend, send_head;
    int32_t *recv_q, nrecv, recv_head;
    uint8_t shdr[PC_HDR_BYTES];
    uint64_t sdone;        /* header + payload bytes sent of the head op */
    uint8_t rhdr[PC_HDR_BYTES];
    uint64_t rdone;        /* header + payload bytes received of the head op */
    uint64_t reduced;      /* payload bytes already reduced (receive-reduce) or read (single copy) */
    uint64_t hashed;       /* payload bytes of the head receive already digested (buffer runs) */
    uint32_t stage_fill;   /* bytes waiting in the staging buffer */
    short want;            /* poll events this channel waits for */
    /* single copy (PC_FRAME_REMOTE) */
    int sremote;           /* the send being written goes as a descriptor */
    int32_t posted;        /* sends from send_head on whose descriptors are out, waiting for acks */
    uint64_t stoken;       /* the token of the oldest of them */
    uint8_t sdesc[PC_REMOTE_DESC_BYTES];
    int rremote;           /* the head receive came as a descriptor */
    uint8_t rdesc[PC_REMOTE_DESC_BYTES];
} chan_state;

struct pc_comm {
    int32_t rank, nranks, stripes;
    pc_conn **conns;          /* nranks * stripes, NULL for self */
    uint8_t **stage;          /* per channel, allocated on first use */
    int cancel_pipe[2];
    int cancelled;            /* atomic */
    int broken;
    int spin_us;              /* most we spin on a small collective's wait (0: never spin) */
    double stall_s;           /* fail when nothing moved this long (0: off) */
    int shm_spin_us;          /* most we spin on a shm-only wait */
    uint64_t remote_min;      /* payloads this big go single-copy where the peer can (0: never) */
    int oversubscribed;       /* more ranks on this host than CPUs */
    int32_t local_ranks;      /* ranks of this comm on this host, ourselves included */
    /* waiting policy (see begin_wait) */
    uint32_t spin_ns[WAIT_KINDS]; /* learned spin budget per kind of wait */
    int32_t cpus_online;
    int busy_looks;           /* consecutive looks at the host that found it busy (host_busy) */
    huge_pages huge;          /* which single-copy buffers go onto huge pages (huge_pages.c) */
    copy_choice choice;       /* single copy or the rings, learned per size class (copy_choice.c) */
    double busy_seen_at;      /* when the last look was (0: never) */
    double spun_s;            /* seconds spent spinning in waits (pc_comm_wait_stats) */
    uint64_t sleeps;          /* waits that went to sleep in the kernel */
    void *scratch;            /* scratch_cap bytes inside a mapping of scratch_map bytes (see grow_scratch) */
    uint64_t scratch_cap;
    size_t scratch_map;
    /* result windows (window.c): ours, our mappings of the peers' (per rank), and where the
     * last windowed body left each of its receives (alias[op]: NULL where in scratch) */
    window_own win;
    window_peer *peer_win;
    shared_peer *peer_shared;  /* our mappings of each rank's shared buffers (shared_peer.c) */
    uint64_t shared_read;      /* bytes we read straight out of those mappings */
    const uint8_t **alias;
    int32_t alias_cap;
    const pc_plan *alias_plan; /* the plan and call the aliases belong to */
    uint64_t alias_seq;
    int alias_window;          /* that body's scratch was the window */
    uint64_t window_copied;    /* bytes our tails copied straight out of peers' windows */
    void *run_mem;            /* a run's bookkeeping (prepare), kept for the next run */
    size_t run_cap;
    uint64_t sent, received;
    uint64_t single_copied;   /* bytes we copied straight out of a peer's memory */
    char err[512];
};

static void set_err(pc_comm *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- comm lifetime ----------------------------------------------------- */
static void close_from(int32_t from, int32_t nconn, int32_t stripes, int32_t rank, const int32_t *fds,
                       const int32_t *shm_fds) {
    for (int32_t i = from; i < nconn; i++) {
        if (i / stripes == rank) continue;
        if (fds && fds[i] >= 0) close(fds[i]);
        for (int k = 0; shm_fds && k < 3; k++)
            if (shm_fds[3 * i + k] >= 0) close(shm_fds[3 * i + k]);
    }
}

/* Ranks of this comm on this host, ourselves included. */
/* The first connection to rank p (NULL for ourselves). */
static pc_conn *first_conn(const pc_comm *c, int32_t p) { return p == c->rank ? NULL : c->conns[p * c->stripes]; }

static int32_t local_ranks(const pc_comm *c) {
    int32_t n = 1;
    for (int32_t p = 0; p < c->nranks; p++) {
        pc_conn *cn = first_conn(c, p);
        n += cn && pc_conn_same_host(cn);
    }
    return n;
}

static int32_t cpus_available(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return 1 << 30;
    return CPU_COUNT(&set);
}

pc_status pc_comm_create(int32_t rank, int32_t nranks, int32_t stripes, const int32_t *fds,
                         int32_t sockbuf_bytes, pc_comm **out) {
    return pc_comm_create_mixed(rank, nranks, stripes, NULL, fds, NULL, sockbuf_bytes, out);
}

pc_status pc_comm_create_mixed(int32_t rank, int32_t nranks, int32_t stripes, const int32_t *kinds,
                               const int32_t *fds, const int32_t *shm_fds, int32_t sockbuf_bytes,
                               pc_comm **out) {
    return pc_comm_create_keyed(rank, nranks, stripes, kinds, fds, shm_fds, sockbuf_bytes, NULL, 0, 0.0, NULL, out);
}

pc_status pc_comm_create_keyed(int32_t rank, int32_t nranks, int32_t stripes, const int32_t *kinds,
                               const int32_t *fds, const int32_t *shm_fds, int32_t sockbuf_bytes,
                               const uint8_t *psk, int32_t psk_len, double handshake_timeout_s,
                               int32_t *failed_peer, pc_comm **out) {
    *out = NULL;
    if (failed_peer) *failed_peer = -1;
    double handshake_until = now_s() + handshake_timeout_s;
    int32_t nconn = nranks * stripes;
    if (nranks < 1 || rank < 0 || rank >= nranks || stripes < 1 || stripes > 64 || !fds) {
        if (nranks > 0 && stripes > 0 && stripes <= 64) close_from(0, nconn, stripes, -1, fds, shm_fds);
        return PC_ERR_ARG;
    }
    for (int32_t i = 0; kinds && i < nconn; i++)
        if (i / stripes != rank && (kinds[i] < 0 || kinds[i] >= PC_CONN_KINDS ||
                                    (kinds[i] == PC_CONN_SHM && !shm_fds))) {
            close_from(0, nconn, stripes, rank, fds, shm_fds);
            return PC_ERR_ARG;
        }
    pc_comm *c = calloc(1, sizeof *c);
    pc_status st = PC_ERR_NOMEM;
    if (!c) goto fail_fds;
    huge_pages_init(&c->huge);
    copy_choice_init(&c->choice);
    window_own_init(&c->win);
    c->rank = rank;
    c->nranks = nranks;
    c->stripes = stripes;
    c->spin_us = 200;
    c->shm_spin_us = PC_SHM_SPIN_DEFAULT;
    c->remote_min = PC_SINGLE_COPY_DEFAULT;
    c->cancel_pipe[0] = c->cancel_pipe[1] = -1;
    c->conns = calloc((size_t)nconn, sizeof *c->conns);
    c->stage = calloc((size_t)nconn, sizeof *c->stage);
    c->peer_win = calloc((size_t)nranks, sizeof *c->peer_win);
    c->peer_shared = calloc((size_t)nranks, sizeof *c->peer_shared);
    if (!c->conns || !c->stage || !c->peer_win || !c->peer_shared) goto fail_fds;
    if (pipe(c->cancel_pipe) != 0) {
        st = PC_ERR_IO;
        goto fail_fds;
    }
    for (int i = 0; i < 2; i++) {
        fcntl(c->cancel_pipe[i], F_SETFL, O_NONBLOCK);
        fcntl(c->cancel_pipe[i], F_SETFD, FD_CLOEXEC);
    }
    for (int32_t i = 0; i < nconn; i++) {
        int32_t peer = i / stripes;
        if (peer == rank) continue;
        int shm = kinds && kinds[i] == PC_CONN_SHM;
        if (fds[i] < 0) {
            close_from(i, i + 1, stripes, rank, NULL, shm_fds);
            continue;
        }
        st = PC_ERR_NOMEM;
        /* in ascending order on every rank: the pairs' blocking handshakes (if any) cannot deadlock */
        double left = handshake_until - now_s(); /* one deadline for all of them */
        pc_conn_args a = {.shm_fds = shm ? shm_fds + 3 * i : NULL, .side = rank < peer ? 0 : 1,
                          .sockbuf_bytes = sockbuf_bytes, .psk = psk, .psk_len = psk_len,
                          .timeout_s = left > 1e-3 ? left : 1e-3};
        c->conns[i] = pc_conn_open(kinds ? kinds[i] : PC_CONN_TCP, fds[i], &a, &st);
        if (!c->conns[i]) {
            if (failed_peer) *failed_peer = peer;
            /* fds from i on are not owned by a conn yet */
            close_from(i, nconn, stripes, rank, fds, shm_fds);
            pc_comm_free(c);
            return st;
        }
        if (!shm) close_from(i, i + 1, stripes, rank, NULL, shm_fds);
    }
    c->local_ranks = local_ranks(c);
    c->oversubscribed = c->local_ranks > cpus_available();
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    c->cpus_online = online > 0 ? (int32_t)online : 1;
    c->spin_ns[WAIT_SHM] = (uint32_t)c->shm_spin_us * 1000u;
    c->spin_ns[WAIT_SOCK] = (uint32_t)c->spin_us * 1000u;
    shared_buffers_sweep();
    *out = c;
    return PC_OK;
fail_fds:
    close_from(0, nconn, stripes, rank, fds, shm_fds);
    if (c) {
        free(c->conns);
        free(c->stage);
        free(c->peer_win);
        free(c->peer_shared);
        if (c->cancel_pipe[0] >= 0) close(c->cancel_pipe[0]);
        if (c->cancel_pipe[1] >= 0) close(c->cancel_pipe[1]);
        free(c);
    }
    return st;
}

void pc_comm_cancel(pc_comm *c) {
    __atomic_store_n(&c->cancelled, 1, __ATOMIC_SEQ_CST);
    char b = 1;
    ssize_t r = write(c->cancel_pipe[1], &b, 1);
    (void)r; /* a full pipe already wakes the loop */
}

static void drain_cancel_pipe(pc_comm *c) {
    char buf[64];
    while (read(c->cancel_pipe[0], buf, sizeof buf) > 0) {
    }
}

void pc_comm_clear_cancel(pc_comm *c) {
    /* Called before every collective: no system call unless a cancel came
     * (a byte a racing cancel leaves behind is drained by wait_for_io). */
    if (!__atomic_load_n(&c->cancelled, __ATOMIC_SEQ_CST)) return;
    drain_cancel_pipe(c);
    __atomic_store_n(&c->cancelled, 0, __ATOMIC_SEQ_CST);
}

/* Spin caps are kept below 1 s (a spin longer than that is never right, and
 * the budgets, in ns, fit 32 bits). */
static int32_t clamp_spin(int32_t us) { return us < 0 ? 0 : us > 1000000 ? 1000000 : us; }

void pc_comm_set_spin(pc_comm *c, int32_t spin_us) {
    c->spin_us = clamp_spin(spin_us);
    c->spin_ns[WAIT_SOCK] = (uint32_t)c->spin_us * 1000u;
}
void pc_comm_set_stall_timeout(pc_comm *c, double seconds) { c->stall_s = seconds > 0 ? seconds : 0; }
void pc_comm_set_shm_spin(pc_comm *c, int32_t spin_us) {
    c->shm_spin_us = clamp_spin(spin_us);
    c->spin_ns[WAIT_SHM] = (uint32_t)c->shm_spin_us * 1000u;
}

void pc_comm_set_single_copy(pc_comm *c, uint64_t min_bytes) {
    c->remote_min = min_bytes;
    for (int32_t i = 0; i < c->nranks * c->stripes; i++)
        if (c->conns[i] && c->conns[i]->ops->rma_allow) c->conns[i]->ops->rma_allow(c->conns[i], min_bytes != 0);
}

void pc_comm_set_single_copy_adapt(pc_comm *c, int32_t adapt) { c->choice.adapt = adapt != 0; }

void pc_comm_single_copy_runs(const pc_comm *c, uint64_t *single_copy, uint64_t *rings) {
    if (single_copy) *single_copy = c->choice.runs[1];
    if (rings) *rings = c->choice.runs[0];
}

void pc_comm_shutdown(pc_comm *c) {
    c->broken = 1;
    for (int32_t i = 0; i < c->nranks * c->stripes; i++)
        if (c->conns[i]) c->conns[i]->ops->shutdown(c->conns[i]);
}

void pc_comm_free(pc_comm *c) {
    if (!c) return;
    for (int32_t i = 0; i < c->nranks * c->stripes; i++) {
        if (c->conns && c->conns[i]) c->conns[i]->ops->destroy(c->conns[i]);
        if (c->stage) free(c->stage[i]);
    }
    free(c->conns);
    free(c->stage);
    if (c->scratch) munmap(c->scratch, c->scratch_map);
    window_own_free(&c->win);
    for (int32_t i = 0; c->peer_win && i < c->nranks; i++) window_peer_free(&c->peer_win[i]);
    free(c->peer_win);
    for (int32_t i = 0; c->peer_shared && i < c->nranks; i++) shared_peer_free(&c->peer_shared[i]);
    free(c->peer_shared);
    free(c->alias);
    huge_pages_free(&c->huge);
    shared_buffers_sweep();
    free(c->run_mem);
    if (c->cancel_pipe[0] >= 0) close(c->cancel_pipe[0]);
    if (c->cancel_pipe[1] >= 0) close(c->cancel_pipe[1]);
    free(c);
}

const char *pc_comm_last_error(const pc_comm *c) { return c->err; }
uint64_t pc_comm_bytes_sent(const pc_comm *c) { return c->sent; }
uint64_t pc_comm_bytes_single_copy(const pc_comm *c) { return c->single_copied; }
uint64_t pc_comm_bytes_from_windows(const pc_comm *c) { return c->window_copied; }
uint64_t pc_comm_bytes_from_shared(const pc_comm *c) { return c->shared_read; }

void pc_comm_wait_stats(const pc_comm *c, double *spun_s, uint64_t *sleeps) {
    *spun_s = c->spun_s;
    *sleeps = c->sleeps;
}

void pc_comm_probe_single_copy(pc_comm *c) {
    for (int32_t i = 0; i < c->nranks * c->stripes; i++) {
        pc_conn *cn = c->conns[i];
        if (cn && cn->ops->rma_probe) cn->ops->rma_probe(cn);
    }
}

int32_t pc_comm_single_copy_refused(const pc_comm *c, int32_t peer) {
    if (peer < 0 || peer >= c->nranks) return 0;
    for (int32_t s = 0; s < c->stripes; s++) {
        pc_conn *cn = c->conns[peer * c->stripes + s];
        int err = cn && cn->ops->rma_refused ? cn->ops->rma_refused(cn) : 0;
        if (err) return err;
    }
    return 0;
}

/* ---- frame validation (also exported for fuzzing) ---------------------- */
pc_status pc_frame_check(const uint8_t *hdr, uint32_t tag, uint32_t desc, uint64_t seq,
                         uint64_t len, char *why, uint32_t why_len) {
    pc_frame_hdr h;
    hdr_decode(hdr, &h);
    const char *what = NULL;
    char detail[160] = "";
    if (h.magic != PC_MAGIC) what = "bad magic (not a pycoll peer?)";
    else if (h.version != PC_VERSION)
        snprintf(detail, sizeof detail, "protocol version %u, expected %u", h.version, PC_VERSION);
    else if (h.kind != PC_FRAME_DATA)
        snprintf(detail, sizeof detail, "unknown frame kind %u", h.kind);
    else if (h.seq != seq)
        snprintf(detail, sizeof detail, "frame of collective #%llu while running #%llu (ranks called collectives in different orders?)",
                 (unsigned long long)h.seq, (unsigned long long)seq);
    else if (h.desc != desc)
        snprintf(detail, sizeof detail, "mismatched collective arguments across ranks (peer digest %08x, ours %08x): same collective, dtype, op, shape and root are required",
                 h.desc, desc);
    else if (h.len != len)
        snprintf(detail, sizeof detail, "frame length %llu, expected %llu (mismatched sizes across ranks?)",
                 (unsigned long long)h.len, (unsigned long long)len);
    else if (h.tag != tag)
        snprintf(detail, sizeof detail, "frame tag %08x, expected %08x (mismatched algorithm, or point-to-point tags, across ranks?)", h.tag, tag);
    if (what) snprintf(detail, sizeof detail, "%s", what);
    if (!detail[0]) return PC_OK;
    if (why && why_len) snprintf(why, why_len, "%s", detail);
    return PC_ERR_PROTO;
}

/* ---- the run ----------------------------------------------------------- */
#define SHARED_RUN_BUFS 8 /* a run's buffers looked up in shared_buffers (a buffer run's first ones) */
#define SHARED_STREAM_MIN (64u << 10) /* a copy out of a peer's shared buffer streams from this size */

typedef struct {
    pc_comm *comm;
    const pc_plan *plan;
    uint8_t *own[PC_BUF_COUNT]; /* IN, OUT, SCRATCH of a plain run */
    uint8_t *const *buf;   /* what ops' src_buf / dst_buf index: own, or a buffer run's table */
    int caller_bufs;       /* a buffer run: every buffer is the caller's (no scratch) */
    uint64_t *digests;     /* a buffer run with hashing: block digests land here ... */
    uint64_t *first;       /* ... buffer b's from first[b] on */
    uint64_t seed;
    int32_t threads;       /* for long single-copy reads */
    int32_t dtype, op, es;
    uint64_t seq;
    uint32_t desc;
    int32_t *pending;      /* unfinished deps per op */
    int32_t *dep_start, *dependents; /* CSR: ops that wait for op i */
    int32_t *ready;        /* stack of ready local ops */
    int32_t nready;
    int32_t done, before_tail;
    int32_t end;           /* ops [0, end) run: nops, or tail_first for a body-only run */
    chan_state *ch;
    int32_t *active;       /* channels with any op */
    int32_t nactive;
    int32_t failed_peer;
    int remote;            /* big enough for single copy (comm->remote_min) */
    const uint8_t **alias; /* a windowed run: comm->alias (see pump_remote, run_local) */
    shared_ref shared[SHARED_RUN_BUFS]; /* buffers that lie in shared memory (shared_buffers.c) */
    pc_status status;
} run_state;


static int op_ready(const run_state *r, int32_t i) {
    return i < r->end && r->pending[i] == 0 && (i < r->plan->tail_first || r->before_tail == 0);
}

static void complete(run_state *r, int32_t i) {
    const pc_plan *p = r->plan;
    r->done++;
    for (int32_t k = r->dep_start[i]; k < r->dep_start[i + 1]; k++) {
        int32_t d = r->dependents[k];
        if (--r->pending[d] == 0 && !plan_op_is_net(p->ops[d].kind) && op_ready(r, d)) r->ready[r->nready++] = d;
    }
    if (i < p->tail_first && --r->before_tail == 0) {
        for (int32_t t = p->tail_first; t < r->end; t++)
            if (r->pending[t] == 0 && !plan_op_is_net(p->ops[t].kind)) r->ready[r->nready++] = t;
    }
}

static void run_local(run_state *r, int32_t i) {
    const pc_op *op = &r->plan->ops[i];
    uint8_t *dst = op->dst_buf >= 0 ? r->buf[op->dst_buf] + op->dst_off : NULL;
    const uint8_t *src = op->src_buf >= 0 ? r->buf[op->src_buf] + op->src_off : NULL;
    uint64_t n = op->len / (uint64_t)r->es;
    switch (op->kind) {
    case PC_OP_COPY:
        if ((op->flags & PC_OPF_FROM_RECV) && r->alias && r->alias[op->aux_off]) {
            src = r->alias[op->aux_off]; /* in the peer's result window */
            r->comm->window_copied += op->len;
            r->comm->single_copied += op->len;
        }
        if (dst == src || !op->len) break;
        /* a tail copies a result out, nothing reads it again in this call: into a large output every
         * piece streams, as one copy of it would (a windowed tail copies segment by segment) */
        if (i >= r->plan->tail_first && r->plan->need_bytes[PC_BUF_OUT] >= PC_STREAM_COPY_MIN)
            pc_copy_streaming(dst, src, op->len);
        else
            pc_copy(dst, src, op->len);
        break;
    case PC_OP_REDUCE:
        pc_reduce(dst, dst, src, n, r->dtype, r->op);
        break;
    case PC_OP_SCALE:
        if (r->op == PC_AVG) pc_scale(dst, n, r->dtype, r->plan->nranks);
        break;
    case PC_OP_ENCODE: /* compressed plans (plan_codec.c): float32 only */
        pc_codec_encode(r->plan->codec, dst, (const float *)src, n);
        break;
    case PC_OP_DECODE:
        pc_codec_decode(r->plan->codec, (float *)dst, src, n);
        break;
    case PC_OP_DECODE_REDUCE:
        pc_codec_decode_reduce(r->plan->codec, (float *)dst, (const float *)src, r->buf[op->aux_buf] + op->aux_off, n,
                               r->op);
        break;
    default:
        break;
    }
}

static void fail(run_state *r, pc_status st, int32_t peer, const char *fmt, ...) {
    if (r->status != PC_OK) return;
    r->status = st;
    r->failed_peer = peer;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->comm->err, sizeof r->comm->err, fmt, ap);
    va_end(ap);
}

static void io_fail(run_state *r, long res, int32_t peer, const char *dir) {
    if (res == PC_IO_CLOSED)
        fail(r, PC_ERR_PEER, peer, "connection to rank %d closed while %s (peer died or aborted)", peer, dir);
    else
        fail(r, PC_ERR_IO, peer, "socket error while %s rank %d", dir, peer);
}

static const uint8_t zero_pad[8];

/* Bytes of padding after a payload of len bytes on conn c. */
static uint64_t pad_of(const pc_conn *c, uint64_t len) {
    return c->align > 1 ? (uint64_t)(-len) & (uint64_t)(c->align - 1) : 0;
}

/* Sends whose descriptors are out complete in order as the reader acks them (tokens are
 * consecutive on a connection: cs->stoken is the oldest's). */
static int complete_acked(run_state *r, int32_t k) {
    chan_state *cs = &r->ch[k];
    pc_conn *cn = r->comm->conns[k];
    int moved = 0;
    while (cs->posted) {
        int32_t i = cs->send_q[cs->send_head];
        long res = cn->ops->rma_wait(cn, cs->stoken);
        if (res == PC_IO_AGAIN) {
            cs->want |= PC_WANT_RMA_ACK;
            return moved;
        }
        if (res < 0) {
            io_fail(r, res, r->plan->ops[i].peer, "sending to");
            return moved;
        }
        moved = 1;
        r->comm->sent += r->plan->ops[i].len;
        cs->stoken++;
        cs->posted--;
        cs->send_head++;
        complete(r, i);
    }
    return moved;
}

/* A single-copy descriptor of op's bytes at src: where they lie in our memory, and the shared
 * buffer they lie in, if one (shared_buffers.h; gen 0: none). */
static void describe_remote(const run_state *r, const pc_op *op, const uint8_t *src, uint8_t *desc) {
    memset(desc, 0, PC_REMOTE_DESC_BYTES);
    put_u64(desc, (uint64_t)(uintptr_t)src);
    put_u64(desc + 8, op->len);
    const shared_ref *ref = op->src_buf >= 0 && op->src_buf < SHARED_RUN_BUFS ? &r->shared[op->src_buf] : NULL;
    uint64_t at = (uint64_t)(uintptr_t)src;
    if (!ref || !ref->gen || at < ref->base || op->len > ref->len || at - ref->base > ref->len - op->len) return;
    put_u64(desc + 16, ref->gen);
    put_u64(desc + 24, (uint64_t)(uint32_t)ref->fd);
    put_u64(desc + 32, ref->base);
    put_u64(desc + 40, ref->len);
}

/* Advance the sends of channel k; returns 1 if bytes moved. A send that goes as a descriptor
 * does not hold up the ready sends behind it: their descriptors follow at once (up to
 * MAX_POSTED), so the reader finds all of them without waiting for us to be scheduled
 * between its reads. A send of bytes waits until every descriptor before it was read. */
static int pump_send(run_state *r, int32_t k) {
    chan_state *cs = &r->ch[k];
    pc_conn *cn = r->comm->conns[k];
    int moved = complete_acked(r, k);
    while (r->status == PC_OK && cs->send_head + cs->posted < cs->nsend && cs->posted < MAX_POSTED) {
        int32_t i = cs->send_q[cs->send_head + cs->posted];
        if (!op_ready(r, i)) return moved;
        const pc_op *op = &r->plan->ops[i];
        const uint8_t *src = op->src_buf >= 0 ? r->buf[op->src_buf] + op->src_off : NULL; /* barrier: no bytes */
        if (cs->sdone == 0) {
            cs->sremote = r->remote && op->len >= REMOTE_OP_MIN && cn->ops->rma_ok && cn->ops->rma_ok(cn);
            if (!cs->sremote && cs->posted) return moved | complete_acked(r, k);
            pc_frame_hdr h = {PC_MAGIC, PC_VERSION, cs->sremote ? PC_FRAME_REMOTE : PC_FRAME_DATA, op->tag,
                              r->desc, r->seq, op->len};
            hdr_encode(cs->shdr, &h);
            if (cs->sremote) describe_remote(r, op, src, cs->sdesc);
        }
        /* on the wire: header, then the payload or its descriptor, then padding */
        uint64_t body = cs->sremote ? PC_REMOTE_DESC_BYTES : op->len;
        const uint8_t *body_at = cs->sremote ? cs->sdesc : src;
        uint64_t pad = pad_of(cn, body), frame = PC_HDR_BYTES + body + pad;
        struct iovec iov[3];
        int n = 0;
        if (cs->sdone < PC_HDR_BYTES) {
            iov[n].iov_base = cs->shdr + cs->sdone;
            iov[n++].iov_len = PC_HDR_BYTES - cs->sdone;
        }
        uint64_t pdone = cs->sdone > PC_HDR_BYTES ? cs->sdone - PC_HDR_BYTES : 0;
        if (body > pdone) {
            iov[n].iov_base = (void *)(body_at + pdone);
            iov[n++].iov_len = body - pdone;
        }
        uint64_t tdone = pdone > body ? pdone - body : 0;
        if (pad > tdone) {
            iov[n].iov_base = (void *)(zero_pad + tdone);
            iov[n++].iov_len = pad - tdone;
        }
        long res = cn->ops->sendv(cn, iov, n);
        if (res == PC_IO_AGAIN) {
            cs->want |= POLLOUT;
            return moved;
        }
        if (res < 0) {
            io_fail(r, res, op->peer, "sending to");
            return moved;
        }
        moved = 1;
        cs->sdone += (uint64_t)res;
        if (!cs->sremote) r->comm->sent += (uint64_t)res;
        if (cs->sdone < frame) continue;
        cs->sdone = 0;
        if (cs->sremote) { /* completes in complete_acked, once read */
            uint64_t token = cn->ops->rma_post(cn);
            if (!cs->posted++) cs->stoken = token;
        } else {
            cs->send_head++;
            complete(r, i);
        }
    }
    if (cs->posted) cs->want |= PC_WANT_RMA_ACK; /* (also when we stopped at MAX_POSTED) */
    return moved;
}

static int check_header(run_state *r, chan_state *cs, const pc_op *op, const pc_conn *cn) {
    char why[256];
    uint8_t h[PC_HDR_BYTES];
    memcpy(h, cs->rhdr, sizeof h);
    /* a descriptor instead of bytes: only where this connection can read the sender's memory */
    int remote = get_u16(h + 6) == PC_FRAME_REMOTE && cn->ops->rma_read;
    if (remote) put_u16(h + 6, PC_FRAME_DATA);
    cs->rremote = remote;
    if (pc_frame_check(h, op->tag, r->desc, r->seq, op->len, why, sizeof why) == PC_OK) return 1;
    fail(r, PC_ERR_PROTO, op->peer, "bad frame from rank %d: %s", op->peer, why);
    return 0;
}

static uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }

static void recv_done(run_state *r, chan_state *cs, int32_t i) {
    cs->rremote = 0;
    cs->rdone = 0;
    cs->reduced = 0;
    cs->hashed = 0;
    cs->stage_fill = 0;
    cs->recv_head++;
    complete(r, i);
}

/* Digests of the blocks of receive `op`'s payload bytes [off, off + n): off is a multiple of
 * PC_HASH_BLOCK and off + n one too or the payload's end (pc_comm_run_buffers checked that the
 * payload starts at a block of its buffer and ends at one or at the buffer's end). */
static void digest_range(const run_state *r, const pc_op *op, uint64_t off, uint64_t n) {
    const uint8_t *p = r->buf[op->dst_buf] + op->dst_off + off;
    uint64_t *d = r->digests + r->first[op->dst_buf] + (op->dst_off + off) / PC_HASH_BLOCK;
    for (uint64_t k = 0; k < n; k += PC_HASH_BLOCK)
        d[k / PC_HASH_BLOCK] = pc_hash64_block(p + k, min_u64(PC_HASH_BLOCK, n - k), r->seed);
}

/* The head receive has `landed` payload bytes: digest its whole blocks among them (all of
 * them once the payload is complete), while they are still in cache. */
static void digest_landed(run_state *r, chan_state *cs, const pc_op *op, uint64_t landed) {
    if (!r->digests || op->kind != PC_OP_RECV) return;
    uint64_t upto = landed >= op->len ? op->len : landed - landed % PC_HASH_BLOCK;
    if (upto > cs->hashed) {
        digest_range(r, op, cs->hashed, upto - cs->hashed);
        cs->hashed = upto;
    }
}

/* Receive-reduce straight out of the transport's buffer (shared memory):
 * one pass reads the peer's bytes where they lie and writes the result.
 * Returns 1 if bytes moved, 0 if nothing did; sets *again when it must wait,
 * and leaves partial elements to the staged path. */
static int reduce_from_peer(run_state *r, int32_t k, int32_t i, int *again) {
    chan_state *cs = &r->ch[k];
    pc_conn *cn = r->comm->conns[k];
    const pc_op *op = &r->plan->ops[i];
    const void *data;
    long avail = cn->ops->peek(cn, &data);
    if (avail == PC_IO_AGAIN) {
        cs->want |= POLLIN;
        *again = 1;
        return 0;
    }
    if (avail < 0) {
        io_fail(r, avail, op->peer, "receiving from");
        *again = 1;
        return 0;
    }
    uint64_t take = min_u64((uint64_t)avail, op->len - cs->reduced);
    take -= take % (uint64_t)r->es;
    if (!take) return 0;
    pc_reduce(r->buf[op->dst_buf] + op->dst_off + cs->reduced, r->buf[op->src_buf] + op->src_off + cs->reduced,
              data, take / (uint64_t)r->es, r->dtype, r->op);
    cn->ops->consume(cn, take);
    cs->reduced += take;
    cs->rdone += take;
    r->comm->received += take;
    return 1;
}

/* Channel k's staging buffer for receive-reduce, made on first use. */
static int has_stage(run_state *r, int32_t k) {
    if (r->comm->stage[k] || (r->comm->stage[k] = malloc(STAGE_BYTES))) return 1;
    fail(r, PC_ERR_NOMEM, -1, "out of memory for a staging buffer");
    return 0;
}

/* ---- single-copy reads of a buffer run, on several threads ----------------
 * One round reads payload bytes [start, end) of the head receive out of the
 * sender's memory in READ_CHUNK pieces that the threads (the caller's among
 * them) take in turn; each thread digests the chunk it just read, while it
 * is in its cache. The round ends when every chunk is in or one read failed
 * (the others stop at their next chunk); each read is one bounded
 * process_vm_readv, so a round lasts about READ_ROUND bytes of copying. */
typedef struct {
    run_state *r;
    pc_conn *cn;
    const pc_op *op;
    uint8_t *dst;
    uint64_t from, end;
    uint64_t next;   /* atomic: the next chunk's offset */
    long failed;     /* atomic: the first failed read's result (0: none) */
    int err;         /* its errno */
} read_round;

static void *read_worker(void *arg) {
    read_round *j = arg;
    for (;;) {
        uint64_t at = __atomic_fetch_add(&j->next, READ_CHUNK, __ATOMIC_RELAXED);
        if (at >= j->end || __atomic_load_n(&j->failed, __ATOMIC_RELAXED)) return NULL;
        uint64_t n = min_u64(READ_CHUNK, j->end - at);
        long res = j->cn->ops->rma_read(j->cn, j->dst + at, j->from + at, n);
        if (res < 0) {
            long none = 0;
            int err = j->cn->err;
            if (__atomic_compare_exchange_n(&j->failed, &none, res, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                j->err = err;
            return NULL;
        }
        if (j->r->digests) digest_range(j->r, j->op, at, n);
    }
}

/* Reads (and digests) the next round of the head receive of channel k: the number of bytes, or
 * the failed read's result (< 0, with *err). */
static long read_round_run(run_state *r, int32_t k, const pc_op *op, uint64_t from, int *err) {
    chan_state *cs = &r->ch[k];
    read_round j = {r, r->comm->conns[k], op, r->buf[op->dst_buf] + op->dst_off, from,
                    min_u64(op->len, cs->reduced + READ_ROUND), cs->reduced, 0, 0};
    int32_t want = j.end - cs->reduced >= READ_PARALLEL_MIN ? r->threads : 1;
    pthread_t tids[MAX_READ_THREADS];
    int32_t started = 0;
    for (int32_t t = 1; t < want; t++) {
        if (pthread_create(&tids[started], NULL, read_worker, &j) != 0) break; /* fewer threads is fine */
        started++;
    }
    read_worker(&j);
    for (int32_t t = 0; t < started; t++) pthread_join(tids[t], NULL);
    *err = j.err;
    return j.failed ? j.failed : (long)(j.end - cs->reduced);
}

/* A PC_FRAME_REMOTE frame whose header we checked: read the descriptor,
 * copy (and reduce) the bytes it names straight out of the sender's memory,
 * tell the sender we are done. Returns 1 if bytes moved. */
static int pump_remote(run_state *r, int32_t k, int32_t i) {
    chan_state *cs = &r->ch[k];
    pc_comm *comm = r->comm;
    pc_conn *cn = comm->conns[k];
    const pc_op *op = &r->plan->ops[i];
    uint64_t desc_end = PC_HDR_BYTES + PC_REMOTE_DESC_BYTES;
    int moved = 0;
    if (cs->rdone < desc_end) {
        struct iovec v = {cs->rdesc + (cs->rdone - PC_HDR_BYTES), desc_end - cs->rdone};
        long res = cn->ops->recvv(cn, &v, 1);
        if (res == PC_IO_AGAIN) {
            cs->want |= POLLIN;
            return 0;
        }
        if (res < 0) {
            io_fail(r, res, op->peer, "receiving from");
            return 0;
        }
        cs->rdone += (uint64_t)res;
        if (cs->rdone < desc_end) return 1;
        if (get_u64(cs->rdesc + 8) != op->len) {
            fail(r, PC_ERR_PROTO, op->peer, "bad frame from rank %d: remote-read descriptor of %llu bytes, expected %llu",
                 op->peer, (unsigned long long)get_u64(cs->rdesc + 8), (unsigned long long)op->len);
            return 1;
        }
        moved = 1;
    }
    int reduce = op->kind == PC_OP_RECV_REDUCE;
    if (reduce && !has_stage(r, k)) return moved;
    uint64_t from = get_u64(cs->rdesc), budget = REMOTE_BUDGET;
    if ((op->flags & PC_OPF_WINDOW) && r->alias && cs->reduced == 0) {
        /* the bytes lie in the sender's result window: the tail copies them from there */
        const uint8_t *at = window_peer_find(&comm->peer_win[op->peer], cn, from, op->len);
        if (at) {
            long res = cn->ops->rma_done(cn);
            if (res < 0) {
                io_fail(r, res, op->peer, "receiving from");
                return moved;
            }
            r->alias[i] = at;
            recv_done(r, cs, i);
            return 1;
        }
    }
    uint8_t *dst = r->buf[op->dst_buf] + op->dst_off;
    const uint8_t *mapped = NULL;
    if (!r->caller_bufs && get_u64(cs->rdesc + 16))
        mapped = shared_peer_find(&comm->peer_shared[op->peer], cn, get_u64(cs->rdesc + 16),
                                  (int32_t)get_u64(cs->rdesc + 24), get_u64(cs->rdesc + 32), get_u64(cs->rdesc + 40),
                                  from, op->len);
    while (mapped && cs->reduced < op->len && budget) {
        /* the sender's bytes lie in shared memory we mapped: used where they lie, no staging, no
         * pinning (a result nobody reads again in this call goes around the cache) */
        uint64_t n = min_u64(op->len - cs->reduced, budget);
        if (reduce)
            pc_reduce(dst + cs->reduced, r->buf[op->src_buf] + op->src_off + cs->reduced, mapped + cs->reduced,
                      n / (uint64_t)r->es, r->dtype, r->op);
        else if (n >= SHARED_STREAM_MIN)
            pc_copy_streaming(dst + cs->reduced, mapped + cs->reduced, n);
        else
            memcpy(dst + cs->reduced, mapped + cs->reduced, n);
        cs->reduced += n;
        comm->received += n;
        comm->single_copied += n;
        comm->shared_read += n;
        budget -= n;
        moved = 1;
    }
    if (r->caller_bufs && cs->reduced < op->len) { /* a buffer run: chunked, hashed, threaded */
        int err = 0;
        long res = read_round_run(r, k, op, from, &err);
        if (res == PC_IO_ERROR && err == EPROTO) {
            fail(r, PC_ERR_PROTO, op->peer, "bad frame from rank %d: a remote-read descriptor we never agreed to",
                 op->peer);
            return moved;
        }
        if (res == PC_IO_ERROR) {
            fail(r, PC_ERR_IO, op->peer, "cannot read the memory rank %d named (%s)", op->peer, strerror(err));
            return moved;
        }
        if (res < 0) {
            io_fail(r, res, op->peer, "reading the memory of");
            return moved;
        }
        cs->reduced += (uint64_t)res;
        cs->hashed = cs->reduced;
        comm->received += (uint64_t)res;
        comm->single_copied += (uint64_t)res;
        moved = 1;
        budget = 0;
    }
    while (cs->reduced < op->len && budget) {
        /* a reduction reads through the staging buffer, while it is in cache */
        uint64_t n = min_u64(op->len - cs->reduced, reduce ? STAGE_BYTES : budget);
        long res = cn->ops->rma_read(cn, reduce ? comm->stage[k] : dst + cs->reduced, from + cs->reduced, n);
        if (res == PC_IO_ERROR && cn->err == EPROTO) {
            fail(r, PC_ERR_PROTO, op->peer, "bad frame from rank %d: a remote-read descriptor we never agreed to",
                 op->peer);
            return moved;
        }
        if (res == PC_IO_ERROR) {
            fail(r, PC_ERR_IO, op->peer, "cannot read the memory rank %d named (%s)", op->peer, strerror(cn->err));
            return moved;
        }
        if (res < 0) {
            io_fail(r, res, op->peer, "reading the memory of");
            return moved;
        }
        if (reduce)
            pc_reduce(dst + cs->reduced, r->buf[op->src_buf] + op->src_off + cs->reduced, comm->stage[k],
                      n / (uint64_t)r->es, r->dtype, r->op);
        cs->reduced += n;
        comm->received += n;
        comm->single_copied += n;
        budget -= min_u64(budget, n);
        moved = 1;
    }
    if (cs->reduced < op->len) return moved;
    long res = cn->ops->rma_done(cn);
    if (res < 0) {
        io_fail(r, res, op->peer, "receiving from");
        return moved;
    }
    recv_done(r, cs, i);
    return 1;
}

/* Advance the head receive of channel k; returns 1 if bytes moved. */
static int pump_recv(run_state *r, int32_t k) {
    chan_state *cs = &r->ch[k];
    pc_comm *comm = r->comm;
    pc_conn *cn = comm->conns[k];
    uint8_t trash[8];
    int moved = 0;
    while (cs->recv_head < cs->nrecv) {
        int32_t i = cs->recv_q[cs->recv_head];
        if (!op_ready(r, i)) return moved;
        const pc_op *op = &r->plan->ops[i];
        if (cs->rremote) {
            int m = pump_remote(r, k, i);
            moved |= m;
            if (cs->rremote && (!m || r->status != PC_OK)) return moved; /* waiting, or failed */
            /* A finished reduction: let the other channels take the next step of its chain
             * (a segment's reductions from several peers) while its accumulator is in cache,
             * before this channel reads the next segment. */
            if (!cs->rremote && op->kind == PC_OP_RECV_REDUCE) return moved;
            continue;
        }
        int reduce = op->kind == PC_OP_RECV_REDUCE;
        int zero_copy = reduce && cn->ops->peek != NULL;
        uint64_t pad = pad_of(cn, op->len), frame = PC_HDR_BYTES + op->len + pad;
        uint64_t pdone = cs->rdone > PC_HDR_BYTES ? cs->rdone - PC_HDR_BYTES : 0; /* payload + pad */
        if (zero_copy && cs->rdone >= PC_HDR_BYTES && pdone < op->len && cs->stage_fill == 0) {
            int again = 0;
            if (reduce_from_peer(r, k, i, &again)) {
                moved = 1;
                if (cs->rdone == frame) recv_done(r, cs, i);
                continue;
            }
            if (again) return moved;
        }
        if (reduce && !has_stage(r, k)) return moved;
        struct iovec iov[3];
        int n = 0;
        if (cs->rdone < PC_HDR_BYTES) {
            iov[n].iov_base = cs->rhdr + cs->rdone;
            iov[n++].iov_len = PC_HDR_BYTES - cs->rdone;
        }
        uint64_t payload_done = min_u64(pdone, op->len), left = op->len - payload_done;
        int to_end = left == 0; /* this read may reach the end of the payload */
        /* Bytes off the wire reach the caller's memory only behind a checked
         * header: a plain receive into IN/OUT reads its header on its own
         * (scratch and the staging buffer are ours, so those read both). A
         * zero-copy receive-reduce reads it alone too: its payload is then
         * reduced where it lies. */
        int callers = r->caller_bufs || op->dst_buf != PC_BUF_SCRATCH; /* buffer runs: all of them */
        int header_alone = cs->rdone < PC_HDR_BYTES && (zero_copy || cn->ops->rma_read || (!reduce && callers));
        if (left && !header_alone) {
            uint64_t want = left;
            if (reduce) {
                /* staged: whole buffers; after peek found a partial element: just that element */
                want = min_u64(left, zero_copy ? (uint64_t)(r->es - (int32_t)cs->stage_fill)
                                               : STAGE_BYTES - cs->stage_fill);
                iov[n].iov_base = comm->stage[k] + cs->stage_fill;
            } else {
                iov[n].iov_base = r->buf[op->dst_buf] + op->dst_off + payload_done;
                if (r->digests) want = min_u64(left, HASHED_RECV_MAX); /* hashed while in cache */
            }
            iov[n++].iov_len = want;
            to_end = want == left;
        }
        uint64_t pad_done = pdone > op->len ? pdone - op->len : 0;
        if (to_end && pad > pad_done) {
            iov[n].iov_base = trash;
            iov[n++].iov_len = pad - pad_done;
        }
        long res = cn->ops->recvv(cn, iov, n);
        if (res == PC_IO_AGAIN) {
            cs->want |= POLLIN;
            return moved;
        }
        if (res < 0) {
            io_fail(r, res, op->peer, "receiving from");
            return moved;
        }
        moved = 1;
        uint64_t before = cs->rdone;
        cs->rdone += (uint64_t)res;
        comm->received += (uint64_t)res;
        if (before < PC_HDR_BYTES && cs->rdone >= PC_HDR_BYTES && !check_header(r, cs, op, cn)) return moved;
        if (cs->rremote) continue; /* the descriptor follows: pump_remote */
        if (!reduce && cs->rdone > PC_HDR_BYTES) digest_landed(r, cs, op, cs->rdone - PC_HDR_BYTES);
        if (reduce && cs->rdone > PC_HDR_BYTES) {
            uint64_t now_done = min_u64(cs->rdone - PC_HDR_BYTES, op->len);
            cs->stage_fill += (uint32_t)(now_done - payload_done); /* payload bytes this call */
            uint32_t whole = cs->stage_fill - cs->stage_fill % (uint32_t)r->es;
            if (whole) {
                uint64_t off = cs->reduced;
                pc_reduce(r->buf[op->dst_buf] + op->dst_off + off, r->buf[op->src_buf] + op->src_off + off,
                          comm->stage[k], whole / (uint32_t)r->es, r->dtype, r->op);
                cs->reduced += whole;
                memmove(comm->stage[k], comm->stage[k] + whole, cs->stage_fill - whole);
                cs->stage_fill -= whole;
            }
        }
        if (cs->rdone == frame) recv_done(r, cs, i);
    }
    return moved;
}

static int run_locals(run_state *r) {
    int any = 0;
    while (r->nready) {
        int32_t i = r->ready[--r->nready];
        run_local(r, i);
        complete(r, i);
        any = 1;
    }
    return any;
}

/* Build per-run bookkeeping: dependents (CSR), FIFOs per channel. It lives
 * in one block the comm keeps between runs (grown when a plan needs more):
 * a small collective then allocates nothing. */
static pc_status prepare(run_state *r) {
    const pc_plan *p = r->plan;
    pc_comm *c = r->comm;
    int32_t nops = p->nops, nch = c->nranks * c->stripes;
    /* int32 slots: pending, dep_start, dependents, ready, active, fill, and
     * the per-channel FIFOs (every net op once, plus one spare per FIFO) */
    size_t n32 = 5 * ((size_t)nops + 2) + ((size_t)p->ndeps + 1) + 3 * (size_t)nch;
    size_t need = sizeof(chan_state) * (size_t)nch + sizeof(int32_t) * n32;
    if (need > c->run_cap) {
        void *m = realloc(c->run_mem, need);
        if (!m) return PC_ERR_NOMEM;
        c->run_mem = m;
        c->run_cap = need;
    }
    memset(c->run_mem, 0, need);
    r->ch = c->run_mem; /* first: the most strictly aligned */
    int32_t *next = (int32_t *)(r->ch + nch);
    r->pending = next, next += nops + 1;
    r->dep_start = next, next += nops + 2;
    r->dependents = next, next += p->ndeps + 1;
    r->ready = next, next += nops + 1;
    r->active = next, next += nch;
    int32_t *fill = next;
    next += nops + 1;
    for (int32_t i = 0; i < nops; i++) {
        const pc_op *op = &p->ops[i];
        r->pending[i] = op->dep_count;
        for (int32_t k = 0; k < op->dep_count; k++) {
            int32_t d = p->deps[op->dep_first + k];
            if (d < 0 || d >= i) return PC_ERR_ARG; /* deps point backwards: no cycles */
            r->dep_start[d + 1]++;
        }
        if (plan_op_is_net(op->kind) && i < r->end) {
            if (op->peer < 0 || op->peer >= c->nranks || op->peer == c->rank || op->stripe < 0 ||
                op->stripe >= c->stripes || !c->conns[op->peer * c->stripes + op->stripe])
                return PC_ERR_ARG;
            chan_state *cs = &r->ch[op->peer * c->stripes + op->stripe];
            if (op->kind == PC_OP_SEND) cs->nsend++;
            else cs->nrecv++;
        }
    }
    for (int32_t i = 0; i < nops; i++) r->dep_start[i + 1] += r->dep_start[i];
    for (int32_t i = 0; i < nops; i++) {
        const pc_op *op = &p->ops[i];
        for (int32_t k = 0; k < op->dep_count; k++) {
            int32_t d = p->deps[op->dep_first + k];
            r->dependents[r->dep_start[d] + fill[d]++] = i;
        }
    }
    for (int32_t k = 0; k < nch; k++) {
        chan_state *cs = &r->ch[k];
        if (!cs->nsend && !cs->nrecv) continue;
        r->active[r->nactive++] = k;
        cs->send_q = next, next += cs->nsend + 1;
        cs->recv_q = next, next += cs->nrecv + 1;
        cs->nsend = cs->nrecv = 0;
    }
    for (int32_t i = 0; i < r->end; i++) {
        const pc_op *op = &p->ops[i];
        if (!plan_op_is_net(op->kind)) continue;
        chan_state *cs = &r->ch[op->peer * c->stripes + op->stripe];
        if (op->kind == PC_OP_SEND) cs->send_q[cs->nsend++] = i;
        else cs->recv_q[cs->nrecv++] = i;
    }
    r->before_tail = p->tail_first;
    for (int32_t i = 0; i < r->end; i++)
        if (r->pending[i] == 0 && !plan_op_is_net(p->ops[i].kind) && op_ready(r, i)) r->ready[r->nready++] = i;
    return PC_OK;
}

/* No byte moved for too long: name a connection we are waiting on. */
static void stall_fail(run_state *r, double idle) {
    int32_t stripes = r->comm->stripes, k = -1;
    const char *dir = "sending to";
    for (int32_t a = 0; a < r->nactive && k < 0; a++)
        if (r->ch[r->active[a]].recv_head < r->ch[r->active[a]].nrecv) k = r->active[a], dir = "receiving from";
    for (int32_t a = 0; a < r->nactive && k < 0; a++)
        if (r->ch[r->active[a]].send_head < r->ch[r->active[a]].nsend) k = r->active[a];
    int32_t peer = k >= 0 ? k / stripes : -1, stripe = k >= 0 ? k % stripes : -1;
    fail(r, PC_ERR_TIMEOUT, peer,
         "no progress for %.1f s (stalled %s rank %d on connection %d; %d of %d steps done): the link or the peer hangs",
         idle, dir, peer, stripe, r->done, r->plan->nops);
}

/* Every channel we wait on is shared memory (no socket to wait for). */
static int shm_only_waits(const run_state *r) {
    for (int32_t a = 0; a < r->nactive; a++)
        if (r->ch[r->active[a]].want && !r->comm->conns[r->active[a]]->ops->arm) return 0;
    return 1;
}

/* ---- waiting policy ------------------------------------------------------
 *
 * A wait starts when a pass over the channels moved nothing and ends at the
 * next pass that moved something. Spinning through it costs a core for its
 * whole length; sleeping costs a wake-up (tens of microseconds on an idle
 * host) but gives the core to whoever else wants it. So:
 *
 *  - While other work wants the host's CPUs, nobody spins: the core goes
 *    to compute, data loaders, or the rank we wait for. "Other work wants
 *    them" (host_busy) is two looks in a row, BUSY_RECHECK apart and only
 *    when a wait begins, that both saw more runnable tasks than CPUs (the
 *    running count of /proc/loadavg), not counting this comm's own ranks on
 *    the host that may be running: where they outnumber the CPUs, those
 *    not asleep in a wait of their engine (each says so in its shared-
 *    memory connections, around every sleep). Counting all of them hid two
 *    busy loops beside 4 ranks on 2 cores, most of them asleep at any time:
 *    the ranks spun 9-24 % of the time, yielding whole time slices to the
 *    loops; counting the awake, they do not spin there (1 MiB: 1.8-3.4 ms
 *    a call against 1.3-4.9, in launches that swing 2-3x). Tasks at a
 *    lower priority count too (discounting them
 *    kept ranks spinning beside busy loops). One look is not enough, because
 *    with every CPU running a rank any other thread that wakes for a moment
 *    tips it over (with 2 ranks on 2 idle cores, a heartbeat
 *    thread or the parent's polling loop: 15-25 % of the looks, each
 *    costing 5 ms of sleeping through waits).
 *  - With more of this comm's ranks on the host than CPUs, a spin yields
 *    between looks (sched_yield): the rank we wait for may be queued behind
 *    us. With only our ranks running that is a cheap handoff (4 ranks on 2
 *    idle cores, 4 KiB: 20-25 us per call against 50 us sleeping); with
 *    other work beside them the yields would go to it for whole time slices
 *    (two busy loops: 1 MiB took 3.2-3.8 ms yielding against 0.8 ms
 *    sleeping), which is why a busy host stops the spin first.
 *  - Otherwise we spin for a budget learned from this comm's recent waits
 *    of the same kind (WAIT_SHM, WAIT_SOCK), capped by shm_spin_us and
 *    spin_us: a wait that a spin of up to the cap would have caught raises
 *    the budget to twice its length (plus SPIN_SLACK); one longer than the
 *    cap was all waste and halves it. The budget drops to zero after a few
 *    long waits (a peer that computes between collectives, a straggler)
 *    and comes back with the first short one: a wait we slept through
 *    still counts, with its wake-up. Between looks the spinner pauses the
 *    CPU (cpu_relax) unless the comm is oversubscribed (above).
 *
 * Then we sleep in poll(): on sockets, or on the shared-memory doorbells
 * (transport_shm.c: the sleeper sets its wait flag and re-checks the ring,
 * the other side publishes and then reads the flag, so one of them always
 * sees the other and no wake-up is lost). That holds for senders too: a
 * full ring or socket buffer is waited for like anything else (POLLOUT).
 */
#define BUSY_RECHECK 0.005  /* s between looks at /proc/loadavg */
#define BUSY_LOOKS 2         /* busy: this many looks in a row saw it so */
#define SPIN_SLACK 50000u    /* ns added to a learned budget: a peer's hiccup (an interrupt, a
                                thread of ours waking) rather than a sleep and a wake-up */

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Tasks running or runnable on the host now (the 4th field of
 * /proc/loadavg, "running/total"; it counts the reader too); 0 if unknown. */
static int32_t runnable_tasks(void) {
    int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    char buf[128];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    const char *p = buf;
    for (int field = 0; field < 3 && p; field++) {
        p = strchr(p, ' ');
        if (p) p++;
    }
    return p ? (int32_t)strtol(p, NULL, 10) : 0;
}

/* Our same-host ranks that may be running now: all but those whose engine
 * said it sleeps in a wait (we are awake: we are looking). */
static int32_t local_ranks_awake(const pc_comm *c) {
    int32_t awake = c->local_ranks;
    for (int32_t p = 0; p < c->nranks; p++) {
        pc_conn *cn = first_conn(c, p);
        if (cn && cn->ops->peer_asleep && cn->ops->peer_asleep(cn)) awake--;
    }
    return awake;
}

/* Say in every same-host connection whether our engine sleeps now: only where our ranks
 * outnumber the CPUs, the one case in which host_busy reads it. */
static void tell_asleep(pc_comm *c, int asleep) {
    if (!c->oversubscribed) return;
    for (int32_t p = 0; p < c->nranks; p++) {
        pc_conn *cn = first_conn(c, p);
        if (cn && cn->ops->set_asleep) cn->ops->set_asleep(cn, asleep);
    }
}

/* Busy: more tasks want a CPU than there are CPUs, not counting our own ranks
 * on this host that may be running (they take turns with us: that is what the
 * yields of an oversubscribed spin are for). Those are all of them unless they
 * outnumber the CPUs; then the ones awake, plus one: a rank whose doorbell
 * rang still says it sleeps until it gets a CPU (without that one, 4 ranks on 2
 * idle cores saw a busy host in a quarter of their looks; two busy loops
 * beside them show as at least two more in every look). */
static int host_busy(pc_comm *c, double t) {
    if (c->busy_seen_at == 0 || t - c->busy_seen_at >= BUSY_RECHECK) {
        int32_t ours = c->local_ranks;
        if (c->oversubscribed) {
            int32_t awake = local_ranks_awake(c) + 1;
            if (awake < ours) ours = awake;
        }
        int32_t room = c->cpus_online > ours ? c->cpus_online : ours;
        c->busy_seen_at = t;
        c->busy_looks = runnable_tasks() > room ? c->busy_looks + 1 : 0;
    }
    return c->busy_looks >= BUSY_LOOKS;
}

/* Between looks of a spin: with more of our ranks than CPUs the rank we wait
 * for may be queued behind us on this core, so hand it the core; otherwise
 * pause (with nobody else runnable a sched_yield is only a system call). */
static void spin_pause(const pc_comm *c) {
    if (c->oversubscribed) sched_yield();
    else cpu_relax();
}

static uint32_t spin_cap_ns(const pc_comm *c, int kind) {
    return (uint32_t)(kind == WAIT_SHM ? c->shm_spin_us : c->spin_us) * 1000u;
}

/* A wait begins: its kind (WAIT_NONE: one that never spins) and how many
 * ns to spin before sleeping. */
static uint32_t begin_wait(run_state *r, double t, int small, int *kind) {
    pc_comm *c = r->comm;
    *kind = WAIT_NONE;
    if (c->spin_us <= 0) return 0; /* no spinning at all */
    int k = shm_only_waits(r) ? WAIT_SHM : small ? WAIT_SOCK : WAIT_NONE;
    if (k == WAIT_NONE) return 0;
    *kind = k;
    return host_busy(c, t) ? 0 : c->spin_ns[k];
}

/* A wait of `waited` seconds ended: learn from it (see above). */
static void end_wait(pc_comm *c, int kind, double waited) {
    if (kind == WAIT_NONE) return;
    uint32_t cap = spin_cap_ns(c, kind), *budget = &c->spin_ns[kind];
    double ns = waited * 1e9;
    if (ns <= (double)cap) {
        double want = 2.0 * ns + SPIN_SLACK;
        uint32_t w = want < (double)cap ? (uint32_t)want : cap;
        if (w > *budget) *budget = w;
        else *budget -= (*budget - w) / 8; /* drift down to what recent waits needed */
    } else {
        *budget /= 2;
        if (*budget < SPIN_SLACK) *budget = 0;
    }
}

/* A wait of `waited` seconds ended: the policy learns from it, and a wait that never slept
 * was spun through (pc_comm_wait_stats; one that slept counted its spin when it went to sleep). */
static void wait_ended(pc_comm *c, int kind, double waited, int slept) {
    end_wait(c, kind, waited);
    if (!slept) c->spun_s += waited;
}

/* Events to poll for on c->fd while waiting for `want`; 0: ready now. */
static short poll_events(pc_conn *c, short want) {
    return c->ops->arm ? c->ops->arm(c, want) : want;
}

static void wait_for_io(run_state *r, double deadline) {
    pc_comm *c = r->comm;
    struct pollfd stack_fds[129];
    size_t need = 2 * (size_t)r->nactive + 1;
    struct pollfd *fds = need <= 129 ? stack_fds : malloc(sizeof(struct pollfd) * need);
    if (!fds) return;
    int n = 0;
    fds[n].fd = c->cancel_pipe[0];
    fds[n].events = POLLIN;
    fds[n++].revents = 0;
    for (int32_t a = 0; a < r->nactive; a++) {
        chan_state *cs = &r->ch[r->active[a]];
        if (!cs->want) continue;
        short ev = poll_events(c->conns[r->active[a]], cs->want);
        if (!ev) { /* became ready while we prepared to sleep */
            if (fds != stack_fds) free(fds);
            return;
        }
        pc_conn *cn = c->conns[r->active[a]];
        fds[n].fd = cn->fd;
        fds[n].events = ev;
        fds[n++].revents = 0;
        if (cn->fd2 >= 0) {
            fds[n].fd = cn->fd2;
            fds[n].events = POLLIN;
            fds[n++].revents = 0;
        }
    }
    double left = deadline - now_s();
    int ms = left <= 0 ? 0 : (left > 0.2 ? 200 : (int)(left * 1000.0) + 1);
    tell_asleep(c, 1);
    poll(fds, (nfds_t)n, ms);
    tell_asleep(c, 0);
    if ((fds[0].revents & POLLIN) && !__atomic_load_n(&c->cancelled, __ATOMIC_SEQ_CST))
        drain_cancel_pipe(c); /* stale: left by a cancel that raced the last clear */
    if (fds != stack_fds) free(fds);
}

/* A body-only run must leave the caller's input as it found it, so that an
 * aborted collective can be re-run: no op before the tail may write IN, nor
 * OUT when OUT overlaps IN. */
static int body_keeps_input(const pc_plan *plan, void *const *bufs, const uint64_t *buf_bytes) {
    const uint8_t *in = bufs[PC_BUF_IN], *out = bufs[PC_BUF_OUT];
    int overlap = in && out && out < in + buf_bytes[PC_BUF_IN] && in < out + buf_bytes[PC_BUF_OUT];
    for (int32_t i = 0; i < plan->tail_first; i++) {
        const pc_op *o = &plan->ops[i];
        int writes = o->kind != PC_OP_SEND; /* every other kind writes its destination */
        if (!writes || !o->len || !(o->dst_buf == PC_BUF_IN || (overlap && o->dst_buf == PC_BUF_OUT))) continue;
        if (o->kind == PC_OP_COPY && (o->src_buf == PC_BUF_IN || o->src_buf == PC_BUF_OUT) &&
            (const uint8_t *)bufs[o->src_buf] + o->src_off == (const uint8_t *)bufs[o->dst_buf] + o->dst_off)
            continue; /* a copy onto itself (one rank: IN is OUT) changes nothing */
        return 0;
    }
    return 1;
}

/* The tail alone: local ops only, in plan order, not cancellable (it runs
 * after the group agreed that the body succeeded everywhere). */
static pc_status run_tail(pc_comm *comm, const pc_plan *plan, run_state *r) {
    for (int32_t i = plan->tail_first; i < plan->nops; i++)
        if (plan_op_is_net(plan->ops[i].kind)) {
            set_err(comm, "plan tail holds a network op; it cannot run on its own");
            return PC_ERR_ARG;
        }
    uint64_t cap = plan->windowed && comm->alias_window ? comm->win.len : comm->scratch_cap;
    if (plan->need_bytes[PC_BUF_SCRATCH] > cap) {
        set_err(comm, "tail run without the body that fills scratch");
        return PC_ERR_ARG;
    }
    for (int32_t i = plan->tail_first; i < plan->nops; i++) run_local(r, i);
    return PC_OK;
}

/* ---- huge pages for single copy (huge_pages.c decides which buffers) ---- */
static int single_copy_peers(pc_comm *c) {
    for (int32_t i = 0; i < c->nranks * c->stripes; i++) {
        pc_conn *cn = c->conns[i];
        if (cn && cn->ops->rma_ok && cn->ops->rma_ok(cn)) return 1;
    }
    return 0;
}

/* Scratch is read by the peers' single-copy reads (results of preserve_input plans, direct
 * all-reduce accumulators) as much as the caller's buffers are: it lives on huge pages from
 * its first touch (THP asked for per mapping, so the "madvise" setting grants it), so those
 * reads walk and pin 2 MiB pages instead of 4 KiB ones. Its contents survive growth: a
 * body's scratch is what its tail copies out. */
static pc_status grow_scratch(pc_comm *c, uint64_t need) {
    if (need > SIZE_MAX / 2) return PC_ERR_NOMEM;
    int huge = need >= PC_HUGE_PAGE / 2; /* a small one is not worth a 2 MiB page */
    uint64_t unit = huge ? PC_HUGE_PAGE : 4096u;
    size_t len = (size_t)((need + unit - 1) & ~(unit - 1));
    size_t map = len + (huge ? PC_HUGE_PAGE : 0); /* room to align the start */
    uint8_t *m = mmap(NULL, map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return PC_ERR_NOMEM;
    uint8_t *at = huge ? (uint8_t *)(((uintptr_t)m + PC_HUGE_PAGE - 1) & ~(uintptr_t)(PC_HUGE_PAGE - 1)) : m;
    if (at > m) munmap(m, (size_t)(at - m)); /* trim to [at, at + len) */
    size_t tail = map - (size_t)(at - m) - len;
    if (tail) munmap(at + len, tail);
#ifdef MADV_HUGEPAGE
    if (huge) madvise(at, len, MADV_HUGEPAGE);
#endif
    madvise(at, len, MADV_DONTFORK); /* like the shm segments: a forked child does not keep it */
    if (c->scratch) {
        memcpy(at, c->scratch, c->scratch_cap);
        munmap(c->scratch, c->scratch_map);
    }
    c->scratch = at;
    c->scratch_cap = len;
    c->scratch_map = len;
    return PC_OK;
}

static pc_status scratch_for(pc_comm *c, const pc_plan *plan);

/* A windowed plan's scratch (window.h): the result window where it can be had (published to
 * every peer when new), else plain scratch; the run's receives start with no aliases. A tail
 * finds what its body left: the same plan and call, or it fails. */
static pc_status window_for(pc_comm *c, const pc_plan *plan, int32_t part, uint64_t seq, run_state *r) {
    if (part == PC_RUN_TAIL) {
        if (c->alias_plan != plan || c->alias_seq != seq) {
            set_err(c, "tail run without the body that fills its window");
            return PC_ERR_ARG;
        }
    } else {
        if (plan->nops > c->alias_cap) {
            const uint8_t **a = realloc(c->alias, sizeof *a * (size_t)plan->nops);
            if (!a) {
                set_err(c, "out of memory for %d aliases", plan->nops);
                return PC_ERR_NOMEM;
            }
            c->alias = a;
            c->alias_cap = plan->nops;
        }
        memset(c->alias, 0, sizeof *c->alias * (size_t)plan->nops);
        uint64_t gen = c->win.gen;
        c->alias_window = window_own_ensure(&c->win, plan->need_bytes[PC_BUF_SCRATCH]) == 0;
        if (c->alias_window && c->win.gen != gen)
            for (int32_t i = 0; i < c->nranks * c->stripes; i++)
                if (c->conns[i]) window_own_publish(&c->win, c->conns[i]);
        if (!c->alias_window && scratch_for(c, plan) != PC_OK) return PC_ERR_NOMEM;
        c->alias_plan = plan;
        c->alias_seq = seq;
    }
    r->own[PC_BUF_SCRATCH] = c->alias_window ? c->win.base : c->scratch;
    r->alias = c->alias;
    return PC_OK;
}

/* Scratch big enough for `plan` (PC_ERR_NOMEM, error set, where it cannot grow). */
static pc_status scratch_for(pc_comm *c, const pc_plan *plan) {
    uint64_t need = plan->need_bytes[PC_BUF_SCRATCH];
    if (need <= c->scratch_cap || grow_scratch(c, need) == PC_OK) return PC_OK;
    set_err(c, "out of memory for %llu bytes of scratch", (unsigned long long)need);
    return PC_ERR_NOMEM;
}

pc_status pc_comm_run(pc_comm *comm, const pc_plan *plan, void *const *bufs, const uint64_t *buf_bytes,
                      int32_t dtype, int32_t op, uint64_t seq, uint32_t desc, double timeout_s,
                      int32_t *failed_peer) {
    return pc_comm_run_part(comm, plan, PC_RUN_ALL, bufs, buf_bytes, dtype, op, seq, desc, timeout_s,
                            failed_peer);
}

/* Plans running now in this process, and the most seen at once since the last reset: how
 * the torch backend's overlapped collectives (one comm per lane) are seen to run together. */
static int32_t running_plans, peak_plans;

/* What every run checks first: the comm still works (a tail runs after a failure's
 * agreement too) and the plan was built for this rank of this comm. */
static pc_status check_run(pc_comm *comm, const pc_plan *plan, int tail_only) {
    if (comm->broken && !tail_only) {
        set_err(comm, "communicator was shut down by an earlier failure; rebuild it");
        return PC_ERR_IO;
    }
    if (plan->nranks != comm->nranks || plan->rank != comm->rank) {
        set_err(comm, "plan built for rank %d of %d, comm is rank %d of %d", plan->rank, plan->nranks,
                comm->rank, comm->nranks);
        return PC_ERR_ARG;
    }
    return PC_OK;
}

/* The element size of `dtype`, or 0 (error set) where the dtype or the op on it is unknown. */
static int32_t check_dtype_op(pc_comm *comm, int32_t dtype, int32_t op) {
    int32_t es = pc_dtype_size(dtype);
    if (!es || pc_reduce_check(dtype, op) != PC_OK) { /* e.g. a bitwise op on floats */
        set_err(comm, "unsupported dtype %d or op %d (or the op is not defined on the dtype)", dtype, op);
        return 0;
    }
    return es;
}

/* A run's state before its ops start: ops index `buf`, ops [0, end) run. */
static void run_init(run_state *r, pc_comm *comm, const pc_plan *plan, uint8_t *const *buf, int32_t dtype,
                     int32_t op, int32_t es, uint64_t seq, uint32_t desc, int32_t end) {
    memset(r, 0, sizeof *r);
    r->comm = comm;
    r->plan = plan;
    r->buf = buf;
    r->dtype = dtype;
    r->op = op;
    r->es = es;
    r->seq = seq;
    r->desc = desc;
    r->failed_peer = -1;
    r->end = end;
}

static pc_status run_part(pc_comm *comm, const pc_plan *plan, int32_t part, void *const *bufs,
                          const uint64_t *buf_bytes, int32_t dtype, int32_t op, uint64_t seq, uint32_t desc,
                          double timeout_s, int32_t *failed_peer);
static pc_status run_loop(pc_comm *comm, run_state *rp, double timeout_s, int32_t *failed_peer);

pc_status pc_comm_run_part(pc_comm *comm, const pc_plan *plan, int32_t part, void *const *bufs,
                           const uint64_t *buf_bytes, int32_t dtype, int32_t op, uint64_t seq, uint32_t desc,
                           double timeout_s, int32_t *failed_peer) {
    int32_t now = __atomic_add_fetch(&running_plans, 1, __ATOMIC_RELAXED);
    int32_t peak = __atomic_load_n(&peak_plans, __ATOMIC_RELAXED);
    while (now > peak && !__atomic_compare_exchange_n(&peak_plans, &peak, now, 1, __ATOMIC_RELAXED,
                                                      __ATOMIC_RELAXED)) {
    }
    pc_status st = run_part(comm, plan, part, bufs, buf_bytes, dtype, op, seq, desc, timeout_s, failed_peer);
    __atomic_sub_fetch(&running_plans, 1, __ATOMIC_RELAXED);
    return st;
}

int32_t pc_engine_peak_running(int32_t reset) {
    if (reset) return __atomic_exchange_n(&peak_plans, __atomic_load_n(&running_plans, __ATOMIC_RELAXED),
                                          __ATOMIC_RELAXED);
    return __atomic_load_n(&peak_plans, __ATOMIC_RELAXED);
}

/* Before a single-copy run: which of its buffers lie in shared memory (shared_buffers.c), and
 * for the others the huge-page policy (huge_pages.c); a buffer that policy finds reused is
 * moved onto shared memory. A buffer run's buffers past SHARED_RUN_BUFS stay where they are. */
static void place_buffers(pc_comm *comm, run_state *r, int32_t nbufs, void *const *bufs,
                          const uint64_t *buf_bytes) {
    void *rest[SHARED_RUN_BUFS];
    uint8_t reused[SHARED_RUN_BUFS], ours[SHARED_RUN_BUFS];
    int32_t n = nbufs < SHARED_RUN_BUFS ? nbufs : SHARED_RUN_BUFS;
    shared_buffers_check(n, bufs, buf_bytes, r->shared, ours);
    if (nbufs > SHARED_RUN_BUFS) { /* too many to track: the huge-page policy alone, as before */
        huge_pages_of_run(&comm->huge, nbufs, bufs, buf_bytes, NULL);
        return;
    }
    for (int32_t b = 0; b < n; b++) rest[b] = r->shared[b].gen || ours[b] ? NULL : bufs[b];
    huge_pages_of_run(&comm->huge, n, rest, buf_bytes, reused);
    for (int32_t b = 0; b < n; b++)
        if (reused[b]) shared_buffers_move(bufs[b], buf_bytes[b], &r->shared[b]);
}

/* Runs a prepared run whose payloads may go single-copy (r->remote): which way they go is the
 * comm's learned choice for runs of `kind` over `bytes` (copy_choice.c), timed for it on success. */
static pc_status run_choosing(pc_comm *comm, run_state *r, int kind, uint64_t bytes, void *const *bufs,
                              const uint64_t *buf_bytes, int32_t nbufs, double timeout_s, int32_t *failed_peer) {
    int choosing = r->remote && single_copy_peers(comm);
    if (choosing) r->remote = copy_choice_pick(&comm->choice, kind, bytes);
    if (r->remote && choosing) place_buffers(comm, r, nbufs, bufs, buf_bytes);
    double t0 = now_s();
    pc_status st = run_loop(comm, r, timeout_s, failed_peer);
    shared_buffers_release(SHARED_RUN_BUFS, r->shared);
    if (choosing && st == PC_OK) copy_choice_learn(&comm->choice, kind, bytes, r->remote, now_s() - t0);
    return st;
}

static pc_status run_part(pc_comm *comm, const pc_plan *plan, int32_t part, void *const *bufs,
                          const uint64_t *buf_bytes, int32_t dtype, int32_t op, uint64_t seq, uint32_t desc,
                          double timeout_s, int32_t *failed_peer) {
    if (failed_peer) *failed_peer = -1;
    if (part < PC_RUN_ALL || part > PC_RUN_TAIL || plan->tail_first < 0 || plan->tail_first > plan->nops) {
        set_err(comm, "bad run part %d or unfinished plan", part);
        return PC_ERR_ARG;
    }
    pc_status checked = check_run(comm, plan, part == PC_RUN_TAIL);
    if (checked != PC_OK) return checked;
    int32_t es = check_dtype_op(comm, dtype, op);
    if (!es) return PC_ERR_ARG;
    if (plan->codec != PC_CODEC_NONE && dtype != PC_F32) {
        set_err(comm, "a compressed plan carries float32 only (dtype %d)", dtype);
        return PC_ERR_ARG;
    }
    if (plan->nbufs || plan->remapped) {
        set_err(comm, plan->nbufs ? "a buffer plan runs through pc_comm_run_buffers"
                                  : "a remapped plan runs through pc_comm_run_remapped");
        return PC_ERR_ARG;
    }
    for (int b = 0; b < 2; b++)
        if (plan->need_bytes[b] > (bufs[b] ? buf_bytes[b] : 0)) {
            set_err(comm, "buffer %d holds %llu bytes, plan needs %llu", b, (unsigned long long)buf_bytes[b],
                    (unsigned long long)plan->need_bytes[b]);
            return PC_ERR_ARG;
        }
    if (part == PC_RUN_BODY && !body_keeps_input(plan, bufs, buf_bytes)) {
        set_err(comm, "this plan writes the caller's input before its tail; it cannot run in two parts");
        return PC_ERR_ARG;
    }
    if (part != PC_RUN_TAIL && !plan->windowed && scratch_for(comm, plan) != PC_OK) return PC_ERR_NOMEM;
    run_state r;
    run_init(&r, comm, plan, r.own, dtype, op, es, seq, desc, part == PC_RUN_BODY ? plan->tail_first : plan->nops);
    r.own[PC_BUF_IN] = bufs[PC_BUF_IN];
    r.own[PC_BUF_OUT] = bufs[PC_BUF_OUT];
    r.own[PC_BUF_SCRATCH] = comm->scratch;
    if (plan->windowed) {
        pc_status ws = window_for(comm, plan, part, seq, &r);
        if (ws != PC_OK) return ws;
    }
    /* Single copy pays once the buffers outgrow the caches: below that, the
     * ring's copy in and copy out run on two cores at once, in cache, and
     * beat one process_vm_readv that must also pin the peer's pages. */
    uint64_t in = plan->need_bytes[PC_BUF_IN], out = plan->need_bytes[PC_BUF_OUT], span = in > out ? in : out;
    r.remote = comm->remote_min && span >= comm->remote_min;
    if (part == PC_RUN_TAIL) return run_tail(comm, plan, &r);
    int kind = in == out ? COPY_RUN_EQUAL : in > out ? COPY_RUN_IN_LARGER : COPY_RUN_OUT_LARGER;
    pc_status st = run_choosing(comm, &r, kind, span, bufs, plan->need_bytes, 2, timeout_s, failed_peer);
    if (st != PC_OK && plan->windowed) comm->alias_plan = NULL; /* a failed body has no tail to run */
    return st;
}

static pc_status check_buffer_plan(pc_comm *comm, const pc_plan *plan, int32_t first, int32_t nbufs,
                                   void *const *bufs, const uint64_t *buf_bytes, int hashed, uint64_t *net);

/* ---- remapped runs (pc_plan_remap: one plan over several caller buffers) ---- */
pc_status pc_comm_run_remapped(pc_comm *comm, const pc_plan *plan, int32_t nbufs, void *const *bufs,
                               const uint64_t *buf_bytes, int32_t dtype, int32_t op, uint64_t seq, uint32_t desc,
                               double timeout_s, int32_t *failed_peer) {
    if (failed_peer) *failed_peer = -1;
    if (!comm) return PC_ERR_ARG;
    if (!plan || !plan->remapped || plan->tail_first < 0 || nbufs < plan->remapped || !bufs || !buf_bytes) {
        set_err(comm, "not a remapped plan over %d buffers", nbufs);
        return PC_ERR_ARG;
    }
    pc_status checked = check_run(comm, plan, 0);
    if (checked != PC_OK) return checked;
    int32_t es = check_dtype_op(comm, dtype, op);
    if (!es) return PC_ERR_ARG;
    uint64_t total = 0, net;
    checked = check_buffer_plan(comm, plan, PC_BUF_COUNT, nbufs, bufs, buf_bytes, 0, &net);
    if (checked != PC_OK) return checked;
    for (int32_t c = 0; c < nbufs; c++) total += buf_bytes[c];
    if (scratch_for(comm, plan) != PC_OK) return PC_ERR_NOMEM;
    uint8_t *stack[PC_BUF_COUNT + 16], **table = stack;
    if (nbufs > 16 && !(table = malloc(sizeof(uint8_t *) * ((size_t)nbufs + PC_BUF_COUNT)))) {
        set_err(comm, "out of memory for %d buffers", nbufs);
        return PC_ERR_NOMEM;
    }
    table[PC_BUF_IN] = table[PC_BUF_OUT] = NULL; /* (no op addresses them: see plan_remap.c) */
    table[PC_BUF_SCRATCH] = comm->scratch;
    for (int32_t c = 0; c < nbufs; c++) table[PC_BUF_COUNT + c] = bufs[c];
    run_state r;
    run_init(&r, comm, plan, table, dtype, op, es, seq, desc, plan->nops);
    r.remote = comm->remote_min && total >= comm->remote_min;
    pc_status st = run_choosing(comm, &r, COPY_RUN_REMAPPED, total, bufs, buf_bytes, nbufs, timeout_s, failed_peer);
    if (table != stack) free(table);
    return st;
}

/* ---- buffer runs ----------------------------------------------------------- */
static uint64_t blocks_of(uint64_t len) { return (len + PC_HASH_BLOCK - 1) / PC_HASH_BLOCK; }

/* Every op's byte ranges inside the caller's buffers, hashed receives on block boundaries; the
 * bytes this rank moves over the network into *net. Caller buffer c is op buffer first + c
 * (buffer runs: 0; remapped runs: PC_BUF_COUNT, below which the engine's own scratch lies). */
static pc_status check_buffer_plan(pc_comm *comm, const pc_plan *plan, int32_t first, int32_t nbufs,
                                   void *const *bufs, const uint64_t *buf_bytes, int hashed, uint64_t *net) {
    *net = 0;
    for (int32_t i = 0; i < plan->nops; i++) {
        const pc_op *o = &plan->ops[i];
        int32_t b[2] = {o->src_buf - first, o->dst_buf - first};
        uint64_t off[2] = {o->src_off, o->dst_off};
        for (int s = 0; s < 2; s++) {
            if (b[s] < 0) continue;
            if (b[s] >= nbufs || (o->len && !bufs[b[s]]) || off[s] > buf_bytes[b[s]] ||
                o->len > buf_bytes[b[s]] - off[s]) {
                set_err(comm, "op %d reaches past buffer %d (%llu bytes at %llu of %llu)", i, b[s],
                        (unsigned long long)o->len, (unsigned long long)off[s],
                        b[s] < nbufs ? (unsigned long long)buf_bytes[b[s]] : 0ull);
                return PC_ERR_ARG;
            }
        }
        if (o->kind == PC_OP_SEND || o->kind == PC_OP_RECV) *net += o->len;
        if (hashed && o->kind == PC_OP_RECV && o->len &&
            (o->dst_off % PC_HASH_BLOCK || ((o->dst_off + o->len) % PC_HASH_BLOCK &&
                                            o->dst_off + o->len != buf_bytes[o->dst_buf]))) {
            set_err(comm, "hashed receive %d of buffer %d is not on %u-byte blocks (%llu at %llu)", i, o->dst_buf,
                    (unsigned)PC_HASH_BLOCK, (unsigned long long)o->len, (unsigned long long)o->dst_off);
            return PC_ERR_ARG;
        }
    }
    return PC_OK;
}

pc_status pc_comm_run_buffers(pc_comm *comm, const pc_plan *plan, int32_t nbufs, void *const *bufs,
                              const uint64_t *buf_bytes, uint64_t seq, uint32_t desc, double timeout_s,
                              uint64_t seed, uint64_t *digests, int32_t threads, int32_t *failed_peer) {
    if (failed_peer) *failed_peer = -1;
    if (!comm) return PC_ERR_ARG;
    if (!plan || plan->tail_first < 0 || !plan->nbufs || nbufs < plan->nbufs || (nbufs && (!bufs || !buf_bytes))) {
        set_err(comm, "not a sealed buffer plan over %d buffers", nbufs);
        return PC_ERR_ARG;
    }
    pc_status st = check_run(comm, plan, 0);
    if (st != PC_OK) return st;
    uint64_t net = 0;
    st = check_buffer_plan(comm, plan, 0, nbufs, bufs, buf_bytes, digests != NULL, &net);
    if (st != PC_OK) return st;
    run_state r; /* (bytes: dtype u8, op sum) */
    run_init(&r, comm, plan, (uint8_t *const *)bufs, PC_U8, PC_SUM, 1, seq, desc, plan->nops);
    r.caller_bufs = 1;
    r.seed = seed;
    if (threads <= 0) threads = comm->cpus_online > 0 ? comm->cpus_online : 1;
    r.threads = threads > MAX_READ_THREADS ? MAX_READ_THREADS : threads;
    if (digests) {
        r.first = malloc(sizeof(uint64_t) * (size_t)nbufs);
        if (!r.first) {
            set_err(comm, "out of memory for %d buffers' digest offsets", nbufs);
            return PC_ERR_NOMEM;
        }
        uint64_t at = 0;
        for (int32_t b = 0; b < nbufs; b++) {
            r.first[b] = at;
            at += blocks_of(buf_bytes[b]);
        }
        r.digests = digests;
    }
    r.remote = comm->remote_min && net >= comm->remote_min;
    st = run_loop(comm, &r, timeout_s, failed_peer);
    free(r.first);
    return st;
}

/* Runs the network part of a prepared run to its end or its first failure. */
static pc_status run_loop(pc_comm *comm, run_state *rp, double timeout_s, int32_t *failed_peer) {
    run_state r = *rp;
    const pc_plan *plan = r.plan;
    pc_status st = prepare(&r);
    if (st != PC_OK) {
        set_err(comm, st == PC_ERR_NOMEM ? "out of memory preparing a plan" : "malformed plan");
        return st;
    }
    double deadline = now_s() + (timeout_s > 0 ? timeout_s : 1e9);
    double idle_since = -1, last_move = now_s();
    /* Socket waits spin only in small collectives: there the next frame is
     * microseconds away. For bulk transfers a sleeping waiter wakes in time
     * and spinning only takes the core from the ranks it waits for (measured
     * with 4 ranks on 2 cores: 16 MiB took 41 ms without spinning, 47 ms with
     * 200 us). */
    uint64_t net_bytes = 0;
    for (int32_t i = 0; i < plan->nops; i++)
        if (plan->ops[i].kind == PC_OP_SEND) net_bytes += plan->ops[i].len;
    int small = net_bytes <= (1u << 20);
    int wait_kind = WAIT_NONE;
    uint32_t spin_ns = 0;
    double looked = 0; /* when the last pass of this wait found nothing, if we did not sleep since */
    int slept = 0;     /* this wait went to sleep (its spin, if any, is counted) */
    while (r.status == PC_OK && r.done < r.end) {
        int moved = run_locals(&r);
        for (int32_t a = 0; a < r.nactive && r.status == PC_OK; a++) {
            int32_t k = r.active[a];
            r.ch[k].want = 0;
            moved |= pump_send(&r, k);
            moved |= pump_recv(&r, k);
        }
        moved |= run_locals(&r);
        if (r.status != PC_OK) break;
        if (r.done == r.end) {
            /* the wait ended within a pass of `looked` (no clock read on the fast path) */
            if (idle_since >= 0) wait_ended(comm, wait_kind, (looked > 0 ? looked : now_s()) - idle_since, slept);
            break;
        }
        if (__atomic_load_n(&comm->cancelled, __ATOMIC_SEQ_CST)) {
            fail(&r, PC_ERR_CANCELLED, -1, "collective cancelled");
            break;
        }
        double t = now_s();
        if (t > deadline) {
            fail(&r, PC_ERR_TIMEOUT, -1, "collective timed out after %.3f s (%d of %d steps done)", timeout_s,
                 r.done, r.end);
            break;
        }
        if (moved) {
            if (idle_since >= 0) wait_ended(comm, wait_kind, t - idle_since, slept);
            idle_since = -1;
            last_move = t;
            continue;
        }
        if (comm->stall_s > 0 && t - last_move > comm->stall_s) {
            stall_fail(&r, t - last_move);
            break;
        }
        /* Nothing moved: spin for the learned budget (none on a busy
         * host), then sleep until a channel is ready or we are cancelled. */
        if (idle_since < 0) {
            idle_since = t;
            slept = 0;
            spin_ns = begin_wait(&r, t, small, &wait_kind);
        }
        if ((t - idle_since) * 1e9 < (double)spin_ns) {
            looked = t;
            spin_pause(comm);
            continue;
        }
        looked = 0;
        if (!slept) comm->spun_s += t - idle_since;
        slept = 1;
        comm->sleeps++;
        wait_for_io(&r, deadline);
    }
    st = r.status;
    if (failed_peer) *failed_peer = r.failed_peer;
    if (st != PC_OK) pc_comm_shutdown(comm);
    return st;
}

/* ---- receive from any source: which peer sends first ------------------- */
/* Rank q's next frame, if its header is there: 1 if it is the one a receive
 * from any source waits for (seq and tag), 0 if it is another frame (for a
 * later call: nothing for us can come before it on that connection), -1 if
 * the header is not all there yet. A closed connection counts as 1 (the
 * receive then fails with the peer's loss). */
static int probe_frame(pc_conn *cn, uint64_t seq, uint32_t tag) {
    uint8_t hdr[PC_HDR_BYTES];
    long got = cn->ops->peek_copy ? cn->ops->peek_copy(cn, hdr, sizeof hdr) : PC_IO_ERROR;
    if (got == PC_IO_AGAIN) return -1;
    if (got < 0) return 1;
    if (got < (long)sizeof hdr) return -1;
    pc_frame_hdr h;
    hdr_decode(hdr, &h);
    return h.magic == PC_MAGIC && h.seq == seq && h.tag == tag;
}

pc_status pc_comm_probe(pc_comm *comm, uint64_t seq, uint32_t tag, double timeout_s, int32_t *peer) {
    *peer = -1;
    if (comm->broken) {
        set_err(comm, "communicator was shut down by an earlier failure; rebuild it");
        return PC_ERR_IO;
    }
    int32_t n = comm->nranks;
    struct pollfd *fds = malloc(sizeof(struct pollfd) * (2 * (size_t)n + 1));
    int32_t *who = malloc(sizeof(int32_t) * (2 * (size_t)n + 1));
    uint8_t *other = calloc((size_t)n, 1); /* rank's next frame is not ours: leave it alone */
    if (!fds || !who || !other) {
        free(fds);
        free(who);
        free(other);
        set_err(comm, "out of memory probing for a sender");
        return PC_ERR_NOMEM;
    }
    double deadline = now_s() + (timeout_s > 0 ? timeout_s : 1e9);
    pc_status st = PC_ERR_TIMEOUT;
    while (*peer < 0) {
        if (__atomic_load_n(&comm->cancelled, __ATOMIC_SEQ_CST)) {
            st = PC_ERR_CANCELLED;
            set_err(comm, "receive from any source cancelled");
            break;
        }
        double t = now_s();
        if (t > deadline) {
            set_err(comm, "receive from any source timed out after %.3f s: no rank sent us a frame with tag %08x",
                    timeout_s, tag);
            break;
        }
        int nf = 0;
        fds[nf].fd = comm->cancel_pipe[0], fds[nf].events = POLLIN, fds[nf].revents = 0, who[nf++] = -1;
        /* the ranks after ours first, so no sender is always served last */
        for (int32_t d = 1; d < n && *peer < 0; d++) {
            int32_t q = (comm->rank + d) % n;
            pc_conn *cn = comm->conns[q * comm->stripes];
            if (!cn || other[q]) continue;
            short ev = poll_events(cn, POLLIN); /* 0: bytes (or the peer's end) are there now */
            if (!ev || !cn->ops->arm) {
                int f = probe_frame(cn, seq, tag);
                if (f == 1) {
                    *peer = q;
                    break;
                }
                if (f == 0) {
                    other[q] = 1;
                    continue;
                }
            }
            fds[nf].fd = cn->fd, fds[nf].events = ev ? ev : POLLIN, fds[nf].revents = 0, who[nf++] = q;
            if (cn->fd2 >= 0) fds[nf].fd = cn->fd2, fds[nf].events = POLLIN, fds[nf].revents = 0, who[nf++] = q;
        }
        if (*peer >= 0) break;
        /* sleep until a connection (or its doorbell) is ready: who sends
         * first is not known, so there is no one wait to learn a spin from */
        double left = deadline - t;
        int ms = left > 0.02 ? 20 : (int)(left * 1000.0) + 1;
        poll(fds, (nfds_t)nf, ms);
        if ((fds[0].revents & POLLIN) && !__atomic_load_n(&comm->cancelled, __ATOMIC_SEQ_CST)) drain_cancel_pipe(comm);
    }
    free(fds);
    free(who);
    free(other);
    return *peer >= 0 ? PC_OK : st;
}

/* ---- raw ring stream: the transport ceiling ---------------------------- */
pc_status pc_comm_stream_ring(pc_comm *comm, uint64_t bytes, double timeout_s, double *seconds) {
    *seconds = 0;
    if (comm->nranks < 2) return PC_OK;
    int32_t right = (comm->rank + 1) % comm->nranks, left = (comm->rank + comm->nranks - 1) % comm->nranks;
    pc_conn *out = comm->conns[right * comm->stripes], *in = comm->conns[left * comm->stripes];
    if (!out || !in) return PC_ERR_ARG;
    enum { BUF = 4 << 20 };
    uint8_t *sb = calloc(1, BUF), *rb = malloc(BUF);
    if (!sb || !rb) {
        free(sb);
        free(rb);
        return PC_ERR_NOMEM;
    }
    uint64_t sent = 0, got = 0;
    double t0 = now_s(), deadline = t0 + timeout_s, idle_since = -1;
    pc_status st = PC_OK;
    while (sent < bytes || got < bytes) {
        int moved = 0;
        short want_out = 0, want_in = 0;
        if (sent < bytes) {
            uint64_t n = bytes - sent < BUF ? bytes - sent : BUF;
            struct iovec v = {sb, n};
            long res = out->ops->sendv(out, &v, 1);
            if (res > 0) sent += (uint64_t)res, moved = 1;
            else if (res == PC_IO_AGAIN) want_out = POLLOUT;
            else { st = PC_ERR_PEER; break; }
        }
        if (got < bytes) {
            uint64_t n = bytes - got < BUF ? bytes - got : BUF;
            struct iovec v = {rb, n};
            long res = in->ops->recvv(in, &v, 1);
            if (res > 0) got += (uint64_t)res, moved = 1;
            else if (res == PC_IO_AGAIN) want_in = POLLIN;
            else { st = PC_ERR_PEER; break; }
        }
        double t = now_s();
        if (t > deadline) { st = PC_ERR_TIMEOUT; break; }
        if (moved) {
            idle_since = -1;
        } else {
            /* the engine's waiting policy, without the learning: spin up to
             * the cap unless the host is busy, then sleep */
            if (idle_since < 0) idle_since = t;
            int shm = out->ops->arm && in->ops->arm;
            int32_t cap_us = comm->spin_us <= 0 ? 0 : shm ? comm->shm_spin_us : comm->spin_us;
            if ((t - idle_since) * 1e6 < cap_us && !host_busy(comm, t)) {
                spin_pause(comm);
                continue;
            }
            short ev_out = want_out ? poll_events(out, want_out) : 0;
            short ev_in = want_in ? poll_events(in, want_in) : 0;
            if ((want_out && !ev_out) || (want_in && !ev_in)) continue;
            struct pollfd p[4] = {{out->fd, ev_out, 0}, {in->fd, ev_in, 0}, {out->fd2, POLLIN, 0},
                                  {in->fd2, POLLIN, 0}};
            poll(p, out->fd2 >= 0 || in->fd2 >= 0 ? 4 : 2, 100); /* negative fds are skipped */
        }
    }
    *seconds = now_s() - t0;
    free(sb);
    free(rb);
    if (st != PC_OK) {
        set_err(comm, "stream test failed");
        pc_comm_shutdown(comm);
    }
    return st;
}
