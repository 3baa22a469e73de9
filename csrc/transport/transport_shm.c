/*
 * transport_shm.c - a same-host pc_conn over shared memory.
 *
 * Terms: a *segment* is one memfd shared by the two ends of one connection
 * (one (peer, stripe) pair). It holds a control page and two *rings*, one
 * per direction: ring s is written only by *side* s (side 0 = the lower
 * rank, which created the segment) and read only by the other side. A ring
 * is a single-producer single-consumer byte queue: `head` counts bytes ever
 * written, `tail` bytes ever consumed; both only grow, the data of byte i
 * lives at i % ring_bytes.
 *
 * Waking and liveness use three more fds per connection:
 *   - two eventfds, one *doorbell* per side: an end about to sleep sets a
 *     `wait` flag in the control page and polls its doorbell; the other end,
 *     after moving bytes, sees the flag and writes its peer's doorbell.
 *     (Dekker-style: the sleeper stores the flag, fences, then re-checks the
 *     ring; the waker updates the ring, fences, then reads the flag; one of
 *     them always sees the other.) An eventfd, not the socket, because a
 *     socket wakes its reader "synchronously": the scheduler then puts the
 *     sleeper on the waker's CPU, behind the waker that keeps spinning.
 *   - the unix stream socket of the mesh handshake (which passed the fds):
 *     when a process dies the kernel closes its end, so the survivor's poll
 *     wakes with EOF and its calls return PC_IO_CLOSED; a dead peer never
 *     leaves a waiter blocked. A graceful shutdown also sets a `closed` flag
 *     that a spinning peer sees without a system call.
 *
 * Nothing has a name: the memfd is anonymous, sealed against resizing (so a
 * peer cannot make our mapping fault), and freed by the kernel once both
 * ends unmapped it, whatever way the processes exit (SIGKILL included).
 *
 * Single copy: for large payloads the engine sends a descriptor (address,
 * length) instead of the bytes, and the receiver copies them straight out
 * of the sender's memory with process_vm_readv (one copy instead of two:
 * into the ring and out of it). The reader then bumps `rma_acks` of that
 * ring, which is what completes the sender's op. Each side tells the other
 * whether it can read its memory (`can_read`): it found out by reading a
 * probe word the other published (a cookie at a known address) the first
 * time it received; ptrace rules (Yama, seccomp, a non-dumpable process)
 * can forbid it, and then the bytes go through the ring as before (under
 * Yama's ptrace_scope 1 each side first names the peers' launcher as its
 * ptracer: shm_readers.c). A
 * reader checks after every copy that the writer has not shut down: a
 * writer whose collective failed may change its buffer once it returns.
 *
 * Writers copy at most what fits and cut partial writes at multiples of 8
 * bytes; with the engine padding frames to 8 bytes (conn->align), every
 * payload element in a ring is naturally aligned and never wraps, so the
 * engine can reduce straight out of the ring (peek / consume).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434 /* the same number on every architecture */
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

#include "pycoll.h"
#include "transport.h"

#define CTL_BYTES 4096u
#define RING_MIN (64u * 1024u)
#define RING_MAX (1ull << 30)
#define PUBLISH_BYTES (64u * 1024u) /* a long copy publishes its progress this often */

/* One cache line per field that a different side writes. */
typedef struct {
    uint64_t head; /* written by the producer */
    uint8_t pad0[56];
    uint64_t tail;     /* written by the consumer */
    uint64_t rma_acks; /* descriptors the consumer finished reading */
    uint8_t pad1[48];
    uint32_t prod_wait; /* producer sleeps until space frees; cleared by the consumer */
    uint8_t pad2[60];
    uint32_t cons_wait; /* consumer sleeps until data arrives; cleared by the producer */
    uint8_t pad3[60];
} ring_ctl;

