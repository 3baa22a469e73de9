/*
 * copy_choice.c - single copy or the rings, learned per size class (copy_choice.h).
 */
#include "copy_choice.h"

#include <string.h>

#define FIRST_PROBE 5     /* the first probe: after a warm-up run and a few measured ones */
#define MIN_GAP 32        /* calls between the first probes ... */
#define MAX_GAP 512       /* ... doubling up to this (a probe then costs 0.6 % of the calls) */
#define MIN_SEEN 3        /* recent runs needed to judge a probe */
/* A switch needs the probe's median under this share of the recent runs' median. To the rings
 * only when they are clearly faster: they copy every byte twice (more CPU, more memory traffic)
 * and on a loaded host near-ties are noise; back to single copy as soon as it is ahead. */
#define TO_RINGS_BELOW 0.5f
#define TO_SINGLE_BELOW 0.9f

void copy_choice_init(copy_choice *c) {
    memset(c, 0, sizeof *c);
    c->adapt = 1;
    for (int kind = 0; kind < COPY_CHOICE_KINDS; kind++)
        for (int k = 0; k < COPY_CHOICE_CLASSES; k++) {
            c->cls[kind][k].single = 1;
            c->cls[kind][k].next_probe = FIRST_PROBE;
            c->cls[kind][k].gap = MIN_GAP;
        }
}

static copy_class *class_of(copy_choice *c, int kind, uint64_t bytes) {
    int k = 0;
    while (bytes > 1 && k < COPY_CHOICE_CLASSES - 1) {
        bytes >>= 1;
        k++;
    }
    return &c->cls[kind >= 0 && kind < COPY_CHOICE_KINDS ? kind : COPY_RUN_EQUAL][k];
}

static int probing(const copy_class *k, uint32_t call) {
    return call >= k->next_probe && call < k->next_probe + COPY_CHOICE_PROBE;
}

static float median(const float *v, int n) {
    float s[COPY_CHOICE_WINDOW];
    memcpy(s, v, sizeof(float) * (size_t)n);
    for (int i = 1; i < n; i++) /* insertion sort: n <= 8 */
        for (int j = i; j > 0 && s[j - 1] > s[j]; j--) {
            float t = s[j];
            s[j] = s[j - 1];
            s[j - 1] = t;
        }
    return n % 2 ? s[n / 2] : 0.5f * (s[n / 2 - 1] + s[n / 2]);
}

/* A probe just ended (call is the first after it): keep or switch, and schedule the next.
 * The schedule depends only on the call count, so it stays the same on every rank. */
static void end_probe(copy_class *k) {
    if (k->probed && k->seen >= MIN_SEEN &&
        median(k->probe, k->probed) < (k->single ? TO_RINGS_BELOW : TO_SINGLE_BELOW) * median(k->recent, k->seen)) {
        k->single = !k->single;
        memcpy(k->recent, k->probe, sizeof(float) * k->probed); /* the new way's runs so far */
        k->seen = k->probed;
        k->next = k->probed % COPY_CHOICE_WINDOW;
    }
    k->probed = 0;
    k->next_probe += COPY_CHOICE_PROBE + k->gap;
    k->gap = k->gap * 2 > MAX_GAP ? MAX_GAP : k->gap * 2;
}

int copy_choice_pick(copy_choice *c, int kind, uint64_t bytes) {
    int single = 1;
    if (c->adapt) {
        copy_class *k = class_of(c, kind, bytes);
        if (k->calls == k->next_probe + COPY_CHOICE_PROBE) end_probe(k);
        single = probing(k, k->calls) ? !k->single : k->single;
        k->calls++;
    }
    c->runs[single]++;
    return single;
}

void copy_choice_learn(copy_choice *c, int kind, uint64_t bytes, int single, double seconds) {
    if (!c->adapt || seconds < 0) return;
    copy_class *k = class_of(c, kind, bytes);
    uint32_t call = k->calls - 1; /* the run being reported: runs of one comm do not overlap */
    float x = (float)(seconds * 1e9 / (double)bytes);
    if (probing(k, call)) {
        if (single != k->single && k->probed < COPY_CHOICE_PROBE) k->probe[k->probed++] = x;
    } else if (single == k->single && call > 0) { /* the first run of a class pays for page faults */
        k->recent[k->next] = x;
        k->next = (uint8_t)((k->next + 1) % COPY_CHOICE_WINDOW);
        if (k->seen < COPY_CHOICE_WINDOW) k->seen++;
    }
}
