/*
 * pycoll.h - the one public interface of the pycoll C core.
 *
 * Terms used throughout:
 *   comm     a set of connections from this rank to every other rank of one
 *            membership epoch (n ranks, k "stripes" = connections per pair).
 *   plan     what one rank does for one collective: an ordered list of ops
 *            (send / recv / recv-reduce / copy / reduce) over byte ranges of
 *            three buffers, with dependencies. Planners build plans; the engine
 *            runs any plan and never knows which algorithm it runs.
 *   buffer   PC_BUF_IN (the caller's input), PC_BUF_OUT (the caller's output,
 *            may be the same memory as IN), PC_BUF_SCRATCH (engine-owned).
 *
 * Every function returns a pc_status (0 = success). Detail for the last
 * failure of a comm is in pc_comm_last_error(); the rank that caused a
 * PC_ERR_PEER / PC_ERR_PROTO failure is returned through an out-parameter.
 * Nothing here calls abort() or exit(); every blocking wait has a deadline.
 */
#ifndef PYCOLL_H
#define PYCOLL_H

#include <stddef.h>
#include <stdint.h>

#define PC_VERSION 1

typedef enum {
    PC_OK = 0,
    PC_ERR_ARG = 1,       /* usage error: bad argument, unsupported dtype/op */
    PC_ERR_NOMEM = 2,     /* allocation failed */
    PC_ERR_IO = 3,        /* socket error other than a closed peer */
    PC_ERR_PEER = 4,      /* a peer closed its connection or reset it */
    PC_ERR_PROTO = 5,     /* a frame failed validation (bad magic, length,
                             sequence, or mismatched collective arguments) */
    PC_ERR_TIMEOUT = 6,   /* the deadline passed without completion */
    PC_ERR_CANCELLED = 7  /* pc_comm_cancel() was called */
} pc_status;

/* Element types. Values are part of the wire header: do not renumber. */
typedef enum {
    PC_F16 = 0, PC_BF16 = 1, PC_F32 = 2, PC_F64 = 3,
    PC_I8 = 4, PC_I16 = 5, PC_I32 = 6, PC_I64 = 7,
    PC_U8 = 8, PC_U16 = 9, PC_U32 = 10, PC_U64 = 11,
    PC_BOOL = 12, /* one byte, 0 or 1 (any non-zero byte reads as 1) */
    PC_DTYPE_COUNT = 13
} pc_dtype;

/* The bitwise ops apply to integer and bool dtypes only. On bool, SUM and MAX
 * are logical or, PROD and MIN logical and (as Gloo and torch); results are 0 or 1. */
typedef enum {
    PC_SUM = 0, PC_PROD = 1, PC_MIN = 2, PC_MAX = 3, PC_AVG = 4,
    PC_BAND = 5, PC_BOR = 6, PC_BXOR = 7,
    PC_OP_COUNT = 8
} pc_redop;

/* Op kinds of a plan. */
typedef enum {
    PC_OP_SEND = 0,        /* send src[len] to peer on stripe */
    PC_OP_RECV = 1,        /* receive len bytes from peer into dst */
    PC_OP_RECV_REDUCE = 2, /* dst = src (op) incoming; src may equal dst */
    PC_OP_COPY = 3,        /* dst = src, local */
    PC_OP_REDUCE = 4,      /* dst = dst (op) src, local */
    PC_OP_SCALE = 5,       /* dst = dst / nranks (the final step of PC_AVG) */
    /* Local ops of compressed plans (see pc_plan_compress); len counts the
     * float32 bytes, the encoded side spans pc_codec_bytes(codec, len / 4). */
    PC_OP_ENCODE = 6,      /* dst (encoded) = encode(src) */
    PC_OP_DECODE = 7,      /* dst = decode(src (encoded)) */
    PC_OP_DECODE_REDUCE = 8 /* dst = src (op) decode(aux (encoded)) */
} pc_op_kind;

typedef enum { PC_BUF_IN = 0, PC_BUF_OUT = 1, PC_BUF_SCRATCH = 2, PC_BUF_COUNT = 3 } pc_buf_id;

/* One step of a plan. Offsets and lengths are in bytes. */
typedef struct {
    int32_t kind;      /* pc_op_kind */
    int32_t peer;      /* remote rank for SEND/RECV/RECV_REDUCE, else -1 */
    int32_t stripe;    /* connection index to that peer */
    uint32_t tag;      /* carried in the frame; sender and receiver agree */
    int32_t src_buf;   /* pc_buf_id, -1 when unused */
    int32_t dst_buf;
    uint64_t src_off;
    uint64_t dst_off;
    uint64_t len;
    int32_t dep_first; /* this op waits for deps[dep_first .. dep_first+dep_count) */
    int32_t dep_count;
    int32_t aux_buf;   /* third operand (PC_OP_DECODE_REDUCE), else -1 */
    int32_t flags;     /* PC_OPF_*: 0 for most ops */
    uint64_t aux_off;
} pc_op;