typedef struct {
    ring_ctl ring[2];
    uint32_t closed[2];      /* side s shut its end down */
    uint32_t can_read[2];    /* side s reads side 1-s's memory: 0 not yet known, 1 yes, 2 no */
    uint64_t probe_addr[2];  /* side s: address of its probe word (0: not published yet) */
    uint64_t probe_val[2];   /* ... and the value the reader must find there */
    /* side s's result window (core/window.h): its fd, address and length in side s, published
     * before the generation that announces them */
    uint64_t win_gen[2];
    uint64_t win_base[2];
    uint64_t win_len[2];
    int32_t win_fd[2];
    /* side s's engine sleeps in a wait (host_busy in engine.c): written around every sleep, so on
     * a line of its own, away from the window generation that every receive reads */
    uint32_t asleep[2] __attribute__((aligned(64)));
} shm_ctl;
typedef char shm_ctl_fits_its_page[sizeof(shm_ctl) <= CTL_BYTES ? 1 : -1];

enum { RMA_UNKNOWN = 0, RMA_YES = 1, RMA_NO = 2 };

typedef struct {
    shm_ctl *ctl;
    void *map;
    size_t map_len;
    ring_ctl *tx, *rx;
    uint8_t *txd, *rxd;
    uint64_t size, mask;
    uint64_t tx_tail_seen; /* last tail of tx read from shared memory */
    int side, dead;
    int peer_bell;         /* the peer's doorbell (we write it) */
    short armed;           /* wait flags we set before sleeping */
    pid_t peer_pid;        /* from SO_PEERCRED; 0: unknown (no single copy) */
    uint64_t probe_word;   /* the peer reads this to prove it can read us */
    uint64_t rma_posted;   /* descriptors we sent */
    uint64_t rma_want;     /* the token the last rma_wait found unread: what a sleep waits for */
    int rma_state;         /* can we read the peer (RMA_*) */
    int probe_err;         /* RMA_NO: why (the read's errno; EIO: it read back another word) */
} shm_conn;

#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOAD_RLX(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

static shm_conn *impl(pc_conn *c) { return (shm_conn *)c->impl; }
static void probe(shm_conn *s);

static void ring_doorbell(pc_conn *c) {
    uint64_t one = 1;
    ssize_t r = write(impl(c)->peer_bell, &one, sizeof one);
    (void)r; /* only fails when the counter is saturated: then it wakes anyway */
}

/* We are running again: stop asking the peer for wake-ups. */
static void disarm(shm_conn *s) {
    if (!s->armed) return;
    if (s->armed & POLLIN) __atomic_store_n(&s->rx->cons_wait, 0u, __ATOMIC_RELAXED);
    if (s->armed & (POLLOUT | PC_WANT_RMA_ACK)) __atomic_store_n(&s->tx->prod_wait, 0u, __ATOMIC_RELAXED);
    s->armed = 0;
}

/* After we changed a ring: wake the other side if it said it sleeps. */
static void wake_if_waiting(pc_conn *c, uint32_t *flag) {
    FENCE();
    if (LOAD_RLX(flag) && __atomic_exchange_n(flag, 0u, __ATOMIC_ACQ_REL)) ring_doorbell(c);
}

static int peer_gone(pc_conn *c) {
    shm_conn *s = impl(c);
    return s->dead || LOAD_ACQ(&s->ctl->closed[1 - s->side]) || LOAD_RLX(&s->ctl->closed[s->side]);
}

/* Bytes queued in rx; > size means the peer corrupted the counters. */
static uint64_t rx_avail(shm_conn *s) { return LOAD_ACQ(&s->rx->head) - LOAD_RLX(&s->rx->tail); }

/* Bytes queued in rx, and in *gone whether the peer has left. The order
 * matters: the peer publishes its last bytes before it leaves (head, then
 * `closed`; its exit before the EOF we see), so "gone" read first and then
 * "nothing queued" really means it left nothing for us. Read the other way
 * round, a peer that sends its last frame and leaves between the two looks
 * like one that died without sending, and the survivor fails a collective
 * the peer completed. */
static uint64_t rx_avail_or_gone(pc_conn *c, int *gone) {
    *gone = peer_gone(c);
    return rx_avail(impl(c));
}

