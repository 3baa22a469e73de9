/*
 * window.h - result windows: where a preserving all-reduce leaves its reduced
 * chunk for same-host peers to copy straight into their caller's buffer.
 *
 * A preserve_input all-reduce must not write the caller's buffer before every
 * transfer has succeeded. Without windows each rank reads its peers' reduced
 * chunks into private scratch during the body and copies all of scratch out
 * in the tail: every byte is copied twice. With windows each rank reduces its
 * own chunk into a memfd that its peers map; the body only tells them where
 * the chunk lies, and after the commit point each rank's tail copies every
 * chunk from the mappings into its output once. A peer that dies after its
 * body finished cannot take its chunk along: the pages live on in our
 * mapping.
 *
 * Reuse rule (the plan keeps it, plan_allpairs.c): a rank writes its window
 * only after every peer has arrived in the same call, so every peer has left
 * the call before, tail included, and nobody still reads the old contents.
 * A window never changes size (sealed); growth makes a new one with a new
 * generation, which peers notice and map anew.
 */
#ifndef PYCOLL_WINDOW_H
#define PYCOLL_WINDOW_H

#include <stdint.h>

#include "transport.h"

typedef struct {
    uint8_t *base; /* our mapping (NULL: none yet) */
    uint64_t len;
    int fd;        /* kept open: peers fetch it with pidfd_getfd */
    uint64_t gen;  /* published with it; changes with every new window */
} window_own;

typedef struct {
    const uint8_t *map; /* our read-only mapping of the peer's window (NULL: none) */
    uint64_t len;
    uint64_t base;      /* the window's address in the peer (what its descriptors name) */
    uint64_t gen;       /* the generation we mapped */
    uint64_t bad_gen;   /* a generation we could not map: not tried again */
} window_peer;

void window_own_init(window_own *w);
/* A window of at least `need` bytes (a new one if the current is smaller): 0 or -errno. */
int window_own_ensure(window_own *w, uint64_t need);
/* Tells the peer on `cn` about our current window. */
void window_own_publish(const window_own *w, pc_conn *cn);
void window_own_free(window_own *w);

/* Where the peer's bytes [from, from + n) (addresses in the peer) lie in our mapping of its
 * window, mapping it first if it is new; NULL where they are not in its published window or it
 * cannot be mapped (the caller then reads them the usual way). */
const uint8_t *window_peer_find(window_peer *p, pc_conn *cn, uint64_t from, uint64_t n);
void window_peer_free(window_peer *p);

#endif
