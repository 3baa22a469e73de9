"""Repeated calls take a short path (pycoll.comm.communicator: Communicator._fast_run):
a call identical to an earlier one of the same epoch in everything but its
arrays' memory skips the argument checks and planning. These tests hold it
to the full path's behaviour: every change of shape, dtype, op, algorithm,
root, wire compression, epoch or array still gives bit-exact results, bad
input still gets its clear error, failures, cancellation, async ordering
and stats work as before, and the short path is really taken.
"""
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import pycoll
import pycoll.testing
from collective_cases import expected, make_plans, run_cases_algorithms, run_on
from pycoll.testing import KILLED
from reference import OPS


def _count_fast(comm):
    """Wrap comm._fast_run to count the calls it ran ([0]: returned, [1]:
    raised), not the ones it passed on to the full path."""
    counts = [0, 0]
    inner = comm._fast_run

    def counting(*args):
        try:
            ran = inner(*args)
        except BaseException:
            counts[1] += 1
            raise
        counts[0] += ran is not None
        return ran
    comm._fast_run = counting
    return counts


def _repeats(cases, n):
    """How many cases repeat an earlier one: same collective, dtype, count and
    algorithm, plus the op for reductions and the root for broadcast."""
    seen, count = set(), 0
    for coll, dtype, op, size, seed, algorithm in cases:
        key = (coll, dtype, size, algorithm,
               op if coll in ("all_reduce", "reduce_scatter") else None,
               seed % n if coll == "broadcast" else None)
        count += key in seen
        seen.add(key)
    return count


def _run_counted(comm, cases):
    counts = _count_fast(comm)
    out, algorithms = run_cases_algorithms(comm, cases)
    return out, algorithms, counts[0]


# A small pool of shapes so that calls repeat (with fresh arrays and data: seeds differ).
_cases = st.tuples(st.sampled_from(["all_reduce", "all_gather", "reduce_scatter", "broadcast"]),
                   st.sampled_from(["float32", "int32", "bfloat16", "float64"]),
                   st.sampled_from(OPS), st.sampled_from([1, 7, 1024]), st.integers(0, 1000),
                   st.sampled_from(["auto", "ring", "tree", "direct"]))


def _drawn_case_lists():
    """Hypothesis's 3 derandomized lists of calls (the same on every run), each played forward,
    backward and forward again so that calls repeat."""
    drawn = []

    @settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(cases=st.lists(_cases, min_size=8, max_size=14).map(lambda c: c + c[::-1] + c))
    def draw(cases):
        drawn.append(cases)
    draw()
    return drawn


REPEATED_CASES = [case for cases in _drawn_case_lists() for case in cases]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_repeated_calls_match_the_reference_whatever_changes(world_size, transport):
    # both drawn lists in one group (a group per list spent most of the test starting processes)
    cases = REPEATED_CASES
    results = run_on(_run_counted, world_size, transport, args=(cases,), timeout=240, init_kwargs={"timeout": 60})
    for i, case in enumerate(cases):
        ran = {results[r][1][i] for r in range(world_size)}
        assert len(ran) == 1, f"ranks ran different algorithms for {case}: {ran}"
        algorithm = ran.pop()
        want = expected(case, world_size, lambda c, k: make_plans(c, k, algorithm))
        for r in range(world_size):
            assert results[r][0][i] == want[r], f"rank {r} differs for case #{i} {case} ({algorithm})"
    for r in range(world_size):
        assert results[r][2] == _repeats(cases, world_size), f"rank {r}: short path taken {results[r][2]} times"


