/*
 * transport.c - opens a connection of any kind, so that the engine never
 * names a concrete transport: it asks for a kind (pycoll.h's PC_CONN_*) and
 * gets a pc_conn behind the table of functions in transport.h.
 */
#include "transport.h"

pc_conn *pc_conn_open(int32_t kind, int fd, const int32_t *shm_fds, int side, int sockbuf_bytes, pc_status *st) {
    switch (kind) {
    case PC_CONN_TCP:
        return pc_tcp_conn(fd, sockbuf_bytes);
    case PC_CONN_SHM:
        return pc_shm_conn(fd, shm_fds, side, st);
    default:
        *st = PC_ERR_ARG;
        return NULL;
    }
}
