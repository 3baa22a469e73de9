/*
 * fuzz_wire.c - fuzz target for everything the C core reads off the wire.
 *
 * One input = one byte of choices + a byte stream. The choices pick a
 * collective, an element count and a segment size; rank 0 of a 2-rank comm
 * then runs that collective's plan while the stream is what "rank 1" sent it
 * (over a socketpair, closed after the stream). Whatever the stream holds, the
 * run must end with a status, never crash or touch memory outside its buffers
 * (run under ASan/UBSan), and, when it fails, leave the caller's buffer as it
 * was (the plans preserve their input). Every input is also fed to
 * pc_frame_check as a header, and the verdict compared with a plain decoding.
 *
 * Two ways to run it (tests/fuzz/README.md, tests/fuzz/run.sh):
 *   libFuzzer (clang, -DPC_LIBFUZZER): coverage-guided, the real thing.
 *   Standalone (any C compiler): `fuzz_wire [inputs] [seed]`, a seeded
 *   mutation loop over valid streams (bit flips, byte sets, interesting
 *   values, truncation, insertion, duplication, header fields);
 *   `fuzz_wire --corpus DIR` writes the valid streams as libFuzzer seeds.
 * The harness (not the library) reports a finding with abort().
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "pycoll.h"

#define DESC 0x5eed1234u
#define SEQ 7u
#define MAX_COUNT 1024

static const uint64_t COUNTS[8] = {0, 1, 3, 16, 100, 257, 640, MAX_COUNT};
static const uint64_t SEGMENTS[4] = {64, 256, 1024, 1 << 20};
static const pc_collective COLLS[4] = {PC_COLL_ALLREDUCE, PC_COLL_ALLGATHER, PC_COLL_REDUCE_SCATTER,
                                       PC_COLL_BROADCAST};

static uint64_t rd(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void wr(uint8_t *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* pc_frame_check against a decoding written out here. */
static void check_frame(const uint8_t *data, size_t size) {
    uint8_t hdr[32] = {0};
    memcpy(hdr, data, size < 32 ? size : 32);
    uint32_t tag = (uint32_t)rd(hdr + 8, 4) ^ (size > 40 ? data[40] : 0);
    uint64_t len = rd(hdr + 24, 8) ^ (size > 41 ? data[41] : 0);
    char why[64];
    uint32_t why_len = size > 42 ? data[42] % 65 : 64;
    memset(why, 'x', sizeof why);
    pc_status st = pc_frame_check(hdr, tag, DESC, SEQ, len, why, why_len);
    int ok = rd(hdr, 4) == 0x4c4f4350u && rd(hdr + 4, 2) == PC_VERSION && rd(hdr + 6, 2) == 1 &&
             rd(hdr + 8, 4) == tag && rd(hdr + 12, 4) == DESC && rd(hdr + 16, 8) == SEQ && rd(hdr + 24, 8) == len;
    if ((st == PC_OK) != ok) abort();
    if (st != PC_OK && why_len > 0 && memchr(why, 0, why_len) == NULL) abort(); /* why must end in NUL */
    for (uint32_t i = why_len; i < sizeof why; i++)
        if (why[i] != 'x') abort(); /* never writes past why_len */
}

typedef struct {
    pc_plan *p0, *p1;
} plan_pair;

static plan_pair plans[4][8][4];

static pc_status get_plans(int c, int k, int s, plan_pair **out) {
    plan_pair *pp = &plans[c][k][s];
    if (!pp->p0) {
        int32_t ring[2] = {0, 1};
        uint32_t flags = (COLLS[c] == PC_COLL_ALLREDUCE || COLLS[c] == PC_COLL_BROADCAST) ? PC_PLAN_PRESERVE_INPUT : 0;
        pc_status st = pc_plan_rings(COLLS[c], 2, 0, ring, 1, 1, COUNTS[k], 4, SEGMENTS[s], 1, flags, &pp->p0);
        if (st != PC_OK) return st;
        st = pc_plan_rings(COLLS[c], 2, 1, ring, 1, 1, COUNTS[k], 4, SEGMENTS[s], 1, flags, &pp->p1);
        if (st != PC_OK) return st;
    }
    *out = pp;
    return PC_OK;
}

static void free_plans(void) {
    for (int c = 0; c < 4; c++)
        for (int k = 0; k < 8; k++)
            for (int s = 0; s < 4; s++) {
                pc_plan_free(plans[c][k][s].p0);
                pc_plan_free(plans[c][k][s].p1);
            }
}

