"""The one-step collectives as direct exchanges (csrc/plan/plan_exchange.c).

gather, scatter and all_to_all (equal or uneven splits) all move every byte once, straight from
the rank that has it to the rank that wants it; each is one ``pc_plan_exchange`` with its own
byte ranges, computed here. reduce to a root is ``pc_plan_reduce``. reduce, gather and scatter
also have a binomial-tree plan (``algorithm="tree"``, csrc/plan/plan_binomial.c: ceil(lg n)
rounds, lg n frames at the root); :func:`pycoll.plan.costmodel.CostModel.choose_rooted` picks one.
Every function returns the :class:`pycoll.plan.planners.Plan` of ``rank`` of ``n``; sizes are in
bytes.
"""
from pycoll.errors import InvalidArgument
from pycoll.plan import planners

NO_FRAME = planners.NO_FRAME


def _rooted(rank, n, root, nbytes, stripes, to_root):
    """One ``nbytes`` block between the root and every rank (the root's own too): to the root,
    laid in rank order in its OUT (gather), or from the root's IN, block p to rank p (scatter).
    A rank that names another root fails the header check at once (PC_PLAN_AGREE)."""
    one = ([0] * n, [NO_FRAME] * n)  # the side that moves one block: only with the root
    one[1][root] = nbytes
    many = ([p * nbytes for p in range(n)], [nbytes] * n) if rank == root else ([0] * n, [NO_FRAME] * n)
    (send_off, send_len), (recv_off, recv_len) = (one, many) if to_root else (many, one)
    return planners.plan_exchange(n, rank, send_off, send_len, recv_off, recv_len, stripes=stripes, agree=True)


ROOTED_ALGORITHMS = ("direct", "tree")


def _check_rooted(algorithm):
    if algorithm not in ROOTED_ALGORITHMS:
        raise InvalidArgument(f"rooted collectives run {' or '.join(ROOTED_ALGORITHMS)}, not {algorithm!r}")


def gather(rank, n, root, nbytes, stripes=1, algorithm="direct"):
    """Every rank's IN (``nbytes``) into the root's OUT, in rank order."""
    _check_rooted(algorithm)
    if algorithm == "tree":
        return planners.plan_binomial_rooted("gather", n, rank, root, nbytes)
    return _rooted(rank, n, root, nbytes, stripes, to_root=True)


def scatter(rank, n, root, nbytes, stripes=1, algorithm="direct"):
    """Block p (``nbytes``) of the root's IN into rank p's OUT."""
    _check_rooted(algorithm)
    if algorithm == "tree":
        return planners.plan_binomial_rooted("scatter", n, rank, root, nbytes)
    return _rooted(rank, n, root, nbytes, stripes, to_root=False)


def offsets(lengths):
    """Start of each of ``lengths`` laid end to end."""
    out, at = [], 0
    for ln in lengths:
        out.append(at)
        at += ln
    return out


ALL_TO_ALL_ALGORITHMS = ("direct", "staged")


def all_to_all(rank, n, send_bytes, recv_bytes, stripes=1, algorithm="direct"):
    """Block p of IN (``send_bytes[p]``, blocks end to end) to rank p; rank p's block for us
    into OUT (``recv_bytes[p]``). Every pair exchanges a frame, empty ones too, so splits that
    disagree across ranks fail the frame's length check instead of waiting. ``algorithm``:
    "direct" (every frame at once) or "staged" (pairwise, n-1 steps: step k sends to rank+k
    and receives from rank-k, a step's send waiting for the previous step's receive)."""
    if algorithm not in ALL_TO_ALL_ALGORITHMS:
        raise InvalidArgument(f"all_to_all runs {' or '.join(ALL_TO_ALL_ALGORITHMS)}, not {algorithm!r}")
    if len(send_bytes) != n or len(recv_bytes) != n:
        raise InvalidArgument(f"all_to_all: {len(send_bytes)} send and {len(recv_bytes)} receive splits for "
                              f"world size {n}")
    if send_bytes[rank] != recv_bytes[rank]:
        raise InvalidArgument(f"all_to_all: rank {rank} sends itself {send_bytes[rank]} bytes but expects "
                              f"{recv_bytes[rank]}")
    return planners.plan_exchange(n, rank, offsets(send_bytes), list(send_bytes), offsets(recv_bytes),
                                  list(recv_bytes), stripes=stripes, staged=algorithm == "staged")


def reduce(rank, n, root, count, itemsize, segment_bytes=1 << 19, stripes=1, avg=False, algorithm="direct"):
    """The others' IN to the root, reduced there into its OUT: in rank order (direct), or
    up a binomial tree in relative rank order grouped by subtrees (tree; see plan_binomial.c)."""
    _check_rooted(algorithm)
    if algorithm == "tree":
        return planners.plan_binomial_reduce(n, rank, root, count, itemsize, segment_bytes=segment_bytes,
                                             stripes=stripes, avg=avg)
    return planners.plan_reduce(n, rank, root, count, itemsize, segment_bytes=segment_bytes, stripes=stripes,
                                avg=avg)


def p2p(rank, n, transfers):
    """Point-to-point transfers, (is_send, peer, offset, bytes, tag) each (see plan_p2p_list)."""
    return planners.plan_p2p_list(n, rank, transfers)
