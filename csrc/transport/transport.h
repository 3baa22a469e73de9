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
     * only once the receiver says it is done reading. */
    int (*rma_ok)(pc_conn *c);                 /* 1: the peer reads our memory itself */
    uint64_t (*rma_post)(pc_conn *c);          /* a descriptor went out: its token */
    long (*rma_wait)(pc_conn *c, uint64_t token); /* 1 once read; PC_IO_AGAIN / CLOSED */
    long (*rma_read)(pc_conn *c, void *dst, uint64_t from, uint64_t n); /* n, or < 0 */
    long (*rma_done)(pc_conn *c);              /* finished one descriptor: 1, or CLOSED */
    void (*rma_allow)(pc_conn *c, int allow);  /* 0: peers must not ask us to read them */
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

/* A connection of `kind` (PC_CONN_TCP or PC_CONN_SHM) over `fd`; `shm_fds` (3 fds) and `side`
 * for shared memory, `sockbuf_bytes` for TCP. NULL on failure, with *st set for shm. The engine
 * opens every connection through this, never through a concrete transport. */
pc_conn *pc_conn_open(int32_t kind, int fd, const int32_t *shm_fds, int side, int sockbuf_bytes, pc_status *st);

/* 1 if the peer runs on this host: a shared-memory conn, or a socket whose
 * two ends have the same address (loopback, or the host dialling itself). */
int pc_conn_same_host(const pc_conn *c);

/* Wraps a connected TCP socket (takes ownership of fd). */
pc_conn *pc_tcp_conn(int fd, int sockbuf_bytes);

/* A shared-memory conn over shm_fds (segment, doorbell of side 0, doorbell
 * of side 1: see pc_shm_segment_create) with `sock`, a connected unix stream
 * socket to the same peer, as liveness signal. side: 0 for the lower rank,
 * 1 for the higher. On success the conn owns sock and the doorbells and the
 * segment fd is closed; on failure (NULL, *st set) all stay with the caller. */
pc_conn *pc_shm_conn(int sock, const int32_t *shm_fds, int side, pc_status *st);

#endif
