"""Plan construction: thin wrappers around the C planners, and the dispatch
from an algorithm name to a plan.

Algorithms (``algorithm=`` of every collective):

- ``ring``: pipelined ring over the topology's ring order (every collective).
- ``hamiltonian``: one ring per Hamiltonian cycle of the complete digraph,
  the payload split across them, so every ordered pair of peers carries
  traffic at once (every collective; see :mod:`pycoll.plan.layout` for the cycles).
- ``tree``: pipelined double binary tree (all_reduce, broadcast).
- ``direct``: one-shot all-reduce, every rank sends its buffer to every
  other and reduces all contributions itself (all_reduce; small messages).
- ``allpairs``: direct reduce-scatter then all-gather, each rank owning one
  chunk: a ring's bytes in two steps, with no chain through the other ranks
  (all_reduce; ranks sharing one host's cores).
- ``innetwork``: hierarchical all-reduce through one aggregator per group
  (all_reduce).
- ``auto``: chosen per call by :mod:`pycoll.plan.costmodel`.

A collective an algorithm does not implement runs the ring instead; the
algorithm that actually ran is what :func:`effective` returns and what
``Stat.algorithm`` records. Plans are cached per communicator epoch.
Adding an algorithm = a C planner, a branch in :func:`build`, its cost in
:mod:`pycoll.plan.costmodel`, and its verifier tests.
"""
import numpy as np

from pycoll.core.native import ffi, lib
from pycoll.errors import InvalidArgument

COLLECTIVES = {
    "all_reduce": lib.PC_COLL_ALLREDUCE,
    "all_gather": lib.PC_COLL_ALLGATHER,
    "reduce_scatter": lib.PC_COLL_REDUCE_SCATTER,
    "broadcast": lib.PC_COLL_BROADCAST,
    "barrier": lib.PC_COLL_BARRIER,
    # one-step plans (plan_exchange.c): no algorithm choice
    "reduce": lib.PC_COLL_REDUCE,
    "gather": lib.PC_COLL_GATHER,
    "scatter": lib.PC_COLL_SCATTER,
    "all_to_all": lib.PC_COLL_ALLTOALL,
    "p2p": lib.PC_COLL_P2P,
}

#: a length in :func:`plan_exchange`: no frame with that rank at all
NO_FRAME = (1 << 64) - 1


class Plan:
    """Owns a C plan; exposes its ops to Python (verifiers, --show-plan)."""

    def __init__(self, ptr):
        self.ptr = ffi.gc(ptr, lib.pc_plan_free)

    @property
    def nops(self):
        return lib.pc_plan_nops(self.ptr)

    def ops(self):
        """The plan's ops as a list of dicts (for inspection and tests)."""
        raw = lib.pc_plan_ops(self.ptr)
        deps = lib.pc_plan_deps(self.ptr)
        out = []
        for i in range(self.nops):
            o = raw[i]
            out.append({
                "kind": int(o.kind), "peer": int(o.peer), "stripe": int(o.stripe), "tag": int(o.tag),
                "src_buf": int(o.src_buf), "src_off": int(o.src_off), "dst_buf": int(o.dst_buf),
                "dst_off": int(o.dst_off), "len": int(o.len),
                "deps": [int(deps[o.dep_first + k]) for k in range(o.dep_count)],
                "aux_buf": int(o.aux_buf), "aux_off": int(o.aux_off),
            })
        return out

    @property
    def tail_first(self):
        return lib.pc_plan_tail_first(self.ptr)

    @property
    def codec(self):
        """The wire codec (a ``lib.PC_CODEC_*`` constant; 0 = none)."""
        return lib.pc_plan_codec(self.ptr)

    def need_bytes(self, buf):
        return lib.pc_plan_need_bytes(self.ptr, buf)


