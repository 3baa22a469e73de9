/*
 * shared_peer.c - mapping a peer's shared buffers (see shared_peer.h).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "shared_buffers.h"
#include "shared_peer.h"

#define SHARED_PEER_MAX (1ull << 40) /* a claim beyond this is not believed */

void shared_peer_free(shared_peer *p) {
    for (int i = 0; i < PEER_MAPS; i++)
        if (p->maps[i].map) munmap((void *)p->maps[i].map, (size_t)p->maps[i].len);
    memset(p, 0, sizeof *p);
}

/* The fetched fd is the memfd of registration `gen`: its name says so. */
static int named_as(int fd, uint64_t gen) {
    char path[64], got[128], want[96];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t k = readlink(path, got, sizeof got - 1);
    if (k <= 0) return 0;
    got[k] = 0;
    int w = snprintf(want, sizeof want, "/memfd:" SHARED_NAME_FMT " (deleted)", (unsigned long long)gen);
    return w > 0 && strcmp(got, want) == 0;
}

static const uint8_t *map_new(pc_conn *cn, uint64_t gen, int32_t rfd, uint64_t len) {
    int fd = cn->ops->fd_fetch(cn, rfd);
    if (fd < 0) return NULL;
    struct stat sb;
    int seals = fcntl(fd, F_GET_SEALS);
    int ok = named_as(fd, gen) && seals >= 0 && (seals & F_SEAL_SHRINK) && fstat(fd, &sb) == 0 &&
             (uint64_t)sb.st_size >= len;
    void *m = ok ? mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0) : MAP_FAILED;
    close(fd);
    return m == MAP_FAILED ? NULL : m;
}

const uint8_t *shared_peer_find(shared_peer *p, pc_conn *cn, uint64_t gen, int32_t fd, uint64_t base,
                                uint64_t len, uint64_t from, uint64_t n) {
    if (!gen || !cn->ops->fd_fetch || fd < 0 || len == 0 || len > SHARED_PEER_MAX || base + len < base ||
        from < base || n > len || from - base > len - n)
        return NULL;
    peer_map *lru = &p->maps[0];
    for (int i = 0; i < PEER_MAPS; i++) {
        peer_map *m = &p->maps[i];
        if (m->map && m->gen == gen) {
            if (m->base != base || m->len != len) return NULL; /* the same registration, told otherwise */
            m->used = ++p->clock;
            return m->map + (from - base);
        }
        if (!m->map || (lru->map && m->used < lru->used)) lru = m;
    }
    if (gen == p->bad_gen) return NULL;
    const uint8_t *map = map_new(cn, gen, fd, len);
    if (!map) {
        p->bad_gen = gen;
        return NULL;
    }
    if (lru->map) munmap((void *)lru->map, (size_t)lru->len);
    *lru = (peer_map){map, gen, base, len, ++p->clock};
    return map + (from - base);
}
