/* transport_tcp.c - the TCP implementation of pc_conn. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "transport.h"

static long classify(pc_conn *c, ssize_t r) {
    if (r > 0) return (long)r;
    if (r == 0) return PC_IO_CLOSED;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return PC_IO_AGAIN;
    if (errno == ECONNRESET || errno == EPIPE || errno == ENOTCONN || errno == ESHUTDOWN) return PC_IO_CLOSED;
    c->err = errno;
    return PC_IO_ERROR;
}

static long tcp_sendv(pc_conn *c, const struct iovec *iov, int iovcnt) {
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = (struct iovec *)iov;
    m.msg_iovlen = (size_t)iovcnt;
    ssize_t r = sendmsg(c->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r == 0) return PC_IO_AGAIN; /* only for an empty iovec */
    return classify(c, r);
}

static long tcp_recvv(pc_conn *c, const struct iovec *iov, int iovcnt) {
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = (struct iovec *)iov;
    m.msg_iovlen = (size_t)iovcnt;
    return classify(c, recvmsg(c->fd, &m, MSG_DONTWAIT));
}

static long tcp_peek_copy(pc_conn *c, void *dst, uint64_t n) {
    return classify(c, recv(c->fd, dst, n, MSG_PEEK | MSG_DONTWAIT));
}

static void tcp_shutdown(pc_conn *c) {
    if (c->fd >= 0) shutdown(c->fd, SHUT_RDWR);
}

static void tcp_destroy(pc_conn *c) {
    if (c->fd >= 0) close(c->fd);
    free(c);
}

/* designated: the optional shared-memory ops stay NULL */
static const pc_conn_ops tcp_ops = {.sendv = tcp_sendv, .recvv = tcp_recvv, .shutdown = tcp_shutdown,
                                    .destroy = tcp_destroy, .peek_copy = tcp_peek_copy};

pc_conn *pc_tcp_conn(int fd, int sockbuf_bytes) {
    pc_conn *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (sockbuf_bytes > 0) {
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sockbuf_bytes, sizeof sockbuf_bytes);
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sockbuf_bytes, sizeof sockbuf_bytes);
    }
    int fl = fcntl(fd, F_GETFL, 0);
    if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    c->ops = &tcp_ops;
    c->fd = fd;
    c->fd2 = -1;
    return c;
}
