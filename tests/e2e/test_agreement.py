"""Arguments that must agree across ranks: a disagreement raises ProtocolError
on every rank, in that same call, and the group recovers at the next call.

The hard cases are those where some rank would send and receive nothing that
reveals the disagreement (a broadcast root only sends); see the README's
"Errors" section for how each case is caught."""
import time

import numpy as np
import pytest

import pycoll
from collective_cases import run_on

# (argument, call on ranks that agree, call on the rank that differs)
KINDS = ["root", "collective", "op", "dtype", "count", "algorithm", "compression"]


def _call(comm, kind, odd):
    """Run the collective of ``kind``; ``odd`` marks the rank whose arguments differ."""
    a = np.ones(64 + (8 if kind == "count" and odd else 0),
                dtype=np.float64 if kind == "dtype" and odd else np.float32)
    if kind == "root":
        comm.broadcast(a, root=1 if odd else 0)
    elif kind == "collective":
        (comm.broadcast if odd else comm.all_reduce)(a)
    elif kind == "op":
        comm.all_reduce(a, op="max" if odd else "sum")
    elif kind == "algorithm":
        comm.all_reduce(a, algorithm="tree" if odd else "ring")
    elif kind == "compression":
        comm.all_reduce(a, compression="bf16" if odd else "none")
    else:
        comm.all_reduce(a)


def _disagree(comm, kind, odd_rank):
    err, t0 = None, time.monotonic()
    try:
        _call(comm, kind, comm.rank == odd_rank)
    except pycoll.CollectiveError as exc:
        err = (type(exc).__name__, str(exc))
    elapsed = time.monotonic() - t0
    b = np.full(4, comm.rank + 1, np.int32)  # the group recovers at the next call
    comm.all_reduce(b)
    return err, elapsed, b.tolist()


def _check(results, n):
    for rank, (err, elapsed, after) in enumerate(results):
        assert err is not None, f"rank {rank} returned normally from a call whose arguments disagree"
        assert err[0] == "ProtocolError", f"rank {rank}: {err}"
        assert elapsed < 10, f"rank {rank} took {elapsed:.1f} s: caught by a timeout, not by the check"
        assert after == [n * (n + 1) // 2] * 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_disagreeing_arguments_raise_protocol_error_on_every_rank(kind, transport):
    n = 3
    _check(run_on(_disagree, n, transport, args=(kind, n - 1), timeout=90, init_kwargs={"timeout": 20}), n)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n,odd", [(2, 1), (4, 2)])
def test_broadcast_roots_that_disagree_raise_everywhere(n, odd, transport):
    """2 ranks naming each other as root both only send; at 4 ranks the odd
    rank sits in the middle of the chain."""
    _check(run_on(_disagree, n, transport, args=("root", odd), timeout=90, init_kwargs={"timeout": 20}), n)


def _skip_one_call(comm, late_is_same_call):
    """Rank 0 makes call A, which times out because rank 1 is elsewhere; rank 1
    then either makes A late (the same call) or skips it and makes B."""
    a = np.ones(16, np.float32)
    b = np.full(8, comm.rank + 1, np.int32)
    comm.all_reduce(np.ones(16, np.float32))  # a first call that both ranks make (A is then the second)
    outcomes = []

    def attempt(fn):
        try:
            fn()
            outcomes.append("ok")
        except pycoll.CollectiveError as exc:
            outcomes.append(type(exc).__name__)

    if comm.rank == 0:
        attempt(lambda: comm.all_reduce(a, timeout=1.5))
    else:
        time.sleep(3.0)  # past rank 0's deadline
        if late_is_same_call:
            attempt(lambda: comm.all_reduce(a, timeout=20))
    attempt(lambda: comm.all_reduce(b, timeout=20))  # call B, on every rank
    c = np.arange(4, dtype=np.float64) * (comm.rank + 1)
    comm.all_reduce(c, timeout=20)  # and everything after it pairs up
    return outcomes, b.tolist(), c.tolist(), comm.epoch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("late_is_same_call", [False, True], ids=["skipped", "late"])
def test_after_a_timeout_every_rank_is_at_the_same_call(late_is_same_call, transport):
    """A rank that skipped the failed call runs its next call in the re-formed
    group (paired with the others' next call); a rank that makes the failed
    call late gets the same error the others got, once."""
    (o0, b0, c0, e0), (o1, b1, c1, e1) = run_on(_skip_one_call, 2, transport, args=(late_is_same_call,),
                                                 timeout=90, init_kwargs={"timeout": 20})
    assert o0 == ["CollectiveTimeout", "ok"]
    assert o1 == (["CollectiveTimeout", "ok"] if late_is_same_call else ["ok"])
    assert b0 == b1 == [3] * 8
    assert c0 == c1 == [0.0, 3.0, 6.0, 9.0]
    assert e0 == e1
