"""One plan over several caller buffers: the coalesced collectives without packing.

A coalesced call (``comm.all_reduce_coalesced`` and friends, torch's ``allreduce_coalesced``)
is one collective over its arrays laid end to end. :func:`remap` takes the plan of that
collective over one virtual buffer and re-addresses its input and output onto stretches of the
arrays themselves (``pc_plan_remap``, csrc/plan/plan_remap.c): an op that crosses from one
array into the next is cut in two. No copy in, no copy out. :func:`stretches` gives the
stretches of the packed layout (pycoll.comm.communicator's ``_pack``): each array cut in
``blocks`` equal blocks, block r of every array before block r+1 of any.

A plan whose transfers touch scratch (the direct plans of small messages, which receive each
peer's data there) cannot be cut the same way on both ends of a transfer, and is refused:
:func:`remap` returns None and the caller packs.
"""
from pycoll.core.native import ffi, lib

__all__ = ["remap", "stretches"]


def stretches(sizes, blocks, first=0):
    """``(buffer, offset, length)`` in bytes of each piece of the packed layout of buffers
    numbered ``first``, ``first + 1``, ... of ``sizes`` bytes, each cut in ``blocks`` blocks."""
    return [(first + i, r * (n // blocks), n // blocks) for r in range(blocks) for i, n in enumerate(sizes)
            if n // blocks]


def remap(plan, nbufs, ins, outs):
    """``plan`` (a :class:`pycoll.plan.planners.Plan`) with IN read as the stretches ``ins``
    laid end to end and OUT as ``outs`` (see :func:`stretches`), over ``nbufs`` caller
    buffers; None where the plan cannot be remapped (see the module doc)."""
    from pycoll.plan.planners import Plan
    if not ins or not outs:
        return None
    cin = _extents(ins)
    cout = cin if outs is ins else _extents(outs)
    out = ffi.new("pc_plan **")
    st = lib.pc_plan_remap(plan.ptr, nbufs, len(ins), cin, len(outs), cout, out)
    if st == lib.PC_ERR_ARG:
        return None
    if st != lib.PC_OK:
        raise MemoryError(f"pc_plan_remap: status {st}")
    return Plan(out[0])


def _extents(stretches_):
    return ffi.new("pc_extent[]", [{"buf": b, "off": off, "len": n} for b, off, n in stretches_])
