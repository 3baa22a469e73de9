"""The standalone aggregator (``pycoll aggregator``): 2 groups x 2 workers + 2 software switches.

Real processes over loopback: results of innetwork all-reduces through the switches are compared
bit for bit with the plans of all six engine ranks executed in Python (plansim); killing a switch
makes the collective in flight fail with PeerFailure on every worker, and the next epoch runs that
group in agent mode while the other switch keeps serving its group.
"""
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import pycoll.testing
from collective_cases import expected, make_plans, rank_input, run_cases_algorithms
from plansim import simulate
from pycoll import aggregator
from pycoll.core.native import lib
from pycoll.comm.communicator import DEFAULT_SEGMENT
from pycoll.errors import PeerFailure
from pycoll.plan.layout import Layout
from pycoll.plan.topology import load_topology
from reference import reduce_fn, storage_dtype

TOPOLOGY = """
[[group]]
name = "rack0"
count = 2
aggregator = "switch"

[[group]]
name = "rack1"
count = 2
aggregator = "switch"
"""

CASES = [
    ("all_reduce", "float32", "sum", 1001, 1, "innetwork"),
    ("all_reduce", "float32", "sum", 300007, 2, "innetwork"),   # several pipeline pieces
    ("all_reduce", "bfloat16", "sum", 97, 3, "innetwork"),
    ("all_reduce", "float64", "prod", 5, 4, "innetwork"),
    ("all_reduce", "int32", "sum", 4099, 5, "innetwork"),
    ("all_reduce", "uint8", "max", 1, 6, "innetwork"),
    ("all_reduce", "float16", "min", 33, 7, "innetwork"),
    ("all_reduce", "float32", "avg", 64, 8, "innetwork"),       # avg: agent mode (see pycoll.aggregator)
    ("all_gather", "float32", "sum", 13, 9, "ring"),            # other collectives: workers only
]


def _switch_main(group, port, topology):
    agg = aggregator.start(group, "127.0.0.1", port, topology=topology, join_timeout=60)
    agg.serve()


