"""Every collective x dtype x op on 1..5 real processes on this host.

Results must be bit-identical on every rank and equal to a NumPy reference
that follows the same reduction order (the plans, executed in Python).
Every test runs twice, over shared memory (what same-host peers use by
default) and over loopback TCP (the ``transport`` fixture); every run
checks that the transport it asked for is the one the peers use.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from collective_cases import expected, make_plans, run_cases_algorithms, run_on
from pycoll.plan import planners
from reference import ALL_DTYPES, OPS

from pycoll.comm.communicator import DEFAULT_SEGMENT as SEGMENT  # plans must match the ones the communicator builds


def check(cases, world_size, timeout=120, transport="shm"):
    """Run the cases; compare with the plans of the algorithm each case ran (auto may pick any)."""
    results = run_on(run_cases_algorithms, world_size, transport, (cases,), timeout, {"timeout": 60})
    for i, case in enumerate(cases):
        ran = {results[r][1][i] for r in range(world_size)}
        assert len(ran) == 1, f"ranks ran different algorithms for {case}: {ran}"
        if case[5] != "auto":
            assert ran == {planners.effective(case[5], case[0])}
        algorithm = ran.pop()
        want = expected(case, world_size, lambda c, n: make_plans(c, n, algorithm))
        for r in range(world_size):
            assert results[r][0][i] == want[r], f"rank {r} differs for case {case} ({algorithm})"
        if case[0] in ("all_reduce", "all_gather", "broadcast"):
            assert len({results[r][0][i] for r in range(world_size)}) == 1, f"ranks disagree on {case}"


SIZES = [0, 1, 2, 3, 5, 7, 13, 31, 97, 1000, 4099, 65537, 300007]
collectives = st.sampled_from(["all_reduce", "all_gather", "reduce_scatter", "broadcast"])
case_strategy = st.tuples(collectives, st.sampled_from(ALL_DTYPES), st.sampled_from(OPS),
                          st.sampled_from(SIZES), st.integers(0, 1000), st.sampled_from(["auto", "ring"]))


def _drawn_case_lists():
    """Hypothesis's 4 derandomized lists of cases (the same on every run)."""
    drawn = []

    @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(cases=st.lists(case_strategy, min_size=12, max_size=20))
    def draw(cases):
        drawn.append(cases)
    draw()
    return drawn


RANDOM_CASES = [case for cases in _drawn_case_lists() for case in cases]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_random_cases(world_size, transport):
    # all of the drawn lists in one group: a group per list spent most of the test starting processes
    check(RANDOM_CASES, world_size, timeout=240, transport=transport)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_dtype_and_op(world_size, transport):
    cases = [(c, d, o, 13 + i, i, "ring") for i, (c, d, o) in enumerate(
        (c, d, o) for c in ("all_reduce", "reduce_scatter") for d in ALL_DTYPES for o in OPS)]
    cases += [(c, d, "sum", 11, 3, "auto") for c in ("all_gather", "broadcast") for d in ALL_DTYPES]
    check(cases, world_size, transport=transport)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_multi_mib_sizes(world_size, transport):
    cases = [("all_reduce", "float32", "sum", (3 << 20) // 4 + 1, 1, "ring"),
             ("all_reduce", "bfloat16", "avg", 1 << 20, 2, "ring"),
             ("all_gather", "float64", "sum", (1 << 19) + 3, 3, "ring"),
             ("reduce_scatter", "int32", "max", (1 << 19) - 1, 4, "ring"),
             ("broadcast", "uint8", "sum", (5 << 20) + 7, 5, "ring"),
             # preserve_input's tail copies 4 MiB and more with streaming stores (csrc/kernels/copy.c)
             ("all_reduce", "float32", "sum", (4 << 20) // 4 + 5, 6, "auto"),
             ("all_reduce", "float64", "max", (5 << 20) // 8 + 3, 7, "ring")]
    check(cases, world_size, timeout=240, transport=transport)


def _all_reduce_unaligned(comm, count, offset):
    raw = np.zeros(count * 4 + 64, np.uint8)
    x = raw[offset:offset + count * 4].view(np.float32)  # not 16-byte aligned: the copy's head path
    x[:] = np.arange(count, dtype=np.float32) % 1000 + comm.rank
    comm.all_reduce(x)
    return x.tobytes(), raw[:offset].tobytes() + raw[offset + count * 4:].tobytes()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("offset", [4, 20])
def test_large_result_copy_at_an_unaligned_address(transport, offset):
    count = (4 << 20) // 4 + 13  # the tail copy: above the streaming threshold, not a multiple of 64 bytes
    results = run_on(_all_reduce_unaligned, 2, transport, (count, offset), 90)
    want = ((np.arange(count, dtype=np.float32) % 1000) * 2 + 1).astype(np.float32).tobytes()
    for got, around in results:
        assert got == want
        assert around == bytes(len(around))  # nothing written outside the array


def _async_many(comm):
    arrays = [np.full(1000 + i, comm.rank + i, dtype=np.float64) for i in range(8)]
    works = [comm.all_reduce_async(a) for a in arrays]
    gathered = np.zeros(3 * comm.world_size, np.int32)
    works.append(comm.all_gather_async(np.full(3, comm.rank, np.int32), gathered))
    sync_after = comm.all_reduce(np.ones(5, np.int64))  # ordered after the queued work
    for w in works:
        w.wait(timeout=30)
    return [a[:2].tolist() for a in arrays], gathered.tolist(), sync_after.tolist(), all(w.done() for w in works)


@pytest.mark.timeout(120)
def test_async_in_flight_keep_order(transport):
    n = 3
    results = run_on(_async_many, n, transport)
    for arrays, gathered, sync_after, done in results:
        assert done
        assert arrays == [[float(sum(r + i for r in range(n)))] * 2 for i in range(8)]
        assert gathered == [r for r in range(n) for _ in range(3)]
        assert sync_after == [n] * 5


def _torch_tensors(comm):
    import torch
    t = torch.arange(10, dtype=torch.bfloat16) + comm.rank
    comm.all_reduce(t)
    u = torch.full((4, 3), float(comm.rank), dtype=torch.float32)
    comm.all_reduce(u, op="max")
    return t.float().tolist(), u.tolist()


@pytest.mark.timeout(120)
def test_torch_cpu_tensors_in_place(transport):
    pytest.importorskip("torch", reason="torch is an optional extra")
    results = run_on(_torch_tensors, 2, transport)
    for t, u in results:
        assert t == [float(2 * i + 1) for i in range(10)]
        assert u == [[1.0] * 3] * 4