def _errors_after_warm_up(comm):
    counts = _count_fast(comm)
    msgs = []

    def expect_error(fn):
        try:
            fn()
            msgs.append(None)
        except pycoll.InvalidArgument as exc:
            msgs.append(str(exc))
    x = np.full(8, comm.rank + 1.0, np.float32)
    comm.all_reduce(x)
    comm.all_reduce(x)  # now remembered
    ro = np.ones(8, np.float32)
    ro.flags.writeable = False
    expect_error(lambda: comm.all_reduce(ro))                                      # same dtype and size
    expect_error(lambda: comm.all_reduce(np.ones(16, np.float32)[::2]))            # same dtype and size
    expect_error(lambda: comm.all_reduce(np.ones((4, 4), np.float32)[:, :2]))      # same dtype and size
    expect_error(lambda: comm.all_reduce(np.ones(8, np.float32), op="median"))
    expect_error(lambda: comm.all_reduce(np.ones(8, np.float32), op=["sum"]))      # unhashable
    expect_error(lambda: comm.all_reduce(np.ones(8, np.float32), algorithm="bogus"))
    expect_error(lambda: comm.all_reduce(np.ones(8, np.float32), dtype="float64"))  # item size differs
    expect_error(lambda: comm.all_reduce(np.ones(8, np.float32), compression="zip"))
    expect_error(lambda: comm.all_reduce(np.ones(8, np.int32), compression="fp16"))  # float32 only
    b = np.ones(3, np.float32)
    comm.broadcast(b, root=1)
    comm.broadcast(b, root=1)
    expect_error(lambda: comm.broadcast(np.ones(3, np.float32), root=comm.world_size))
    send, recv = np.ones(2, np.float32), np.zeros(2 * comm.world_size, np.float32)
    comm.all_gather(send, recv)
    comm.all_gather(send, recv)
    ro_recv = np.zeros(2 * comm.world_size, np.float32)
    ro_recv.flags.writeable = False
    expect_error(lambda: comm.all_gather(send, ro_recv))
    expect_error(lambda: comm.all_gather(send, np.zeros(2 * comm.world_size, np.float64)))
    expect_error(lambda: comm.all_gather(send, np.zeros(2 * comm.world_size + 1, np.float32)))
    # what may differ does: a read-only send, another shape of the same size, a fresh array
    ro_send = np.full(2, comm.rank, np.float32)
    ro_send.flags.writeable = False
    comm.all_gather(ro_send, recv)
    gathered = recv.tolist()
    y = np.full((2, 4), comm.rank + 10.0, np.float32)
    comm.all_reduce(y)
    z = np.arange(8, dtype=np.float32) * (comm.rank + 1)
    before = x.copy()
    comm.all_reduce(z)
    return msgs, counts, x.tolist(), before.tolist(), y.ravel().tolist(), z.tolist(), gathered


@pytest.mark.timeout(90)
def test_bad_input_gets_the_same_errors_after_a_call_was_remembered():
    n = 2
    results = pycoll.testing.run(_errors_after_warm_up, n, timeout=80)
    for msgs, (hits, _), x, before, y, z, gathered in results:
        assert all(m is not None for m in msgs), msgs
        assert "read-only" in msgs[0] and "contiguous" in msgs[1] and "contiguous" in msgs[2]
        assert "median" in msgs[3] and "sum" in msgs[4] and "bogus" in msgs[5] and "float64" in msgs[6]
        assert "zip" in msgs[7] and "float32" in msgs[8] and "root" in msgs[9]
        assert "read-only" in msgs[10] and "float64" in msgs[11] and "elements" in msgs[12]
        assert x == [6.0] * 8 and before == x  # z's call did not touch x
        assert y == [21.0] * 8
        assert z == [3.0 * i for i in range(8)]
        assert gathered == [0.0, 0.0, 1.0, 1.0]
        assert hits == 6  # the 3 repeats, the read-only send, the reshaped y and the fresh z


def _through_a_loss(comm, victim):
    x = np.zeros(64, np.float32)
    other = np.ones(8, np.int64)
    comm.all_reduce(other)
    comm.all_reduce(other)  # remembered in the first epoch, next used in the second
    sums, err = [], None
    for i in range(30):
        x[:] = comm.rank + i
        original = x.copy()
        recorded = len(comm.stats)
        try:
            comm.all_reduce(x)
            sums.append(float(x[0]))
        except pycoll.PeerFailure as exc:
            # the call ran and failed (a stat that says so), or found the epoch aborted and did not run
            err = (exc.lost, bool(np.array_equal(x, original)), [s.ok for s in list(comm.stats)[recorded:]])
            break
        if comm.rank == victim and i == 5:
            pycoll.testing.fault_point("die")
    counts = _count_fast(comm)
    after = []
    for i in range(4):  # the survivors' group: the first call rebuilds it, the rest repeat
        x[:] = comm.rank + 1
        comm.all_reduce(x)
        after.append(float(x[0]))
    for i in range(2):  # first used in this epoch: planned again, then repeated
        other[:] = 10 * (comm.rank + 1)
        comm.all_reduce(other)
        after.append(float(other[0]))
    last = comm.stats[-1]
    return err, sums, after, counts[0], comm.world_size, comm.epoch, (last.world_size, last.epoch, last.ok)