def plan_rings(coll, nranks, rank, rings, count, itemsize, *, root=0, segment_bytes=1 << 19,
               stripes=1, preserve=False, avg=False):
    """A (multi-)ring plan; ``rings`` is a list of rank orders."""
    rings = np.ascontiguousarray(np.asarray(rings, dtype=np.int32).reshape(len(rings), nranks))
    flags = (lib.PC_PLAN_PRESERVE_INPUT if preserve else 0) | (lib.PC_PLAN_AVG if avg else 0)
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_rings(COLLECTIVES[coll], nranks, rank, ffi.cast("int32_t *", rings.ctypes.data),
                           len(rings), root, count, itemsize, segment_bytes, stripes, flags, out)
    if st != lib.PC_OK:
        raise InvalidArgument(f"cannot plan {coll} for rank {rank} of {nranks} (status {st})")
    return Plan(out[0])


def _flags(preserve, avg):
    return (lib.PC_PLAN_PRESERVE_INPUT if preserve else 0) | (lib.PC_PLAN_AVG if avg else 0)


def plan_tree(coll, nranks, rank, count, itemsize, *, root=0, segment_bytes=1 << 17, stripes=1,
              preserve=False, avg=False):
    """A double-binary-tree plan (all_reduce or broadcast)."""
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_tree(COLLECTIVES[coll], nranks, rank, root, count, itemsize, segment_bytes, stripes,
                          _flags(preserve, avg), out)
    if st != lib.PC_OK:
        raise InvalidArgument(f"cannot plan a tree {coll} for rank {rank} of {nranks} (status {st})")
    return Plan(out[0])


def plan_direct(coll, nranks, rank, count, itemsize, *, stripes=1, preserve=False, avg=False):
    """A one-shot plan (all_reduce only): every rank sends its buffer to every
    other and reduces all n contributions in rank order."""
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_direct(COLLECTIVES[coll], nranks, rank, count, itemsize, stripes, _flags(preserve, avg), out)
    if st != lib.PC_OK:
        raise InvalidArgument(f"cannot plan a direct {coll} for rank {rank} of {nranks} (status {st})")
    return Plan(out[0])


def plan_allpairs(coll, nranks, rank, count, itemsize, *, segment_bytes=1 << 19, stripes=1, preserve=False,
                  avg=False):
    """A direct reduce-scatter + all-gather plan (all_reduce only, plan_allpairs.c)."""
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_allpairs(COLLECTIVES[coll], nranks, rank, count, itemsize, segment_bytes, stripes,
                              _flags(preserve, avg), out)
    if st != lib.PC_OK:
        raise InvalidArgument(f"cannot plan an allpairs {coll} for rank {rank} of {nranks} (status {st})")
    return Plan(out[0])


def tree_links(nranks, tree, rank):
    """(parent, child0, child1) of ``rank`` in all-reduce tree 0 or 1; -1 where absent."""
    p, c0, c1 = ffi.new("int32_t *"), ffi.new("int32_t *"), ffi.new("int32_t *")
    st = lib.pc_tree_links(nranks, tree, rank, p, c0, c1)
    if st != lib.PC_OK:
        raise InvalidArgument(f"no tree {tree} link for rank {rank} of {nranks}")
    return int(p[0]), int(c0[0]), int(c1[0])


def plan_hier(coll, nranks, rank, agg_of, rings, count, itemsize, *, segment_bytes=1 << 19, stripes=1,
              preserve=False, avg=False, switch=False):
    """A hierarchical all-reduce plan: ``agg_of[r]`` aggregates rank r's group
    (itself for ring ranks); ``rings`` are orders of the ring ranks. ``switch``:
    ``rank`` is a standalone aggregator with no data (see :mod:`pycoll.aggregator`)."""
    agg = np.ascontiguousarray(np.asarray(agg_of, dtype=np.int32).reshape(nranks))
    nring = len(rings[0]) if len(rings) else 0
    segment_bytes = hier_segment(segment_bytes, count * itemsize, nring)
    orders = np.ascontiguousarray(np.asarray(rings, dtype=np.int32).reshape(len(rings), nring))
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_hier(COLLECTIVES[coll], nranks, rank, ffi.cast("int32_t *", agg.ctypes.data),
                          ffi.cast("int32_t *", orders.ctypes.data), len(orders), nring, count, itemsize,
                          segment_bytes, stripes, _flags(preserve, avg) | (lib.PC_PLAN_SWITCH if switch else 0), out)
    if st != lib.PC_OK:
        raise InvalidArgument(f"cannot plan a hierarchical {coll} for rank {rank} of {nranks} (status {st})")
    return Plan(out[0])


