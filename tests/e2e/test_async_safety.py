"""Memory handed to an async collective stays where the engine reads and writes it until the
call finished: resizing a NumPy array in flight is refused (NumPy raises), a torch tensor's
storage is kept alive, and a communicator's async calls complete (never hang) after close()."""
import time

import numpy as np
import pytest

import pycoll
import pycoll.testing
from collective_cases import run_on

REPS = 40
COUNT = 1 << 20  # 4 MiB of float32: malloc maps it on its own, so a freed buffer faults at once


def _resize_in_flight(comm, reps):
    refused = 0
    for i in range(reps):
        a = np.full(COUNT, float(comm.rank + 1), np.float32)
        work = comm.all_reduce_async(a)
        try:
            a.resize(2 * COUNT, refcheck=False)  # would free the memory the engine is using
        except ValueError:
            refused += 1
            work.wait()
            total = float(sum(range(1, comm.world_size + 1)))
            assert (a == total).all(), f"rep {i}: wrong result"
        else:
            work.wait()  # the call had finished before the resize: nothing to check
        a.resize(3, refcheck=False)  # once done the array is the caller's again
    comm.barrier()
    return refused


@pytest.mark.timeout(240)
def test_numpy_resize_while_an_async_collective_runs_is_refused(transport):
    refused = run_on(_resize_in_flight, 2, transport, args=(REPS,), timeout=200)
    assert sum(refused) > 0, refused  # the resize came while the call ran, and was refused


def _replace_storage_in_flight(comm, reps):
    import torch
    outcomes = set()
    for i in range(reps):
        t = torch.full((COUNT,), float(comm.rank + 1))
        work = comm.all_reduce_async(t)
        t.set_(torch.zeros(3))  # drops the tensor's reference to the storage the engine uses
        try:
            work.wait()
            outcomes.add("ok")
        except pycoll.InvalidArgument as exc:
            assert "storage" in str(exc), exc
            outcomes.add("reported")
    comm.barrier()
    return sorted(outcomes)


@pytest.mark.timeout(240)
def test_torch_storage_replaced_while_an_async_collective_runs_is_kept_alive(transport):
    pytest.importorskip("torch")
    out = run_on(_replace_storage_in_flight, 2, transport, args=(REPS,), timeout=200)
    for outcomes in out:
        # "ok": that call had finished before set_; else the tensor no longer shows the result: said so
        assert "reported" in outcomes and set(outcomes) <= {"ok", "reported"}, out


def _async_after_close(comm):
    a = np.ones(8, np.float32)
    comm.all_reduce_async(a).wait()  # starts the worker thread
    comm.barrier()
    comm.close()
    work = comm.all_reduce_async(a)
    try:
        work.wait(timeout=20)
    except pycoll.CollectiveTimeout:
        return "hung"
    except pycoll.CollectiveError as exc:
        return str(exc)
    return "ran"


@pytest.mark.timeout(120)
def test_an_async_call_after_close_fails_instead_of_hanging():
    for out in pycoll.testing.run(_async_after_close, 2, timeout=100):
        assert "closed" in out, out


def _raising_callback(comm):
    a = np.ones(8, np.float32)
    if comm.rank == 1:
        time.sleep(0.5)  # rank 0's call waits for us: its callback is added while it runs
    work = comm.all_reduce_async(a)
    if comm.rank == 0:
        work.add_done_callback(lambda w: 1 / 0)  # a user's bug, run on pycoll's worker thread
    work.wait()
    b = np.ones(8, np.float32)
    try:
        comm.all_reduce_async(b).wait(timeout=20)  # the worker must still be there
    except pycoll.CollectiveTimeout:
        return "hung"
    return b.tolist()


@pytest.mark.timeout(120)
def test_a_raising_done_callback_does_not_stop_the_worker():
    for out in pycoll.testing.run(_raising_callback, 2, timeout=100):
        assert out == [2.0] * 8, out
