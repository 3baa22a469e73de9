/* The single-copy-or-rings learner (csrc/core/copy_choice.c) fed synthetic run times:
 * tests/unit/test_copy_choice.py builds this with that one source and runs it. Prints OK. */
#include <stdio.h>
#include <stdlib.h>

#include "copy_choice.h"

#define MIB (1ull << 20)
#define CHECK(cond, ...)                                        \
    do {                                                        \
        if (!(cond)) {                                          \
            printf("FAIL line %d: ", __LINE__);                 \
            printf(__VA_ARGS__);                                \
            printf("\n");                                       \
            exit(1);                                            \
        }                                                       \
    } while (0)

/* Seconds per MiB of each way (index: single), times 1 + noise in [0, jitter). */
static double took(const double per_mib[2], int single, uint64_t bytes, double jitter, unsigned *seed) {
    double noise = jitter > 0 ? jitter * (double)(rand_r(seed) % 1000) / 1000.0 : 0.0;
    return per_mib[single] * (double)bytes / (double)MIB * (1.0 + noise);
}

/* `calls` runs of `bytes`; returns how many went single-copy. */
static int drive(copy_choice *c, uint64_t bytes, int calls, const double per_mib[2], double jitter, unsigned *seed,
                 int *last) {
    int singles = 0;
    for (int i = 0; i < calls; i++) {
        int s = copy_choice_pick(c, COPY_RUN_EQUAL, bytes);
        singles += s;
        *last = s;
        copy_choice_learn(c, COPY_RUN_EQUAL, bytes, s, took(per_mib, s, bytes, jitter, seed));
    }
    return singles;
}

int main(void) {
    unsigned seed = 7;
    int last;
    copy_choice c;

    /* Single copy faster: it stays, and probes of the rings get rarer. */
    copy_choice_init(&c);
    double single_fast[2] = {2e-3, 1e-3};
    int singles = drive(&c, 16 * MIB, 1000, single_fast, 0.3, &seed, &last);
    CHECK(last == 1 && singles >= 960 && singles < 1000, "single copy faster: %d of 1000 single", singles);

    /* Rings three times faster (a squeezed host): the first probe (calls 5-7) moves the class. */
    copy_choice_init(&c);
    double rings_fast[2] = {1e-3, 3e-3};
    singles = drive(&c, 16 * MIB, 8, rings_fast, 0.3, &seed, &last);
    CHECK(last == 0, "rings faster: still single copy after the first probe");
    singles = drive(&c, 16 * MIB, 992, rings_fast, 0.3, &seed, &last);
    CHECK(last == 0 && singles <= 40, "rings faster: %d of the next 992 single", singles);
    CHECK(c.runs[0] + c.runs[1] == 1000, "runs counted %llu", (unsigned long long)(c.runs[0] + c.runs[1]));

    /* ... and back once single copy is ahead again (by its next probe, at most 512 + 3 calls). */
    singles = drive(&c, 16 * MIB, 520, single_fast, 0.3, &seed, &last);
    CHECK(last == 1, "single copy ahead again: still on the rings after 520 calls");

    /* A tie under noise (every run 0-50 % slower at random): no move to the rings, which copy
     * twice. Ten learners, 1000 calls each. */
    double tie[2] = {1e-3, 1e-3};
    for (int k = 0; k < 10; k++) {
        copy_choice_init(&c);
        singles = drive(&c, 16 * MIB, 1000, tie, 0.5, &seed, &last);
        CHECK(singles >= 960, "tie, learner %d: %d of 1000 single", k, singles);
    }

    /* One descheduled run in four (5x slower) among the recent runs does not fake a win. */
    copy_choice_init(&c);
    int moved = 0;
    for (int i = 0; i < 1000; i++) {
        int s = copy_choice_pick(&c, COPY_RUN_EQUAL, 16 * MIB);
        double t = (s ? 1e-3 : 1.1e-3) * 16 * (i % 4 == 0 && s ? 5.0 : 1.0);
        copy_choice_learn(&c, COPY_RUN_EQUAL, 16 * MIB, s, t);
        moved |= !c.cls[COPY_RUN_EQUAL][24].single; /* the class (2^24 bytes) preferring the rings */
    }
    CHECK(!moved, "outliers moved the class to the rings");

    /* Size classes learn apart: 4 MiB keeps single copy while 64 MiB moves. */
    copy_choice_init(&c);
    int last_small = 1, last_big = 1;
    for (int i = 0; i < 200; i++) {
        drive(&c, 4 * MIB, 1, single_fast, 0.1, &seed, &last_small);
        drive(&c, 64 * MIB, 1, rings_fast, 0.1, &seed, &last_big);
    }
    CHECK(last_small == 1 && last_big == 0, "classes: 4 MiB single %d, 64 MiB single %d", last_small, last_big);

    /* Kinds learn apart too: one size's reduce-scatters keep single copy while its all-gathers,
     * called in turn with them, move. */
    copy_choice_init(&c);
    int rs_single = 0, ag_single = 0; /* over the last 100 of 200 calls of each */
    for (int i = 0; i < 200; i++) {
        int s = copy_choice_pick(&c, COPY_RUN_IN_LARGER, 4 * MIB);
        copy_choice_learn(&c, COPY_RUN_IN_LARGER, 4 * MIB, s, took(single_fast, s, 4 * MIB, 0.1, &seed));
        rs_single += i >= 100 && s;
        s = copy_choice_pick(&c, COPY_RUN_OUT_LARGER, 4 * MIB);
        copy_choice_learn(&c, COPY_RUN_OUT_LARGER, 4 * MIB, s, took(rings_fast, s, 4 * MIB, 0.1, &seed));
        ag_single += i >= 100 && s;
    }
    CHECK(rs_single >= 90 && ag_single <= 10, "kinds: reduce-scatter %d of 100 single, all-gather %d", rs_single,
          ag_single);

    /* Two ranks that measure differently still probe on the same calls. */
    copy_choice a, b;
    copy_choice_init(&a);
    copy_choice_init(&b);
    unsigned sa = 1, sb = 2;
    for (int i = 0; i < 2000; i++) {
        int pa = copy_choice_pick(&a, COPY_RUN_EQUAL, 8 * MIB), pb = copy_choice_pick(&b, COPY_RUN_EQUAL, 8 * MIB);
        int probe_a = pa != a.cls[COPY_RUN_EQUAL][23].single, probe_b = pb != b.cls[COPY_RUN_EQUAL][23].single;
        CHECK(probe_a == probe_b, "call %d: rank a probing %d, rank b %d", i, probe_a, probe_b);
        copy_choice_learn(&a, COPY_RUN_EQUAL, 8 * MIB, pa, took(i < 1000 ? single_fast : rings_fast, pa, 8 * MIB, 0.5, &sa));
        copy_choice_learn(&b, COPY_RUN_EQUAL, 8 * MIB, pb, took(rings_fast, pb, 8 * MIB, 0.5, &sb));
    }

    /* Off: always single copy, whatever the times. */
    copy_choice_init(&c);
    c.adapt = 0;
    singles = drive(&c, 16 * MIB, 500, rings_fast, 0.0, &seed, &last);
    CHECK(singles == 500, "adapt off: %d of 500 single", singles);

    printf("OK\n");
    return 0;
}