def plan_p2p(nranks, rank, peer, nbytes, send):
    """One frame of ``nbytes`` from IN to ``peer`` (send) or from ``peer`` into OUT."""
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_p2p(nranks, rank, peer, nbytes, 1 if send else 0, out)
    if st != lib.PC_OK:
        raise InvalidArgument(f"cannot plan a frame between ranks {rank} and {peer} of {nranks} (status {st})")
    return Plan(out[0])


def plan_reduce(nranks, rank, root, count, itemsize, *, segment_bytes=1 << 19, stripes=1, avg=False):
    """Reduce to ``root``: the others send, the root reduces in rank order (plan_exchange.c)."""
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_reduce(nranks, rank, root, count, itemsize, segment_bytes, stripes, _flags(False, avg), out)
    if st != lib.PC_OK:
        raise InvalidArgument(f"cannot plan a reduce to {root} for rank {rank} of {nranks} (status {st})")
    return Plan(out[0])


def plan_binomial_reduce(nranks, rank, root, count, itemsize, *, segment_bytes=1 << 19, stripes=1, avg=False):
    """Reduce to ``root`` over a binomial tree (plan_binomial.c): every node reduces its input
    with its children's subtree results in relative rank order and passes it up."""
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_binomial_reduce(nranks, rank, root, count, itemsize, segment_bytes, stripes,
                                     _flags(False, avg), out)
    if st != lib.PC_OK:
        raise InvalidArgument(f"cannot plan a tree reduce to {root} for rank {rank} of {nranks} (status {st})")
    return Plan(out[0])


def plan_binomial_rooted(coll, nranks, rank, root, nbytes):
    """gather or scatter of ``nbytes`` blocks over a binomial tree (plan_binomial.c)."""
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_binomial_rooted(COLLECTIVES[coll], nranks, rank, root, nbytes, out)
    if st != lib.PC_OK:
        raise InvalidArgument(f"cannot plan a tree {coll} from {root} for rank {rank} of {nranks} (status {st})")
    return Plan(out[0])


def plan_exchange(nranks, rank, send_off, send_len, recv_off, recv_len, *, stripes=1, agree=False, staged=False):
    """A one-step exchange (all_to_all, gather, scatter): byte ranges of IN to send to and of
    OUT to receive from every rank (:data:`NO_FRAME`: no frame with that rank). ``staged``:
    n-1 pairwise steps instead, one payload in flight each way (PC_PLAN_STAGED)."""
    arrs = [np.ascontiguousarray(np.asarray(a, dtype=np.uint64).reshape(nranks))
            for a in (send_off, send_len, recv_off, recv_len)]
    ptrs = [ffi.cast("uint64_t *", a.ctypes.data) for a in arrs]
    out = ffi.new("pc_plan **")
    flags = (lib.PC_PLAN_AGREE if agree else 0) | (lib.PC_PLAN_STAGED if staged else 0)
    st = lib.pc_plan_exchange(nranks, rank, *ptrs, stripes, flags, out)
    if st != lib.PC_OK:
        raise InvalidArgument(f"cannot plan an exchange for rank {rank} of {nranks} (status {st})")
    return Plan(out[0])