/* Op flags: result windows (core/window.h). Engines that ignore them still run the plan
 * right: the receive lands in dst and the copy reads src. */
#define PC_OPF_WINDOW 1u    /* PC_OP_RECV: where the sender's bytes lie in its result window,
                             * the receiver may leave them there (no copy into dst) */
#define PC_OPF_FROM_RECV 2u /* PC_OP_COPY: src is wherever receive op aux_off's bytes are */

typedef struct pc_plan pc_plan;
typedef struct pc_comm pc_comm;

/* ---- plan inspection (for verifiers and `pycoll topology --show-plan`) --- */
int32_t pc_plan_nops(const pc_plan *plan);
const pc_op *pc_plan_ops(const pc_plan *plan);
const int32_t *pc_plan_deps(const pc_plan *plan);
/* Bytes of IN / OUT / SCRATCH the plan touches (buf in pc_buf_id). */
uint64_t pc_plan_need_bytes(const pc_plan *plan, int32_t buf);
/* Ops from this index on run only after all earlier ops completed. */
int32_t pc_plan_tail_first(const pc_plan *plan);
/* The wire codec of the plan's payloads (pc_codec), PC_CODEC_NONE if plain. */
int32_t pc_plan_codec(const pc_plan *plan);
void pc_plan_free(pc_plan *plan);

/* ---- planners ---------------------------------------------------------- */
typedef enum {
    PC_COLL_ALLREDUCE = 0,
    PC_COLL_ALLGATHER = 1,
    PC_COLL_REDUCE_SCATTER = 2,
    PC_COLL_BROADCAST = 3,
    PC_COLL_BARRIER = 4,
    /* planned by pc_plan_reduce / pc_plan_exchange / pc_plan_p2p_list; the
     * values name the collective in argument digests */
    PC_COLL_REDUCE = 5,
    PC_COLL_GATHER = 6,
    PC_COLL_SCATTER = 7,
    PC_COLL_ALLTOALL = 8,
    PC_COLL_P2P = 9
} pc_collective;

/* Plan flags. */
#define PC_PLAN_PRESERVE_INPUT 1u /* never write IN/OUT before every transfer is
                                     done (results go through scratch), so a
                                     failed collective leaves the caller's
                                     buffer untouched */
#define PC_PLAN_AVG 2u            /* the op is an average: divide once by n */
#define PC_PLAN_SWITCH 4u         /* pc_plan_hier only: this rank is a standalone
                                     aggregator with no data of its own; its
                                     accumulator starts from its first member's
                                     data and lives in scratch (IN/OUT unused) */
#define PC_PLAN_AGREE 8u          /* pc_plan_exchange: an empty frame to and from
                                     every rank that no data frame goes to or comes
                                     from, so that every pair exchanges a checked
                                     frame each way and a rank whose call differs
                                     (another root) fails the header check instead
                                     of waiting out its timeout (plan.h:
                                     plan_agree_silent) */
