/*
 * transport.c - opens a connection of any kind, so that the engine never
 * names a concrete transport: it asks for a kind (pycoll.h's PC_CONN_*) and
 * gets a pc_conn behind the table of functions in transport.h; and says
 * whether a conn's peer shares this host (the engine's waiting policy).
 */
#include "transport.h"

#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

pc_conn *pc_conn_open(int32_t kind, int fd, const pc_conn_args *a, pc_status *st) {
    switch (kind) {
    case PC_CONN_TCP:
        *st = PC_ERR_NOMEM;
        return pc_tcp_conn(fd, a->sockbuf_bytes);
    case PC_CONN_SHM:
        return pc_shm_conn(fd, a->shm_fds, a->side, st);
    case PC_CONN_TLS:
        return pc_tls_conn(fd, a->sockbuf_bytes, a->side == 0, a->psk, a->psk_len, a->timeout_s, st);
    default:
        *st = PC_ERR_ARG;
        return NULL;
    }
}

int pc_conn_same_host(const pc_conn *c) {
    if (c->ops->arm) return 1; /* only shared-memory conns have arm */
    struct sockaddr_storage a, b;
    socklen_t la = sizeof a, lb = sizeof b;
    if (c->fd < 0 || getsockname(c->fd, (struct sockaddr *)&a, &la) != 0 ||
        getpeername(c->fd, (struct sockaddr *)&b, &lb) != 0 || a.ss_family != b.ss_family)
        return 0;
    if (a.ss_family == AF_INET)
        return ((struct sockaddr_in *)&a)->sin_addr.s_addr == ((struct sockaddr_in *)&b)->sin_addr.s_addr;
    if (a.ss_family == AF_INET6)
        return memcmp(&((struct sockaddr_in6 *)&a)->sin6_addr, &((struct sockaddr_in6 *)&b)->sin6_addr, 16) == 0;
    return a.ss_family == AF_UNIX;
}
