"""A member the coordinator removed while it lives learns it at its next heartbeat and stops
waiting: its call raises the eviction in about a second, whatever it waits in.

A chaos run (seed 329) had a member declared dead while it was building the mesh of an epoch the
others had already left (their listeners refused its hello); nothing told it, so it waited until
the group finished, then succeeded the coordinator alone from its old epoch and ran a step the
others had run without it: two results for one step. It now aborts its wait at the heartbeat
reply that says it was removed, and a removed member never succeeds a coordinator.
"""
import os
import time

import numpy as np
import pytest

import pycoll
from elastic_util import Cluster


def _idle_then_train(comm, go):
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:  # idle: the victim's call waits for us
        time.sleep(0.05)
    x = np.full(16, 1.0)
    comm.all_reduce(x, retry=True)
    comm.update_topology()
    y = np.full(16, 1.0)
    comm.all_reduce(y, retry=True)
    return comm.world_size, float(y[0])


def _victim(comm):
    x = np.full(16, 1.0)
    t0 = time.monotonic()
    try:
        comm.all_reduce(x, retry=True)
    except pycoll.CollectiveError as exc:
        return type(exc).__name__, getattr(exc, "evicted", False), str(exc), time.monotonic() - t0
    return "returned", False, "", time.monotonic() - t0


@pytest.mark.timeout(120)
def test_a_member_removed_while_alive_stops_waiting_and_raises_the_eviction(tmp_path):
    go = str(tmp_path / "go")
    with Cluster(min_world_size=3, heartbeat_timeout=3.0) as c:
        c.spawn("a", _idle_then_train, go)
        c.spawn("b", _idle_then_train, go)
        c.spawn("v", _victim)
        deadline = time.monotonic() + 60
        while c.coordinator.epoch < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.0)  # v is in its all_reduce, waiting for a and b
        # The coordinator counts v dead while it lives (as after a connection of its closed):
        # its heartbeats are then answered "removed".
        c.coordinator.members["v"].hb_timeout = 1e-3
        kind, evicted, text, seconds = c.results(["v"], timeout=60)[0]
        open(go, "w").close()
        rest = c.results(["a", "b"], timeout=60)
    assert kind == "CoordinatorError" and evicted and "removed" in text, (kind, text)
    assert seconds < 1.0 + 5.0, f"the removed member waited {seconds:.1f} s"
    assert rest == [(2, 2.0), (2, 2.0)]
