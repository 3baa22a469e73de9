"""Algorithm choice and plan construction (the C planners do the work).

Each algorithm turns (collective, world, sizes) into a C plan; plans are
cached per communicator epoch. Adding an algorithm = a function here that
calls its C planner, plus its verifier tests.
"""
import numpy as np

from ._native import ffi, lib
from .errors import InvalidArgument

COLLECTIVES = {
    "all_reduce": lib.PC_COLL_ALLREDUCE,
    "all_gather": lib.PC_COLL_ALLGATHER,
    "reduce_scatter": lib.PC_COLL_REDUCE_SCATTER,
    "broadcast": lib.PC_COLL_BROADCAST,
    "barrier": lib.PC_COLL_BARRIER,
}


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
            })
        return out

    @property
    def tail_first(self):
        return lib.pc_plan_tail_first(self.ptr)

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


ALGORITHMS = ("auto", "ring")


def check_algorithm(name):
    if name not in ALGORITHMS:
        raise InvalidArgument(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return name