/* Free bytes in tx (re-reading the consumer's tail only when the last
 * value we saw leaves less than `want`); UINT64_MAX if the peer corrupted
 * the counters. */
static uint64_t tx_space(shm_conn *s, uint64_t want) {
    uint64_t head = LOAD_RLX(&s->tx->head);
    uint64_t used = head - s->tx_tail_seen;
    if (used > s->size || s->size - used < want) {
        s->tx_tail_seen = LOAD_ACQ(&s->tx->tail);
        used = head - s->tx_tail_seen;
    }
    return used > s->size ? UINT64_MAX : s->size - used;
}

static long shm_sendv(pc_conn *c, const struct iovec *iov, int iovcnt) {
    shm_conn *s = impl(c);
    disarm(s);
    if (peer_gone(c)) return PC_IO_CLOSED;
    uint64_t total = 0;
    for (int i = 0; i < iovcnt; i++) total += iov[i].iov_len;
    if (total == 0) return PC_IO_AGAIN;
    uint64_t head = LOAD_RLX(&s->tx->head);
    uint64_t space = tx_space(s, total);
    if (space == UINT64_MAX) {
        c->err = EPROTO;
        return PC_IO_ERROR;
    }
    uint64_t n = total <= space ? total : (space & ~(uint64_t)7);
    if (n == 0) return PC_IO_AGAIN;
    uint64_t left = n, pos = head;
    for (int i = 0; i < iovcnt && left; i++) {
        const uint8_t *src = iov[i].iov_base;
        uint64_t len = iov[i].iov_len < left ? iov[i].iov_len : left;
        while (len) {
            uint64_t at = pos & s->mask, run = s->size - at < len ? s->size - at : len;
            if (run > PUBLISH_BYTES) run = PUBLISH_BYTES;
            memcpy(s->txd + at, src, run);
            src += run;
            pos += run;
            len -= run;
            left -= run;
            if (left && pos - head >= PUBLISH_BYTES && !((pos - head) & 7)) {
                /* let the reader start on what is there while we copy on */
                STORE_REL(&s->tx->head, pos);
                wake_if_waiting(c, &s->tx->cons_wait);
            }
        }
    }
    STORE_REL(&s->tx->head, head + n);
    wake_if_waiting(c, &s->tx->cons_wait);
    return (long)n;
}

static void shm_consume(pc_conn *c, uint64_t n) {
    shm_conn *s = impl(c);
    STORE_REL(&s->rx->tail, LOAD_RLX(&s->rx->tail) + n);
    wake_if_waiting(c, &s->rx->prod_wait);
}

/* What every read starts with: the bytes queued (> 0), or PC_IO_AGAIN /
 * CLOSED / ERROR (the peer corrupted the counters). */
static long rx_begin(pc_conn *c) {
    shm_conn *s = impl(c);
    disarm(s);
    if (s->rma_state == RMA_UNKNOWN) probe(s);
    int gone;
    uint64_t avail = rx_avail_or_gone(c, &gone);
    if (avail == 0) return gone ? PC_IO_CLOSED : PC_IO_AGAIN;
    if (avail > s->size) {
        c->err = EPROTO;
        return PC_IO_ERROR;
    }
    return (long)avail; /* <= the ring size, 1 GiB at most */
}

/* Copies n (<= the ring size) received bytes from ring position pos to dst:
 * the ring may wrap inside them. */
static void rx_copy(const shm_conn *s, void *dst, uint64_t pos, uint64_t n) {
    if (!n) return; /* an empty iovec entry may have no base */
    uint64_t at = pos & s->mask, first = s->size - at < n ? s->size - at : n;
    memcpy(dst, s->rxd + at, first);
    if (n > first) memcpy((uint8_t *)dst + first, s->rxd, n - first);
}

