"""Rank-side functions and parent-side references for collective tests.

A *case* is (collective, dtype, op, count, seed, algorithm); each rank
builds its input deterministically from (seed, rank), runs the collective
and returns the raw output bytes. The parent recomputes the expected bytes
by executing the same plans in Python (plansim), i.e. in the same
reduction order, so floats are compared bit for bit.
"""
import numpy as np

from reference import make_input, reduce_fn, scale_fn, storage_dtype

#: The data paths same-host peers can use. Tests that take the ``transport``
#: fixture (tests/conftest.py) run once on each.
TRANSPORTS = ("shm", "tcp")


def assert_transport(comm, transport):
    """Every peer of ``comm`` is reached over ``transport`` (not a silent fallback)."""
    want = ["self" if p == comm.rank else transport for p in range(comm.world_size)]
    assert comm.peer_transports == want, f"asked for {transport}, peers use {comm.peer_transports}"


def on_transport(comm, transport, fn, *args):
    """Executed on every rank: check the transport, then return ``fn(comm, *args)``."""
    assert_transport(comm, transport)
    return fn(comm, *args)


def run_on(fn, world_size, transport, args=(), timeout=90, init_kwargs=None, **run_kwargs):
    """pycoll.testing.run of ``fn(comm, *args)`` over ``transport``; every
    rank first checks that its peers really use it."""
    import pycoll.testing
    return pycoll.testing.run(on_transport, world_size, args=(transport, fn) + tuple(args), timeout=timeout,
                              init_kwargs=dict(init_kwargs or {}, transport=transport), **run_kwargs)


def rank_input(case, rank, world_size):
    coll, dtype, op, count, seed, _ = case
    if coll == "reduce_scatter":
        return make_input(dtype, op, count * world_size, rank, seed)
    return make_input(dtype, op, count, rank, seed)


def run_cases(comm, cases):
    """Executed on every rank."""
    return run_cases_algorithms(comm, cases)[0]


def run_cases_algorithms(comm, cases):
    """Executed on every rank: (output bytes, algorithm that ran) per case."""
    out, algorithms = [], []
    for case in cases:
        coll, dtype, op, count, seed, algorithm = case
        x = rank_input(case, comm.rank, comm.world_size)
        kw = {"dtype": dtype, "algorithm": algorithm}
        if coll == "all_reduce":
            comm.all_reduce(x, op=op, **kw)
            res = x
        elif coll == "all_gather":
            res = np.zeros(count * comm.world_size, dtype=x.dtype)
            comm.all_gather(x, res, **kw)
        elif coll == "reduce_scatter":
            res = np.zeros(count, dtype=x.dtype)
            comm.reduce_scatter(x, res, op=op, **kw)
        elif coll == "broadcast":
            comm.broadcast(x, root=seed % comm.world_size, **kw)
            res = x
        out.append(res.tobytes())
        algorithms.append(comm.stats[-1].algorithm)
    return out, algorithms


def make_plans(case, n, algorithm, topology=None):
    """The plans a communicator of n local ranks builds for ``case`` under ``algorithm``
    (an effective one, e.g. the Stat.algorithm it reported)."""
    from pycoll.plan import planners
    from pycoll.comm.communicator import DEFAULT_SEGMENT
    from pycoll.plan.layout import Layout

    coll, dtype, op, count, seed, _ = case
    es = storage_dtype(dtype).itemsize
    root = seed % n if coll == "broadcast" else 0
    layout = Layout(n, topology, hosts=["localhost"] * n)
    return [planners.build(algorithm, coll, layout, r, count, es, root=root, segment_bytes=DEFAULT_SEGMENT,
                           preserve=coll in ("all_reduce", "broadcast"), avg=(op == "avg")) for r in range(n)]


def expected(case, world_size, plans_for):
    """Reference bytes per rank, from the plans the communicator would use."""
    from plansim import simulate

    coll, dtype, op, count, seed, _ = case
    sd = storage_dtype(dtype)
    inputs = [rank_input(case, r, world_size) for r in range(world_size)]
    plans = plans_for(case, world_size)
    bufs = []
    for r in range(world_size):
        x = inputs[r].copy()
        scratch = np.zeros(plans[r].need_bytes(2) // sd.itemsize, dtype=sd)
        if coll in ("all_reduce", "broadcast"):
            bufs.append([x, x, scratch])
        elif coll == "all_gather":
            bufs.append([x, np.zeros(count * world_size, dtype=sd), scratch])
        else:
            bufs.append([x, np.zeros(count, dtype=sd), scratch])
    simulate(plans, bufs, sd.itemsize, reduce_fn(dtype, op), scale_fn(dtype, op, world_size))
    return [bufs[r][1].tobytes() for r in range(world_size)]
