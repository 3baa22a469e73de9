/* Result windows (csrc/core/window.c) against a fake peer connection whose "peer" is this
 * process: our own window is mapped a second time the way a peer maps it, and the checks on
 * what a peer claims (sealed, as long as it says, ranges inside it) are driven by lies. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "window.h"

static int failures;
#define CHECK(cond)                                                       \
    do {                                                                  \
        if (!(cond)) {                                                    \
            printf("FAIL line %d: %s\n", __LINE__, #cond);                \
            failures++;                                                   \
        }                                                                 \
    } while (0)

/* what the fake peer published */
static struct {
    int fd;
    uint64_t gen, base, len;
    int fetches;
} pub;

static uint64_t fake_gen(pc_conn *c) {
    (void)c;
    return pub.gen;
}

static int fake_fetch(pc_conn *c, uint64_t *gen, uint64_t *base, uint64_t *len) {
    (void)c;
    pub.fetches++;
    if (!pub.gen) return -2;
    *gen = pub.gen;
    *base = pub.base;
    *len = pub.len;
    return dup(pub.fd);
}

static void publish(int fd, uint64_t gen, uint64_t base, uint64_t len) {
    pub.fd = fd, pub.gen = gen, pub.base = base, pub.len = len;
}

int main(void) {
    pc_conn_ops ops;
    memset(&ops, 0, sizeof ops);
    ops.win_gen = fake_gen;
    ops.win_fetch = fake_fetch;
    pc_conn conn;
    memset(&conn, 0, sizeof conn);
    conn.ops = &ops;

    /* our own window: sealed, at least as big as asked, a new generation only when it grows */
    window_own w;
    window_own_init(&w);
    CHECK(window_own_ensure(&w, 5u << 20) == 0);
    CHECK(w.base && w.len >= (5u << 20) && w.fd >= 0 && w.gen > 0);
    int seals = fcntl(w.fd, F_GET_SEALS);
    CHECK(seals >= 0 && (seals & F_SEAL_SHRINK) && (seals & F_SEAL_GROW));
    uint64_t gen1 = w.gen;
    CHECK(window_own_ensure(&w, 1u << 20) == 0 && w.gen == gen1);
    for (uint64_t i = 0; i < w.len; i++) w.base[i] = (uint8_t)(i * 7 + 1);

    /* nothing published: no fetch, no alias */
    window_peer p;
    memset(&p, 0, sizeof p);
    publish(-1, 0, 0, 0);
    CHECK(window_peer_find(&p, &conn, 1000, 10) == NULL && pub.fetches == 0);

    /* mapped as a peer maps it: another mapping of the same bytes */
    uint64_t base = (uint64_t)(uintptr_t)w.base;
    publish(w.fd, w.gen, base, w.len);
    const uint8_t *at = window_peer_find(&p, &conn, base + 4096, 1000);
    CHECK(at && at != w.base + 4096 && memcmp(at, w.base + 4096, 1000) == 0);
    w.base[5000] ^= 0xff; /* a later write shows through (shared, not a copy) */
    CHECK(at && at[5000 - 4096] == w.base[5000]);
    CHECK(pub.fetches == 1);
    CHECK(window_peer_find(&p, &conn, base, w.len) != NULL && pub.fetches == 1); /* mapped once */

    /* ranges outside the window are refused, overflow included */
    CHECK(window_peer_find(&p, &conn, base - 1, 10) == NULL);
    CHECK(window_peer_find(&p, &conn, base + w.len - 10, 11) == NULL);
    CHECK(window_peer_find(&p, &conn, base + w.len, 0) != NULL); /* empty, at the end */
    CHECK(window_peer_find(&p, &conn, UINT64_MAX - 5, 10) == NULL);
    CHECK(window_peer_find(&p, &conn, base + 16, UINT64_MAX) == NULL);

    /* growth: a new window, a new generation; the peer maps the new one */
    CHECK(window_own_ensure(&w, 9u << 20) == 0 && w.gen != gen1 && w.len >= (9u << 20));
    memset(w.base, 0x5a, w.len);
    base = (uint64_t)(uintptr_t)w.base;
    publish(w.fd, w.gen, base, w.len);
    at = window_peer_find(&p, &conn, base + (8u << 20), 64);
    CHECK(at && at[0] == 0x5a && at[63] == 0x5a && pub.fetches == 2);

    /* lies: a length past the memfd's end (our mapping would fault there) */
    window_peer q;
    memset(&q, 0, sizeof q);
    publish(w.fd, w.gen + 100, base, w.len + 4096);
    int before = pub.fetches;
    CHECK(window_peer_find(&q, &conn, base, 64) == NULL);
    CHECK(window_peer_find(&q, &conn, base, 64) == NULL && pub.fetches == before + 1); /* not tried again */
    /* an unsealed memfd (it could shrink under our mapping) */
    int loose = memfd_create("not-a-window", MFD_CLOEXEC);
    CHECK(loose >= 0 && ftruncate(loose, 1 << 20) == 0);
    publish(loose, w.gen + 200, 1 << 30, 1 << 20);
    CHECK(window_peer_find(&q, &conn, (1 << 30) + 8, 8) == NULL && q.map == NULL);
    /* a zero length, and an address range that wraps */
    publish(w.fd, w.gen + 300, base, 0);
    CHECK(window_peer_find(&q, &conn, base, 0) == NULL && q.map == NULL);
    publish(w.fd, w.gen + 400, UINT64_MAX - 4095, 8192);
    CHECK(window_peer_find(&q, &conn, UINT64_MAX - 4095, 8) == NULL && q.map == NULL);
    /* an fd we cannot fetch (a kernel without pidfd_getfd, a peer we may not read): asked once */
    publish(-1, w.gen + 500, base, 4096);
    before = pub.fetches;
    CHECK(window_peer_find(&q, &conn, base, 8) == NULL && q.map == NULL);
    CHECK(window_peer_find(&q, &conn, base, 8) == NULL && pub.fetches == before + 1);

    window_peer_free(&p);
    window_peer_free(&q);
    window_own_free(&w);
    close(loose);
    if (failures) return 1;
    printf("OK\n");
    return 0;
}
