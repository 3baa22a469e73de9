/*
 * window.c - result windows (see window.h): our own memfd and our mappings
 * of the peers' ones.
 *
 * Nothing read from a peer is trusted: the fd we fetch must be a memfd
 * sealed against shrinking (so our mapping can never fault), at least as
 * long as the peer says, and a descriptor's range must lie inside it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "window.h"

#define WINDOW_UNIT (2u << 20)     /* sizes round up to this: fewer new windows as calls grow */
#define WINDOW_MAX (1ull << 40)    /* a peer's claim beyond this is not believed */

static uint64_t next_gen; /* generations of this process's windows, from 1 */

void window_own_init(window_own *w) {
    memset(w, 0, sizeof *w);
    w->fd = -1;
}

void window_own_free(window_own *w) {
    if (w->base) munmap(w->base, (size_t)w->len);
    if (w->fd >= 0) close(w->fd);
    window_own_init(w);
}

int window_own_ensure(window_own *w, uint64_t need) {
    if (w->base && w->len >= need) return 0;
    if (need == 0 || need > WINDOW_MAX) return -EINVAL;
    uint64_t len = (need + WINDOW_UNIT - 1) & ~(uint64_t)(WINDOW_UNIT - 1);
    int fd = memfd_create("pycoll-window", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return -errno;
    if (ftruncate(fd, (off_t)len) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    void *m = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        int e = errno;
        close(fd);
        return -e;
    }
    madvise(m, (size_t)len, MADV_DONTFORK); /* a forked child (a data loader) does not keep it */
    /* The old window's pages stay alive in the peers' mappings for as long as they read them. */
    window_own_free(w);
    w->base = m;
    w->len = len;
    w->fd = fd;
    w->gen = __atomic_add_fetch(&next_gen, 1, __ATOMIC_RELAXED);
    return 0;
}

void window_own_publish(const window_own *w, pc_conn *cn) {
    if (w->base && cn->ops->win_publish) cn->ops->win_publish(cn, w->fd, (uint64_t)(uintptr_t)w->base, w->len, w->gen);
}

void window_peer_free(window_peer *p) {
    if (p->map) munmap((void *)p->map, (size_t)p->len);
    memset(p, 0, sizeof *p);
}

/* Maps the peer's published window: 0, or -errno (then nothing changed). */
static int map_peer(window_peer *p, pc_conn *cn) {
    uint64_t gen, base, len;
    int fd = cn->ops->win_fetch(cn, &gen, &base, &len);
    if (fd < 0) return fd; /* (the caller remembers the generation that failed) */
    struct stat sb;
    int seals = fcntl(fd, F_GET_SEALS);
    int ok = seals >= 0 && (seals & F_SEAL_SHRINK) && fstat(fd, &sb) == 0 && len > 0 && len <= WINDOW_MAX &&
             (uint64_t)sb.st_size >= len && base + len > base;
    void *m = ok ? mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
    close(fd);
    if (m == MAP_FAILED) {
        p->bad_gen = gen;
        return ok ? -ENOMEM : -EPROTO;
    }
    madvise(m, (size_t)len, MADV_DONTFORK);
    window_peer_free(p);
    p->map = m;
    p->len = len;
    p->base = base;
    p->gen = gen;
    return 0;
}

const uint8_t *window_peer_find(window_peer *p, pc_conn *cn, uint64_t from, uint64_t n) {
    if (!cn->ops->win_gen || !cn->ops->win_fetch) return NULL;
    /* The peer published its window before it sent the descriptor that names it. */
    uint64_t gen = cn->ops->win_gen(cn);
    if (!gen) return NULL;
    if (gen != p->gen) {
        if (gen == p->bad_gen) return NULL;
        int e = map_peer(p, cn);
        if (e != 0 && e != -EAGAIN) p->bad_gen = gen; /* refused (no pidfd_getfd, not allowed): once */
        if (e != 0 || p->gen != gen) return NULL;
    }
    if (from < p->base || n > p->len || from - p->base > p->len - n) return NULL;
    return p->map + (from - p->base);
}
