/*
 * transport.h - a byte-stream connection to one peer, behind a small table
 * of functions. The engine only ever calls these; TCP (transport_tcp.c) and
 * same-host shared memory (transport_shm.c) implement them. All calls are
 * non-blocking and report readiness through a pollable fd.
 */
#ifndef PYCOLL_TRANSPORT_H
#define PYCOLL_TRANSPORT_H

#include <stdint.h>
#include <poll.h>
#include <sys/uio.h>

#include "pycoll.h"

typedef struct pc_conn pc_conn;

/* Results of sendv/recvv besides a byte count > 0. */
#define PC_IO_AGAIN 0    /* would block: poll the fd */
#define PC_IO_CLOSED -1  /* the peer closed the connection or reset it */
#define PC_IO_ERROR -2   /* any other error (errno is kept in conn->err) */

typedef struct {
    long (*sendv)(pc_conn *c, const struct iovec *iov, int iovcnt);
    long (*recvv)(pc_conn *c, const struct iovec *iov, int iovcnt);
    void (*shutdown)(pc_conn *c); /* wake and fail the peer's pending I/O */
    void (*destroy)(pc_conn *c);  /* release everything */
    /* Optional (NULL for sockets). */
    /* Called just before the engine sleeps waiting for `want` (POLLIN /
     * POLLOUT): returns the events to poll for on fd, or 0 if the conn is
     * ready already (the engine then does not sleep). */
    short (*arm)(pc_conn *c, short want);
    /* Zero-copy receive: *data = the next bytes in place; returns how many
     * are contiguous there (> 0), or PC_IO_AGAIN / CLOSED / ERROR. They
     * stay valid until consume(c, n) releases the first n of them. */
    long (*peek)(pc_conn *c, const void **data);
    void (*consume)(pc_conn *c, uint64_t n);
    /* Single copy (same host): instead of a payload the sender writes a
     * PC_FRAME_REMOTE frame naming its buffer, and the receiver copies the
     * bytes straight out of the sender's memory. The sender's op completes
     * only once the receiver says it is done reading. Tokens count the
     * descriptors of a connection; several may be out at once, and the reader
     * finishes them in order. */
    int (*rma_ok)(pc_conn *c);                 /* 1: the peer reads our memory itself */
    uint64_t (*rma_post)(pc_conn *c);          /* a descriptor went out: its token */
    long (*rma_wait)(pc_conn *c, uint64_t token); /* 1 once read; PC_IO_AGAIN / CLOSED */
    long (*rma_read)(pc_conn *c, void *dst, uint64_t from, uint64_t n); /* n, or < 0 */
    long (*rma_done)(pc_conn *c);              /* finished one descriptor: 1, or CLOSED */
    void (*rma_allow)(pc_conn *c, int allow);  /* 0: peers must not ask us to read them */
    /* Copies up to n of the next bytes to dst without consuming them (receive
     * from any source reads the next frame's header this way): how many, or
     * PC_IO_AGAIN / CLOSED / ERROR. */
    long (*peek_copy)(pc_conn *c, void *dst, uint64_t n);
    /* Single copy: find out now (instead of at the first receive) whether we can read the
     * peer's memory, and tell it; a no-op once known. */
    void (*rma_probe)(pc_conn *c);
    /* Single copy: the errno with which the kernel refused our read of the peer's memory (0:
     * allowed, or not known yet). */
    int (*rma_refused)(pc_conn *c);
    /* Result windows (core/window.h): tell the peer where ours is; the generation the peer
     * published last (0: none); a new fd of the peer's window with what it published (or
     * -errno: unknown, not allowed, gone). */
    void (*win_publish)(pc_conn *c, int fd, uint64_t base, uint64_t len, uint64_t gen);
    uint64_t (*win_gen)(pc_conn *c);
    int (*win_fetch)(pc_conn *c, uint64_t *gen, uint64_t *base, uint64_t *len);
    /* Shared buffers (core/shared_buffers.h): a new fd of the peer's fd number `remote_fd`, or
     * -errno (not allowed, gone). */
    int (*fd_fetch)(pc_conn *c, int32_t remote_fd);
    /* Same host: whether our engine sleeps in a wait now (set around each sleep), and whether
     * the peer's does: the ranks that want no CPU when the engine asks if the host is busy. */
    void (*set_asleep)(pc_conn *c, int asleep);
    int (*peer_asleep)(pc_conn *c);
} pc_conn_ops;

/* Poll bit (arm's `want`) for "waiting until the peer finished a remote read". */
#define PC_WANT_RMA_ACK POLLPRI

struct pc_conn {
    const pc_conn_ops *ops;
    int fd;          /* poll() on this for POLLIN / POLLOUT (via arm if set) */
    int fd2;         /* if >= 0, also poll() this one for POLLIN while waiting */
    int err;         /* errno of the last PC_IO_ERROR */
    uint32_t align;  /* frames are padded to a multiple of this (0/1: none) */
    void *impl;
};

/* What a connection needs besides its fd: the shared-memory fds, TCP's socket buffer size,
 * TLS's pre-shared key and handshake deadline. */
typedef struct {
    const int32_t *shm_fds; /* PC_CONN_SHM: 3 fds */
    int side;               /* 0 for the lower rank of the pair, 1 for the higher */
    int sockbuf_bytes;      /* TCP and TLS: 0 keeps the system's */
    const uint8_t *psk;     /* PC_CONN_TLS: the key (16..64 bytes) */
    int psk_len;
    double timeout_s;       /* PC_CONN_TLS: the handshake's limit */
} pc_conn_args;

/* A connection of `kind` (PC_CONN_*) over `fd`. NULL on failure, with *st set, and fd (and the
 * shm fds) still the caller's. The engine opens every connection through this, never through a
 * concrete transport. */
pc_conn *pc_conn_open(int32_t kind, int fd, const pc_conn_args *a, pc_status *st);

/* 1 if the peer runs on this host: a shared-memory conn, or a socket whose
 * two ends have the same address (loopback, or the host dialling itself). */
int pc_conn_same_host(const pc_conn *c);

/* Wraps a connected TCP socket (takes ownership of fd). */
pc_conn *pc_tcp_conn(int fd, int sockbuf_bytes);

/* TLS 1.3 over the connected TCP socket fd (transport_tls.c), keyed with psk: the handshake
 * (server: side 0) runs to its end within timeout_s. NULL on failure with *st: PC_ERR_PROTO when
 * the peer does not hold the key (or speaks no TLS), PC_ERR_TIMEOUT, PC_ERR_PEER; fd stays the
 * caller's then. */
pc_conn *pc_tls_conn(int fd, int sockbuf_bytes, int server, const uint8_t *psk, int psk_len, double timeout_s,
                     pc_status *st);

/* A shared-memory conn over shm_fds (segment, doorbell of side 0, doorbell
 * of side 1: see pc_shm_segment_create) with `sock`, a connected unix stream
 * socket to the same peer, as liveness signal. side: 0 for the lower rank,
 * 1 for the higher. On success the conn owns sock and the doorbells and the
 * segment fd is closed; on failure (NULL, *st set) all stay with the caller. */
pc_conn *pc_shm_conn(int sock, const int32_t *shm_fds, int side, pc_status *st);

#endif
