/*
 * shared_buffers.h - a caller's buffer that comes back call after call (DDP's
 * gradient buckets) moved onto shared memory, so same-host peers read it with
 * plain loads instead of process_vm_readv.
 *
 * process_vm_readv pins and copies page by page into the reader's memory, so a
 * receive-reduce reads the bytes once through the kernel into a staging buffer
 * and again from there: measured 4.0 ms for 14 MiB against 1.4-2.2 ms reducing
 * straight out of a mapping of the sender's memory (2 ranks on this host). Only
 * shared memory can be mapped by another process, so a buffer seen in two
 * single-copy runs (huge_pages.c tells: its pages stayed where they were) is
 * *moved*: its page-aligned interior is copied into a
 * sealed memfd that is then mapped over it (MAP_FIXED: same addresses, same
 * contents, from then on shared). Its descriptors name the memfd, which peers
 * fetch with pidfd_getfd (the ptrace permission single copy already needs)
 * and map read-only.
 *
 * The range must still be ours when a descriptor names it: each run checks
 * every buffer's registration with PROCMAP_QUERY (Linux 6.11; one ioctl, about
 * 0.6 us): the mapping at the range must still be this memfd. A buffer freed
 * back to the kernel (glibc unmaps big blocks) fails that check and is
 * dropped; one freed inside malloc's heap stays this memfd, which is still
 * correct: the bytes at those addresses are what a descriptor names. An
 * address that gets new memory call after call (a torch.cat per call) is
 * never found reused. Without PROCMAP_QUERY nothing is moved.
 *
 * A forked child (a data loader) must not share these pages with us: its
 * malloc may hand out what is free in them. A fork handler maps every moved
 * range in the child privately (copy-on-write of the memfd), and a dropped
 * range's leftovers are made private the same way in this process.
 *
 * The registry is process-wide (it is about this process's memory, whatever
 * comm sends it) and locked. A move lasts while its memory is ours: it is
 * checked by every run that names it, and all of them by a sweep at each
 * comm's creation and free and every SWEEP_RUNS runs (a buffer freed back to
 * the kernel then lets its memfd go). At most SHARED_MAX moves live at once:
 * past that, buffers stay where they are (evicting would copy buffers used in
 * turn every step).
 */
#ifndef PYCOLL_SHARED_BUFFERS_H
#define PYCOLL_SHARED_BUFFERS_H

#include <stdint.h>

#define SHARED_MIN_BYTES (1u << 20) /* smaller buffers stay where they are: single copy is cheap there */

/* What a descriptor tells a peer about the shared memory its bytes lie in (gen 0: none). */
typedef struct {
    uint64_t gen;  /* this registration's number, unique in this process */
    int32_t fd;    /* our fd of the memfd (the peer fetches it with pidfd_getfd) */
    uint64_t base; /* the range's address here */
    uint64_t len;
} shared_ref;

/* A single-copy run is about to send from these buffers: check the moves covering them (a
 * stale one is dropped) and fill refs[b] for each buffer that lies in shared memory (gen 0
 * otherwise). ours[b] = 1 where buffer b lies on memory we moved (under a move, or left private
 * by one): huge pages can neither be had there nor prove it reused, so such a buffer moves when
 * seen again at the same range, and the huge-page policy must leave it alone. */
void shared_buffers_check(int32_t nbufs, void *const *bufs, const uint64_t *buf_bytes, shared_ref *refs,
                          uint8_t *ours);
/* Moves buf, which the caller found reused (huge_pages.c), onto shared memory and fills *ref;
 * leaves both as they were where it cannot (switched off, no PROCMAP_QUERY, too small, or the
 * slots and overlapping moves are all in runs' use). */
void shared_buffers_move(void *buf, uint64_t bytes, shared_ref *ref);
/* The run that got these refs ended: the moves they name may be dropped again (a move in use is
 * never made private: a peer may have it mapped, and our writes must reach it). */
void shared_buffers_release(int32_t nrefs, shared_ref *refs);

/* Drops the moves whose memory was freed back to the kernel (and with them their memfds): each
 * comm's creation and free calls it, and every SWEEP_RUNS runs do. A move whose memory is still
 * ours stays, whether or not a comm is left (its fd with it). */
void shared_buffers_sweep(void);

/* The switch, the counters and whether this kernel can (pc_shared_buffers_* in pycoll.h). */

/* The memfd name of registration `gen`, which a reader checks the fetched fd against. */
#define SHARED_NAME_FMT "pycoll-shared-%llu"

#endif
