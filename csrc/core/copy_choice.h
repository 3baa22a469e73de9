/*
 * copy_choice.h - which way a run's big same-host payloads go: single copy or the rings.
 *
 * Single copy (the reader copies out of the sender's memory) moves each byte once, but every
 * transfer is a rendezvous: the reader reads only after the sender posted, and the sender's
 * send ends only when the reader has read. Where the ranks run at once (an idle host, or load
 * that shares their session) that costs nothing and halves the bytes. Where they seldom run at
 * once (a job squeezed by other jobs' sessions: measured 2 ranks, a DDP step's 28 + 4 MiB
 * all-reduces, 41-50 ms single-copied against 15 ms through the rings) each rendezvous waits
 * for the peer's next turn on a core,
 * while a ring send lands and returns. No fixed rule tells the two apart, so each comm learns
 * it per kind of run and size class from its own runs: it keeps the time per byte of the preferred way's last
 * 8 runs, runs the other way now and then (a probe: 3 runs in a row, at gaps that double from
 * 32 calls to 512), and switches when the probe's median is clearly below the recent runs'
 * (medians: on a loaded host one run in a few is descheduled and takes several times longer).
 *
 * Probes fall on the same calls on every rank (they count calls, not time, and the schedule
 * does not depend on what a rank measured), so a probe measures the group running the other
 * way, not a mix. A rank that decides otherwise than its peers costs only speed: a receiver
 * takes either kind of frame.
 */
#ifndef PYCOLL_COPY_CHOICE_H
#define PYCOLL_COPY_CHOICE_H

#include <stdint.h>

#define COPY_CHOICE_CLASSES 48 /* size classes: one per power of two of the run's bytes */
/* Kinds of run, learned apart: a size's all-gather and reduce-scatter (FSDP's pair, one after
 * the other) cost different times per byte, and one window mixing them biases every probe. */
enum { COPY_RUN_EQUAL, COPY_RUN_IN_LARGER, COPY_RUN_OUT_LARGER, COPY_RUN_REMAPPED, COPY_CHOICE_KINDS };

#define COPY_CHOICE_WINDOW 8 /* recent runs of the preferred way that it is judged by */
#define COPY_CHOICE_PROBE 3  /* runs of the other way per probe */

typedef struct {
    uint32_t calls;      /* runs of this class so far */
    uint32_t next_probe; /* the call at which the next probe starts */
    uint32_t gap;        /* calls between probes */
    uint8_t single;      /* the preferred way: 1 single copy, 0 the rings */
    uint8_t seen, probed; /* samples in recent[] (up to the window), in probe[] */
    uint8_t next;        /* where the next sample goes in recent[] */
    float recent[COPY_CHOICE_WINDOW]; /* ns per byte of the preferred way's last runs */
    float probe[COPY_CHOICE_PROBE];   /* ns per byte of the current probe's runs */
} copy_class;

typedef struct {
    int adapt;           /* 0: always single copy (the learner is off) */
    copy_class cls[COPY_CHOICE_KINDS][COPY_CHOICE_CLASSES];
    uint64_t runs[2];    /* runs sent each way (index: single), for observability */
} copy_choice;

void copy_choice_init(copy_choice *c);
/* The way for the next run of `kind` (COPY_RUN_*) over `bytes` (1: single copy); counts the call. */
int copy_choice_pick(copy_choice *c, int kind, uint64_t bytes);
/* What that run took (call only for runs that succeeded). */
void copy_choice_learn(copy_choice *c, int kind, uint64_t bytes, int single, double seconds);

#endif
