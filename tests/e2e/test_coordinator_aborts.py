"""An epoch's abort reaches every member, even one the coordinator could not reach when it aborted.

The coordinator pushes an abort on each member's heartbeat connection, which it learns from the
member's first heartbeat. A member that re-registered with a successor moments before the abort
(its first heartbeat not in yet) missed the push and waited in its collective until the call's
timeout, while the others waited for it at the sync point: a 60 s step in a chaos run (seed 202).
"""
import concurrent.futures as cf
import threading
import time

import pytest

from pycoll.control.client import CoordinatorClient
from pycoll.control.coordinator import PROTOCOL, Coordinator


def _wait(cond, limit):
    deadline = time.monotonic() + limit
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


@pytest.mark.timeout(60)
def test_a_member_heard_only_after_the_abort_is_told_at_its_first_heartbeat():
    coord = Coordinator("127.0.0.1", 0, min_world_size=3, heartbeat_timeout=3.0).start()
    clients = [CoordinatorClient("127.0.0.1", coord.port, heartbeat_timeout=3.0) for _ in range(3)]
    aborts = {c.name: [] for c in clients}
    lock = threading.Lock()
    try:
        for i, c in enumerate(clients):
            c.on_abort = lambda msg, name=c.name: (lock.acquire(), aborts[name].append(msg), lock.release())
            c.request({"t": "join", "proto": PROTOCOL, "addr": ["127.0.0.1", 1001 + i]}, timeout=10)
        reporter, other, late = clients
        for c in (reporter, other):  # `late` has not sent its first heartbeat yet
            c.start_heartbeats()
        with cf.ThreadPoolExecutor(3) as ex:
            list(ex.map(lambda c: c.request({"t": "sync", "epoch": 0, "rebuild": True}, timeout=10), clients))
        assert coord.epoch == 1 and coord.members[late.name].hb_ident is None
        reporter.request({"t": "fail", "epoch": 1, "seq": 0, "why": "a peer's connection closed", "status": 4},
                         timeout=10)
        assert _wait(lambda: aborts[other.name], 5), "the member the coordinator could reach was not told"
        assert not aborts[late.name]
        late.start_heartbeats()
        assert _wait(lambda: aborts[late.name], 3), "the member heard after the abort was never told"
        assert aborts[late.name][0]["epoch"] == 1
    finally:
        for c in clients:
            c.close()
        coord.stop()


@pytest.mark.timeout(60)
def test_moving_to_a_successor_does_not_wait_for_a_request_to_the_lost_coordinator():
    """A request in flight to a coordinator that will never answer (it died after taking it) holds
    the client's lock; moving to the successor waited for that request's timeout (3 s for a
    failure report: a chaos run's re-registration came 2.8 s late). It now gives up at once."""
    import zmq
    silent = zmq.Context.instance().socket(zmq.ROUTER)  # takes requests, never answers
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    client = CoordinatorClient("127.0.0.1", port, heartbeat_timeout=30.0)
    outcome = {}

    def waiting_request():
        t0 = time.monotonic()
        try:
            client.request({"t": "fail", "epoch": 3, "why": "x"}, timeout=20)
            outcome["result"] = "answered"
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcome["result"] = str(exc)
        outcome["seconds"] = time.monotonic() - t0

    try:
        t = threading.Thread(target=waiting_request)
        t.start()
        assert silent.poll(5000), "the request never reached the coordinator"
        t0 = time.monotonic()
        client.retarget("127.0.0.1", port + 1)
        moved = time.monotonic() - t0
        t.join(10)
        assert "re-registers with its successor" in outcome["result"], outcome
        assert moved < 1.0 and outcome["seconds"] < 5.0, (moved, outcome)
        assert client.needs_rejoin and client.endpoint == f"127.0.0.1:{port + 1}"
    finally:
        client.close()
        silent.close()


@pytest.mark.timeout(60)
def test_a_join_request_to_an_elected_successor_that_died_gives_up_in_ms():
    """A dying process's data listener may still accept the election's probe; the join request
    to it then waited its whole 2 s. The wait now watches the successor's listener."""
    import zmq
    from pycoll.comm.epoch import _Watch
    from pycoll.net.mesh import Listener, reserve_port
    silent = zmq.Context.instance().socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    client = CoordinatorClient("127.0.0.1", port, heartbeat_timeout=30.0)
    gone = reserve_port("127.0.0.1")  # bound, not listening: refuses, as a dead peer's port does
    alive = Listener()
    try:
        t0 = time.monotonic()
        with pytest.raises(Exception, match="it is gone"):
            client.request({"t": "join"}, timeout=10, give_up=_Watch(gone.getsockname()).gone)
        assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        with pytest.raises(Exception, match="no answer"):
            client.request({"t": "join"}, timeout=1.0, give_up=_Watch(alive.addr).gone)
        assert time.monotonic() - t0 >= 1.0  # a live successor is waited for
    finally:
        client.close()
        silent.close()
        gone.close()
        alive.close()
