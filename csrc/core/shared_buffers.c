/*
 * shared_buffers.c - moving reused single-copy buffers onto shared memory
 * (see shared_buffers.h).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pycoll.h"
#include "shared_buffers.h"

#define SHARED_MAX 256        /* moved ranges at once (DDP buckets of 6 GiB of gradients at 25 MiB);
                                 when full, nothing more moves (see free_slot) */
#define SWEEP_RUNS 1024       /* runs between looks at every move (see sweep) */

/* PROCMAP_QUERY (linux/fs.h from 6.11), spelled out for older headers. */
struct pc_procmap_query {
    uint64_t size, query_flags, query_addr, vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode;
    uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
    uint64_t vma_name_addr, build_id_addr;
};
#define PC_PROCMAP_QUERY _IOWR('f', 17, struct pc_procmap_query)
#define PC_VMA_SHARED 0x08
#define PC_QUERY_COVERING_OR_NEXT 0x10

typedef struct {
    uintptr_t start, end; /* page-aligned */
    int fd;
    uint64_t ino;
    uint32_t dev_major, dev_minor;
    uint64_t gen;
    uint64_t used_run;    /* 0: free slot */
    int32_t users;        /* runs in flight that named it: it is not dropped under them */
} moved_range;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static moved_range moved[SHARED_MAX];
/* Buffers seen over memory we moved before (malloc gives freed moved memory to new buffers):
 * huge pages never prove such a buffer reused (shared memory has none here), so being seen
 * again at the same range does; a fresh buffer per call there costs one move, not one per call,
 * since that memory stays ours. */
#define SIGHTINGS 64
static struct {
    uintptr_t start, end;
    uint64_t run;
} sightings[SIGHTINGS];
/* Memfds whose leftovers make_private mapped privately: memory of ours that is neither a move
 * nor anonymous (no huge pages there either), judged like memory under a move. */
#define RETIRED 64
static struct {
    uint64_t ino;
    uint32_t dev_major, dev_minor;
} retired[RETIRED];
static int n_retired, next_retired;
static uint64_t runs, next_gen, n_moved, n_dropped;
static int enabled = 1;
static int maps_fd = -1; /* /proc/self/maps; -2: PROCMAP_QUERY unusable here */
static pid_t maps_pid;

/* The mapping that covers addr (or the next one, with covering_or_next): 0, or -1 where none. */
static int query(uintptr_t addr, int covering_or_next, struct pc_procmap_query *q) {
    if (maps_fd == -2) return -1;
    if (maps_fd >= 0 && maps_pid != getpid()) { /* a forked child: that fd shows the parent */
        close(maps_fd);
        maps_fd = -1;
    }
    if (maps_fd < 0) {
        maps_fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
        maps_pid = getpid();
        if (maps_fd < 0) {
            maps_fd = -2;
            return -1;
        }
    }
    memset(q, 0, sizeof *q);
    q->size = sizeof *q;
    q->query_addr = addr;
    q->query_flags = covering_or_next ? PC_QUERY_COVERING_OR_NEXT : 0;
    if (ioctl(maps_fd, PC_PROCMAP_QUERY, q) == 0) return 0;
    if (errno == ENOTTY || errno == EINVAL) { /* no PROCMAP_QUERY on this kernel */
        close(maps_fd);
        maps_fd = -2;
    }
    return -1;
}

int32_t pc_shared_buffers_available(void) {
    struct pc_procmap_query q;
    pthread_mutex_lock(&lock);
    int ok = query((uintptr_t)&q, 0, &q) == 0;
    pthread_mutex_unlock(&lock);
    return ok;
}

/* The mapping q is a shared mapping of m's memfd. */
static int shares_memfd_of(const struct pc_procmap_query *q, const moved_range *m) {
    return (q->vma_flags & PC_VMA_SHARED) && q->inode == m->ino && q->dev_major == m->dev_major &&
           q->dev_minor == m->dev_minor;
}

/* m's range is moved, or overlaps [s, e). */
static int overlaps(const moved_range *m, uintptr_t s, uintptr_t e) {
    return m->used_run && m->start < e && s < m->end;
}

/* Our shared mapping of m's memfd covers all of m's range, at the offsets we gave it. */
static int still_ours(const moved_range *m) {
    struct pc_procmap_query q;
    return query(m->start, 0, &q) == 0 && shares_memfd_of(&q, m) && q.vma_start <= m->start &&
           q.vma_end >= m->end && q.vma_offset + (m->start - q.vma_start) == 0;
}

/* Whatever of m's range is still our shared mapping of its memfd becomes a private mapping of it
 * (same bytes, copy-on-write from now on), so that nobody else's pages are ever ours; then m is
 * forgotten. */