def _start_switches(port, path, cli=False):
    """Two switches; with ``cli`` rack1's is the real ``pycoll aggregator`` command."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_switch_main, args=("rack0", port, str(path)), daemon=True)]
    procs[0].start()
    if cli:
        procs.append(subprocess.Popen([sys.executable, "-m", "pycoll", "aggregator", "--group", "rack1",
                                       "--topology", str(path), "--master-port", str(port)]))
    else:
        procs.append(ctx.Process(target=_switch_main, args=("rack1", port, str(path)), daemon=True))
        procs[1].start()
    return procs


def _stop(procs):
    for p in procs:
        if isinstance(p, subprocess.Popen):
            p.kill()
            p.wait(timeout=5)
        else:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


def _wait_for_switches(comm, want):
    deadline = time.monotonic() + 60
    while comm.aggregators != want and time.monotonic() < deadline:
        comm.update_topology()
        time.sleep(0.05)
    assert comm.aggregators == want, comm.aggregators
    return comm.epoch


def _switch_reference(case, topo, switch_groups):
    """Output bytes per worker: the plans of workers and switches run in Python."""
    coll, dtype, op, count, seed, _ = case
    sd = storage_dtype(dtype)
    layout = Layout(4, topo, ["localhost"] * 4)
    switches = {g: [4 + i] for i, g in enumerate(switch_groups)}
    el = aggregator.EngineLayout(layout, switches)
    assert el.usable
    plans = [el.plan(r, count, sd.itemsize, DEFAULT_SEGMENT, 1, True) for r in range(el.world_size)]
    bufs = []
    for r in range(el.world_size):
        x = rank_input(case, r, 4) if r < 4 else np.zeros(0, sd)
        bufs.append([x, x, np.zeros(plans[r].need_bytes(2) // sd.itemsize, sd)])
    simulate(plans, bufs, sd.itemsize, reduce_fn(dtype, op))
    return [bufs[r][1].tobytes() for r in range(4)]


def _check(results, cases, topo, switch_groups):
    for i, case in enumerate(cases):
        coll, dtype, op, *_ = case
        ran = {results[r][0][1][i] for r in range(4)}
        assert len(ran) == 1
        if coll == "all_reduce" and op != "avg":
            want = _switch_reference(case, topo, switch_groups)
        else:
            want = expected(case, 4, lambda c, k: make_plans(c, k, ran.pop(), topo))
        for r in range(4):
            assert results[r][0][0][i] == want[r], f"rank {r} differs for {case}"


def _workers_through_switches(comm):
    _wait_for_switches(comm, ["rack0", "rack1"])
    assert comm.world_size == 4
    out = run_cases_algorithms(comm, CASES)
    # the all-reduces really went through the switches' mesh (no one may bypass them)
    return out, comm.aggregators, lib.pc_comm_bytes_sent(comm.epoch_state.switch.hcomm)


@pytest.mark.timeout(180)
def test_two_switches_bit_exact(tmp_path):
    path = tmp_path / "racks.toml"
    path.write_text(TOPOLOGY)
    topo = load_topology(path)
    port = pycoll.testing.free_port()
    procs = _start_switches(port, path, cli=True)
    try:
        results = pycoll.testing.run(_workers_through_switches, 4, timeout=150, port=port,
                                     init_kwargs={"timeout": 30, "topology": str(path)})
    finally:
        _stop(procs)
    assert all(res[1] == ["rack0", "rack1"] for res in results)
    payload = sum(c[3] * storage_dtype(c[1]).itemsize for c in CASES if c[0] == "all_reduce" and c[2] != "avg")
    assert all(res[2] >= payload for res in results), [res[2] for res in results]
    _check(results, CASES, topo, ["rack0", "rack1"])


def _workers_lose_a_switch(comm, victim_pid):
    _wait_for_switches(comm, ["rack0", "rack1"])
    x = np.ones(1000, np.float32)
    comm.all_reduce(x, algorithm="innetwork")
    assert (x == 4).all()
    comm.barrier()  # every worker is done with the switches: they idle
    if comm.rank == 0:
        os.kill(victim_pid, signal.SIGKILL)
    failed = None
    for _ in range(20):  # bounded: the abort reaches everyone within a heartbeat
        y = np.full(1000, comm.rank + 1.0, np.float32)
        try:
            comm.all_reduce(y, algorithm="innetwork")
        except PeerFailure as exc:
            failed = exc
            break
        comm.barrier()
        time.sleep(0.1)
    assert failed is not None, "losing a switch went unnoticed"
    out = run_cases_algorithms(comm, CASES)
    return out, comm.aggregators, comm.world_size


@pytest.mark.timeout(180)
def test_switch_killed_peer_failure_then_agent_mode(tmp_path):
    path = tmp_path / "racks.toml"
    path.write_text(TOPOLOGY)
    topo = load_topology(path)
    port = pycoll.testing.free_port()
    procs = _start_switches(port, path)
    try:
        results = pycoll.testing.run(_workers_lose_a_switch, 4, args=(procs[1].pid,), timeout=150,
                                     port=port, init_kwargs={"timeout": 30, "topology": str(path)})
    finally:
        _stop(procs)
    assert all(res[1] == ["rack0"] and res[2] == 4 for res in results)
    _check(results, CASES, topo, ["rack0"])


def _encrypted_innetwork(comm):
    _wait_for_switches(comm, ["rack0", "rack1"])
    x = np.arange(300007, dtype=np.float32) * np.float32(comm.rank + 1)
    comm.all_reduce(x, algorithm="innetwork")
    return x, lib.pc_comm_bytes_sent(comm.epoch_state.switch.hcomm)


@pytest.mark.timeout(180)
def test_switches_with_an_encrypted_data_plane(tmp_path, monkeypatch):
    """PYCOLL_ENCRYPT=1: the switches' links to the workers are TLS on both ends (the
    aggregator derives the same key), and the in-network all-reduce is exact."""
    monkeypatch.setenv("PYCOLL_ENCRYPT", "1")
    monkeypatch.setenv("PYCOLL_SECRET", "rack-secret")  # the switches and ranks inherit both
    path = tmp_path / "racks.toml"
    path.write_text(TOPOLOGY)
    port = pycoll.testing.free_port()
    procs = _start_switches(port, path)
    try:
        results = pycoll.testing.run(_encrypted_innetwork, 4, timeout=150, port=port,
                                     init_kwargs={"timeout": 30, "topology": str(path)})
    finally:
        _stop(procs)
    want = np.arange(300007, dtype=np.float32) * np.float32(10)
    for x, sent in results:
        assert x.tobytes() == want.tobytes() and sent >= x.nbytes