/* Rank 0 runs its plan against `stream` from rank 1; returns the status. */
static pc_status run_rank0(uint8_t choice, const uint8_t *stream, size_t n) {
    plan_pair *pp;
    int c = choice & 3, k = (choice >> 2) & 7, s = (choice >> 5) & 3;
    if (get_plans(c, k, s, &pp) != PC_OK) abort();
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return PC_ERR_IO;
    int bufsz = 1 << 20;
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &bufsz, sizeof bufsz);
    setsockopt(sv[0], SOL_SOCKET, SO_RCVBUF, &bufsz, sizeof bufsz);
    size_t w = 0;
    while (w < n) {
        ssize_t r = write(sv[1], stream + w, n - w);
        if (r <= 0) break;
        w += (size_t)r;
    }
    shutdown(sv[1], SHUT_WR); /* the stream ends here: a short one is a truncated frame */
    int32_t fds[2] = {-1, sv[0]};
    pc_comm *comm;
    if (pc_comm_create(0, 2, 1, fds, 0, &comm) != PC_OK) {
        close(sv[1]);
        return PC_ERR_IO;
    }
    uint64_t in_bytes = pc_plan_need_bytes(pp->p0, PC_BUF_IN), out_bytes = pc_plan_need_bytes(pp->p0, PC_BUF_OUT);
    int same = COLLS[c] == PC_COLL_ALLREDUCE || COLLS[c] == PC_COLL_BROADCAST; /* in place */
    if (same && out_bytes > in_bytes) in_bytes = out_bytes;
    uint8_t *in = malloc(in_bytes + 1), *out = same ? in : malloc(out_bytes + 1), *copy = malloc(in_bytes + 1);
    if (!in || !out || !copy) abort();
    for (uint64_t i = 0; i < in_bytes; i++) in[i] = (uint8_t)(i * 7 + 1);
    memcpy(copy, in, in_bytes);
    void *bufs[2] = {in, out};
    uint64_t sizes[2] = {in_bytes, same ? in_bytes : out_bytes};
    int32_t failed = -2;
    pc_status st = pc_comm_run(comm, pp->p0, bufs, sizes, PC_F32, PC_SUM, SEQ, DESC, 2.0, &failed);
    if (st == PC_ERR_TIMEOUT || st == PC_ERR_ARG || st == PC_ERR_NOMEM) {
        fprintf(stderr, "status %d: %s\n", st, pc_comm_last_error(comm));
        abort(); /* EOF must end it at once */
    }
    if (st != PC_OK && (failed != 1)) abort();                                    /* blame the peer */
    if (st != PC_OK && same && memcmp(in, copy, in_bytes) != 0) abort();          /* input preserved */
    pc_comm_shutdown(comm);
    pc_comm_free(comm);
    close(sv[1]);
    if (!same) free(out);
    free(in);
    free(copy);
    return st;
}

/* The valid stream rank 1 would send for this choice (frames with payload). */
static size_t valid_stream(uint8_t choice, uint8_t *buf, size_t cap) {
    plan_pair *pp;
    if (get_plans(choice & 3, (choice >> 2) & 7, (choice >> 5) & 3, &pp) != PC_OK) abort();
    const pc_op *ops = pc_plan_ops(pp->p1);
    size_t n = 0;
    for (int32_t i = 0; i < pc_plan_nops(pp->p1); i++) {
        if (ops[i].kind != PC_OP_SEND || ops[i].peer != 0) continue;
        if (n + 32 + ops[i].len > cap) break;
        wr(buf + n, 0x4c4f4350u, 4);
        wr(buf + n + 4, PC_VERSION, 2);
        wr(buf + n + 6, 1, 2);
        wr(buf + n + 8, ops[i].tag, 4);
        wr(buf + n + 12, DESC, 4);
        wr(buf + n + 16, SEQ, 8);
        wr(buf + n + 24, ops[i].len, 8);
        n += 32;
        for (uint64_t j = 0; j < ops[i].len; j++) buf[n++] = (uint8_t)(j * 13 + 5);
    }
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    check_frame(data, size);
    if (size < 1) return 0;
    run_rank0(data[0], data + 1, size - 1);
    return 0;
}