static void make_private(moved_range *m) {
    uintptr_t at = m->start;
    uint64_t kept = 0; /* m's inode once recorded in retired[] */
    struct pc_procmap_query q;
    for (int guard = 0; at < m->end && guard < 1024; guard++) {
        if (query(at, 1, &q) != 0 || q.vma_start >= m->end) break;
        uintptr_t s = q.vma_start > at ? q.vma_start : at, e = q.vma_end < m->end ? q.vma_end : m->end;
        if (shares_memfd_of(&q, m) &&
            mmap((void *)s, e - s, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, m->fd,
                 (off_t)(q.vma_offset + (s - q.vma_start))) != MAP_FAILED && kept != m->ino) {
            kept = m->ino;
            retired[next_retired].ino = m->ino;
            retired[next_retired].dev_major = m->dev_major;
            retired[next_retired].dev_minor = m->dev_minor;
            next_retired = (next_retired + 1) % RETIRED;
            if (n_retired < RETIRED) n_retired++;
        }
        at = e > at ? e : at + 4096;
    }
    close(m->fd);
    memset(m, 0, sizeof *m);
    m->fd = -1;
}

/* A forked child keeps no shared pages of ours (see shared_buffers.h). */
static void fork_prepare(void) { pthread_mutex_lock(&lock); }
static void fork_parent(void) { pthread_mutex_unlock(&lock); }
static void fork_child(void) {
    for (int i = 0; i < SHARED_MAX; i++)
        if (moved[i].used_run) make_private(&moved[i]);
    pthread_mutex_unlock(&lock);
}
static void init_once(void) {
    for (int i = 0; i < SHARED_MAX; i++) moved[i].fd = -1;
    const char *env = getenv("PYCOLL_SHARED_BUFFERS"); /* 0: off for this process */
    if (env && env[0] == '0' && !env[1]) enabled = 0;
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}

/* Moves [s, e) onto a new memfd mapped over it: 0, or -1 (nothing changed). */
static int move_range(uintptr_t s, uintptr_t e, moved_range *m) {
    uint64_t len = e - s, gen = next_gen + 1;
    char name[64];
    snprintf(name, sizeof name, SHARED_NAME_FMT, (unsigned long long)gen);
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return -1;
    struct stat sb;
    void *tmp = MAP_FAILED;
    if (ftruncate(fd, (off_t)len) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0 ||
        fstat(fd, &sb) != 0 ||
        (tmp = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0)) == MAP_FAILED) {
        close(fd);
        return -1;
    }
    memcpy(tmp, (const void *)s, len);
    /* mremap moves the filled pages over the buffer in one step; where it fails the buffer is
     * left as it was (the checks come before the old mapping goes) */
    if (mremap(tmp, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)s) == MAP_FAILED) {
        munmap(tmp, len);
        close(fd);
        return -1;
    }
    next_gen = gen;
    *m = (moved_range){s, e, fd, (uint64_t)sb.st_ino, 0, 0, gen, runs, 0};
    struct pc_procmap_query q;
    if (query(s, 0, &q) == 0) {
        m->dev_major = q.dev_major;
        m->dev_minor = q.dev_minor;
    }
    n_moved++;
    return 0;
}

static int retired_inode(const struct pc_procmap_query *q) {
    for (int i = 0; i < n_retired; i++)
        if (retired[i].ino == q->inode && retired[i].dev_major == q->dev_major && retired[i].dev_minor == q->dev_minor)
            return 1;
    return 0;
}

/* [s, e) lies, in part or whole, on memory of ours: under a move, or left private by one. */
static int over_our_memory(uintptr_t s, uintptr_t e) {
    for (int i = 0; i < SHARED_MAX; i++)
        if (overlaps(&moved[i], s, e)) return 1;
    struct pc_procmap_query q;
    uintptr_t at = s;
    for (int guard = 0; n_retired && at < e && guard < 8; guard++) { /* the mappings across it */
        if (query(at, 1, &q) != 0 || q.vma_start >= e) break;
        if (!(q.vma_flags & PC_VMA_SHARED) && q.inode && retired_inode(&q)) return 1;
        at = q.vma_end > at ? q.vma_end : at + 4096;
    }
    return 0;
}

/* Seen [s, e) now: 1 if it was seen in an earlier run too. */
static int seen_before(uintptr_t s, uintptr_t e) {
    int lru = 0;
    for (int i = 0; i < SIGHTINGS; i++) {
        if (sightings[i].start == s && sightings[i].end == e && sightings[i].run) {
            int before = sightings[i].run < runs;
            sightings[i].run = runs;
            return before;
        }
        if (sightings[i].run < sightings[lru].run) lru = i;
    }
    sightings[lru].start = s;
    sightings[lru].end = e;
    sightings[lru].run = runs;
    return 0;
}

static moved_range *covering(uintptr_t s, uintptr_t e) {
    for (int i = 0; i < SHARED_MAX; i++)
        if (moved[i].used_run && moved[i].start <= s && moved[i].end >= e) return &moved[i];
    return NULL;
}

/* Drops the moves that overlap [s, e) (a bigger buffer over a moved one): 0, or -1 where one is
 * in a run's use (then nothing is dropped). */
static int drop_overlapping(uintptr_t s, uintptr_t e) {
    for (int i = 0; i < SHARED_MAX; i++)
        if (overlaps(&moved[i], s, e) && moved[i].users) return -1;
    for (int i = 0; i < SHARED_MAX; i++)
        if (overlaps(&moved[i], s, e)) {
            make_private(&moved[i]);
            n_dropped++;
        }
    return 0;
}

