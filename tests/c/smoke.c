/*
 * The C core without Python: includes pycoll.h only and links against
 * libpycoll.a (make -C csrc; tests/unit/test_cbuild.py builds and runs this).
 * No sockets: hashing, a reduction kernel, a 2-rank ring plan inspected op by
 * op, and plans run on a 1-rank comm (which has no connections). Prints OK and
 * returns 0, or names the first failed check and returns 1.
 *
 *   make -C csrc check
 *   cc -std=c99 -Icsrc tests/c/smoke.c build/csrc/libpycoll.a -pthread -o smoke && ./smoke
 */
#include <stdio.h>
#include <string.h>

#include "pycoll.h"

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "smoke: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            return 1;                                                            \
        }                                                                        \
    } while (0)

enum { COUNT = 1000 };

static int check_hash(void) {
    static unsigned char buf[200000]; /* more than one 64 KiB block */
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (unsigned char)(i * 131u + 7u);
    uint64_t a = 0, b = 0, c = 0, many[2] = {0, 0};
    CHECK(pc_hash64(buf, sizeof buf, 1, &a) == PC_OK);
    CHECK(pc_hash64(buf, sizeof buf, 1, &b) == PC_OK);
    CHECK(a == b && a != 0);
    CHECK(pc_hash64(buf, sizeof buf, 2, &c) == PC_OK && c != a); /* the seed counts */
    buf[sizeof buf - 1] ^= 1;
    CHECK(pc_hash64(buf, sizeof buf, 1, &c) == PC_OK && c != a); /* so does the last byte */
    buf[sizeof buf - 1] ^= 1;
    const void *ptrs[2] = {buf, buf};
    uint64_t lens[2] = {sizeof buf, 10};
    CHECK(pc_hash64_many(ptrs, lens, 2, 1, 2, many) == PC_OK);
    CHECK(pc_hash64(buf, 10, 1, &c) == PC_OK);
    CHECK(many[0] == a && many[1] == c); /* threads do not change the value */
    return 0;
}

static int check_reduce(void) {
    float a[COUNT], b[COUNT], d[COUNT];
    for (int i = 0; i < COUNT; i++) a[i] = (float)i, b[i] = 0.5f * (float)i;
    CHECK(pc_dtype_size(PC_F32) == 4 && pc_dtype_size(PC_BF16) == 2);
    CHECK(pc_reduce(d, a, b, COUNT, PC_F32, PC_SUM) == PC_OK);
    for (int i = 0; i < COUNT; i++) CHECK(d[i] == 1.5f * (float)i);
    CHECK(pc_reduce(d, a, b, COUNT, PC_F32, PC_MAX) == PC_OK);
    for (int i = 0; i < COUNT; i++) CHECK(d[i] == a[i]);
    CHECK(pc_reduce(d, a, b, COUNT, PC_DTYPE_COUNT, PC_SUM) == PC_ERR_ARG);
    return 0;
}

/* Rank 0's plan of a 2-rank ring all-reduce: only valid ops, every transfer
 * with rank 1, as many bytes sent as received, dependencies on earlier ops. */
static int check_ring_plan(void) {
    const int32_t ring[2] = {0, 1};
    pc_plan *plan = NULL;
    CHECK(pc_plan_rings(PC_COLL_ALLREDUCE, 2, 0, ring, 1, 0, COUNT, 4, 1024, 1, 0, &plan) == PC_OK);
    int32_t nops = pc_plan_nops(plan);
    const pc_op *ops = pc_plan_ops(plan);
    const int32_t *deps = pc_plan_deps(plan);
    CHECK(nops > 2 && ops != NULL);
    uint64_t sent = 0, received = 0;
    for (int32_t i = 0; i < nops; i++) {
        const pc_op *op = &ops[i];
        CHECK(op->kind >= PC_OP_SEND && op->kind <= PC_OP_DECODE_REDUCE);
        int net = op->kind == PC_OP_SEND || op->kind == PC_OP_RECV || op->kind == PC_OP_RECV_REDUCE;
        CHECK(net ? op->peer == 1 : op->peer == -1);
        if (op->kind == PC_OP_SEND) sent += op->len;
        if (op->kind == PC_OP_RECV || op->kind == PC_OP_RECV_REDUCE) received += op->len;
        for (int32_t j = 0; j < op->dep_count; j++) {
            CHECK(deps != NULL);
            CHECK(deps[op->dep_first + j] >= 0 && deps[op->dep_first + j] < i);
        }
    }
    CHECK(sent > 0 && sent == received);
    CHECK(pc_plan_need_bytes(plan, PC_BUF_IN) == COUNT * 4);
    CHECK(pc_plan_codec(plan) == PC_CODEC_NONE);
    CHECK(pc_plan_tail_first(plan) >= 0 && pc_plan_tail_first(plan) <= nops);
    pc_plan_free(plan);
    CHECK(pc_plan_rings(PC_COLL_ALLREDUCE, 2, 2, ring, 1, 0, COUNT, 4, 1024, 1, 0, &plan) == PC_ERR_ARG);
    return 0;
}

