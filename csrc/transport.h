/*
 * transport.h - a byte-stream connection to one peer, behind a small table
 * of functions. The engine only ever calls these; TCP is one implementation
 * and a same-host shared-memory transport can be another. All calls are
 * non-blocking and report readiness through a pollable fd.
 */
#ifndef PYCOLL_TRANSPORT_H
#define PYCOLL_TRANSPORT_H

#include <stdint.h>
#include <sys/uio.h>

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
} pc_conn_ops;

struct pc_conn {
    const pc_conn_ops *ops;
    int fd;   /* poll() on this for POLLIN / POLLOUT */
    int err;  /* errno of the last PC_IO_ERROR */
    void *impl;
};

/* Wraps a connected TCP socket (takes ownership of fd). */
pc_conn *pc_tcp_conn(int fd, int sockbuf_bytes);

#endif