static long shm_recvv(pc_conn *c, const struct iovec *iov, int iovcnt) {
    shm_conn *s = impl(c);
    long ready = rx_begin(c);
    if (ready <= 0) return ready;
    uint64_t avail = (uint64_t)ready, pos = LOAD_RLX(&s->rx->tail), got = 0;
    for (int i = 0; i < iovcnt && got < avail; i++) {
        uint64_t len = iov[i].iov_len < avail - got ? iov[i].iov_len : avail - got;
        rx_copy(s, iov[i].iov_base, pos + got, len);
        got += len;
    }
    if (got == 0) return PC_IO_AGAIN; /* empty iovec */
    shm_consume(c, got);
    return (long)got;
}

static long shm_peek(pc_conn *c, const void **data) {
    shm_conn *s = impl(c);
    long ready = rx_begin(c);
    *data = NULL;
    if (ready <= 0) return ready;
    uint64_t at = LOAD_RLX(&s->rx->tail) & s->mask;
    uint64_t run = s->size - at < (uint64_t)ready ? s->size - at : (uint64_t)ready;
    *data = s->rxd + at;
    return (long)run;
}

static long shm_peek_copy(pc_conn *c, void *dst, uint64_t n) {
    shm_conn *s = impl(c);
    long ready = rx_begin(c);
    if (ready <= 0) return ready;
    uint64_t take = n < (uint64_t)ready ? n : (uint64_t)ready;
    rx_copy(s, dst, LOAD_RLX(&s->rx->tail), take);
    return (long)take;
}

/* ---- single copy ------------------------------------------------------ */
static long peer_read(shm_conn *s, void *dst, uint64_t from, uint64_t n) {
    uint8_t *d = dst;
    while (n) {
        struct iovec l = {d, n}, r = {(void *)(uintptr_t)from, n};
        ssize_t got = process_vm_readv(s->peer_pid, &l, 1, &r, 1, 0);
        if (got <= 0) return got == 0 ? -EFAULT : -errno;
        d += got;
        from += (uint64_t)got;
        n -= (uint64_t)got;
    }
    return 0;
}

/* The first time we receive: can we read the peer's memory? */
static void probe(shm_conn *s) {
    uint64_t addr = LOAD_ACQ(&s->ctl->probe_addr[1 - s->side]), seen = 0;
    if (!addr) return; /* the peer has not published its probe word yet */
    long e = s->peer_pid > 0 ? peer_read(s, &seen, addr, sizeof seen) : -ESRCH;
    int ok = e == 0 && seen == LOAD_RLX(&s->ctl->probe_val[1 - s->side]);
    s->probe_err = ok ? 0 : e ? (int)-e : EIO;
    s->rma_state = ok ? RMA_YES : RMA_NO;
    STORE_REL(&s->ctl->can_read[s->side], (uint32_t)s->rma_state);
}

static int shm_rma_ok(pc_conn *c) {
    shm_conn *s = impl(c);
    return LOAD_ACQ(&s->ctl->can_read[1 - s->side]) == RMA_YES;
}

static uint64_t shm_rma_post(pc_conn *c) { return ++impl(c)->rma_posted; }

static long shm_rma_wait(pc_conn *c, uint64_t token) {
    shm_conn *s = impl(c);
    disarm(s);
    int gone = peer_gone(c); /* first: an ack then a quick exit must still count as an ack */
    if (LOAD_ACQ(&s->tx->rma_acks) >= token) return 1;
    s->rma_want = token;
    return gone ? PC_IO_CLOSED : PC_IO_AGAIN;
}

static long shm_rma_read(pc_conn *c, void *dst, uint64_t from, uint64_t n) {
    shm_conn *s = impl(c);
    if (s->rma_state != RMA_YES) { /* the peer sent a descriptor we never asked for */
        c->err = EPROTO;
        return PC_IO_ERROR;
    }
    long e = peer_read(s, dst, from, n);
    if (peer_gone(c)) return PC_IO_CLOSED; /* it may have changed the bytes under us */
    if (e == -ESRCH) return PC_IO_CLOSED;
    if (e) {
        c->err = (int)-e;
        return PC_IO_ERROR;
    }
    return (long)n;
}

