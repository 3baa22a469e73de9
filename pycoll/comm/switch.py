"""The workers' side of the standalone in-network aggregators (``pycoll aggregator``).

Workers and switches share this module; :mod:`pycoll.aggregator` (the switch process) and
:mod:`pycoll.comm.communicator` (a worker's communicator) both import it, and it imports neither.

* :func:`split_members` is the one place that maps the coordinator's member list (workers
  first, aggregators last) to a worker count and each switch group's engine rank.
* :class:`EngineLayout` is the hierarchical layout over the whole mesh (workers, then
  switches) that ``plan_hier`` runs on, on both sides.
* :class:`SwitchPath` is a worker's route through the switches for one epoch: the whole-mesh C
  communicator, its plans, and the 64-byte descriptor frame (:func:`pack_descriptor`) that the
  lowest worker of each switch group sends its switch before each ``innetwork`` all-reduce.

See :mod:`pycoll.aggregator` for membership, the data path, and what happens on faults.
"""
import struct

from pycoll.core import engine
from pycoll.plan import planners
from pycoll.core.native import ffi, lib
from pycoll.errors import CollectiveError

__all__ = ["split_members", "EngineLayout", "SwitchPath", "pack_descriptor", "unpack_descriptor", "run_plan",
           "DESC_BYTES", "DESC_SEQ", "DESC_DIGEST"]

DESC_FORMAT = "<8sQIiiQiI20x"  # 64 bytes: magic, seq, digest, dtype, op, count, itemsize, timeout (ms)
DESC_BYTES = struct.calcsize(DESC_FORMAT)
DESC_MAGIC = b"pcswitch"
DESC_SEQ = 0                   # frame seq of descriptors (collectives start at 1)
DESC_DIGEST = 0x5357_4443      # frame digest of descriptors


def split_members(members):
    """``members`` as the coordinator sends them ([name, addr, host, group-or-None], engine rank
    order) -> (worker count, {group name: engine rank of its switch})."""
    switches = {}
    workers = 0
    for e, m in enumerate(members):
        group = m[3] if len(m) > 3 else None
        if group is None:
            if switches:
                raise CollectiveError("coordinator sent an aggregator before a worker")
            workers += 1
        else:
            switches.setdefault(group, []).append(e)
    return workers, switches


class EngineLayout:
    """The hierarchical layout over the whole mesh (workers, then switches), for ``plan_hier``.

    ``usable`` is False when some switch has no group to serve (unknown or duplicate group, or
    no topology that matches the workers): then no switch is used this epoch, since every engine
    rank takes part in a hierarchical plan.
    """

    def __init__(self, layout, switches):
        self.workers = layout.world_size
        nsw = sum(len(v) for v in switches.values())
        self.world_size = self.workers + nsw
        self.agg_of = list(layout.agg_of) + list(range(self.workers, self.world_size))
        self.leaders = {}  # engine rank of a switch -> its group's lowest worker
        self.groups = []   # names of the groups a switch serves
        served = set()
        groups = layout.topology.groups if layout.topology is not None else []
        for g in groups:
            if g.aggregator == "switch" and g.name in switches:
                e = switches[g.name][0]
                served.add(e)
                self.groups.append(g.name)
                self.leaders[e] = min(g.ranks)
                for r in g.ranks:
                    self.agg_of[r] = e
        self.usable = bool(served) and len(served) == nsw
        self.agg_ring = []
        for r in layout.ring:
            a = self.agg_of[r]
            if a not in self.agg_ring:
                self.agg_ring.append(a)

    def plan(self, rank, count, itemsize, segment_bytes, stripes, preserve):
        """The hierarchical all-reduce plan of engine rank ``rank``."""
        return planners.plan_hier("all_reduce", self.world_size, rank, self.agg_of, [self.agg_ring], count,
                                  itemsize, segment_bytes=segment_bytes, stripes=stripes,
                                  preserve=preserve and rank < self.workers, switch=rank >= self.workers)


def pack_descriptor(seq, digest, dtype, op, count, itemsize, timeout):
    ms = max(1, min(int(timeout * 1000), 0xFFFFFFFF))
    return struct.pack(DESC_FORMAT, DESC_MAGIC, seq, digest, dtype, op, count, itemsize, ms)


def unpack_descriptor(data):
    """(seq, digest, dtype, op, count, itemsize, timeout s); never trusts what came off the wire."""
    magic, seq, digest, dtype, op, count, itemsize, ms = struct.unpack(DESC_FORMAT, bytes(data))
    if magic != DESC_MAGIC or lib.pc_dtype_size(dtype) != itemsize or not 0 <= op < lib.PC_OP_COUNT \
            or op == lib.PC_AVG or count >= 1 << 40 or ms == 0:
        raise CollectiveError("malformed aggregator descriptor")
    return seq, digest, dtype, op, count, itemsize, ms / 1000.0


def run_plan(comm, plan, in_addr, in_bytes, out_addr, out_bytes, dtype, op, seq, digest, timeout):
    """Run ``plan`` on the C communicator ``comm`` (one whole plan); returns (status, failed peer)."""
    bufs = ffi.new("void *[2]", [ffi.cast("void *", in_addr), ffi.cast("void *", out_addr)])
    sizes = ffi.new("uint64_t[2]", [in_bytes, out_bytes])
    failed = ffi.new("int32_t *")
    st = engine.run(comm, plan.ptr, bufs, sizes, dtype, op, seq, digest, timeout, failed)
    return st, int(failed[0])


class SwitchPath:
    """A worker's route through the switches for one epoch: the whole-mesh C communicator and
    the engine layout. Made by the communicator at each epoch that has usable switches."""

    def __init__(self, hcomm, elayout, rank, stripes):
        self.hcomm = hcomm
        self.elayout = elayout
        self.rank = rank
        self.stripes = stripes
        self.usable = elayout.usable
        self._plans = {}
        self._desc_plans = {e: planners.plan_p2p(elayout.world_size, rank, e, DESC_BYTES, True)
                            for e, lead in elayout.leaders.items() if lead == rank and self.usable}
        self._desc = ffi.new("uint8_t[]", DESC_BYTES)

    def applies(self, coll, chosen, opc, count):
        return coll == "all_reduce" and chosen == "innetwork" and opc != lib.PC_AVG and count > 0

    def plan(self, count, itemsize, segment_bytes, preserve):
        key = (count, itemsize, preserve)
        p = self._plans.get(key)
        if p is None:
            if len(self._plans) > 64:
                self._plans.clear()
            p = self._plans[key] = self.elayout.plan(self.rank, count, itemsize, segment_bytes, self.stripes,
                                                     preserve)
        return p

    def announce(self, seq, digest, dtype, op, count, itemsize, timeout):
        """Send the descriptor to every switch this rank leads; returns (status, failed peer)."""
        if not self._desc_plans:
            return lib.PC_OK, -1
        ffi.memmove(self._desc, pack_descriptor(seq, digest, dtype, op, count, itemsize, timeout), DESC_BYTES)
        addr = int(ffi.cast("uintptr_t", self._desc))
        for plan in self._desc_plans.values():
            st, peer = run_plan(self.hcomm, plan, addr, DESC_BYTES, 0, 0, lib.PC_U8, lib.PC_SUM, DESC_SEQ,
                                DESC_DIGEST, timeout)
            if st != lib.PC_OK:
                return st, peer
        return lib.PC_OK, -1