#ifndef PC_LIBFUZZER
/* ---- standalone mutation driver --------------------------------------- */
static uint64_t rng_state;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static size_t mutate(uint8_t *b, size_t n, size_t cap) {
    static const uint64_t interesting[] = {0, 1, 0x7f, 0x80, 0xff, 0xffff, 0xffffffffu, 0x7fffffffffffffffull,
                                           0xffffffffffffffffull, 32, 1u << 20, 1ull << 40};
    int rounds = 1 + (int)(rnd() % 4);
    for (int r = 0; r < rounds; r++) {
        switch (rnd() % 7) {
        case 0: /* flip a bit */
            if (n) b[rnd() % n] ^= (uint8_t)(1u << (rnd() % 8));
            break;
        case 1: /* set a byte */
            if (n) b[rnd() % n] = (uint8_t)rnd();
            break;
        case 2: /* an interesting value over 1, 2, 4 or 8 bytes */
            if (n >= 8) {
                int w = 1 << (rnd() % 4);
                wr(b + rnd() % (n - 7), interesting[rnd() % (sizeof interesting / sizeof *interesting)], w);
            }
            break;
        case 3: /* truncate */
            if (n) n = (size_t)(rnd() % n);
            break;
        case 4: /* insert random bytes */
            if (n < cap) {
                size_t at = n ? (size_t)(rnd() % n) : 0, k = 1 + (size_t)(rnd() % 48);
                if (n + k > cap) k = cap - n;
                memmove(b + at + k, b + at, n - at);
                for (size_t i = 0; i < k; i++) b[at + i] = (uint8_t)rnd();
                n += k;
            }
            break;
        case 5: /* duplicate a chunk (a frame sent twice) */
            if (n > 1 && n < cap) {
                size_t from = (size_t)(rnd() % n), k = 1 + (size_t)(rnd() % (n - from));
                if (n + k > cap) k = cap - n;
                memcpy(b + n, b + from, k);
                n += k;
            }
            break;
        case 6: /* a header field: tag, desc, seq or len */
            if (n >= 32) {
                size_t frame = 0; /* the first header sits at 0 */
                static const int offs[] = {0, 4, 6, 8, 12, 16, 24};
                int o = offs[rnd() % 7];
                wr(b + frame + o, rnd(), o >= 16 ? 8 : (o == 4 || o == 6 ? 2 : 4));
            }
            break;
        }
    }
    return n;
}

/* Writes one valid input per choice into dir (seeds for libFuzzer). */
static int write_corpus(const char *dir) {
    enum { CAP = 64 * 1024 };
    uint8_t *buf = malloc(CAP + 1);
    if (!buf) return 1;
    int written = 0;
    for (int choice = 0; choice < 256; choice++) {
        buf[0] = (uint8_t)choice;
        size_t n = 1 + valid_stream((uint8_t)choice, buf + 1, CAP);
        char path[4096];
        snprintf(path, sizeof path, "%s/valid-%03d", dir, choice);
        FILE *f = fopen(path, "wb");
        if (!f) continue;
        written += fwrite(buf, 1, n, f) == n;
        fclose(f);
    }
    free(buf);
    free_plans();
    printf("wrote %d seeds to %s\n", written, dir);
    return written ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[1], "--corpus") == 0) return write_corpus(argv[2]);
    long iters = argc > 1 ? atol(argv[1]) : 100000;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : (uint64_t)time(NULL);
    if (!rng_state) rng_state = 88172645463325252ull;
    printf("fuzz_wire: %ld inputs, seed %llu\n", iters, (unsigned long long)rng_state);
    enum { CAP = 64 * 1024 };
    uint8_t *stream = malloc(CAP + 1);
    if (!stream) return 1;
    long counts[8] = {0};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long it = 0; it < iters; it++) {
        uint8_t choice = (uint8_t)rnd();
        stream[0] = choice;
        size_t n = 1 + valid_stream(choice, stream + 1, CAP);
        if (it % 16) n = 1 + mutate(stream + 1, n - 1, CAP); /* every 16th stays valid: must succeed */
        check_frame(stream + 1, n - 1);
        pc_status st = run_rank0(stream[0], stream + 1, n - 1);
        if (it % 16 == 0 && st != PC_OK) {
            fprintf(stderr, "valid stream failed with status %d\n", st);
            abort();
        }
        counts[st & 7]++;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("done in %.1f s: ok %ld, proto %ld, peer %ld, io %ld, other %ld; no crash\n", secs, counts[PC_OK],
           counts[PC_ERR_PROTO], counts[PC_ERR_PEER], counts[PC_ERR_IO],
           iters - counts[PC_OK] - counts[PC_ERR_PROTO] - counts[PC_ERR_PEER] - counts[PC_ERR_IO]);
    free(stream);
    free_plans();
    return 0;
}
#endif