static void sweep(void);

/* A free slot, or a slot whose move's memory is no longer ours (freed since); NULL if every
 * slot holds a live move. A full table moves nothing more rather than evict: with more reused
 * buffers than slots (DDP's buckets, used in turn) every eviction would come back as a move, a
 * copy of the buffer, each step; the buffers past SHARED_MAX stay single-copied as before. */
static moved_range *free_slot(void) {
    for (int i = 0; i < SHARED_MAX; i++)
        if (!moved[i].used_run) return &moved[i];
    sweep();
    for (int i = 0; i < SHARED_MAX; i++)
        if (!moved[i].used_run) return &moved[i];
    return NULL;
}

/* Moves [s, e) (dropping the moves it overlaps) into a free slot: the move, or NULL where it
 * cannot (switched off, no PROCMAP_QUERY, an overlapping move in use, no slot, a failed move). */
static moved_range *move_into_slot(uintptr_t s, uintptr_t e) {
    if (!enabled || maps_fd == -2 || e <= s || drop_overlapping(s, e) != 0) return NULL;
    moved_range *slot = free_slot();
    return slot && move_range(s, e, slot) == 0 ? slot : NULL;
}

static void page_interior(void *buf, uint64_t bytes, uintptr_t *s, uintptr_t *e) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    *s = ((uintptr_t)buf + page - 1) & ~(page - 1);
    *e = ((uintptr_t)buf + bytes) & ~(page - 1);
}

/* A run names m: it stays until the run releases it (shared_buffers_release). */
static void fill_ref(moved_range *m, shared_ref *ref) {
    m->used_run = runs;
    m->users++;
    *ref = (shared_ref){m->gen, m->fd, m->start, m->end - m->start};
}

/* Drops every move whose memory is no longer ours (freed back to the kernel), so that its memfd
 * goes too; the lock is held. */
static void sweep(void) {
    for (int i = 0; i < SHARED_MAX; i++)
        if (moved[i].used_run && !moved[i].users && !still_ours(&moved[i])) {
            make_private(&moved[i]);
            n_dropped++;
        }
}

void shared_buffers_check(int32_t nbufs, void *const *bufs, const uint64_t *buf_bytes, shared_ref *refs,
                          uint8_t *ours) {
    pthread_once(&once, init_once);
    pthread_mutex_lock(&lock);
    if (++runs % SWEEP_RUNS == 0) sweep();
    for (int32_t b = 0; b < nbufs; b++) {
        memset(&refs[b], 0, sizeof refs[b]);
        ours[b] = 0;
        if (!bufs[b] || buf_bytes[b] < SHARED_MIN_BYTES) continue;
        uintptr_t s, e;
        page_interior(bufs[b], buf_bytes[b], &s, &e);
        moved_range *m = e > s ? covering(s, e) : NULL;
        if (m && m->used_run != runs && !still_ours(m)) { /* freed and given new memory since */
            make_private(m);
            n_dropped++;
            m = NULL;
        }
        ours[b] = m != NULL || (e > s && over_our_memory(s, e));
        if (!m && ours[b] && seen_before(s, e)) m = move_into_slot(s, e);
        if (m) fill_ref(m, &refs[b]);
    }
    pthread_mutex_unlock(&lock);
}

void shared_buffers_move(void *buf, uint64_t bytes, shared_ref *ref) {
    pthread_once(&once, init_once);
    pthread_mutex_lock(&lock);
    uintptr_t s, e;
    page_interior(buf, bytes, &s, &e);
    moved_range *m = e > s ? covering(s, e) : NULL; /* moved already (IN and OUT of one run) */
    if (!m && bytes >= SHARED_MIN_BYTES) m = move_into_slot(s, e);
    if (m && !ref->gen) fill_ref(m, ref);
    pthread_mutex_unlock(&lock);
}

void shared_buffers_release(int32_t nrefs, shared_ref *refs) {
    pthread_mutex_lock(&lock);
    for (int32_t b = 0; b < nrefs; b++) {
        for (int i = 0; refs[b].gen && i < SHARED_MAX; i++)
            if (moved[i].used_run && moved[i].gen == refs[b].gen && moved[i].users > 0) moved[i].users--;
        refs[b].gen = 0;
    }
    pthread_mutex_unlock(&lock);
}

void shared_buffers_sweep(void) {
    pthread_once(&once, init_once);
    pthread_mutex_lock(&lock);
    sweep();
    pthread_mutex_unlock(&lock);
}

void pc_shared_buffers_stats(uint64_t *moved_out, uint64_t *dropped, int32_t *live) {
    pthread_mutex_lock(&lock);
    int32_t n = 0;
    for (int i = 0; i < SHARED_MAX; i++) n += moved[i].used_run != 0;
    if (moved_out) *moved_out = n_moved;
    if (dropped) *dropped = n_dropped;
    if (live) *live = n;
    pthread_mutex_unlock(&lock);
}

void pc_shared_buffers_enable(int32_t on) {
    pthread_mutex_lock(&lock);
    enabled = on != 0;
    pthread_mutex_unlock(&lock);
}
