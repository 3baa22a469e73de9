/*
 * shared_peer.h - our read-only mappings of a same-host peer's shared buffers
 * (core/shared_buffers.h), so that a receive reads the bytes its descriptor
 * names with plain loads.
 *
 * A descriptor that names shared memory carries the registration's number,
 * the sender's fd of its memfd, and the range's address and length there.
 * Nothing in it is trusted: the fd we fetch must be the memfd of that
 * registration (its name says so), sealed against shrinking (our mapping can
 * never fault) and at least as long as claimed, and the bytes named must lie
 * inside the range. Anything else: NULL, and the caller reads the usual way.
 */
#ifndef PYCOLL_SHARED_PEER_H
#define PYCOLL_SHARED_PEER_H

#include <stdint.h>

#include "transport.h"

#define PEER_MAPS 16 /* a peer's registrations mapped at once; the least recently used goes */

typedef struct {
    const uint8_t *map; /* NULL: free */
    uint64_t gen, base, len;
    uint64_t used;
} peer_map;

typedef struct {
    peer_map maps[PEER_MAPS];
    uint64_t clock;
    uint64_t bad_gen; /* a registration we could not map: not tried again */
} shared_peer;

/* Where the peer's bytes [from, from + n) lie in our mapping of its registration `gen` (the fd,
 * base and length its descriptor gave), mapping it first if new; NULL if not allowed or a lie. */
const uint8_t *shared_peer_find(shared_peer *p, pc_conn *cn, uint64_t gen, int32_t fd, uint64_t base,
                                uint64_t len, uint64_t from, uint64_t n);
void shared_peer_free(shared_peer *p);

#endif
