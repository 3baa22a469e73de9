"""pycoll.testing: results, failures, timeouts, kills at points or after t seconds, delays."""
import json
import multiprocessing
import os
import time

import numpy as np
import pytest

import pycoll
import pycoll.testing
from pycoll.testing import KILLED, RankError, fault_point


def _identity(comm, tag):
    return comm.rank, comm.world_size, tag


@pytest.mark.timeout(60)
def test_results_come_back_in_rank_order():
    assert pycoll.testing.run(_identity, 3, args=("x",), timeout=50) == [(r, 3, "x") for r in range(3)]


def _raise_on_one(comm):
    if comm.rank == 1:
        raise KeyError("boom on purpose")
    return comm.rank


@pytest.mark.timeout(60)
def test_failing_rank_raises_with_its_traceback():
    with pytest.raises(RankError) as info:
        pycoll.testing.run(_raise_on_one, 3, timeout=50)
    assert info.value.rank == 1
    assert "KeyError" in str(info.value) and "boom on purpose" in info.value.remote_traceback
    assert "_raise_on_one" in info.value.remote_traceback
    assert multiprocessing.active_children() == []


@pytest.mark.timeout(60)
def test_return_exceptions_keeps_the_other_results():
    out = pycoll.testing.run(_raise_on_one, 3, timeout=50, return_exceptions=True)
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], RankError) and out[1].rank == 1


def _hang_on_two(comm):
    if comm.rank == 2:
        time.sleep(60)
    return comm.rank


@pytest.mark.timeout(60)
def test_a_hanging_rank_is_killed_at_the_timeout(capfd):
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        pycoll.testing.run(_hang_on_two, 3, timeout=4)
    assert info.value.rank == 2 and "did not finish within 4" in str(info.value)
    assert "all ranks: rank 0: ok; rank 1: ok; rank 2: did not finish" in str(info.value)
    assert time.monotonic() - t0 < 20
    assert multiprocessing.active_children() == []
    # before the kill, the hung rank printed where it was stuck (and only that rank)
    err = capfd.readouterr().err
    assert "in _hang_on_two" in err and err.count("in _rank_main") == 1, err


def _steps(comm, steps):
    """Survivors record how many full-group steps succeeded before the failure."""
    full = 0
    for step in range(steps):
        fault_point("step")
        x = np.full(1000, comm.rank + 1, np.int64)
        try:
            comm.all_reduce(x)
        except pycoll.PeerFailure:
            return {"full_steps": full, "failed_at": step}
        assert x[0] == comm.world_size * (comm.world_size + 1) // 2
        full += 1
    return {"full_steps": full, "failed_at": None}


@pytest.mark.timeout(90)
def test_kill_at_the_nth_hit_of_a_named_point():
    out = pycoll.testing.run(_steps, 3, args=(5,), timeout=80, kill={1: ("step", 3)},
                             init_kwargs={"heartbeat_timeout": 3.0, "timeout": 30})
    assert out[1] == KILLED
    # rank 1 died on its 3rd "step" point: steps 0 and 1 ran on all three ranks, step 2 failed
    assert out[0] == out[2] == {"full_steps": 2, "failed_at": 2}


@pytest.mark.timeout(90)
def test_kill_at_a_collective_point():
    out = pycoll.testing.run(_steps, 3, args=(5,), timeout=80, kill={2: "before:all_reduce"},
                             init_kwargs={"heartbeat_timeout": 3.0, "timeout": 30})
    assert out[2] == KILLED
    assert out[0] == out[1] == {"full_steps": 0, "failed_at": 0}


def _barriers_until_failure(comm):
    t0 = time.monotonic()
    for _ in range(2000):  # bounded: ~20 s at most
        try:
            comm.barrier()
        except pycoll.PeerFailure:
            return time.monotonic() - t0
        time.sleep(0.01)
    return None


@pytest.mark.timeout(90)
def test_kill_after_seconds():
    out = pycoll.testing.run(_barriers_until_failure, 3, timeout=80, kill={1: 1.0},
                             init_kwargs={"heartbeat_timeout": 3.0, "timeout": 30})
    assert out[1] == KILLED
    for r in (0, 2):
        assert out[r] is not None, f"rank {r} never saw the failure"
        assert 0.7 < out[r] < 15, out[r]


def _time_a_barrier(comm):
    t0 = time.monotonic()
    fault_point("work")
    comm.barrier()
    return time.monotonic() - t0