#define PC_PLAN_STAGED 16u        /* pc_plan_exchange: pairwise exchange in n-1
                                     steps (step k: send to rank+k, receive from
                                     rank-k; a step's sends wait for the previous
                                     step's receive), so each rank has one
                                     payload in flight each way, not n-1 */

/*
 * Multi-ring planner. `rings` holds nrings permutations of 0..nranks-1 (each
 * one ring order, row-major, nrings*nranks entries); the payload is split
 * evenly across the rings and each ring runs a pipelined ring algorithm on
 * its share. One ring = the classic ring. `count` is the element count of
 * the per-rank block for ALLGATHER and REDUCE_SCATTER (IN holds one block /
 * nranks blocks, OUT holds nranks blocks / one block), otherwise the element
 * count of the whole buffer. `stripes` spreads each ring's traffic over that
 * many connections per pair. `segment_bytes` is the pipeline granularity.
 */
pc_status pc_plan_rings(pc_collective coll, int32_t nranks, int32_t rank,
                        const int32_t *rings, int32_t nrings, int32_t root,
                        uint64_t count, int32_t elem_size, uint64_t segment_bytes,
                        int32_t stripes, uint32_t flags, pc_plan **out);

/*
 * Double binary tree planner (plan_tree.c): PC_COLL_ALLREDUCE (each of two
 * complementary trees reduces half of the data up to its root and
 * broadcasts it back down, pipelined in segments) and PC_COLL_BROADCAST
 * (from `root`, half the data down each tree). Other collectives return
 * PC_ERR_ARG. `count` is the element count of the whole buffer.
 */
pc_status pc_plan_tree(pc_collective coll, int32_t nranks, int32_t rank, int32_t root,
                       uint64_t count, int32_t elem_size, uint64_t segment_bytes,
                       int32_t stripes, uint32_t flags, pc_plan **out);
/*
 * One-shot all-reduce planner (plan_direct.c), for small messages: every
 * rank sends its whole buffer to every other rank and reduces all n
 * contributions itself, in rank order (bit-identical everywhere). One step
 * of latency, n-1 times a ring's traffic. Only PC_COLL_ALLREDUCE; `count`
 * is the element count of the whole buffer; the result reaches OUT through
 * scratch (the input is intact if the collective fails, whatever `flags`
 * says of PC_PLAN_PRESERVE_INPUT). Each frame is one small message, sent on
 * the first of the `stripes` connections of its pair.
 */
pc_status pc_plan_direct(pc_collective coll, int32_t nranks, int32_t rank, uint64_t count,
                         int32_t elem_size, int32_t stripes, uint32_t flags, pc_plan **out);
/*
 * Direct reduce-scatter + all-gather all-reduce (plan_allpairs.c): chunk c of
 * the buffer is owned by rank c; every rank sends each chunk of its input
 * straight to its owner, the owner reduces the n contributions (in the order
 * x_c, x_{c+1}, ..., rank numbers mod n: bit-identical everywhere) and sends
 * the result straight to every rank. Two steps, a ring's bytes per rank, no
 * chain through other ranks (see the file). Only PC_COLL_ALLREDUCE; `count`
 * is the element count of the whole buffer; chunks are cut in segments of at
 * most `segment_bytes`, spread over the `stripes` connections of each pair.
 */
pc_status pc_plan_allpairs(pc_collective coll, int32_t nranks, int32_t rank, uint64_t count,
                           int32_t elem_size, uint64_t segment_bytes, int32_t stripes, uint32_t flags,
                           pc_plan **out);
/*
 * Reduce to a root (plan_exchange.c): every other rank sends IN to `root`,
 * which reduces the n contributions in rank order (x_0 (op) x_1 ...: the
 * bits of pc_plan_direct's all-reduce) in scratch and copies the result to
 * its OUT in the tail. Payloads are cut in segments of segment_bytes (at
 * most 8 segments: larger ones past that), and segment g of rank j's reduction waits only for segment
 * g of rank j-1's, so the root reduces while the rest still arrives. Other
 * ranks only send (their OUT is never written); the root's IN is intact if
 * the call fails. Ranks exchange empty frames only where no data flows (the
 * root's data frames carry the check of its arguments: plan.h,
 * plan_agree_silent).
 */
pc_status pc_plan_reduce(int32_t nranks, int32_t rank, int32_t root, uint64_t count, int32_t elem_size,
                         uint64_t segment_bytes, int32_t stripes, uint32_t flags, pc_plan **out);
/*
 * Rooted collectives over a binomial tree (plan_binomial.c), ceil(lg n)
 * rounds, lg n frames at the root instead of n - 1. Reduce: as
 * pc_plan_reduce (in place at the root through scratch, pipelined in
 * segments of segment_bytes) but each node reduces its own input with its
 * children's subtree results in relative rank order (v = rank - root mod n):
 * a fixed order per (n, root), not pc_plan_reduce's rank-order chain.
 * Gather (coll PC_COLL_GATHER: IN one block of nbytes, the root's OUT n
 * blocks in rank order) and scatter (PC_COLL_SCATTER: the root's IN n
 * blocks, OUT one block); interior nodes forward their subtree's blocks
 * through scratch. Both open with plan_agree's frames.
 */
pc_status pc_plan_binomial_reduce(int32_t nranks, int32_t rank, int32_t root, uint64_t count, int32_t elem_size,
                                  uint64_t segment_bytes, int32_t stripes, uint32_t flags, pc_plan **out);
pc_status pc_plan_binomial_rooted(pc_collective coll, int32_t nranks, int32_t rank, int32_t root, uint64_t nbytes,
                                  pc_plan **out);
/*
 * Direct exchange (plan_exchange.c), one step: this rank sends
 * IN[send_off[p], +send_len[p]) to every rank p and receives
 * OUT[recv_off[p], +recv_len[p]) from it (byte ranges; p == rank is a local
 * copy and needs send_len == recv_len). A length of PC_NO_FRAME means no
 * frame with that rank at all; a length of 0 an empty frame (so that ranks
 * whose lengths disagree fail the frame check instead of waiting).
 * all_to_all (equal or uneven splits), gather and scatter are all this
 * plan. Payloads of 1 MiB and more are spread over the stripes. All sends
 * start at once (no receive waits for a send of ours: no deadlock however
 * small the connection buffers). flags: PC_PLAN_AGREE.
 */
#define PC_NO_FRAME UINT64_MAX
pc_status pc_plan_exchange(int32_t nranks, int32_t rank, const uint64_t *send_off, const uint64_t *send_len,
                           const uint64_t *recv_off, const uint64_t *recv_len, int32_t stripes, uint32_t flags,
                           pc_plan **out);
/*
 * Point-to-point transfers (plan_exchange.c): `n` transfers, transfer i
 * sends IN[off[i], +len[i]) to peer[i] (is_send[i] != 0) or receives
 * OUT[off[i], +len[i]) from it, in one frame carrying tag[i] (the receiver
 * checks it). Transfers with the same peer and direction keep their order
 * (they pair with the peer's in order); all others run at once. Stripe 0.
 */
pc_status pc_plan_p2p_list(int32_t nranks, int32_t rank, int32_t n, const int32_t *peer, const int32_t *is_send,
                           const uint64_t *off, const uint64_t *len, const uint32_t *tag, pc_plan **out);
/* Whether pc_reduce supports (dtype, op): PC_OK or PC_ERR_ARG. */
pc_status pc_reduce_check(int32_t dtype, int32_t op);

/* The all-reduce trees: parent and children of `rank` in tree 0 or 1 of
 * nranks ranks (-1 where there is none). */
pc_status pc_tree_links(int32_t nranks, int32_t tree, int32_t rank, int32_t *parent,
                        int32_t *child0, int32_t *child1);

/*
 * Hierarchical (in-network-style) all-reduce planner (plan_hier.c).
 * agg_of[r] (nranks entries) is the rank that aggregates rank r's group;
 * agg_of[r] == r for every *ring rank* (aggregators, and ranks of groups
 * without an aggregator). `rings` holds nrings orders of the nring ring
 * ranks. Members hand their data to their aggregator in segments, the
 * aggregators run the (multi-)ring all-reduce on the group partials, and
 * results flow back to the members. Only PC_COLL_ALLREDUCE.
 */
pc_status pc_plan_hier(pc_collective coll, int32_t nranks, int32_t rank, const int32_t *agg_of,
                       const int32_t *rings, int32_t nrings, int32_t nring, uint64_t count,
                       int32_t elem_size, uint64_t segment_bytes, int32_t stripes,
                       uint32_t flags, pc_plan **out);

/*
 * One frame of `nbytes` between `rank` and `peer` (plan_hier.c): send != 0
 * sends IN[0, nbytes), else receives into OUT[0, nbytes). Used for the small
 * descriptor a group's lowest worker sends its standalone aggregator ahead
 * of each collective.
 */
pc_status pc_plan_p2p(int32_t nranks, int32_t rank, int32_t peer, uint64_t nbytes, int32_t send,
                      pc_plan **out);

/*
 * Compression as a plan transformation: returns a plan that does what `plan`
 * does with every payload on the wire encoded by `codec` (pc_codec), for
 * float32 data. Sends encode into scratch (PC_OP_ENCODE), receives land in
 * scratch and decode (PC_OP_DECODE, PC_OP_DECODE_REDUCE); the network ops
 * move the encoded bytes as opaque data. Every rank ends bit-identical: a
 * value is encoded once where it is made, whoever forwards it forwards those
 * bytes, and the rank that made it keeps the decoded bytes too. Works for
 * any planner's plan (planners never see codecs). PC_ERR_ARG if `plan` is
 * already compressed or the codec is unknown.
 */
pc_status pc_plan_compress(const pc_plan *plan, int32_t codec, pc_plan **out);

/* A stretch of a caller's buffer: bytes [off, off + len) of buffer `buf`. */
typedef struct {
    int32_t buf;
    uint64_t off;
    uint64_t len;
} pc_extent;
/*
 * One plan over several caller buffers (the coalesced collectives): returns
 * `plan` with IN read as in[0 .. n_in) laid end to end and OUT as
 * out[0 .. n_out), each stretch in one of nbufs caller buffers; ops that
 * cross a stretch boundary are cut there (plan_remap.c). Runs through
 * pc_comm_run_remapped only. PC_ERR_ARG if `plan` is compressed, a buffer
 * plan, already remapped, holds a network op on scratch (its peer might cut
 * that transfer elsewhere), or reads or writes past the stretches' total.
 */
pc_status pc_plan_remap(const pc_plan *plan, int32_t nbufs, int32_t n_in, const pc_extent *in, int32_t n_out,
                        const pc_extent *out, pc_plan **remapped);
/* How many of a remapped plan's transfers were cut in pieces: 0 means it puts on the wire
 * exactly the frames of the plan it came from. */
int32_t pc_plan_cut_transfers(const pc_plan *plan);

/* ---- reduction kernels ------------------------------------------------- */
int32_t pc_dtype_size(int32_t dtype);
/* dst[i] = a[i] (op) b[i] for i < count; dst may alias a or b. PC_AVG reduces
 * as PC_SUM (the division happens once, at the end, via pc_scale). */
pc_status pc_reduce(void *dst, const void *a, const void *b, uint64_t count,
                    int32_t dtype, int32_t op);
/* dst[i] = dst[i] / divisor (integers truncate toward zero). */
pc_status pc_scale(void *dst, uint64_t count, int32_t dtype, int32_t divisor);

/* ---- wire codecs (csrc/kernels/codec.c documents formats and error bounds) ----- */
typedef enum {
    PC_CODEC_NONE = 0, /* float32 as is */
    PC_CODEC_FP16 = 1, /* IEEE half, round to nearest-even */
    PC_CODEC_BF16 = 2, /* bfloat16, round to nearest-even */
    PC_CODEC_INT8 = 3, /* per block of PC_CODEC_INT8_BLOCK values: min, step, uint8 */
    PC_CODEC_COUNT = 4
} pc_codec;
#define PC_CODEC_INT8_BLOCK 256
/* Encoded size of `count` float32 values (0 for an unknown codec). */
uint64_t pc_codec_bytes(int32_t codec, uint64_t count);
pc_status pc_codec_encode(int32_t codec, void *dst, const float *src, uint64_t count);
pc_status pc_codec_decode(int32_t codec, float *dst, const void *src, uint64_t count);
/* dst[i] = a[i] (op) decode(src)[i]; dst may alias a. */
pc_status pc_codec_decode_reduce(int32_t codec, float *dst, const float *a, const void *src,
                                 uint64_t count, int32_t op);

/* ---- communicator ------------------------------------------------------ */
/*
 * Takes ownership of connected, handshaken sockets: fds[peer*stripes + s] is
 * stripe s to `peer` (-1 for peer == rank). They are closed by pc_comm_free
 * and on every failure path of this function.
 */
pc_status pc_comm_create(int32_t rank, int32_t nranks, int32_t stripes,
                         const int32_t *fds, int32_t sockbuf_bytes,
                         pc_comm **out);
/* Connection kinds for pc_comm_create_mixed. */
#define PC_CONN_TCP 0 /* fds[i]: a connected TCP socket */
#define PC_CONN_SHM 1 /* fds[i]: a connected unix stream socket to the same
                         peer; shm_fds[3*i .. 3*i+2]: its shared segment */
#define PC_CONN_TLS 2 /* fds[i]: a connected TCP socket, under TLS 1.3 keyed
                         with pc_comm_create_keyed's psk */
#define PC_CONN_KINDS 3

/*
 * Like pc_comm_create, with a kind per connection (kinds[peer*stripes + s],
 * PC_CONN_*): peers on this host can use shared memory, the rest TCP. For
 * PC_CONN_SHM, shm_fds[3*i .. 3*i+2] are the three fds made by
 * pc_shm_segment_create (the lower rank of the pair creates them and passes
 * them to the higher one); both ends use the same three. Takes ownership of
 * every fd >= 0 in fds and shm_fds (closed by pc_comm_free and on every
 * failure path). kinds == NULL means all TCP; shm_fds may be NULL when no
 * kind is PC_CONN_SHM.
 */
pc_status pc_comm_create_mixed(int32_t rank, int32_t nranks, int32_t stripes, const int32_t *kinds,
                               const int32_t *fds, const int32_t *shm_fds, int32_t sockbuf_bytes,
                               pc_comm **out);
/*
 * Like pc_comm_create_mixed, where kinds may also be PC_CONN_TLS: those
 * connections run a TLS 1.3 handshake authenticated by the pre-shared key
 * psk (16..64 bytes, the same on both ends; the lower rank of a pair is the
 * server), all within handshake_timeout_s, before this returns. A peer
 * without the key fails it: PC_ERR_PROTO, and *failed_peer names it (also
 * for any other connection that failed to open; -1 otherwise).
 */
pc_status pc_comm_create_keyed(int32_t rank, int32_t nranks, int32_t stripes, const int32_t *kinds,
                               const int32_t *fds, const int32_t *shm_fds, int32_t sockbuf_bytes,
                               const uint8_t *psk, int32_t psk_len, double handshake_timeout_s,
                               int32_t *failed_peer, pc_comm **out);
/*
 * The shared parts of one shared-memory connection: fds[0] an anonymous
 * segment (memfd, sealed against resizing) with ring_bytes per direction (a
 * power of two, 64 KiB .. 1 GiB), fds[1] and fds[2] the doorbells (eventfds)
 * of the lower and the higher rank. The caller owns the fds. Nothing is
 * named: the memory is freed when the last process holding an fd or a
 * mapping of it exits, however it exits.
 */
pc_status pc_shm_segment_create(uint64_t ring_bytes, int32_t *fds);
/*
 * Single copy under Yama (ptrace_scope 1): a shared-memory connection names
 * the nearest common ancestor of this process and its peer (the launcher of
 * sibling ranks) as this process's ptracer, so that the peer may read our
 * buffers (pc_readers_admit(peer_pid); it only ever widens to cover every
 * peer seen, and never names pid 1 outside a container's pid namespace,
 * which would admit every process on the host). pc_readers_admitted returns the pid named (0: none) and in *err
 * the errno of that prctl (EINVAL: the kernel has no Yama, nothing needed).
 * pc_common_ancestor(a, b): the nearest process both descend from (a
 * process counts as its own ancestor), 0 when /proc cannot tell.
 */
void pc_readers_admit(int32_t peer_pid);
int32_t pc_readers_admitted(int32_t *err);
int32_t pc_common_ancestor(int32_t a, int32_t b);

/* Thread-safe: makes the running (or next) pc_comm_run return
 * PC_ERR_CANCELLED promptly. pc_comm_clear_cancel() re-arms the comm. */
void pc_comm_cancel(pc_comm *comm);
void pc_comm_clear_cancel(pc_comm *comm);
/* The most microseconds a wait in a small collective (at most 1 MiB sent)
 * may spin before sleeping in poll() (default 200; 0 turns spinning off
 * altogether, also on shared memory below). How long a wait actually spins
 * is learned from the comm's recent waits, up to this cap, and is zero
 * while the host has more runnable tasks than CPUs (see engine.c). */
void pc_comm_set_spin(pc_comm *comm, int32_t spin_us);
/* Fail a collective with PC_ERR_TIMEOUT when no byte moved on any of its
 * connections for `seconds` (0, the default, turns this off). Meant for
 * long-haul links, where the collective deadline must be long. */
void pc_comm_set_stall_timeout(pc_comm *comm, double seconds);
/* The same cap for waits on shared-memory connections only, in collectives
 * of any size (default PC_SHM_SPIN_DEFAULT microseconds); they sleep on
 * eventfd doorbells after it. */
#define PC_SHM_SPIN_DEFAULT 500
void pc_comm_set_shm_spin(pc_comm *comm, int32_t spin_us);
/* Same-host single copy: in a collective whose buffers hold at least
 * min_bytes, a payload (of 64 KiB or more) to a shared-memory peer that can
 * read this process's memory goes as a descriptor, and the peer copies the
 * bytes out of our buffer itself (process_vm_readv) instead of through the
 * ring (a copy in and a copy out). 0 turns it off both ways (we neither send
 * descriptors nor let peers send us any). Default PC_SINGLE_COPY_DEFAULT
 * (measured crossover, 2 ranks on this 2-core host: ~2.5 MiB). Call before
 * the first collective. */
#define PC_SINGLE_COPY_DEFAULT 3145728
void pc_comm_set_single_copy(pc_comm *comm, uint64_t min_bytes);
/* Whether such payloads go single-copy is learned per comm, kind and size
 * (default on): a run's rendezvous waits for the peer to run, which costs more
 * than the ring's second copy where the ranks seldom run at once (other jobs'
 * sessions on the cores); the comm times both ways now and then, on the same
 * calls on every rank, and keeps the faster (core/copy_choice.h). 0: always
 * single copy from min_bytes. */
void pc_comm_set_single_copy_adapt(pc_comm *comm, int32_t adapt);
/* Runs big enough for single copy, with single-copy peers, sent each way. */
void pc_comm_single_copy_runs(const pc_comm *comm, uint64_t *single_copy, uint64_t *rings);
/* Closes every connection; the comm can only be freed afterwards. Peers
 * blocked on us see PC_ERR_PEER at once (this is how a failure propagates). */
void pc_comm_shutdown(pc_comm *comm);
void pc_comm_free(pc_comm *comm);
const char *pc_comm_last_error(const pc_comm *comm);
uint64_t pc_comm_bytes_sent(const pc_comm *comm);
/* Bytes this comm copied straight out of peers' memory (single copy). */
uint64_t pc_comm_bytes_single_copy(const pc_comm *comm);
/* Of those, bytes copied out of peers' result windows (preserving all-reduces, core/window.h). */
uint64_t pc_comm_bytes_from_windows(const pc_comm *comm);
/* Of those, bytes read with plain loads out of our mappings of peers' shared buffers. */
uint64_t pc_comm_bytes_from_shared(const pc_comm *comm);
/* Shared buffers (process-wide): a caller's buffer seen in two single-copy runs is moved onto
 * shared memory (same addresses and bytes) that same-host peers map and read with plain loads.
 * enable 0: nothing more is moved. Stats: buffers moved so far, moves dropped since (the memory
 * was freed and given back), moves live now. available: 1 where this kernel allows it. */
void pc_shared_buffers_enable(int32_t enable);
int32_t pc_shared_buffers_available(void);
void pc_shared_buffers_stats(uint64_t *moved, uint64_t *dropped, int32_t *live);
/* The waiting policy at work: seconds this comm spent spinning in its waits, and how many
 * waits went to sleep in the kernel. */
void pc_comm_wait_stats(const pc_comm *comm, double *spun_s, uint64_t *sleeps);
/* Single copy is decided per connection the first time its receiver receives,
 * so a peer's first payloads on a fresh connection go through the ring. This
 * decides it now on every connection of the comm (not while a plan runs on
 * it): a healing joiner's very first transfer is then single copy too. */
void pc_comm_probe_single_copy(pc_comm *comm);
/* Why single copy from same-host peer `peer` is off: the errno with which
 * the kernel refused our read of its memory (EPERM: ptrace rules such as
 * Yama's ptrace_scope 2; EIO: the read gave back another word), or 0 (reads
 * allowed, not a shared-memory peer, or not found out yet: each side probes
 * at its first receive, or at pc_comm_probe_single_copy). */
int32_t pc_comm_single_copy_refused(const pc_comm *comm, int32_t peer);

/*
 * Runs a plan to completion or failure. `bufs[PC_BUF_IN]`/`bufs[PC_BUF_OUT]`
 * are the caller's memory (sizes in buf_bytes; checked against the plan);
 * scratch is owned by the comm. `seq` and `desc` go into every frame and
 * must match on the receiving side: `seq` orders collectives, `desc` is a
 * digest of the collective's arguments so mismatched calls fail cleanly.
 * Releases nothing the caller owns; on failure *failed_peer is the rank whose
 * connection failed or sent a bad frame (-1 if none).
 */
pc_status pc_comm_run(pc_comm *comm, const pc_plan *plan, void *const *bufs,
                      const uint64_t *buf_bytes, int32_t dtype, int32_t op,
                      uint64_t seq, uint32_t desc, double timeout_s,
                      int32_t *failed_peer);

/* Parts of a plan for pc_comm_run_part. A collective that must agree with
 * the group before it touches the caller's buffer runs its BODY (every
 * transfer; results stay in scratch, the input is left as it was: plans
 * that would write it are refused with PC_ERR_ARG), then, once the group
 * decided to commit, its TAIL (the local copies out of scratch; not
 * cancellable). ALL is both, as pc_comm_run does. */
#define PC_RUN_ALL 0
#define PC_RUN_BODY 1
#define PC_RUN_TAIL 2
pc_status pc_comm_run_part(pc_comm *comm, const pc_plan *plan, int32_t part, void *const *bufs,
                           const uint64_t *buf_bytes, int32_t dtype, int32_t op, uint64_t seq,
                           uint32_t desc, double timeout_s, int32_t *failed_peer);

/* Runs a buffer plan (pc_plan_create_buffers) over the caller's buffers
 * bufs[0 .. nbufs) of buf_bytes[] bytes: every op's byte ranges are checked
 * against them first (PC_ERR_ARG), frames carry `seq` and `desc` as in
 * pc_comm_run, and received bytes land straight in the buffers.
 * With `digests` (else NULL), the receiver hashes as the bytes land: every
 * receive must start at a multiple of PC_HASH_BLOCK of its buffer and end at
 * one or at the buffer's end (PC_ERR_ARG otherwise), and the block digests
 * (pc_hash64_block with `seed`) of what it received are stored buffer after
 * buffer: buffer b's block k at digests[sum over c < b of
 * ceil(buf_bytes[c] / PC_HASH_BLOCK) + k] (the array must hold that many
 * for every buffer; entries of blocks nothing was received into are left
 * alone). pc_hash64_fold over a buffer's digests then gives pc_hash64 of
 * what arrived, without reading the buffer again. Large receives from a
 * same-host peer are copied (and hashed) on up to `threads` threads (0: one
 * per CPU, at most 8). */
pc_status pc_comm_run_buffers(pc_comm *comm, const pc_plan *plan, int32_t nbufs, void *const *bufs,
                              const uint64_t *buf_bytes, uint64_t seq, uint32_t desc, double timeout_s,
                              uint64_t seed, uint64_t *digests, int32_t threads, int32_t *failed_peer);

/* Runs a plan from pc_plan_remap over the caller's buffers bufs[0 .. nbufs)
 * of buf_bytes[] bytes (every op's byte ranges checked against them first:
 * PC_ERR_ARG), otherwise as pc_comm_run. */
pc_status pc_comm_run_remapped(pc_comm *comm, const pc_plan *plan, int32_t nbufs, void *const *bufs,
                               const uint64_t *buf_bytes, int32_t dtype, int32_t op, uint64_t seq, uint32_t desc,
                               double timeout_s, int32_t *failed_peer);

/* The most plans (pc_comm_run / _part calls on any comm) seen running at once in this
 * process since the last reset; reset != 0 returns it and restarts from those running now. */
int32_t pc_engine_peak_running(int32_t reset);

/* Validates a 32-byte frame header against what the plan expects; on
 * mismatch returns PC_ERR_PROTO and writes the reason into why. */
pc_status pc_frame_check(const uint8_t *hdr, uint32_t tag, uint32_t desc, uint64_t seq,
                         uint64_t len, char *why, uint32_t why_len);

/* Receive from any source: waits until the first connection of some other
 * rank starts with a frame of sequence number `seq` and tag `tag` (its
 * header is read in place, nothing is consumed), or is closed, at most
 * timeout_s (0: no limit), and sets *peer to that rank (the ranks after ours
 * are looked at first). A rank whose next frame is another one is passed
 * over: nothing for us can come before it on that connection. The caller
 * then runs a plan that receives from *peer. PC_ERR_TIMEOUT, PC_ERR_CANCELLED. */
pc_status pc_comm_probe(pc_comm *comm, uint64_t seq, uint32_t tag, double timeout_s, int32_t *peer);

/* ---- transport measurement --------------------------------------------- */
/* Sends `bytes` to (rank+1)%n while receiving as many from (rank-1)%n over
 * stripe 0, no reduction: the ceiling a ring can reach on these links. */
pc_status pc_comm_stream_ring(pc_comm *comm, uint64_t bytes, double timeout_s,
                              double *seconds);

/* ---- plans built op by op (point-to-point transfers, custom schedules) --- */
/* An empty plan for `rank` of `nranks`. Append ops (deps are indices of
 * earlier ops; *index receives the new op's index), then seal it before
 * running. Every op is checked as it is added. */
pc_status pc_plan_create(int32_t nranks, int32_t rank, pc_plan **out);
pc_status pc_plan_append(pc_plan *plan, const pc_op *op, const int32_t *deps, int32_t ndeps,
                         int32_t *index);
pc_status pc_plan_seal(pc_plan *plan);
/* A buffer plan: its ops name buffers 0 .. nbufs-1 of the caller (not IN /
 * OUT / SCRATCH) and may only send, receive and copy; it runs through
 * pc_comm_run_buffers only (and other plans never through that). */
#define PC_MAX_BUFFERS 1048576
pc_status pc_plan_create_buffers(int32_t nranks, int32_t rank, int32_t nbufs, pc_plan **out);

/* ---- hashing ----------------------------------------------------------- */
/*
 * A fast 64-bit non-cryptographic hash for parity checks. Data is cut into
 * fixed 64 KiB blocks hashed independently (4 lanes of multiply-rotate
 * mixing each) and the block digests are folded in order, so the value does
 * not depend on how many threads computed it. pc_hash64_many hashes n
 * buffers at once with up to `threads` threads (0 = one per CPU, at most
 * 16); out[i] is the hash of ptrs[i][0..lens[i]).
 */
pc_status pc_hash64(const void *data, uint64_t len, uint64_t seed, uint64_t *out);
pc_status pc_hash64_many(const void *const *ptrs, const uint64_t *lens, int32_t n, uint64_t seed,
                         int32_t threads, uint64_t *out);
/* The same hash in pieces, for bytes that arrive out of order: the digest of
 * block k is pc_hash64_block(data + k * PC_HASH_BLOCK, bytes of that block,
 * seed) (the last block may be shorter; 0 for no bytes), and
 * pc_hash64_fold(the ceil(len / PC_HASH_BLOCK) digests in order, len, seed)
 * equals pc_hash64(data, len, seed). */
#define PC_HASH_BLOCK 65536
uint64_t pc_hash64_block(const void *data, uint64_t len, uint64_t seed);
pc_status pc_hash64_fold(const uint64_t *digests, uint64_t len, uint64_t seed, uint64_t *out);

#endif
