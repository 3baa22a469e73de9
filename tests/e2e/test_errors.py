"""Bad input gets a clear error on every rank, nothing hangs, and the group
keeps working afterwards. Mismatched calls are caught from the frames
received, so they run over shared memory and over TCP; local errors are
raised before anything is sent."""
import time

import numpy as np
import pytest

import pycoll
import pycoll.testing
from collective_cases import run_on


def _mismatch(comm, kind):
    a = np.ones(10 + (comm.rank if kind == "size" else 0), dtype=np.float32 if kind != "dtype" or comm.rank == 0 else np.float64)
    err = None
    t0 = time.monotonic()
    try:
        if kind == "op":
            comm.all_reduce(a, op="sum" if comm.rank == 0 else "max")
        elif kind.endswith("_root"):  # rank 2 names another root (no separate agree round: the data frames)
            root = 1 if comm.rank == 2 else 0
            whole = np.ones(comm.world_size * a.size, np.float32) if comm.rank == root else None
            if kind == "gather_root":
                comm.gather(a, whole, root=root, algorithm="direct")
            elif kind == "scatter_root":
                comm.scatter(whole, a, root=root, algorithm="direct")
            else:
                comm.reduce(a, root=root, algorithm="direct")
        elif kind == "collective":
            if comm.rank == 0:
                comm.all_reduce(a)
            else:
                comm.broadcast(a)
        else:
            comm.all_reduce(a)
    except pycoll.CollectiveError as exc:
        err = f"{type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - t0
    # the group recovers: the next collective works on everyone
    b = np.full(4, comm.rank + 1, np.int32)
    comm.all_reduce(b)
    return err, elapsed, b.tolist()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["size", "dtype", "op", "collective", "gather_root", "scatter_root", "reduce_root"])
def test_mismatched_calls_fail_on_every_rank_then_recover(kind, transport):
    n = 3
    results = run_on(_mismatch, n, transport, args=(kind,), timeout=90, init_kwargs={"timeout": 20})
    for err, elapsed, after in results:
        assert err is not None, "every rank must see the error"
        assert elapsed < 10, "detected fast, not by timeout"
        assert after == [n * (n + 1) // 2] * 4
    assert any("mismatched" in err or "length" in err for err, _, _ in results)


def _local_errors(comm):
    msgs = []
    cases = [
        lambda: comm.all_reduce(np.ones((4, 4), np.float32)[:, ::2]),
        lambda: comm.all_reduce(np.frombuffer(b"\0" * 16, dtype=np.float32)),
        lambda: comm.all_reduce(np.ones(4, np.float32), op="median"),
        lambda: comm.all_reduce([1.0, 2.0]),
        lambda: comm.all_reduce(np.ones(4, np.complex64)),
        lambda: comm.all_gather(np.ones(3, np.float32), np.ones(5, np.float32)),
        lambda: comm.all_gather(np.ones(3, np.float32), np.ones(3 * comm.world_size, np.float64)),
        lambda: comm.reduce_scatter(np.ones(7, np.float32), np.ones(3, np.float32)),
        lambda: comm.broadcast(np.ones(3, np.float32), root=comm.world_size),
        lambda: comm.all_reduce(np.ones(3, np.float32), algorithm="bogus"),
    ]
    for case in cases:
        try:
            case()
            msgs.append(None)
        except pycoll.InvalidArgument as exc:
            msgs.append(str(exc))
    ok = np.ones(3, np.float32)
    comm.all_reduce(ok)  # nothing was sent: the group is intact
    return msgs, ok.tolist()


@pytest.mark.timeout(60)
def test_local_usage_errors_are_clear_and_harmless():
    results = pycoll.testing.run(_local_errors, 2, timeout=50)
    for msgs, ok in results:
        assert all(m is not None for m in msgs), msgs
        assert "contiguous" in msgs[0] and "read-only" in msgs[1] and "median" in msgs[2]
        assert "root" in msgs[8] and "bogus" in msgs[9]
        assert ok == [2.0] * 3


def test_init_without_rendezvous_info_says_what_is_missing(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(pycoll.InvalidArgument, match="WORLD_SIZE"):
        pycoll.init()
    with pytest.raises(pycoll.InvalidArgument, match="rank"):
        pycoll.init(rank=3, world_size=2, master_port=12345)


def test_unreachable_coordinator_is_an_error_not_a_hang():
    port = pycoll.testing.free_port()
    t0 = time.monotonic()
    with pytest.raises(pycoll.CoordinatorError, match="coordinator"):
        pycoll.init(rank=1, world_size=2, master_port=port, join_timeout=1.5)
    assert time.monotonic() - t0 < 10
