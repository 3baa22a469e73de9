"""Symbolic verification of the planners: no sockets, every world size.

Each plan set is executed in Python with expressions instead of numbers.
For every output element we check who contributed (every rank exactly
once) and that all ranks hold the *same* expression (same reduction
order, hence bit-identical floats).
"""
import numpy as np
import pytest

from pycoll.plan import planners
from plansim import IN, OUT, SCRATCH, leaves, simulate, sym_array, sym_reduce, sym_scale

WORLD_SIZES = list(range(1, 13)) + [16, 17, 31, 32]


def ring_plans(coll, n, count, rings=None, **kw):
    rings = rings or [list(range(n))]
    return [planners.plan_rings(coll, n, r, rings, count, 8, **kw) for r in range(n)]


def buffers(plans, in_counts, out_counts, ins):
    bufs = []
    for r, p in enumerate(plans):
        out = np.empty(out_counts, dtype=object)
        scratch = np.empty(p.need_bytes(SCRATCH) // 8, dtype=object)
        bufs.append([ins[r], out, scratch])
    return bufs


@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("preserve", [False, True])
@pytest.mark.parametrize("avg", [False, True])
def test_ring_all_reduce(n, preserve, avg):
    count = 3 * n + 2  # uneven chunks
    plans = ring_plans("all_reduce", n, count, segment_bytes=16, preserve=preserve, avg=avg)
    ins = [sym_array(r, count) for r in range(n)]
    bufs = []
    for r, p in enumerate(plans):
        data = ins[r].copy()
        scratch = np.empty(p.need_bytes(SCRATCH) // 8, dtype=object)
        # in place: IN and OUT are the same array
        bufs.append([data, data, scratch])
    simulate(plans, bufs, 8, sym_reduce, sym_scale if avg else None)
    for i in range(count):
        exprs = {repr(bufs[r][OUT][i]) for r in range(n)}
        assert len(exprs) == 1, f"element {i}: ranks disagree on the reduction order"
        e = bufs[0][OUT][i]
        if avg and n > 1:
            assert e[0] == "scale"
        assert sorted(leaves(e)) == [(r, i) for r in range(n)]


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_ring_all_gather(n):
    count = 5
    plans = ring_plans("all_gather", n, count, segment_bytes=16)
    ins = [sym_array(r, count) for r in range(n)]
    bufs = buffers(plans, count, n * count, ins)
    simulate(plans, bufs, 8, sym_reduce)
    for r in range(n):
        assert list(bufs[r][OUT]) == [(q, i) for q in range(n) for i in range(count)]


@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("avg", [False, True])
def test_ring_reduce_scatter(n, avg):
    count = 4
    plans = ring_plans("reduce_scatter", n, count, segment_bytes=16, avg=avg)
    ins = [sym_array(r, n * count) for r in range(n)]
    bufs = buffers(plans, n * count, count, ins)
    simulate(plans, bufs, 8, sym_reduce, sym_scale if avg else None)
    for r in range(n):
        for i in range(count):
            assert sorted(leaves(bufs[r][OUT][i])) == [(q, r * count + i) for q in range(n)]
        # the input is never written
        assert list(bufs[r][IN]) == list(sym_array(r, n * count))


@pytest.mark.parametrize("n", WORLD_SIZES)
@pytest.mark.parametrize("preserve", [False, True])
def test_ring_broadcast(n, preserve):
    count = 7
    root = n // 2
    plans = ring_plans("broadcast", n, count, root=root, segment_bytes=16, preserve=preserve)
    bufs = []
    for r, p in enumerate(plans):
        data = sym_array(r, count)
        bufs.append([data, data, np.empty(p.need_bytes(SCRATCH) // 8, dtype=object)])
    simulate(plans, bufs, 8, sym_reduce)
    for r in range(n):
        assert list(bufs[r][OUT]) == [(root, i) for i in range(count)]


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_barrier_plan_connects_everyone(n):
    plans = [planners.plan_rings("barrier", n, r, [list(range(n))], 0, 1) for r in range(n)]
    simulate(plans, [[None, None, None] for _ in range(n)], 1, sym_reduce)
    rounds = int(np.ceil(np.log2(n))) if n > 1 else 0
    assert all(p.nops == 2 * rounds for p in plans)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
@pytest.mark.parametrize("stripes", [1, 2, 3])
def test_multi_ring_and_stripes(n, stripes):
    rng = np.random.default_rng(n)
    rings = [list(range(n)), list(rng.permutation(n))]
    count = 11 * n + 3
    plans = ring_plans("all_reduce", n, count, rings=rings, segment_bytes=24, stripes=stripes)
    bufs = []
    for r, p in enumerate(plans):
        data = sym_array(r, count)
        bufs.append([data, data, np.empty(p.need_bytes(SCRATCH) // 8, dtype=object)])
    simulate(plans, bufs, 8, sym_reduce)
    for i in range(count):
        assert len({repr(bufs[r][OUT][i]) for r in range(n)}) == 1
        assert sorted(leaves(bufs[0][OUT][i])) == [(r, i) for r in range(n)]
    used = {op["stripe"] for p in plans for op in p.ops() if op["peer"] >= 0}
    assert used == set(range(stripes)) or count // n < stripes


def test_planner_rejects_bad_arguments():
    with pytest.raises(Exception):
        planners.plan_rings("all_reduce", 3, 5, [[0, 1, 2]], 10, 4)
    with pytest.raises(Exception):
        planners.plan_rings("all_reduce", 3, 0, [[0, 1, 1]], 10, 4)  # not a permutation


def test_calibration_outlasts_a_burst_of_noise():
    """A busy moment at start-up (the first few tiny all-reduces slow) must not
    set the per-message overhead of the whole epoch: the best of enough
    repetitions is taken."""
    import time as _time

    from pycoll.plan import costmodel

    calls = []

    def fake_ring(arr, op):
        calls.append(arr.size)
        if op == "max":
            return
        tiny_calls = sum(1 for c in calls if c == 1)
        # the warm-up and the next four tiny calls hit a noisy moment (2 ms); then 50 us
        _time.sleep(0.002 if arr.size == 1 and tiny_calls <= 5 else 0.00005 if arr.size == 1 else 0.001)

    model = costmodel.calibrate(fake_ring, 2)
    assert model.overhead_s < 0.0005, model.overhead_s