static int run(pc_comm *comm, const pc_plan *plan, float *in, float *out, uint64_t seq) {
    void *bufs[2] = {in, out};
    uint64_t bytes[2] = {COUNT * sizeof(float), COUNT * sizeof(float)};
    int32_t failed = -2;
    pc_status st = pc_comm_run(comm, plan, bufs, bytes, PC_F32, PC_SUM, seq, 0, 10.0, &failed);
    if (st != PC_OK) fprintf(stderr, "smoke: pc_comm_run: %d (%s)\n", (int)st, pc_comm_last_error(comm));
    return st == PC_OK ? 0 : 1;
}

/* A comm of one rank has no connections; a ring all-reduce on it is a copy,
 * and so is a plan built op by op. */
static int check_one_rank(void) {
    static float in[COUNT], out[COUNT];
    for (int i = 0; i < COUNT; i++) in[i] = (float)i - 3.25f;
    int32_t fd = -1;
    pc_comm *comm = NULL;
    CHECK(pc_comm_create_mixed(0, 1, 1, NULL, &fd, NULL, 0, &comm) == PC_OK && comm != NULL);

    const int32_t ring[1] = {0};
    pc_plan *plan = NULL;
    CHECK(pc_plan_rings(PC_COLL_ALLREDUCE, 1, 0, ring, 1, 0, COUNT, 4, 1024, 1, 0, &plan) == PC_OK);
    memset(out, 0, sizeof out);
    CHECK(run(comm, plan, in, out, 1) == 0);
    CHECK(memcmp(in, out, sizeof in) == 0);
    pc_plan_free(plan);

    CHECK(pc_plan_create(1, 0, &plan) == PC_OK);
    pc_op copy;
    memset(&copy, 0, sizeof copy);
    copy.kind = PC_OP_COPY;
    copy.peer = -1;
    copy.src_buf = PC_BUF_IN;
    copy.dst_buf = PC_BUF_OUT;
    copy.aux_buf = -1;
    copy.len = COUNT / 2 * sizeof(float);
    int32_t first = -1, second = -1;
    CHECK(pc_plan_append(plan, &copy, NULL, 0, &first) == PC_OK && first == 0);
    copy.src_off = copy.dst_off = copy.len;
    CHECK(pc_plan_append(plan, &copy, &first, 1, &second) == PC_OK && second == 1);
    pc_op to_self = copy;
    to_self.kind = PC_OP_SEND;
    to_self.peer = 0;
    CHECK(pc_plan_append(plan, &to_self, NULL, 0, NULL) == PC_ERR_ARG); /* checked as it is added */
    CHECK(pc_plan_seal(plan) == PC_OK);
    CHECK(pc_plan_nops(plan) == 2);
    memset(out, 0, sizeof out);
    CHECK(run(comm, plan, in, out, 2) == 0);
    CHECK(memcmp(in, out, sizeof in) == 0);
    pc_plan_free(plan);

    CHECK(pc_comm_bytes_sent(comm) == 0);
    pc_comm_shutdown(comm);
    pc_comm_free(comm);
    return 0;
}

int main(void) {
    if (check_hash() || check_reduce() || check_ring_plan() || check_one_rank()) return 1;
    printf("OK\n");
    return 0;
}