static long shm_rma_done(pc_conn *c) {
    shm_conn *s = impl(c);
    if (peer_gone(c)) return PC_IO_CLOSED;
    STORE_REL(&s->rx->rma_acks, LOAD_RLX(&s->rx->rma_acks) + 1);
    wake_if_waiting(c, &s->rx->prod_wait);
    return 1;
}

static void shm_rma_probe(pc_conn *c) {
    shm_conn *s = impl(c);
    if (s->rma_state == RMA_UNKNOWN) probe(s);
}

static int shm_rma_refused(pc_conn *c) {
    shm_conn *s = impl(c);
    /* ESRCH: the peer was gone when we looked, which its failure reports, not a refusal */
    return s->rma_state == RMA_NO && s->probe_err != ESRCH ? s->probe_err : 0;
}

static void shm_rma_allow(pc_conn *c, int allow) {
    shm_conn *s = impl(c);
    s->rma_state = allow ? RMA_UNKNOWN : RMA_NO;
    STORE_REL(&s->ctl->can_read[s->side], (uint32_t)s->rma_state);
}

/* EOF or an error on the unix socket: the peer process is gone. */
static int socket_closed(pc_conn *c) {
    char b;
    ssize_t r = recv(c->fd2, &b, 1, MSG_DONTWAIT | MSG_PEEK);
    return r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

/* Clear our doorbell; notice EOF on the socket (the peer process is gone). */
static void drain(pc_conn *c) {
    shm_conn *s = impl(c);
    uint64_t v;
    ssize_t r = read(c->fd, &v, sizeof v);
    (void)r; /* EAGAIN: nobody rang */
    if (socket_closed(c)) s->dead = 1;
}

static short shm_arm(pc_conn *c, short want) {
    shm_conn *s = impl(c);
    drain(c);
    if (peer_gone(c)) return 0;
    if (want & POLLIN) __atomic_store_n(&s->rx->cons_wait, 1u, __ATOMIC_RELAXED);
    /* the reader wakes prod_wait both when it frees space and when it acks a descriptor */
    if (want & (POLLOUT | PC_WANT_RMA_ACK)) __atomic_store_n(&s->tx->prod_wait, 1u, __ATOMIC_RELAXED);
    s->armed |= want & (POLLIN | POLLOUT | PC_WANT_RMA_ACK);
    FENCE();
    if ((want & POLLIN) && rx_avail(s) != 0) return 0;
    if ((want & POLLOUT) && tx_space(s, 8) >= 8) return 0; /* (or corrupt: let sendv say so) */
    /* several descriptors may be out: the engine waits for the oldest (the last rma_wait's) */
    if ((want & PC_WANT_RMA_ACK) && LOAD_ACQ(&s->tx->rma_acks) >= s->rma_want) return 0;
    if (peer_gone(c)) return 0;
    return POLLIN; /* our doorbell rang (fd2, the socket, reports EOF) */
}

static void shm_shutdown(pc_conn *c) {
    shm_conn *s = impl(c);
    STORE_REL(&s->ctl->closed[s->side], 1u);
    FENCE();
    ring_doorbell(c);
    if (c->fd2 >= 0) shutdown(c->fd2, SHUT_RDWR); /* the peer's poll sees EOF */
}

static void shm_destroy(pc_conn *c) {
    shm_conn *s = impl(c);
    if (s) {
        if (s->map) munmap(s->map, s->map_len);
        if (s->peer_bell >= 0) close(s->peer_bell);
        free(s);
    }
    if (c->fd >= 0) close(c->fd);
    if (c->fd2 >= 0) close(c->fd2);
    free(c);
}

/* ---- result windows --------------------------------------------------- */
static void shm_win_publish(pc_conn *c, int fd, uint64_t base, uint64_t len, uint64_t gen) {
    shm_conn *s = impl(c);
    __atomic_store_n(&s->ctl->win_fd[s->side], fd, __ATOMIC_RELAXED);
    __atomic_store_n(&s->ctl->win_base[s->side], base, __ATOMIC_RELAXED);
    __atomic_store_n(&s->ctl->win_len[s->side], len, __ATOMIC_RELAXED);
    STORE_REL(&s->ctl->win_gen[s->side], gen);
}

static uint64_t shm_win_gen(pc_conn *c) {
    shm_conn *s = impl(c);
    return LOAD_ACQ(&s->ctl->win_gen[1 - s->side]);
}

/* A new fd of the peer's fd `rfd`, fetched from the peer process itself (pidfd_getfd: the same
 * ptrace permission as the single-copy reads, which must work already): the fd, or -errno. */
static int shm_fd_fetch(pc_conn *c, int32_t rfd) {
    shm_conn *s = impl(c);
    if (s->rma_state != RMA_YES || s->peer_pid <= 0) return -EPERM;
    int pfd = (int)syscall(SYS_pidfd_open, s->peer_pid, 0);
    if (pfd < 0) return -errno;
    /* the pid is still our peer's (not reused) while its end of the socket is open */
    if (peer_gone(c) || socket_closed(c)) {
        close(pfd);
        return -ESRCH;
    }
    int fd = (int)syscall(SYS_pidfd_getfd, pfd, rfd, 0);
    int e = errno;
    close(pfd);
    return fd < 0 ? -e : fd;
}

/* The peer's window fd and what it published with it. */
static int shm_win_fetch(pc_conn *c, uint64_t *gen, uint64_t *base, uint64_t *len) {
    shm_conn *s = impl(c);
    int o = 1 - s->side;
    if (s->rma_state != RMA_YES || s->peer_pid <= 0) return -EPERM;
    uint64_t g = LOAD_ACQ(&s->ctl->win_gen[o]);
    if (!g) return -ENOENT;
    int32_t rfd = __atomic_load_n(&s->ctl->win_fd[o], __ATOMIC_RELAXED);
    uint64_t b = __atomic_load_n(&s->ctl->win_base[o], __ATOMIC_RELAXED);
    uint64_t l = __atomic_load_n(&s->ctl->win_len[o], __ATOMIC_RELAXED);
    int fd = shm_fd_fetch(c, rfd);
    if (fd < 0) return fd;
    if (LOAD_ACQ(&s->ctl->win_gen[o]) != g) { /* it moved on while we fetched */
        close(fd);
        return -EAGAIN;
    }
    *gen = g;
    *base = b;
    *len = l;
    return fd;
}

/* ---- who sleeps ----------------------------------------------------- */
static void shm_set_asleep(pc_conn *c, int asleep) {
    shm_conn *s = impl(c);
    __atomic_store_n(&s->ctl->asleep[s->side], asleep ? 1u : 0u, __ATOMIC_RELAXED);
}

static int shm_peer_asleep(pc_conn *c) {
    shm_conn *s = impl(c);
    return __atomic_load_n(&s->ctl->asleep[1 - s->side], __ATOMIC_RELAXED) != 0;
}

static const pc_conn_ops shm_ops = {shm_sendv,       shm_recvv,   shm_shutdown,  shm_destroy,   shm_arm,
                                    shm_peek,        shm_consume, shm_rma_ok,    shm_rma_post,  shm_rma_wait,
                                    shm_rma_read,    shm_rma_done, shm_rma_allow, shm_peek_copy, shm_rma_probe,
                                    shm_rma_refused, shm_win_publish, shm_win_gen, shm_win_fetch, shm_fd_fetch,
                                    shm_set_asleep,  shm_peer_asleep};

pc_status pc_shm_segment_create(uint64_t ring_bytes, int32_t *fds) {
    fds[0] = fds[1] = fds[2] = -1;
    if (ring_bytes < RING_MIN || ring_bytes > RING_MAX || (ring_bytes & (ring_bytes - 1))) return PC_ERR_ARG;
    pc_status st = PC_ERR_IO;
    fds[0] = memfd_create("pycoll-shm", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    for (int i = 1; i < 3; i++) fds[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fds[0] < 0 || fds[1] < 0 || fds[2] < 0) goto fail;
    if (ftruncate(fds[0], (off_t)(CTL_BYTES + 2 * ring_bytes)) != 0 ||
        fcntl(fds[0], F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
        goto fail;
    return PC_OK;
fail:
    if (errno == ENOMEM || errno == ENOSPC || errno == EMFILE || errno == ENFILE) st = PC_ERR_NOMEM;
    for (int i = 0; i < 3; i++) {
        if (fds[i] >= 0) close(fds[i]);
        fds[i] = -1;
    }
    return st;
}

/* Ownership: on success the conn owns sock and both doorbells and the
 * segment fd is closed; on failure all stay with the caller. */
pc_conn *pc_shm_conn(int sock, const int32_t *shm_fds, int side, pc_status *st) {
    *st = PC_ERR_ARG;
    pc_conn *c = NULL;
    shm_conn *s = NULL;
    struct stat sb;
    int seg_fd = shm_fds[0], bell[2] = {shm_fds[1], shm_fds[2]};
    if (side < 0 || side > 1 || bell[0] < 0 || bell[1] < 0) goto fail;
    int seals = fcntl(seg_fd, F_GET_SEALS);
    /* Trust nothing about the segment: size a power of two plus the control
     * page, and sealed so the peer cannot shrink it under our mapping. */
    if (seals < 0 || !(seals & F_SEAL_SHRINK) || fstat(seg_fd, &sb) != 0) goto fail;
    uint64_t len = (uint64_t)sb.st_size;
    if (len < CTL_BYTES + 2 * (uint64_t)RING_MIN || len > CTL_BYTES + 2 * RING_MAX) goto fail;
    uint64_t ring = (len - CTL_BYTES) / 2;
    if ((ring & (ring - 1)) || CTL_BYTES + 2 * ring != len) goto fail;
    *st = PC_ERR_NOMEM;
    c = calloc(1, sizeof *c);
    s = calloc(1, sizeof *s);
    if (!c || !s) goto fail;
    void *map = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED, seg_fd, 0);
    if (map == MAP_FAILED) goto fail;
    madvise(map, (size_t)len, MADV_DONTFORK); /* a forked child (a data loader) does not keep it */
    s->map = map;
    s->map_len = (size_t)len;
    s->ctl = map;
    s->side = side;
    s->size = ring;
    s->mask = ring - 1;
    s->tx = &s->ctl->ring[side];
    s->rx = &s->ctl->ring[1 - side];
    s->txd = (uint8_t *)map + CTL_BYTES + (uint64_t)side * ring;
    s->rxd = (uint8_t *)map + CTL_BYTES + (uint64_t)(1 - side) * ring;
    s->tx_tail_seen = LOAD_ACQ(&s->tx->tail);
    s->peer_bell = bell[1 - side];
    for (int i = 0; i < 2; i++) {
        int fd = i ? sock : bell[side];
        int fl = fcntl(fd, F_GETFL, 0);
        if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    }
    struct ucred cred;
    socklen_t cl = sizeof cred;
    s->peer_pid = getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0 ? cred.pid : 0;
    pc_readers_admit(s->peer_pid); /* before the probe word: the peer probes once it sees it */
    /* publish our probe word: any value the peer cannot guess by accident */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    s->probe_word = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ ((uint64_t)getpid() << 40) ^
                    (uint64_t)(uintptr_t)s;
    STORE_REL(&s->ctl->probe_val[side], s->probe_word);
    STORE_REL(&s->ctl->probe_addr[side], (uint64_t)(uintptr_t)&s->probe_word);
    c->ops = &shm_ops;
    c->fd = bell[side];
    c->fd2 = sock;
    c->align = 8;
    c->impl = s;
    close(seg_fd); /* the mapping keeps the memory */
    *st = PC_OK;
    return c;
fail:
    free(c);
    free(s);
    return NULL;
}