@pytest.mark.timeout(120)
def test_a_remembered_call_fails_cleanly_and_the_survivors_carry_on(transport):
    n, victim = 3, 2
    results = run_on(_through_a_loss, n, transport, args=(victim,), timeout=100, kill={victim: "die"},
                     init_kwargs={"timeout": 30, "heartbeat_timeout": 3.0})
    assert results[victim] == KILLED
    for r in (0, 1):
        err, sums, after, hits, ws, epoch, last = results[r]
        assert err is not None, f"rank {r} never saw the failure"
        lost, intact, oks = err
        assert lost == (victim,) and intact and oks in ([], [False])
        assert sums[:6] == [float(3 * i + 3) for i in range(6)]
        # ranks may be renumbered: the sum of the survivors' new ranks + 1 is 1 + 2
        assert after == [3.0] * 4 + [30.0] * 2 and ws == 2 and epoch > 1 and last == (2, epoch, True)
        assert hits == 4


def _cancel_a_remembered_call(comm):
    a = np.ones(1000, np.float32)
    comm.all_reduce(a)
    comm.all_reduce(a)
    if comm.rank == 1:
        time.sleep(1.0)  # joins rank 0's next call too late
        try:
            comm.all_reduce(a)  # the same call, which rank 0's cancel failed: reported once here
            return "ran"
        except pycoll.PeerFailure:
            pass
        comm.barrier()
        return None
    counts = _count_fast(comm)
    a[:] = 5.0
    threading.Timer(0.3, comm.cancel).start()
    t0 = time.monotonic()
    try:
        comm.all_reduce(a, timeout=30)
        raised = None
    except pycoll.Cancelled as exc:
        raised = str(exc)
    took = time.monotonic() - t0
    ran = list(counts)
    comm.barrier()  # the group works again
    return raised, took, a.tolist()[:3], ran


@pytest.mark.timeout(60)
def test_cancelling_a_remembered_call():
    (raised, took, head, ran), late = pycoll.testing.run(_cancel_a_remembered_call, 2, timeout=50)
    assert late is None  # the late rank's same call failed once, then the two pair again
    assert raised and "cancel" in raised
    assert took < 5
    assert head == [5.0] * 3  # input intact
    assert ran == [0, 1]  # the short path ran it, and raised


def _async_then_sync(comm):
    x = np.zeros(16, np.float64)
    comm.all_reduce(x)  # remembered
    arrays = [np.full(16, 10.0 * (i + 1) + comm.rank, np.float64) for i in range(6)]
    works = [comm.all_reduce_async(a) for a in arrays]
    if comm.rank == 1:
        time.sleep(0.2)  # rank 0's sync call comes first: it must still queue behind its async ones
    y = np.full(16, 1000.0 + comm.rank, np.float64)
    comm.all_reduce(y)
    for w in works:
        w.wait(timeout=30)
    return [a[0] for a in arrays], float(y[0])


@pytest.mark.timeout(60)
def test_a_remembered_call_waits_for_queued_async_work():
    for sums, y in pycoll.testing.run(_async_then_sync, 2, timeout=50):
        assert sums == [20.0 * (i + 1) + 1 for i in range(6)]
        assert y == 2001.0


def _settings_change(comm):
    x = np.linspace(0.1, 1.7, 1024, dtype=np.float32) + comm.rank / 3
    inputs = [x.copy()]
    sent = []
    for compression in ("none", "none", "bf16", "bf16", "none"):
        comm.compression = compression
        a = inputs[0].copy()
        before = comm.bytes_sent
        comm.all_reduce(a, algorithm="ring")
        sent.append(comm.bytes_sent - before)
        inputs.append(a)
    s = list(comm.stats)[-5:]
    return sent, [a.tobytes() for a in inputs[1:]], [(t.op, t.algorithm, t.nbytes, t.ok) for t in s]


@pytest.mark.timeout(60)
def test_changing_the_default_compression_applies_to_remembered_calls():
    for sent, outs, stats in pycoll.testing.run(_settings_change, 2, timeout=50, init_kwargs={"transport": "shm"}):
        assert sent[0] == sent[1] == sent[4] and sent[2] == sent[3] < sent[0]
        assert outs[0] == outs[1] == outs[4] and outs[2] == outs[3] != outs[0]
        assert stats == [("all_reduce", "ring", 4096, True)] * 5