@pytest.mark.timeout(90)
def test_delay_every_point_makes_a_straggler():
    # rank 1 sleeps at "work" and at "before:barrier": everyone waits for it at the barrier
    out = pycoll.testing.run(_time_a_barrier, 3, timeout=80, delay={1: 0.4})
    assert all(t >= 0.75 for t in out), out


@pytest.mark.timeout(90)
def test_delay_per_point():
    out = pycoll.testing.run(_time_a_barrier, 3, timeout=80, delay={2: {"work": 0.6}})
    assert all(0.55 <= t for t in out), out
    assert out[0] < 5


def _entry_time(comm):
    return time.time()


@pytest.mark.timeout(90)
def test_start_delay_makes_a_late_rank():
    t0 = time.time()
    out = pycoll.testing.run(_entry_time, 3, timeout=80, delay={2: {"start": 1.5}})
    # a static group forms once every rank joined, so all of them start late
    assert all(t - t0 >= 1.5 for t in out), [t - t0 for t in out]


def _env_only():
    import pycoll as pc
    with pc.init() as comm:  # from the environment the harness set, as under torchrun
        return os.environ["RANK"], comm.all_reduce(np.ones(2, np.int32)).tolist()


@pytest.mark.timeout(60)
def test_init_none_sets_torchrun_variables():
    out = pycoll.testing.run(_env_only, 2, init=None, timeout=50)
    assert out == [("0", [2, 2]), ("1", [2, 2])]


def _torch_sum():
    import torch
    import torch.distributed as dist
    t = torch.tensor([dist.get_rank() + 1], dtype=torch.int64)
    dist.all_reduce(t)
    return dist.get_backend(), int(t.item())


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["pycoll", "gloo"])
def test_init_torch(backend):
    pytest.importorskip("torch", reason="torch is an optional extra")
    assert pycoll.testing.run(_torch_sum, 2, init=f"torch:{backend}", timeout=80) == [(backend, 3)] * 2


def test_bad_arguments_are_reported_before_starting():
    with pytest.raises(TypeError, match="module level"):
        pycoll.testing.run(lambda comm: 1, 2)
    with pytest.raises(ValueError, match="not a rank"):
        pycoll.testing.run(_identity, 2, args=(1,), kill={5: 1.0})
    with pytest.raises(ValueError, match="point name"):
        pycoll.testing.run(_identity, 2, args=(1,), kill={0: ("x", 0)})
    with pytest.raises(ValueError, match="init="):
        pycoll.testing.run(_identity, 2, args=(1,), init="mpi")


def test_fault_point_is_free_without_faults(monkeypatch):
    monkeypatch.delenv("PYCOLL_FAULT", raising=False)
    monkeypatch.delenv("PYCOLL_FAULT_DELAY", raising=False)
    t0 = time.perf_counter()
    for _ in range(10000):
        fault_point("x")
    assert time.perf_counter() - t0 < 1.0


def _surroundings(comm, probe_module):
    import sys
    print(f"rank {comm.rank} speaks", file=sys.stderr, flush=True)
    return os.getcwd(), os.environ.get("PYCOLL_TEST_PROBE"), probe_module in sys.modules, pycoll.testing.FAULTS_ARMED


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start", ["fork server", "spawn"])
def test_ranks_see_the_callers_environment_directory_and_stderr(start, tmp_path, monkeypatch, capfd):
    """From the fork server (tests/conftest.py preloads for the whole suite) a rank is what a
    spawned one is: the caller's environment and working directory of the moment, output to the
    caller's stderr, faults armed from the environment; and the preloaded modules are already
    there (a spawned rank imports its own)."""
    if start == "spawn":
        monkeypatch.setattr(pycoll.testing, "_preloaded", set())
    elif os.environ.get("PYCOLL_TEST_SPAWN"):
        pytest.skip("PYCOLL_TEST_SPAWN is set: the suite runs without a fork server")
    assert start == "spawn" or "hypothesis" in pycoll.testing._preloaded
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYCOLL_TEST_PROBE", "set after the server started")
    monkeypatch.setenv("PYCOLL_FAULT_DELAY", json.dumps({"nowhere": 0.0}))
    res = pycoll.testing.run(_surroundings, 2, args=("hypothesis",), timeout=100)
    assert res == [(str(tmp_path), "set after the server started", start == "fork server", True)] * 2
    assert "rank 0 speaks" in capfd.readouterr().err


def test_preload_takes_module_names():
    with pytest.raises(TypeError):
        pycoll.testing.preload(pycoll)