def plan_p2p_list(nranks, rank, transfers):
    """Point-to-point transfers: ``transfers`` is a list of (is_send, peer, byte offset,
    bytes, tag); sends read IN, receives write OUT, in one step."""
    n = len(transfers)
    cols = list(zip(*transfers)) if n else [(), (), (), (), ()]
    is_send = np.ascontiguousarray(np.asarray(cols[0], dtype=np.int32).reshape(n))
    peer = np.ascontiguousarray(np.asarray(cols[1], dtype=np.int32).reshape(n))
    off = np.ascontiguousarray(np.asarray(cols[2], dtype=np.uint64).reshape(n))
    ln = np.ascontiguousarray(np.asarray(cols[3], dtype=np.uint64).reshape(n))
    tag = np.ascontiguousarray(np.asarray(cols[4], dtype=np.uint32).reshape(n))
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_p2p_list(nranks, rank, n, ffi.cast("int32_t *", peer.ctypes.data),
                              ffi.cast("int32_t *", is_send.ctypes.data), ffi.cast("uint64_t *", off.ctypes.data),
                              ffi.cast("uint64_t *", ln.ctypes.data), ffi.cast("uint32_t *", tag.ctypes.data), out)
    if st != lib.PC_OK:
        raise InvalidArgument(f"cannot plan point-to-point transfers for rank {rank} of {nranks} (status {st})")
    return Plan(out[0])


ALGORITHMS = ("auto", "ring", "hamiltonian", "tree", "innetwork", "direct", "allpairs")
# Which collectives each algorithm implements; the others run the ring.
SUPPORTS = {
    "ring": {"all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier"},
    "hamiltonian": {"all_reduce", "all_gather", "reduce_scatter", "broadcast"},
    "tree": {"all_reduce", "broadcast"},
    "innetwork": {"all_reduce"},
    "direct": {"all_reduce"},
    "allpairs": {"all_reduce"},
}
# Tree segments are smaller: its pipeline is as deep as the trees, a ring's only one hop.
TREE_SEGMENT = 1 << 17
# The in-network schedule fills its aggregators piece by piece and drains the results the same
# way: the first piece's trip in and the last one's trip out are paid outside the pipeline, so
# it cuts each ring chunk into HIER_PIECES pieces (not below HIER_MIN_SEGMENT bytes). 8: the
# shared-uplink emulation (bench/shared_uplink.py) ran 1 MiB in 98 ms instead of 115 ms with it,
# and 16 MiB slower with 16 pieces (1.70 s) than with 8 (1.48 s).
HIER_PIECES = 8
HIER_MIN_SEGMENT = 1 << 16


def hier_segment(segment_bytes, nbytes, ring_ranks):
    """The pipeline unit plan_hier uses for an ``nbytes`` all-reduce whose inter-group ring has
    ``ring_ranks`` ranks: at most ``segment_bytes``, small enough for HIER_PIECES per chunk."""
    chunk = int(nbytes) // max(int(ring_ranks), 1)
    return int(min(segment_bytes, max(HIER_MIN_SEGMENT, chunk // HIER_PIECES)))


def check_algorithm(name):
    if name not in ALGORITHMS:
        raise InvalidArgument(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return name


def effective(algorithm, coll):
    """The algorithm that runs ``coll`` when ``algorithm`` (not auto) is asked for."""
    return algorithm if coll in SUPPORTS.get(algorithm, ()) else "ring"


def build(algorithm, coll, layout, rank, count, itemsize, *, root=0, segment_bytes=1 << 19, stripes=1,
          preserve=False, avg=False):
    """The plan of ``rank`` for ``coll`` under ``algorithm`` (an effective one,
    not auto) on ``layout`` (a :class:`pycoll.plan.layout.Layout`)."""
    n = layout.world_size
    kw = dict(segment_bytes=segment_bytes, stripes=stripes, preserve=preserve, avg=avg)
    if algorithm == "tree":
        kw["segment_bytes"] = min(segment_bytes, TREE_SEGMENT)
        return plan_tree(coll, n, rank, count, itemsize, root=root, **kw)
    if algorithm == "direct":
        return plan_direct(coll, n, rank, count, itemsize, stripes=stripes, preserve=preserve, avg=avg)
    if algorithm == "allpairs":
        return plan_allpairs(coll, n, rank, count, itemsize, **kw)
    if algorithm == "innetwork":
        return plan_hier(coll, n, rank, layout.agg_of, [layout.agg_ring], count, itemsize, **kw)
    rings = layout.cycles if algorithm == "hamiltonian" else [layout.ring]
    return plan_rings(coll, n, rank, rings, count, itemsize, root=root, **kw)
